"""Measure a parent and its compressed child the same way (size, parameters, FLOPs, speed, memory), the memory
budget of a target card, and the accuracy gate."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tasks.devices import Device
from tasks.models.entry import load_model
from tasks.images.preprocess import Preprocessing
from tasks.compress.targets import TargetProfile

CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context, cuDNN/cuBLAS workspaces and DALI's pools: a fixed allowance
MIB = 2**20


def count_parameters(module: nn.Module) -> int:
    """Weights the model holds: its parameters, plus the int8 weight constants of a quantized program."""
    named = dict(module.named_parameters())
    named |= {n: b for n, b in module.named_buffers() if b.dtype == torch.int8}
    return sum(t.numel() for t in named.values())


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one image's forward pass (torch's FlopCounterMode: matmuls and convolutions),
    counted on a float32 CPU copy. An int8 program counts the same convolutions: int8 changes the precision, not
    the number of operations."""
    from torch.utils.flop_counter import FlopCounterMode

    module = copy.deepcopy(module).cpu().float()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(torch.zeros((1, *input_shape)))
    return int(counter.get_total_flops())


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t._base is None:  # a view (e.g. a transposed weight) holds no memory
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def estimate_memory(module: nn.Module, pre: Preprocessing, batch_size: int, on_cuda: bool = True) -> dict[str, int]:
    """GPU memory the classify path needs at `batch_size`, computed (no GPU needed):

    weights at the execution dtype (fp16 on CUDA, as the classify path runs; int8 constants stay 1 byte)
    + activations: 3 x the largest single op output of one image (an op's input, its output and one
      residual branch alive at once), times the batch, at the execution dtype
    + the decoded input batch (C x crop x crop) + CUDA_CONTEXT_BYTES for the context, workspaces and DALI.
    """
    cpu = copy.deepcopy(module).cpu().float()
    meter = _LargestOutput()
    with meter, torch.no_grad():
        cpu(torch.zeros((1, *pre.input_shape)))
    scale = 0.5 if on_cuda else 1.0  # fp32 measured, fp16 run on CUDA
    tensors = list(cpu.parameters()) + list(cpu.buffers())
    weights = sum(int(t.numel() * t.element_size() * (scale if t.is_floating_point() else 1)) for t in tensors)
    activations = int(3 * meter.largest * scale * batch_size)
    inputs = int(batch_size * pre.channels * pre.crop * pre.crop * 4 * scale)
    total = weights + activations + inputs + (CUDA_CONTEXT_BYTES if on_cuda else 0)
    return {"weights": weights, "activations": activations, "inputs": inputs,
            "context": CUDA_CONTEXT_BYTES if on_cuda else 0, "total": total}


def check_fits(estimate: dict[str, int], measured_peak: int | None, target: TargetProfile, batch_size: int) -> str:
    """'' when the child fits the target's memory at `batch_size`, else why not. The larger of the computed
    estimate and the measured peak (+ the context allowance, when measured on a GPU) is what counts."""
    need = max(estimate["total"], (measured_peak + CUDA_CONTEXT_BYTES) if measured_peak else 0)
    if need <= target.memory_bytes:
        return ""
    return (f"needs about {need / MIB:.0f} MiB at batch size {batch_size} (weights {estimate['weights'] / MIB:.0f}, "
            f"activations {estimate['activations'] / MIB:.0f} MiB); target {target.name} has {target.memory_gib:g} GiB")


def measure_model(model_dir: str, device: Device, batch_size: int, min_seconds: float = 0.5) -> dict[str, Any]:
    """Size on disk, parameters, FLOPs, and model images/s + peak GPU memory through the classify path's
    Classifier (fp16 channels_last on CUDA, fp32 on CPU) on a synthetic batch of `batch_size` images."""
    from tasks.classify.infer import Classifier

    entry, module = load_model(model_dir)
    pre = entry.preprocessing
    result: dict[str, Any] = {"weights_bytes": entry.weights_bytes, "parameters": count_parameters(module),
                              "flops": count_flops(module, pre.input_shape)}
    del module
    if device.is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device.torch_device)
    classifier = Classifier(model_dir, device)
    x = torch.rand((batch_size, *pre.input_shape), device=device.torch_device)
    classifier.top_k(x, 5)  # warm-up: kernels chosen, memory pools grown
    runs, t0 = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < min_seconds:
        classifier.top_k(x, 5)  # ends with a copy to the host, so the GPU work is finished when it returns
        runs += 1
    result["images_per_second"] = runs * batch_size / (time.perf_counter() - t0)
    result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device.torch_device) if device.is_cuda else None
    result["device"] = str(device)
    return result


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    accuracy_drop_points: float
    reason: str


def decide(parent_top1: float, child_top1: float, max_accuracy_drop: float, memory_problem: str = "") -> GateDecision:
    """Pass when the top-1 drop (in percentage points) is at most `max_accuracy_drop` and the memory fits."""
    drop = (parent_top1 - child_top1) * 100
    if drop > max_accuracy_drop:
        return GateDecision(False, drop, f"top-1 accuracy dropped {drop:.2f} points ({parent_top1:.4f} -> "
                                         f"{child_top1:.4f}); allowed: at most {max_accuracy_drop:g}")
    if memory_problem:
        return GateDecision(False, drop, f"does not fit the target: {memory_problem}")
    return GateDecision(True, drop, f"top-1 drop {drop:.2f} points is within {max_accuracy_drop:g}")


_ROWS = (("top-1 accuracy", "top1", "{:.4f}"), ("top-5 accuracy", "top5", "{:.4f}"),
         ("size on disk (MB)", "weights_bytes", "{:.3f}"), ("parameters", "parameters", "{:,}"),
         ("GFLOPs / image", "flops", "{:.4f}"), ("model images/s", "images_per_second", "{:.0f}"),
         ("pipeline images/s", "pipeline_images_per_second", "{:.0f}"),
         ("peak GPU memory (MiB)", "peak_gpu_memory_bytes", "{:.0f}"),
         ("memory estimate (MiB)", "memory_estimate_bytes", "{:.0f}"))
_UNITS = {"weights_bytes": 1e6, "flops": 1e9, "peak_gpu_memory_bytes": MIB, "memory_estimate_bytes": MIB}


def comparison_rows(parent: dict[str, Any], child: dict[str, Any]) -> list[dict[str, str]]:
    """Parent vs child, one row per measure, as text (n/a where a measure does not apply, e.g. GPU memory on CPU)."""
    rows = []
    for label, key, fmt in _ROWS:
        p, c = parent.get(key), child.get(key)
        unit = _UNITS.get(key, 1)
        text = [fmt.format(v / unit) if isinstance(v, (int, float)) and unit != 1 else
                fmt.format(v) if isinstance(v, (int, float)) else "n/a" for v in (p, c)]
        ratio = f"x{c / p:.3f}" if isinstance(p, (int, float)) and isinstance(c, (int, float)) and p else ""
        if key in ("top1", "top5") and isinstance(p, float) and isinstance(c, float):
            ratio = f"{(c - p) * 100:+.2f} pts"
        rows.append({"measure": label, "parent": text[0], "child": text[1], "change": ratio})
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    lines = ["  ".join(k.ljust(widths[k]) for k in widths)]
    lines += ["  ".join(r[k].ljust(widths[k]) for k in widths) for r in rows]
    return "\n".join(lines)
