"""Precision recipes: fp16 / bf16 casting, int8 weight storage, and post-training static int8 (PT2E, x86)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tasks.compress.apply import (
    Candidate, CompressContext, module_dtype, recipe_handler, same_architecture, sample_images,
)
from tasks.compress.recipes import Bf16Config, Fp16Config, Int8StaticConfig, Int8WeightsConfig, device_capability
from tasks.models.entry import INT8_SCALE_PREFIX, WeightsFormat

_QUANT_OPS = ("quantized_decomposed.dequantize_per_channel", "quantized_decomposed.dequantize_per_tensor")


@recipe_handler(Fp16Config)
def cast_fp16(candidate: Candidate, cfg: Fp16Config, ctx: CompressContext) -> dict[str, Any]:
    candidate.module = candidate.module.half()
    return {"dtype": "float16"}


@recipe_handler(Bf16Config)
def cast_bf16(candidate: Candidate, cfg: Bf16Config, ctx: CompressContext) -> dict[str, Any]:
    cc = device_capability(ctx.device)
    if ctx.device.is_cuda and cc is not None and cc < 8.0:
        raise ValueError(f"bf16 needs compute capability 8.0 or newer; {ctx.device} has {cc}")
    candidate.module = candidate.module.to(torch.bfloat16)
    return {"dtype": "bfloat16"}


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (dim 0): q = round(w / s), s = max|w| / 127 (1 where a channel is all 0)."""
    w = weight.detach().float()
    scale = w.abs().flatten(1).amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))), -127, 127).to(torch.int8)
    return q, scale


def _quantizable(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith("weight") and tensor.is_floating_point() and tensor.dim() >= 2  # conv and linear weights


@recipe_handler(Int8WeightsConfig)
def quantize_int8_weights(candidate: Candidate, cfg: Int8WeightsConfig, ctx: CompressContext) -> dict[str, Any]:
    """Round conv/linear weights to int8 per channel in place (so what is measured is what loads), store int8."""
    module = candidate.module.float()
    if not same_architecture(module, ctx.entry):
        raise ValueError(f"int8-weights stores the {ctx.entry.architecture} state dict, but the model's layer shapes "
                         "changed (pruned?); use int8-static or export after prune")
    layers, max_error = 0, 0.0
    with torch.no_grad():
        for name, param in module.named_parameters():
            if _quantizable(name, param):
                q, scale = quantize_per_channel(param)
                rounded = q.float() * scale.view(-1, *[1] * (q.dim() - 1))
                max_error = max(max_error, (rounded - param).abs().max().item())
                param.copy_(rounded)
                layers += 1
    if layers == 0:
        raise RuntimeError(f"int8-weights found no conv or linear weight to quantize in {ctx.entry.architecture}")
    candidate.module, candidate.storage = module, WeightsFormat.INT8_WEIGHTS
    return {"quantized_layers": layers, "max_weight_error": max_error}


def save_int8_weights(module: nn.Module, path: Path) -> int:
    """Conv/linear weights as int8 + an fp32 scale per output channel; everything else as it is. Returns bytes."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        if _quantizable(name, tensor):
            q, scale = quantize_per_channel(tensor)
            state[name], state[INT8_SCALE_PREFIX + name] = q.contiguous(), scale.contiguous()
        else:
            state[name] = tensor.float().contiguous() if tensor.is_floating_point() else tensor.contiguous()
    save_file(state, str(path))
    return path.stat().st_size


def x86_quantizer():
    """The x86 inductor quantizer with its default static config (torchao's, since torch.ao's PT2E moved there)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    return xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())


def count_quantized_layers(graph_module: torch.fx.GraphModule) -> tuple[int, int]:
    """(conv/linear nodes whose weight is dequantized from int8, all conv/linear nodes) in a converted graph."""
    quantized = total = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(("aten.conv", "aten.linear")):
            total += 1
            weight = node.args[1] if len(node.args) > 1 else None
            if isinstance(weight, torch.fx.Node) and str(weight.target).startswith(_QUANT_OPS):
                quantized += 1
    return quantized, total


def quantize_static(module: nn.Module, calibration: torch.Tensor, batch_size: int, quantizer=None):
    """PT2E: export, insert observers, calibrate, convert; fail loudly when nothing was quantized.

    Returns the re-exported program (dynamic batch) and a report."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from tasks.compress.export import batch_dim

    module = module.float().cpu().eval()
    example = calibration[:2].clone()  # a slice would carry the whole calibration set into the archive
    captured = torch.export.export(module, (example,), dynamic_shapes=({0: batch_dim()},)).module()
    prepared = prepare_pt2e(captured, quantizer if quantizer is not None else x86_quantizer())
    with torch.no_grad():
        for start in range(0, len(calibration), batch_size):
            prepared(calibration[start:start + batch_size])
    converted = convert_pt2e(prepared)
    quantized, total = count_quantized_layers(converted)
    if quantized == 0:
        raise RuntimeError(f"int8-static quantized none of the {total} conv/linear layers: the quantizer matched "
                           "nothing (a no-op int8 model would be stored as if it were compressed)")
    _drop_unused_parameters(converted)
    program = torch.export.export(converted, (example,), dynamic_shapes=({0: batch_dim()},))
    ops = Counter(str(n.target) for n in converted.graph.nodes if str(n.target).startswith("quantized_decomposed"))
    return program, {"quantized_layers": quantized, "layers": total, "calibration_images": len(calibration),
                     "quantize_ops": dict(ops)}


def _drop_unused_parameters(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e folds weights into int8 constants but keeps the fp32 originals as attributes: drop them."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.recompile()


@recipe_handler(Int8StaticConfig)
def quantize_int8_static(candidate: Candidate, cfg: Int8StaticConfig, ctx: CompressContext) -> dict[str, Any]:
    if ctx.device.is_cuda:
        raise ValueError("int8-static makes an x86 CPU program; run the compression with device cpu")
    if module_dtype(candidate.module) != torch.float32:
        raise ValueError("int8-static calibrates a float32 model; put it before any fp16/bf16 recipe")
    calibration = sample_images(ctx.split("train"), cfg.calibration_images, ctx)
    program, report = quantize_static(candidate.module, calibration, ctx.batch_size)
    candidate.program, candidate.module, candidate.storage = program, program.module(), WeightsFormat.EXPORTED_PROGRAM
    return report
