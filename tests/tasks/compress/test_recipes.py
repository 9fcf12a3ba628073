"""Compression recipes as plain functions, on a seed-cnn really trained on the demo digits."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tasks.compress.apply import CompressContext, recorded_splits
from tasks.compress.recipes import (
    Bf16Config, ExportConfig, Fp16Config, Int8StaticConfig, PruneConfig, Sparse24Config, check_supported,
    check_target, parse_chain, parse_recipe,
)
from tasks.models.entry import load_model, read_entry
from tasks.models.registry import fetch_model, get_model
from tasks.targets import get_target


@functools.lru_cache(maxsize=1)
def _trained_registry(digits_dir: str) -> Path:
    """seed-cnn trained for 2 epochs on the digits, registered as models:/digits/1 (once per test process)."""
    from flows.train_model import train_model

    root = Path(tempfile.mkdtemp(prefix="a2k-compress-parent-")) / "registry"
    train_model(dataset=digits_dir, name="digits", epochs=2, flip_probability=0.0, device="cpu", registry=str(root))
    return root


@pytest.fixture
def trained_registry(digits_dir, tmp_path) -> str:
    """A private copy of the trained registry, so each test registers its own children."""
    copy = tmp_path / "registry"
    shutil.copytree(_trained_registry(str(digits_dir)), copy)
    return str(copy)


def _context(registry: str, device: str = "cpu") -> CompressContext:
    from tasks.devices import resolve_device

    info = get_model("models:/digits/1", registry)
    parent = fetch_model(info, registry)
    return CompressContext(parent, read_entry(parent), resolve_device(device), 64, recorded_splits(info, registry))


# --- recipe strings and chains ---------------------------------------------------------------------------------------

def test_recipe_strings_parse_to_configs_that_round_trip_through_dicts():
    from tasks.compress.recipes import recipe_from_dict

    chain = parse_chain(["prune:0.3,epochs=1,distill=true", "sparse-2:4", "fp16"])
    assert chain[0] == PruneConfig(ratio=0.3, epochs=1, distill=True)
    assert [c.name for c in chain] == ["prune", "sparse-2:4", "fp16"]
    assert parse_recipe("int8-static:64") == Int8StaticConfig(calibration_images=64)
    assert parse_recipe("export:8,max_abs_diff=0.01,onnx=false") == ExportConfig(8, 0.01, 1.0, False)
    for cfg in chain + [parse_recipe("int8-static:64"), parse_recipe("export")]:
        assert recipe_from_dict(cfg.to_dict()) == cfg
    assert chain[0].to_dict()["recipe"] == "prune"


@pytest.mark.parametrize("text, message", [
    ("int9", "recipe 'int9' is not known; allowed: distill:ARCH"),
    ("prune:1.5", "prune ratio 1.5 must be between 0 and 1"),
    ("prune:abc", "value 'abc' in recipe 'prune:abc' is not a float"),
    ("fp16:2", "recipe 'fp16' takes no value"),
    ("sparse-2:8", "recipe 'sparse-2:8' is not known"),
    ("prune:0.3,speed=9", "option 'speed=9' of recipe 'prune' is not KEY=VALUE with KEY one of: ratio, epochs"),
    ("int8-static:0", "calibration_images 0 must be 1 to 100000"),
])
def test_bad_recipe_strings_are_refused_naming_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_recipe(text)


@pytest.mark.parametrize("chain, message", [
    ([], "give at least one recipe"),
    (["fp16", "prune:0.3"], "'prune' cannot follow 'fp16'; chains go in this order: distill -> prune"),
    (["export", "compile"], "already stores a torch.export program; 'compile' cannot follow it"),
    (["compile", "distill:tiny-cnn"], "'distill' cannot follow 'compile'"),
    (["fp16", "int8-weights"], "each set how weights are stored; choose one"),
    (["export", "fp16"], "'fp16' cannot follow 'export'"),
    (["int8-static", "export"], "already stores a torch.export program"),
    (["fp16", "fp16"], "repeats a recipe"),
])
def test_bad_chains_are_refused(chain, message):
    with pytest.raises(ValueError, match=message):
        parse_chain(chain)


def test_bf16_and_sparse_are_refused_where_unsupported_and_targets_are_data():
    a2000 = get_target("a2000")
    assert (a2000.compute_capability, a2000.memory_gib, a2000.hw_jpeg_decoder) == (8.6, 6, False)
    check_target(parse_chain(["sparse-2:4", "bf16"]), a2000)  # Ampere takes both
    with pytest.raises(ValueError, match="'bf16' needs compute capability 8.0 or newer.*target 't4' has 7.5"):
        check_target([Bf16Config()], get_target("t4"))
    with pytest.raises(ValueError, match="'sparse-2:4' needs compute capability 8.0.*7.5"):
        check_target([Sparse24Config()], get_target("t4"))
    with pytest.raises(ValueError, match="'sparse-2:4' runs on cuda only; device cpu is cpu"):
        check_supported([Sparse24Config()], "cpu", None, "device cpu")
    with pytest.raises(ValueError, match="'int8-static' runs on cpu only; target 'a2000' is cuda"):
        check_target([Int8StaticConfig()], a2000)
    check_supported([Bf16Config(), Fp16Config()], "cpu", None, "device cpu")  # on the CPU bf16 is storage rounding
    with pytest.raises(ValueError, match="target 'a3000' is not known; available: a2000, a2000-12gb"):
        get_target("a3000")


def test_the_sparse_handler_itself_refuses_a_cpu_device(trained_registry):
    from tasks.compress.apply import Candidate
    from tasks.compress.prune import sparsify_2_4

    ctx = _context(trained_registry)
    with pytest.raises(ValueError, match="sparse-2:4 needs an Ampere or newer CUDA card.*the device is cpu"):
        sparsify_2_4(Candidate(load_model(ctx.parent_dir)[1]), Sparse24Config(), ctx)


# --- the recipes on the trained model --------------------------------------------------------------------------------

def test_int8_weights_are_stored_4x_smaller_and_dequantized_at_load(trained_registry, tmp_path):
    from tasks.compress.recipes import Int8WeightsConfig
    from tasks.compress.apply import compress
    from tasks.models.entry import WeightsFormat

    ctx = _context(trained_registry)
    child, steps = compress(ctx.parent_dir, [Int8WeightsConfig()], tmp_path / "child", ctx, {"parent": "p"})
    assert child.weights_format is WeightsFormat.INT8_WEIGHTS and steps[0]["quantized_layers"] == 5
    assert child.weights_bytes < ctx.entry.weights_bytes / 3.5
    _, parent = load_model(ctx.parent_dir)
    _, loaded = load_model(tmp_path / "child")
    for (name, p), (_, c) in zip(parent.named_parameters(), loaded.named_parameters()):
        assert c.dtype == torch.float32
        if p.dim() >= 2:  # within half a quantization step of the original, per output channel
            step = p.detach().abs().flatten(1).amax(1) / 127
            assert ((c - p).abs().flatten(1).amax(1) <= step / 2 + 1e-7).all(), name
        else:
            assert torch.equal(c, p), name
    x = torch.randn(16, 3, 32, 32)
    assert (loaded(x).argmax(1) == parent(x).argmax(1)).float().mean() >= 0.9


def test_int8_static_quantizes_every_conv_and_linear_and_a_no_op_fails_loudly(trained_registry):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    from tasks.compress.apply import sample_images
    from tasks.compress.quant import quantize_static

    ctx = _context(trained_registry)
    images = sample_images(ctx.split("train"), 32, ctx)
    assert images.shape == (32, 3, 32, 32)
    _, model = load_model(ctx.parent_dir)
    program, report = quantize_static(model, images, 16)
    assert report["quantized_layers"] == report["layers"] == 5 and report["calibration_images"] == 32
    int8 = [t for t in program.state_dict.values() if t.dtype == torch.int8]
    assert sum(t.numel() for t in int8) == sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert not any(t.dtype == torch.float32 and t.dim() >= 2 for t in program.state_dict.values())  # no fp32 copies
    agree = (program.module()(images).argmax(1) == model(images).argmax(1)).float().mean()
    assert agree >= 0.9
    with pytest.raises(RuntimeError, match="int8-static quantized none of the 5 conv/linear layers"):
        quantize_static(model, images, 16, quantizer=xiq.X86InductorQuantizer())  # a quantizer with no config


def test_a_broken_export_is_caught_by_the_parity_check(trained_registry):
    from tasks.compress.apply import sample_images
    from tasks.compress.export import (ParityError, check_parity, export_onnx, export_program, onnx_runner,
                                       roundtrip)

    ctx = _context(trained_registry)
    images = sample_images(ctx.split("test"), 16, ctx)
    _, model = load_model(ctx.parent_dir)
    program = roundtrip(export_program(model, ctx.entry.preprocessing))
    report = check_parity(model, program.module(), images, 1e-4, 1.0, "program")
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] <= 1e-4
    broken = program.module()
    with torch.no_grad():
        broken.get_parameter("classifier.3.bias").add_(torch.linspace(-5, 5, 10))  # a mis-exported head
    with pytest.raises(ParityError, match="program fails parity with the eager model on 16 images"):
        check_parity(model, broken, images, 1e-4, 1.0, "program")

    onnx_ok = onnx_runner(export_onnx(model, ctx.entry.preprocessing))
    assert check_parity(model, onnx_ok, images, 1e-3, 1.0, "ONNX")["top1_agreement"] == 1.0
    _, other = load_model(ctx.parent_dir)
    with torch.no_grad():
        other.features[0].weight.mul_(-1)  # an ONNX file of the wrong weights
    with pytest.raises(ParityError, match="ONNX fails parity"):
        check_parity(model, onnx_runner(export_onnx(other, ctx.entry.preprocessing)), images, 1e-3, 1.0, "ONNX")


def test_pruning_removes_real_parameters_and_flops(trained_registry):
    from tasks.compress.measure import count_flops, count_parameters
    from tasks.compress.prune import prune_channels

    ctx = _context(trained_registry)
    _, model = load_model(ctx.parent_dir)
    before = (count_parameters(model), count_flops(model, (3, 32, 32)))
    report = prune_channels(model, 0.3, (3, 32, 32), 10)
    assert (report["parameters_before"], report["flops_before"]) == before == (356_810, 21_170_688)
    assert report["parameters_after"] == count_parameters(model) < 0.6 * before[0]
    assert report["flops_after"] == count_flops(model, (3, 32, 32)) < 0.6 * before[1]
    assert [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)] == [22, 44, 89]
    assert model.classifier[-1].out_features == 10 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    _, rounded = load_model(ctx.parent_dir)
    prune_channels(rounded, 0.3, (3, 32, 32), 10, round_to=8)  # the recipe's default: tensor-core friendly
    assert [m.out_channels for m in rounded.features if isinstance(m, torch.nn.Conv2d)] == [16, 40, 88]  # rounded down


def test_memory_estimate_and_the_a2000_budget():
    from tasks.compress.measure import CUDA_CONTEXT_BYTES, check_fits, decide, estimate_memory
    from tasks.models.entry import build_model, default_preprocessing

    a2000 = get_target("a2000")
    pre = default_preprocessing("resnet50")
    resnet = build_model("resnet50", 1000, pre)
    small = estimate_memory(resnet, pre, 64)
    tensors = list(resnet.parameters()) + list(resnet.buffers())
    assert small["weights"] == sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors)
    # at least 3 x the 64 x 112 x 112 stem output of each image (fp16), and linear in the batch
    assert small["activations"] >= 3 * 64 * 112 * 112 * 2 * 64
    assert estimate_memory(resnet, pre, 128)["activations"] == 2 * small["activations"]
    assert small["total"] == small["weights"] + small["activations"] + small["inputs"] + CUDA_CONTEXT_BYTES
    assert check_fits(small, None, a2000, 64) == ""
    big = estimate_memory(resnet, pre, 4096)
    assert "target a2000 has 6 GiB" in check_fits(big, None, a2000, 4096)
    assert check_fits(small, 7 * 2**30, a2000, 64)  # a measured peak over the budget counts too
    assert decide(0.95, 0.945, 1.0).passed and not decide(0.95, 0.93, 1.0).passed
    assert "dropped 2.00 points" in decide(0.95, 0.93, 1.0).reason
    assert "does not fit" in decide(0.95, 0.95, 1.0, "needs 9 GiB").reason
    fast, slow = decide(0.95, 0.945, 1.0, "", 1.6, 1.2, "on 8 SMs"), decide(0.95, 0.95, 1.0, "", 1.1, 1.2, "on 8 SMs")
    assert fast.passed and fast.reason == "top-1 drop 0.50 points is within 1, x1.60 the parent's images/s on 8 SMs"
    assert not slow.passed and slow.reason.startswith("not fast enough: x1.10 the parent's images/s on 8 SMs; needs "
                                                      "at least x1.2")
    assert not decide(0.95, 0.90, 1.0, "", 3.0, 1.2).passed  # fast but inaccurate
    assert decide(0.95, 0.95, 1.0, "", 0.5, 0.0).passed  # 0: speed not required
