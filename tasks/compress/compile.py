"""The compile recipe: the model compiled ahead of time with Inductor (AOTInductor) for the card it is built on, as
the executor runs it (fp16 channels_last on CUDA, fp32 on the CPU, batch norms folded, one batch shape), checked
against the eager model on the parent's test split before it is stored."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tasks.classify.infer import fold_batch_norms
from tasks.compress.apply import Candidate, CompressContext, module_dtype, recipe_handler, sample_images
from tasks.compress.export import ParityError
from tasks.compress.measure import count_flops, count_parameters, estimate_memory
from tasks.compress.recipes import CompileConfig
from tasks.models.compiled import CompiledModel, here, probe_package
from tasks.models.entry import WeightsFormat


def compile_package(module: torch.nn.Module, input_shape: tuple[int, ...], device, batch_size: int,
                    directory: Path) -> tuple[Path, torch.nn.Module, dict[str, Any]]:
    """Export the module as the executor runs it on `device` and compile it into `directory`/model.pt2.
    Returns the package, the eager module it was compiled from (on the device, for the parity check) and the
    record of what it was compiled for."""
    from torch._inductor import aoti_compile_and_package

    module = fold_batch_norms(module.float().cpu().eval(), input_shape, "the model to compile")
    dtype = torch.float16 if device.is_cuda else torch.float32
    layout = torch.channels_last if device.is_cuda else torch.contiguous_format
    module = module.to(device.torch_device, dtype).to(memory_format=layout).eval()
    example = torch.randn((batch_size, *input_shape), generator=torch.Generator().manual_seed(0))
    example = example.to(device.torch_device, dtype).contiguous(memory_format=layout)
    with torch.no_grad():
        program = torch.export.export(module, (example,))
    package = aoti_compile_and_package(program, package_path=str(directory / "model.pt2"))
    record = {**here(device), "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
              "memory_format": "channels_last" if device.is_cuda else "contiguous"}
    if device.is_cuda:
        record["gpu"] = torch.cuda.get_device_name(device.torch_device)
    return Path(package), module, record


def check_compiled(reference: torch.nn.Module, compiled: CompiledModel, images: torch.Tensor,
                   cfg: CompileConfig) -> dict[str, Any]:
    """Both on the same images, as the executor feeds them; ParityError when they disagree beyond the config."""
    x = images.to(compiled.device.torch_device, compiled.dtype).contiguous(memory_format=compiled.memory_format)
    with torch.inference_mode():
        expected = torch.cat([reference(x[i : i + compiled.batch_size]).float()
                              for i in range(0, len(x), compiled.batch_size)])
        actual = compiled(x).float()
    if actual.shape != expected.shape:
        raise ParityError(f"the compiled model's output shape {tuple(actual.shape)} is not the eager model's "
                          f"{tuple(expected.shape)}")
    agreement = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
    rel = ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    report = {"images": len(images), "top1_agreement": agreement, "rel_diff": rel,
              "max_abs_diff": (actual - expected).abs().max().item()}
    if agreement < cfg.min_agreement or not rel <= cfg.max_rel_diff:
        raise ParityError(f"the compiled model fails parity with the eager model on {len(images)} images: top-1 "
                          f"agreement {agreement:.4f} (needs >= {cfg.min_agreement}), relative difference {rel:.3g} "
                          f"(needs <= {cfg.max_rel_diff:g}); not stored")
    return report


@recipe_handler(CompileConfig)
def compile_model(candidate: Candidate, cfg: CompileConfig, ctx: CompressContext) -> dict[str, Any]:
    from torch._inductor import aoti_load_package

    pre = ctx.entry.preprocessing
    batch_size = cfg.batch_size or ctx.batch_size
    source = candidate.module.float().cpu().eval()
    described = {"parameters": count_parameters(source), "flops": count_flops(source, pre.input_shape),
                 "memory_estimate": estimate_memory(source, pre, batch_size, on_cuda=True)}  # as the parent's
    images = sample_images(ctx.split("test"), cfg.parity_images, ctx)
    with tempfile.TemporaryDirectory(prefix="a2k-compile-") as tmp:
        t0 = time.perf_counter()
        package, reference, record = compile_package(source, pre.input_shape, ctx.device, batch_size, Path(tmp))
        seconds = time.perf_counter() - t0
        probe_package(package, ctx.device)  # a loader that crashes fails the recipe, not the whole process
        runner = aoti_load_package(str(package))
        compiled = CompiledModel(runner, batch_size, module_dtype(reference), ctx.device.is_cuda, ctx.device)
        parity = check_compiled(reference, compiled, images, cfg)
        candidate.package = package.read_bytes()
    candidate.compiled = {**record, **described}
    candidate.storage = WeightsFormat.AOTI_PACKAGE
    return {"compiled_for": record, "compile_seconds": round(seconds, 1), "parity": parity,
            "package_bytes": len(candidate.package), **described}

