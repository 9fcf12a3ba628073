"""Compression recipes: frozen configs parsed from strings like `prune:0.3`, one handler each, dispatched on the
config's type (the torchao `quantize_(model, config)` shape).

The handlers live in compress_quant (fp16, bf16, int8-weights, int8-static), compress_prune (prune, sparse-2:4)
and compress_export (export); applying a chain and saving the child in compress_apply; the measurements and the
gate in compress_measure.
"""

from __future__ import annotations

import dataclasses
import importlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tasks.devices import Device
from tasks.models.entry import ModelEntry, build_model
from tasks.compress.targets import TargetProfile


# --- the recipes ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipeConfig:
    """Common shape: a name, an optional positional value (`prune:0.3`), keyword options (`prune:0.3,epochs=2`),
    where it can run, and its rank in a chain (a chain's recipes go in non-decreasing rank)."""

    name: ClassVar[str]
    positional: ClassVar[str | None] = None
    devices: ClassVar[frozenset[str]] = frozenset({"cuda", "cpu"})
    min_compute_capability: ClassVar[float | None] = None
    rank: ClassVar[int]
    precision: ClassVar[bool] = False  # sets how weights are stored: at most one such recipe in a chain

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class PruneConfig(RecipeConfig):
    """Structured channel pruning (torch-pruning, magnitude importance), then fine-tuning on the parent's train split."""

    name: ClassVar[str] = "prune"
    positional: ClassVar[str] = "ratio"
    rank: ClassVar[int] = 0
    ratio: float = 0.3
    epochs: int = 2
    learning_rate: float = 1e-3
    distill: bool = False  # add a KL term towards the parent's soft predictions
    temperature: float = 4.0
    # kept channel counts are rounded down to multiples of this: fp16 tensor-core convolutions want multiples
    # of 8 (a ResNet-50 pruned without it ran at 0.70x its parent's speed on an H100 with half the FLOPs,
    # bench/RESULTS.md); round_to=1 prunes exactly `ratio`
    round_to: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"prune ratio {self.ratio!r} must be between 0 and 1 (e.g. prune:0.3)")
        if self.round_to < 1:
            raise ValueError(f"prune round_to {self.round_to!r} must be at least 1 (8 suits fp16 tensor cores)")
        if self.epochs < 0 or not self.learning_rate > 0 or not self.temperature > 0:
            raise ValueError(f"prune epochs {self.epochs!r} must be >= 0, learning_rate {self.learning_rate!r} and "
                             f"temperature {self.temperature!r} positive")


@dataclass(frozen=True)
class Sparse24Config(RecipeConfig):
    """2:4 semi-structured sparsity of the Linear layers whose shapes the sparse kernels take (Ampere and newer)."""

    name: ClassVar[str] = "sparse-2:4"
    devices: ClassVar[frozenset[str]] = frozenset({"cuda"})
    min_compute_capability: ClassVar[float] = 8.0
    rank: ClassVar[int] = 1


@dataclass(frozen=True)
class Fp16Config(RecipeConfig):
    """Weights stored in float16 (half the bytes); the classify path runs fp16 on CUDA, fp32 on the CPU."""

    name: ClassVar[str] = "fp16"
    rank: ClassVar[int] = 2
    precision: ClassVar[bool] = True


@dataclass(frozen=True)
class Bf16Config(RecipeConfig):
    """Weights stored in bfloat16; refused on CUDA cards below compute capability 8.0. On the CPU it means the
    weights are rounded to bf16 and stored so (half the bytes) and run upcast to fp32."""

    name: ClassVar[str] = "bf16"
    min_compute_capability: ClassVar[float] = 8.0
    rank: ClassVar[int] = 2
    precision: ClassVar[bool] = True


@dataclass(frozen=True)
class Int8WeightsConfig(RecipeConfig):
    """Per-output-channel symmetric int8 weights + fp32 scales in safetensors, dequantized at load."""

    name: ClassVar[str] = "int8-weights"
    rank: ClassVar[int] = 2
    precision: ClassVar[bool] = True


@dataclass(frozen=True)
class Int8StaticConfig(RecipeConfig):
    """Post-training static int8 for x86 CPUs: PT2E with the x86 inductor quantizer, calibrated on N images."""

    name: ClassVar[str] = "int8-static"
    positional: ClassVar[str] = "calibration_images"
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    rank: ClassVar[int] = 3
    precision: ClassVar[bool] = True
    calibration_images: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.calibration_images <= 100_000:
            raise ValueError(f"int8-static calibration_images {self.calibration_images!r} must be 1 to 100000")


