"""Target profiles: the cards a compressed model is meant to run on, as data (add one with a row, not code)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class TargetProfile:
    """What a compression recipe and a memory budget need to know about a card."""

    name: str
    description: str
    device: str  # "cuda" (a GPU runs the model) or "cpu"
    compute_capability: float | None  # None on a CPU target
    memory_gib: float
    hw_jpeg_decoder: bool  # a hardware JPEG decoder that DALI's mixed decoding can use

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"target {self.name!r}: device {self.device!r} is not one of: cuda, cpu")
        if (self.device == "cuda") != (self.compute_capability is not None):
            raise ValueError(f"target {self.name!r}: a cuda target needs a compute capability, a cpu target none")
        if not self.memory_gib > 0:
            raise ValueError(f"target {self.name!r}: memory_gib {self.memory_gib!r} must be positive")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "device": self.device,
                "compute_capability": self.compute_capability, "memory_gib": self.memory_gib,
                "hw_jpeg_decoder": self.hw_jpeg_decoder}


TARGETS: dict[str, TargetProfile] = {t.name: t for t in (
    TargetProfile("a2000", "NVIDIA RTX A2000 6 GB (Ampere GA106, no hardware JPEG decoder)", "cuda", 8.6, 6, False),
    TargetProfile("a2000-12gb", "NVIDIA RTX A2000 12 GB (Ampere GA106, no hardware JPEG decoder)", "cuda", 8.6, 12,
                  False),
    TargetProfile("t4", "NVIDIA T4 16 GB (Turing: no bf16, no 2:4 sparse tensor cores)", "cuda", 7.5, 16, False),
    TargetProfile("h100", "NVIDIA H100 80 GB (Hopper, hardware JPEG decoder)", "cuda", 9.0, 80, True),
    TargetProfile("x86-cpu", "an x86 server CPU with 16 GiB for the model", "cpu", None, 16, False),
)}


def get_target(name: str) -> TargetProfile:
    if name not in TARGETS:
        raise ValueError(f"target {name!r} is not known; available: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]
