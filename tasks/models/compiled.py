"""Models compiled ahead of time (AOTInductor packages): where one may run, and the callable the executor runs.

A package holds machine code for one GPU architecture (or CPU instruction set), one torch release and one batch
shape, so its entry records all three (`lineage.compiled`) and a run elsewhere is refused, naming the parent to
use instead. The package is a shared library a2k built itself at compress time; its sha256 is checked (as every
model's) before it is loaded, and importers never take one from outside.
"""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tasks.devices import Device
    from tasks.models.entry import ModelEntry

PACKAGE_FILE = "model.aoti.pt2"


def here(device: Device) -> dict[str, str]:
    """Where code would run on `device`: the GPU architecture (sm_XX) or the CPU's machine and vector ISA."""
    if device.is_cuda:
        major, minor = torch.cuda.get_device_capability(device.torch_device)
        return {"device": "cuda", "arch": f"sm_{major}{minor}", "torch": torch.__version__}
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"device": "cpu", "arch": f"{platform.machine()}-{pick_vec_isa() or 'scalar'}", "torch": torch.__version__}


def compiled_record(entry: ModelEntry) -> dict[str, Any]:
    record = entry.lineage.get("compiled")
    if not isinstance(record, dict) or not {"device", "arch", "torch", "batch_size"} <= set(record):
        raise ValueError(f"model {entry.name} v{entry.version} is an AOTInductor package without a complete "
                         "'compiled' record (device, arch, torch, batch_size) in its lineage; it cannot be checked")
    return record


def check_runs_here(entry: ModelEntry, device: Device) -> None:
    """Refuse, in one line, a compiled model on a device or torch it was not built for."""
    record, now = compiled_record(entry), here(device)
    if all(record[k] == now[k] for k in ("device", "arch", "torch")):
        return
    parent = entry.lineage.get("parent") or "its parent"
    raise ValueError(f"model {entry.name} v{entry.version} is compiled for {record['device']} {record['arch']} with "
                     f"torch {record['torch']}; this run has {device} {now['arch']} with torch {now['torch']}: "
                     f"classify with {parent} instead, or compile it again here (recipe 'compile')")


class CompiledModel:
    """An AOTInductor package as the executor calls it: any number of images in, logits out. The package runs one
    batch shape; a smaller batch is padded to it and a larger one is cut into batches of it."""

    def __init__(self, runner, batch_size: int, dtype: torch.dtype, channels_last: bool, device: Device) -> None:
        self.runner, self.batch_size, self.dtype, self.device = runner, batch_size, dtype, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        outs = []
        for i in range(0, n, self.batch_size):
            part = x[i : i + self.batch_size].to(self.device.torch_device, self.dtype)
            if len(part) < self.batch_size:
                filler = part.new_zeros((self.batch_size - len(part), *part.shape[1:]))
                part = torch.cat([part, filler])
            out = self.runner(part.contiguous(memory_format=self.memory_format))
            outs.append(out[: min(self.batch_size, n - i)])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def load_compiled(entry: ModelEntry, package: Path, device: Device | None) -> CompiledModel:
    """The package on `device` (default: the kind it was compiled for, the current card), after checking it was
    built for that device and this torch."""
    from tasks.devices import Device as _Device, resolve_device

    record = compiled_record(entry)
    if device is None:
        device = resolve_device("cuda") if record["device"] == "cuda" else _Device("cpu")
    check_runs_here(entry, device)
    from torch._inductor import aoti_load_package

    try:  # one caller thread at a time (the executor's model turn), so no locking; CUDA graphs can capture it
        runner = aoti_load_package(str(package), run_single_threaded=True,
                                   **({"device_index": device.index} if device.is_cuda else {}))
    except TypeError:  # an older torch without these options
        runner = aoti_load_package(str(package))
    dtype = getattr(torch, record.get("dtype", "float32"))
    return CompiledModel(runner, int(record["batch_size"]), dtype, record.get("memory_format") == "channels_last",
                         device)


class PackageLoadError(RuntimeError):
    """A compiled package that cannot be loaded on this machine."""


def probe_package(package: Path, device: Device, timeout: float = 300) -> None:
    """Load the package in a separate process first: a loader that crashes (seen on one machine image with torch
    2.11, where every AOTInductor package, CPU or CUDA, died in its loader with SIGSEGV) then fails the recipe with
    its reason instead of killing the run that asked."""
    index = str(device.index) if device.is_cuda else "-1"
    try:
        done = subprocess.run([sys.executable, "-m", "tasks.models.compiled", str(package), index],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PackageLoadError(f"loading the compiled package took more than {timeout:.0f} s") from None
    if done.returncode != 0:
        how = (f"was killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0 else
               f"exited {done.returncode}")
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise PackageLoadError(f"a process loading the compiled package {how} (torch {torch.__version__}): {last}")


if __name__ == "__main__":  # python -m tasks.models.compiled PACKAGE DEVICE_INDEX: load it, as probe_package asks
    from torch._inductor import aoti_load_package

    aoti_load_package(sys.argv[1], **({"device_index": int(sys.argv[2])} if int(sys.argv[2]) >= 0 else {}))
