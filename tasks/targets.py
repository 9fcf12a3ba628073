"""Target profiles: the cards a model is meant to run on, as data (add one with a row, not code), and the budget a
run on a bigger card keeps to so that it runs as the target would (`--target a2000`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tasks.devices import Device

log = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class TargetProfile:
    """What a compression recipe, a memory budget and an emulated run need to know about a card."""

    name: str
    description: str
    device: str  # "cuda" (a GPU runs the model) or "cpu"
    compute_capability: float | None  # None on a CPU target
    memory_gib: float
    hw_jpeg_decoder: bool  # a hardware JPEG decoder that DALI's mixed decoding can use
    sm_count: int | None = None  # streaming multiprocessors (None on a CPU target)
    fp16_tensor_tflops: float | None = None  # dense fp16 tensor-core throughput (fp32 accumulate)
    memory_bandwidth_gbs: float | None = None
    host_cores: int = 8  # the cores of the machine such a card typically sits in (DALI's CPU threads)

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"target {self.name!r}: device {self.device!r} is not one of: cuda, cpu")
        if (self.device == "cuda") != (self.compute_capability is not None):
            raise ValueError(f"target {self.name!r}: a cuda target needs a compute capability, a cpu target none")
        if not self.memory_gib > 0:
            raise ValueError(f"target {self.name!r}: memory_gib {self.memory_gib!r} must be positive")
        if self.host_cores < 1:
            raise ValueError(f"target {self.name!r}: host_cores {self.host_cores!r} must be at least 1")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "device": self.device,
                "compute_capability": self.compute_capability, "memory_gib": self.memory_gib,
                "hw_jpeg_decoder": self.hw_jpeg_decoder, "sm_count": self.sm_count,
                "fp16_tensor_tflops": self.fp16_tensor_tflops, "memory_bandwidth_gbs": self.memory_bandwidth_gbs,
                "host_cores": self.host_cores}


TARGETS: dict[str, TargetProfile] = {t.name: t for t in (
    TargetProfile("a2000", "NVIDIA RTX A2000 6 GB (Ampere GA106, no hardware JPEG decoder)", "cuda", 8.6, 6, False,
                  sm_count=26, fp16_tensor_tflops=32, memory_bandwidth_gbs=288, host_cores=8),
    TargetProfile("a2000-12gb", "NVIDIA RTX A2000 12 GB (Ampere GA106, no hardware JPEG decoder)", "cuda", 8.6, 12,
                  False, sm_count=26, fp16_tensor_tflops=32, memory_bandwidth_gbs=288, host_cores=8),
    TargetProfile("t4", "NVIDIA T4 16 GB (Turing: no bf16, no 2:4 sparse tensor cores)", "cuda", 7.5, 16, False,
                  sm_count=40, fp16_tensor_tflops=65, memory_bandwidth_gbs=320, host_cores=8),
    TargetProfile("h100", "NVIDIA H100 80 GB (Hopper, hardware JPEG decoder)", "cuda", 9.0, 80, True,
                  sm_count=132, fp16_tensor_tflops=989, memory_bandwidth_gbs=3350, host_cores=16),
    TargetProfile("x86-cpu", "an x86 server CPU with 16 GiB for the model", "cpu", None, 16, False, host_cores=16),
)}


def get_target(name: str) -> TargetProfile:
    if name not in TARGETS:
        raise ValueError(f"target {name!r} is not known; available: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


# --- running as the target would, on a bigger card --------------------------------------------------------------------

# Dense fp16 tensor-core TFLOPS one SM gives at its boost clock, by compute capability (datasheet figures over SM
# counts: H100 SXM 989/132, A100 312/108, RTX A2000 32/26, L4 121/58, T4 65/40). Only the ratio to the target's
# throughput matters: it says how many of this card's SMs do the target's tensor work.
TFLOPS_PER_SM: dict[float, float] = {9.0: 7.5, 8.0: 2.9, 8.6: 1.23, 8.7: 1.23, 8.9: 2.1, 7.5: 1.6, 10.0: 15.2,
                                     12.0: 2.0}


def green_context_sms(wanted: int, compute_capability: float, card_sms: int) -> int:
    """The SM count a green context can take that is closest above `wanted`: CUDA splits SMs in groups (on compute
    capability 9.0 and newer at least 8 and a multiple of 8; on 8.x at least 4 and a multiple of 2; else at
    least 2, a multiple of 2), and never more than the card has."""
    least, step = (8, 8) if compute_capability >= 9.0 else (4, 2) if compute_capability >= 8.0 else (2, 2)
    return min(card_sms, max(least, math.ceil(wanted / step) * step))


@dataclass(frozen=True)
class Budget:
    """What a run keeps to: a GPU memory cap, the hardware decoder's share, DALI's threads and the SMs the model's
    stream may use (None: no limit of that kind)."""

    target: str | None = None
    gpu_memory_gb: float | None = None
    hw_decoder_load: float = 0.65
    num_threads: int | None = None
    model_sms: int | None = None
    note: str = ""
    batch_size: int | None = None  # None: the largest that fits (at most 256)
    decoder: str = ""  # where the decoder settings came from (the card's decode profile, or the fixed defaults)

    def describe(self) -> str:
        sms = f"the model on {self.model_sms} SMs" if self.model_sms else "the model on every SM"
        mem = f"{self.gpu_memory_gb:g} GiB" if self.gpu_memory_gb else "all GPU memory"
        return (f"target {self.target}: {mem}, hw_decoder_load {self.hw_decoder_load:g}, "
                f"{self.num_threads or 'all usable'} DALI threads, {sms}" + (f" ({self.note})" if self.note else ""))


def plan_budget(target: str | None, device: Device, num_threads: int | None, hw_decoder_load: float | None,
                gpu_memory_gb: float | None, batch_size: int | None = None) -> Budget:
    """The run's budget: the parameters as given, those left unset from this card's decode profile (`a2k tune`)
    or the fixed defaults, and, with a target, the target's memory, decoder, host cores and tensor throughput on
    this card (each parameter given explicitly may only be tighter than the target's)."""
    from tasks.classify.infer import MAX_AUTO_BATCH
    from tasks.images.tune import DEFAULT_LOAD, decoder_defaults

    tuned, decoder = decoder_defaults(device, num_threads, hw_decoder_load, batch_size)
    if tuned is not None:
        num_threads, hw_decoder_load = tuned.num_threads, tuned.hw_decoder_load
        batch_size = tuned.batch_size if tuned.batch_size < MAX_AUTO_BATCH or batch_size else None
    hw_decoder_load = DEFAULT_LOAD if hw_decoder_load is None else hw_decoder_load
    if target is None:
        return Budget(None, gpu_memory_gb, hw_decoder_load, num_threads, None, batch_size=batch_size, decoder=decoder)
    profile = get_target(target)
    if profile.device != "cuda" or not device.is_cuda:
        raise ValueError(f"target {target!r} emulates a CUDA card and needs a CUDA device; the device is {device} "
                         f"(the target is {profile.device})")
    import torch

    props = torch.cuda.get_device_properties(device.torch_device)
    cc = props.major + props.minor / 10
    sms, note = None, f"on the target card itself ({props.name}): memory checked and capped only"
    per_sm = TFLOPS_PER_SM.get(cc)
    same_card = abs(cc - profile.compute_capability) < 1e-6 and props.multi_processor_count <= (profile.sm_count or 0)
    if not same_card:
        if per_sm is None:
            raise ValueError(f"target {target!r}: the tensor throughput of an SM of compute capability {cc} "
                             f"({props.name}) is not known; known: {', '.join(str(c) for c in sorted(TFLOPS_PER_SM))}")
        wanted = (profile.fp16_tensor_tflops or 0) / per_sm
        sms = green_context_sms(math.ceil(wanted), cc, props.multi_processor_count)
        note = (f"{props.name}: {sms} of {props.multi_processor_count} SMs ~ {sms * per_sm:.0f} dense fp16 TFLOPS "
                f"for the target's {profile.fp16_tensor_tflops:g}" + (
                    f", {sms * per_sm / profile.fp16_tensor_tflops:.1f}x the target: the smallest split of this card"
                    if sms > math.ceil(wanted) else ""))
    memory = min(gpu_memory_gb or profile.memory_gib, profile.memory_gib)
    load = 0.0 if not profile.hw_jpeg_decoder else hw_decoder_load
    threads = min(num_threads or profile.host_cores, profile.host_cores)
    return Budget(target, memory, load, threads, sms, note, batch_size, decoder)


def sm_share_stream(device: Device, sms: int) -> tuple[object, torch.cuda.Stream]:
    """A CUDA stream whose kernels run on `sms` of the card's SMs (a green context), and the context itself, which
    must be kept alive as long as the stream is used."""
    import torch
    from torch.cuda.green_contexts import GreenContext

    index = device.index or 0
    context = GreenContext.create(num_sms=sms, device_id=index)
    if hasattr(context, "Stream"):
        return context, context.Stream()
    with torch.cuda.device(index):  # torch before the green contexts' Stream(): a stream made while it is current
        context.set_context()
        try:
            stream = torch.cuda.Stream(index)
        finally:
            context.pop_context()
    return context, stream
