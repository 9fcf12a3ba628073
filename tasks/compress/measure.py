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
from tasks.targets import TargetProfile

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


def model_facts(model_dir: str, batch_size: int, on_cuda: bool) -> dict[str, Any]:
    """Size on disk, parameters, FLOPs per image and the computed memory estimate at `batch_size` (no GPU needed).
    A compiled model's come from its compile record: they were counted on the module it was compiled from."""
    from tasks.models.compiled import compiled_record
    from tasks.models.entry import WeightsFormat, read_entry

    entry = read_entry(model_dir)
    facts: dict[str, Any] = {"weights_bytes": entry.weights_bytes}
    if entry.weights_format is WeightsFormat.AOTI_PACKAGE:
        record = compiled_record(entry)
        estimate = record.get("memory_estimate") or {"total": 0}
        return {**facts, "parameters": record.get("parameters"), "flops": record.get("flops"),
                "memory_estimate": estimate, "memory_estimate_bytes": estimate["total"]}
    _, module = load_model(model_dir)
    estimate = estimate_memory(module, entry.preprocessing, batch_size, on_cuda=on_cuda)
    return {**facts, "parameters": count_parameters(module),
            "flops": count_flops(module, entry.preprocessing.input_shape),
            "memory_estimate": estimate, "memory_estimate_bytes": estimate["total"]}


def measure_speeds(model_dirs: dict[str, str], device: Device, batch_size: int, model_sms: int | None = None,
                   rounds: int = 3, min_seconds: float = 0.5) -> dict[str, dict[str, Any]]:
    """Images/s of each model through the executor as a classify run drives it (`Classifier.top_k`: fp16
    channels_last and a CUDA graph on CUDA, on `model_sms` SMs when given; fp32 on the CPU), on a random batch of
    `batch_size` images on the device. The models take turns, `rounds` times, each for at least `min_seconds` a
    turn, and each gets its median: a slow spell of the machine falls on both. Peak GPU memory per model."""
    from tasks.classify.infer import Classifier

    classifiers: dict[str, Classifier] = {}
    peaks: dict[str, int | None] = {}
    for name, model_dir in model_dirs.items():
        base = 0
        if device.is_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device.torch_device)
            base = torch.cuda.memory_allocated(device.torch_device)  # the models measured before this one
        c = classifiers[name] = Classifier(model_dir, device, model_sms=model_sms)
        if device.is_cuda:
            c.capture(batch_size)
        x = torch.rand((batch_size, *c.entry.preprocessing.input_shape), device=device.torch_device)
        c.top_k(x, 5)  # warm-up: kernels chosen, memory pools grown
        peaks[name] = torch.cuda.max_memory_allocated(device.torch_device) - base if device.is_cuda else None
    rates: dict[str, list[float]] = {name: [] for name in classifiers}
    inputs = {name: torch.rand((batch_size, *c.entry.preprocessing.input_shape), device=device.torch_device)
              for name, c in classifiers.items()}
    for _ in range(rounds):
        for name, c in classifiers.items():
            runs, t0 = 0, time.perf_counter()
            while runs < 3 or time.perf_counter() - t0 < min_seconds:
                c.top_k(inputs[name], 5)  # ends with a copy to the host: the GPU work is done when it returns
                runs += 1
            rates[name].append(runs * batch_size / (time.perf_counter() - t0))
    return {name: {"images_per_second": sorted(r)[len(r) // 2], "images_per_second_runs": r,
                   "peak_gpu_memory_bytes": peaks[name], "device": str(device), "model_sms": model_sms,
                   "cuda_graph": classifiers[name].graph is not None}
            for name, r in rates.items()}


def measure_model(model_dir: str, device: Device, batch_size: int, min_seconds: float = 0.5,
                  model_sms: int | None = None) -> dict[str, Any]:
    """`model_facts` and `measure_speeds` of one model."""
    speed = measure_speeds({"model": model_dir}, device, batch_size, model_sms, rounds=1, min_seconds=min_seconds)
    return {**model_facts(model_dir, batch_size, device.is_cuda), **speed["model"]}


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    accuracy_drop_points: float
    reason: str
    speedup: float | None = None


def decide(parent_top1: float, child_top1: float, max_accuracy_drop: float, memory_problem: str = "",
           speedup: float | None = None, min_speedup: float = 0.0, where: str = "") -> GateDecision:
    """Pass when the top-1 drop (in percentage points) is at most `max_accuracy_drop`, the memory fits and the
    child is at least `min_speedup` times as fast as the parent (measured `where`)."""
    drop = (parent_top1 - child_top1) * 100
    if drop > max_accuracy_drop:
        return GateDecision(False, drop, f"top-1 accuracy dropped {drop:.2f} points ({parent_top1:.4f} -> "
                                         f"{child_top1:.4f}); allowed: at most {max_accuracy_drop:g}", speedup)
    if memory_problem:
        return GateDecision(False, drop, f"does not fit the target: {memory_problem}", speedup)
    at = f" {where}" if where else ""
    if min_speedup > 0 and (speedup is None or speedup < min_speedup):
        said = "not measured" if speedup is None else f"x{speedup:.2f} the parent's images/s{at}"
        return GateDecision(False, drop, f"not fast enough: {said}; needs at least x{min_speedup:g} "
                                         f"(top-1 drop {drop:.2f} points is within {max_accuracy_drop:g})", speedup)
    fast = f", x{speedup:.2f} the parent's images/s{at}" if speedup is not None else ""
    return GateDecision(True, drop, f"top-1 drop {drop:.2f} points is within {max_accuracy_drop:g}{fast}", speedup)


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
