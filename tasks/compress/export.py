"""The export recipe: a torch.export program (.pt2) and ONNX, each stored only after a parity check against eager."""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import torch
from torch import nn

from tasks.compress.apply import Candidate, CompressContext, module_dtype, recipe_handler, sample_images
from tasks.compress.recipes import ExportConfig
from tasks.images.preprocess import Preprocessing
from tasks.models.entry import WeightsFormat

MAX_BATCH = 8192


class ParityError(RuntimeError):
    """An exported model does not compute what the eager model computes."""


def batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def export_program(module: nn.Module, pre: Preprocessing) -> torch.export.ExportedProgram:
    """Export with a dynamic batch dimension, in the module's own dtype."""
    example = torch.zeros((2, *pre.input_shape), dtype=module_dtype(module))
    return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch_dim()},))


def roundtrip(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Save and load the program, so the parity check runs what will be stored."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


@torch.no_grad()
def check_parity(reference: nn.Module, candidate, images: torch.Tensor, max_abs_diff: float, min_agreement: float,
                 what: str) -> dict[str, Any]:
    """Run both on the same images; raise ParityError when top-1 agreement or max |logit diff| is out of bounds.

    `candidate` is a module or any callable taking a float tensor and returning logits."""
    x = images.to(module_dtype(reference))
    expected = reference(x).float()
    actual = torch.as_tensor(candidate(x)).float()
    if actual.shape != expected.shape:
        raise ParityError(f"{what}: output shape {tuple(actual.shape)} is not the eager model's {tuple(expected.shape)}")
    agreement = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
    diff = (actual - expected).abs().max().item()
    report = {"images": len(images), "top1_agreement": agreement, "max_abs_diff": diff}
    if agreement < min_agreement or not diff <= max_abs_diff:
        raise ParityError(f"{what} fails parity with the eager model on {len(images)} images: top-1 agreement "
                          f"{agreement:.4f} (needs >= {min_agreement}), max abs diff {diff:.3g} (needs <= "
                          f"{max_abs_diff:g}); not stored")
    return report


def export_onnx(module: nn.Module, pre: Preprocessing) -> bytes:
    """The module as a self-contained ONNX file (weights inside), with a dynamic batch dimension."""
    example = torch.zeros((2, *pre.input_shape), dtype=module_dtype(module))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(module.eval(), (example,), path, dynamo=True, external_data=False,
                          dynamic_shapes=({0: batch_dim()},), verbose=False)
        with open(path, "rb") as f:
            return f.read()


def onnx_runner(data: bytes):
    """A callable running the ONNX model with onnxruntime on the CPU (None when onnxruntime is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])


@recipe_handler(ExportConfig)
def export(candidate: Candidate, cfg: ExportConfig, ctx: CompressContext) -> dict[str, Any]:
    module = candidate.module.cpu().eval()
    images = sample_images(ctx.split("test"), cfg.parity_images, ctx)
    program = roundtrip(export_program(module, ctx.entry.preprocessing))
    report: dict[str, Any] = {"program": check_parity(module, program.module(), images, cfg.max_abs_diff,
                                                      cfg.min_agreement, "the torch.export program")}
    report["onnx"] = _onnx(candidate, module, images, cfg, ctx) if cfg.onnx else "not requested"
    candidate.program, candidate.storage = program, WeightsFormat.EXPORTED_PROGRAM
    return report


def _onnx(candidate: Candidate, module: nn.Module, images: torch.Tensor, cfg: ExportConfig,
          ctx: CompressContext) -> dict[str, Any] | str:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return "skipped: the onnx package is not installed"
    try:
        data = export_onnx(module, ctx.entry.preprocessing)
    except Exception as err:  # noqa: BLE001 - "ONNX where the model exports": say why it did not, keep the .pt2
        return f"not exported: {type(err).__name__}: {str(err)[:300]}"
    runner = onnx_runner(data)
    if runner is None:
        return "exported without a parity check: onnxruntime is not installed; not stored"
    report = check_parity(module, runner, images, cfg.max_abs_diff, cfg.min_agreement, "the ONNX model")
    candidate.files["model.onnx"] = data
    return {**report, "file": "model.onnx", "bytes": len(data)}
