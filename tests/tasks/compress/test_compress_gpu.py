"""Compression on a CUDA card: fp16 and 2:4 sparsity run there, bf16 where the card takes it (run with -m gpu)."""

from __future__ import annotations

import pytest
import torch

from tasks.compress.apply import Candidate, CompressContext
from tasks.compress.recipes import Bf16Config, Sparse24Config, check_supported, device_capability
from tasks.models.entry import build_model, default_preprocessing

pytestmark = pytest.mark.gpu


def _ctx(seed_model_dir) -> CompressContext:
    from tasks.devices import resolve_device
    from tasks.models.entry import read_entry

    return CompressContext(seed_model_dir, read_entry(seed_model_dir), resolve_device("cuda"), 64, {})


def test_sparse_2_4_prunes_the_eligible_linear_and_the_sparse_kernel_matches_dense(seed_model_dir):
    from tasks.compress.prune import sparsify_2_4

    ctx = _ctx(seed_model_dir)
    cc = device_capability(ctx.device)
    model = build_model("seed-cnn", 2, default_preprocessing("seed-cnn"))
    if cc < 8.0:
        with pytest.raises(ValueError, match="sparse-2:4 needs an Ampere or newer CUDA card"):
            sparsify_2_4(Candidate(model), Sparse24Config(), ctx)
        return
    report = sparsify_2_4(candidate := Candidate(model), Sparse24Config(), ctx)
    assert [r["layer"] for r in report["sparse_layers"]] == ["classifier.1"]  # 2048 -> 128; the 2-class head is too small
    weight = candidate.module.classifier[1].weight.detach()
    assert ((weight.reshape(-1, 4) != 0).sum(1) <= 2).all()
    assert all(r["sparse_vs_dense_max_diff"] < 1e-2 for r in report["sparse_layers"])


def test_bf16_follows_the_compute_capability(seed_model_dir):
    from tasks.compress.quant import cast_bf16

    ctx = _ctx(seed_model_dir)
    cc = device_capability(ctx.device)
    model = build_model("seed-cnn", 2, default_preprocessing("seed-cnn"))
    if cc < 8.0:
        with pytest.raises(ValueError, match="bf16 needs compute capability 8.0"):
            check_supported([Bf16Config()], "cuda", cc, "device cuda")
        return
    cast_bf16(candidate := Candidate(model), Bf16Config(), ctx)
    out = candidate.module.cuda()(torch.zeros(4, 3, 32, 32, device="cuda", dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (4, 2)


def test_measure_reports_peak_gpu_memory_and_speed(seed_model_dir):
    from tasks.devices import resolve_device
    from tasks.compress.measure import measure_model

    result = measure_model(str(seed_model_dir), resolve_device("cuda"), 256, min_seconds=0.2)
    assert result["peak_gpu_memory_bytes"] > 0 and result["images_per_second"] > 0