@dataclass(frozen=True)
class ExportConfig(RecipeConfig):
    """A torch.export program (.pt2), plus ONNX when `onnx` is installed, stored only if parity holds on N images."""

    name: ClassVar[str] = "export"
    positional: ClassVar[str] = "parity_images"
    rank: ClassVar[int] = 3
    parity_images: int = 32
    max_abs_diff: float = 1e-3  # on the logits, in the model's own dtype
    min_agreement: float = 1.0  # share of images whose top-1 class is the same
    onnx: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.parity_images <= 100_000 or not self.max_abs_diff > 0 or not 0 < self.min_agreement <= 1:
            raise ValueError(f"export parity_images {self.parity_images!r} (1-100000), max_abs_diff "
                             f"{self.max_abs_diff!r} (> 0) or min_agreement {self.min_agreement!r} (0-1] out of range")


RECIPES: dict[str, type[RecipeConfig]] = {c.name: c for c in (
    PruneConfig, Sparse24Config, Fp16Config, Bf16Config, Int8WeightsConfig, Int8StaticConfig, ExportConfig)}

# one mapping from config type to the code that applies it (imported when used)
_HANDLERS: dict[type[RecipeConfig], str] = {
    PruneConfig: "tasks.compress.prune:prune",
    Sparse24Config: "tasks.compress.prune:sparsify_2_4",
    Fp16Config: "tasks.compress.quant:cast_fp16",
    Bf16Config: "tasks.compress.quant:cast_bf16",
    Int8WeightsConfig: "tasks.compress.quant:quantize_int8_weights",
    Int8StaticConfig: "tasks.compress.quant:quantize_int8_static",
    ExportConfig: "tasks.compress.export:export",
}

_ALLOWED = ("prune:RATIO[,epochs=N,learning_rate=X,distill=true]", "sparse-2:4", "fp16", "bf16", "int8-weights",
            "int8-static[:N]", "export[:N][,max_abs_diff=X,min_agreement=X,onnx=false]")


def parse_recipe(text: str) -> RecipeConfig:
    """`NAME`, `NAME:VALUE` or `NAME:VALUE,KEY=VALUE,...` -> its config; anything else is refused naming what is allowed."""
    name, _, rest = text.strip().partition(",")
    name, positional = (name, None) if name in RECIPES else (name.rpartition(":")[0], name.rpartition(":")[2])
    if name not in RECIPES:
        raise ValueError(f"recipe {text!r} is not known; allowed: {', '.join(_ALLOWED)}")
    cls = RECIPES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    raw: dict[str, str] = {}
    if positional is not None:
        if cls.positional is None:
            raise ValueError(f"recipe {name!r} takes no value (got {text!r}); allowed: {', '.join(_ALLOWED)}")
        raw[cls.positional] = positional
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"option {item!r} of recipe {name!r} is not KEY=VALUE with KEY one of: "
                             f"{', '.join(fields) or 'none'}")
        raw[key] = value
    return cls(**{k: _convert(v, fields[k].type, text) for k, v in raw.items()})


def _convert(value: str, kind: Any, text: str) -> Any:
    kind = {"int": int, "float": float, "bool": bool}.get(kind, kind)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return kind(value)
    except ValueError:
        raise ValueError(f"value {value!r} in recipe {text!r} is not a {kind.__name__}") from None


def recipe_from_dict(d: dict[str, Any]) -> RecipeConfig:
    d = dict(d)
    name = d.pop("recipe", None)
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is not known; allowed: {', '.join(RECIPES)}")
    return RECIPES[name](**d)


def parse_chain(texts: list[str]) -> list[RecipeConfig]:
    """Parse and check a chain: at least one recipe, each once, in rank order, at most one precision recipe."""
    if not texts:
        raise ValueError(f"give at least one recipe; allowed: {', '.join(_ALLOWED)}")
    chain = [parse_recipe(t) for t in texts]
    names = [c.name for c in chain]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe chain {names} repeats a recipe; each may appear once")
    precision = [c.name for c in chain if c.precision]
    if len(precision) > 1:
        raise ValueError(f"recipes {precision} each set how weights are stored; choose one")
    for a, b in zip(chain, chain[1:]):
        if b.rank < a.rank:
            order = " -> ".join(sorted(RECIPES, key=lambda n: RECIPES[n].rank))
            raise ValueError(f"recipe {b.name!r} cannot follow {a.name!r}; chains go in this order: {order}")
        if a.rank == b.rank == 3:
            raise ValueError(f"{a.name!r} already stores a torch.export program; {b.name!r} cannot follow it")
    return chain


