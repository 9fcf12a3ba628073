"""Resolve a device string (auto | cpu | cuda | cuda:N) to what torch and DALI each need.

torch is imported where the hardware is asked, not with the module: a parameter's spelling is checked without it
(the CLI refuses a bad one before torch loads)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class Device:
    """A resolved device: `torch_device` for the model, `dali_device_id` for the decoder (None on CPU)."""

    kind: str  # "cpu" or "cuda"
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda"):
            raise ValueError(f"device kind {self.kind!r} is not one of: cpu, cuda")
        if (self.kind == "cuda") != (self.index is not None):
            raise ValueError(f"device {self.kind!r} with index {self.index!r}: only cuda takes an index")

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(str(self))

    @property
    def dali_device_id(self) -> int | None:
        return self.index

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"


def available_devices() -> list[str]:
    """Every device string that `resolve_device` accepts on this machine, for error messages."""
    import torch

    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] + (
        ["cuda"] if torch.cuda.is_available() else []
    )


def check_device_spec(spec: str) -> str:
    """Check the spelling of a device string without touching the hardware (for parameter models)."""
    if not _DEVICE_PATTERN.match(spec):
        raise ValueError(f"device {spec!r} is not one of: auto, cpu, cuda, cuda:N")
    return spec


def resolve_device(spec: str = "auto") -> Device:
    """`auto` picks the current CUDA device when there is one, else the CPU; anything else must exist."""
    check_device_spec(spec)
    if spec == "cpu":
        return Device("cpu")
    import torch

    if spec == "auto":
        return Device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else Device("cpu")
    index = torch.cuda.current_device() if spec == "cuda" and torch.cuda.is_available() else int(spec.partition(":")[2] or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} not found; available: {', '.join(available_devices())}")
    return Device("cuda", index)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA allocation failure, from torch or from DALI (which raises RuntimeError with CUDA's message)."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("out of memory", "cudaerrormemoryallocation", "cuda_error_out_of_memory",
                            "nvjpeg_status_allocator_failure")
    )