def check_supported(chain: list[RecipeConfig], device_kind: str, compute_capability: float | None, where: str) -> None:
    """Refuse a recipe that cannot run on `where` (a device or a target profile), naming why."""
    for cfg in chain:
        if device_kind not in cfg.devices:
            raise ValueError(f"recipe {cfg.name!r} runs on {' or '.join(sorted(cfg.devices))} only; {where} is "
                             f"{device_kind}" + (" (2:4 sparse kernels are CUDA tensor-core kernels)"
                                                 if cfg.name == "sparse-2:4" else
                                                 " (it makes an x86 CPU int8 program)" if cfg.name == "int8-static"
                                                 else ""))
        need = cfg.min_compute_capability
        if device_kind == "cuda" and need is not None and (compute_capability or 0) < need:
            raise ValueError(f"recipe {cfg.name!r} needs compute capability {need} or newer (Ampere); {where} has "
                             f"{compute_capability}")


def check_target(chain: list[RecipeConfig], target: TargetProfile) -> None:
    check_supported(chain, target.device, target.compute_capability, f"target {target.name!r}")


def device_capability(device: Device) -> float | None:
    if not device.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(device.torch_device)
    return major + minor / 10


# --- applying a chain ----------------------------------------------------------------------------------------------

class Storage(str, Enum):
    """How the child's weights are written; each has one branch in `save_candidate`."""

    STATE_DICT = "state_dict"  # the architecture's own state dict (any float dtype) in safetensors
    INT8_WEIGHTS = "int8_weights"  # int8 + per-channel scales in safetensors
    PROGRAM = "program"  # a torch.export program: a changed architecture (pruned) or a quantized graph


@dataclass
class Candidate:
    """The model being compressed, as the chain leaves it."""

    module: nn.Module
    storage: Storage = Storage.STATE_DICT
    program: torch.export.ExportedProgram | None = None  # stored as is when set (export, int8-static)
    files: dict[str, bytes] = field(default_factory=dict)  # extra files for the version, e.g. model.onnx


@dataclass(frozen=True)
class CompressContext:
    """What handlers may need besides the model: the parent, the device, and the parent's recorded splits."""

    parent_dir: Path
    entry: ModelEntry
    device: Device
    batch_size: int
    splits: dict[str, str]  # split name -> manifest URL (train, val, test) of the parent
    num_threads: int | None = None

    def split(self, name: str) -> str:
        if name not in self.splits:
            raise ValueError(f"{self.entry.name} v{self.entry.version} has no recorded {name} split (nor has an "
                             f"ancestor); it has: {', '.join(self.splits) or 'none'}")
        return self.splits[name]


def apply_recipe(candidate: Candidate, cfg: RecipeConfig, ctx: CompressContext) -> dict[str, Any]:
    """Run the handler registered for the config's type; it updates `candidate` and returns its report."""
    if type(cfg) not in _HANDLERS:
        raise TypeError(f"no handler for {type(cfg).__name__}; known: {', '.join(c.__name__ for c in _HANDLERS)}")
    module, _, function = _HANDLERS[type(cfg)].partition(":")
    return {"recipe": cfg.name, **getattr(importlib.import_module(module), function)(candidate, cfg, ctx)}


def sample_images(manifest_url: str, n: int, ctx: CompressContext) -> torch.Tensor:
    """The first `n` images of a split manifest, through the ingest pipeline (reader threads + DALI), fp32 on CPU."""
    from tasks.images.decode import ImageDecoder, decode_files
    from tasks.storage import read_parquet

    uris = read_parquet(manifest_url, columns=["uri"]).column("uri").to_pylist()[:n]
    decoder = ImageDecoder(ctx.entry.preprocessing, ctx.device, min(ctx.batch_size, max(len(uris), 1)),
                           ctx.num_threads)
    with ThreadPoolExecutor(max_workers=4) as readers:
        out = [images.float().cpu() for _, images, _ in decode_files(uris, decoder, readers) if images is not None]
    if not out:
        raise ValueError(f"none of the first {n} images of {manifest_url} could be decoded")
    return torch.cat(out)


def module_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def same_architecture(module: nn.Module, entry: ModelEntry) -> bool:
    """Whether the module's tensors have the shapes of a fresh `entry.architecture` (i.e. a state dict loads)."""
    ref = build_model(entry.architecture, entry.num_classes, entry.preprocessing).state_dict()
    mine = module.state_dict()
    return mine.keys() == ref.keys() and all(mine[k].shape == ref[k].shape for k in ref)
