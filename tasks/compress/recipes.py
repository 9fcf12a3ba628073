"""Compression recipes: frozen configs parsed from strings like `prune:0.3,epochs=2`, and the checks of a chain.

The config classes are the one statement of the recipe set: `RECIPES`, the "allowed:" text of every refusal and the
CLI's help are derived from them. Each is applied by the handler registered for its type beside its code (quant.py,
prune.py, export.py; see `apply.recipe_handler`). Nothing here imports torch, so the CLI can list the recipes cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from tasks.targets import TargetProfile

if TYPE_CHECKING:
    from tasks.devices import Device


# --- the recipes ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipeConfig:
    """Common shape: a name, an optional positional value (`prune:0.3`), keyword options (`prune:0.3,epochs=2`),
    where it can run, and its rank in a chain (a chain's recipes go in non-decreasing rank)."""

    name: ClassVar[str]
    positional: ClassVar[str | None] = None
    devices: ClassVar[frozenset[str]] = frozenset({"cuda", "cpu"})
    devices_reason: ClassVar[str] = ""  # said when the recipe is refused on another kind of device
    min_compute_capability: ClassVar[float | None] = None
    rank: ClassVar[int]
    precision: ClassVar[bool] = False  # sets how weights are stored: at most one such recipe in a chain

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class DistillConfig(RecipeConfig):
    """Train a smaller architecture from scratch on the parent's train split against the parent's soft predictions
    (knowledge distillation): the child is that architecture, with the parent's classes and preprocessing."""

    name: ClassVar[str] = "distill"
    positional: ClassVar[str] = "arch"
    rank: ClassVar[int] = -1  # first: it replaces the model the rest of the chain works on
    arch: str = "resnet18"
    epochs: int = 10
    learning_rate: float = 3e-3
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the hard-label loss; 1 - alpha goes to the parent's soft predictions

    def __post_init__(self) -> None:
        from tasks.models.entry import list_architectures  # the registry of architectures (imports torch)

        if self.arch not in list_architectures():
            raise ValueError(f"distill architecture {self.arch!r} is not known; available: "
                             f"{', '.join(list_architectures())}")
        if self.epochs < 1 or not self.learning_rate > 0 or not self.temperature > 0 or not 0 <= self.alpha <= 1:
            raise ValueError(f"distill epochs {self.epochs!r} must be >= 1, learning_rate {self.learning_rate!r} and "
                             f"temperature {self.temperature!r} positive, alpha {self.alpha!r} in [0, 1]")


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
    # of 8, or a pruned model can run slower than its parent (bench/NOTES.md); round_to=1 prunes exactly `ratio`
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
    devices_reason: ClassVar[str] = "2:4 sparse kernels are CUDA tensor-core kernels"
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
    devices_reason: ClassVar[str] = "it makes an x86 CPU int8 program"
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


@dataclass(frozen=True)
class CompileConfig(RecipeConfig):
    """The model compiled ahead of time with Inductor into an AOTInductor package, for the device the compression
    runs on (its GPU architecture, or the CPU's instruction set), this torch, and one batch shape; loaded at
    classify time without compiling, refused elsewhere. Stored only if it agrees with the eager model on N images
    of the parent's test split."""

    name: ClassVar[str] = "compile"
    positional: ClassVar[str] = "batch_size"
    rank: ClassVar[int] = 4  # last: it freezes whatever the chain made
    batch_size: int = 0  # 0: the compression run's batch size (what the executor will run)
    parity_images: int = 256
    min_agreement: float = 0.995  # share of images whose top-1 class is the eager model's
    max_rel_diff: float = 1e-2  # ||logits - eager|| / ||eager||: fp16 rounding is ~1e-3

    def __post_init__(self) -> None:
        if not 0 <= self.batch_size <= 8192 or not 1 <= self.parity_images <= 100_000:
            raise ValueError(f"compile batch_size {self.batch_size!r} (0-8192, 0 = the run's) or parity_images "
                             f"{self.parity_images!r} (1-100000) out of range")
        if not 0 < self.min_agreement <= 1 or not self.max_rel_diff > 0:
            raise ValueError(f"compile min_agreement {self.min_agreement!r} (0-1] or max_rel_diff "
                             f"{self.max_rel_diff!r} (> 0) out of range")


RECIPES: dict[str, type[RecipeConfig]] = {c.name: c for c in (
    DistillConfig, PruneConfig, Sparse24Config, Fp16Config, Bf16Config, Int8WeightsConfig, Int8StaticConfig,
    ExportConfig, CompileConfig)}


# --- how a recipe is written, derived from its config --------------------------------------------------------------

def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def recipe_usage(cls: type[RecipeConfig]) -> str:
    """How to write the recipe and every field's default, e.g.
    `int8-static:CALIBRATION_IMAGES[,KEY=VALUE] (defaults: calibration_images=256)`."""
    fields = dataclasses.fields(cls)
    if not fields:
        return cls.name
    defaults = [f"{f.name}={_show(f.default) if f.default is not dataclasses.MISSING else 'required'}" for f in fields]
    positional = f":{cls.positional.upper()}" if cls.positional else ""
    return f"{cls.name}{positional}[,KEY=VALUE] (defaults: {', '.join(defaults)})"


def allowed_recipes() -> str:
    """Every recipe's usage, in the order a chain takes them."""
    return ", ".join(recipe_usage(c) for c in sorted(RECIPES.values(), key=lambda c: c.rank))


# --- parsing and checking --------------------------------------------------------------------------------------------

def parse_recipe(text: str) -> RecipeConfig:
    """`NAME`, `NAME:VALUE` or `NAME:VALUE,KEY=VALUE,...` -> its config; anything else is refused naming what is allowed."""
    name, _, rest = text.strip().partition(",")
    name, positional = (name, None) if name in RECIPES else (name.rpartition(":")[0], name.rpartition(":")[2])
    if name not in RECIPES:
        raise ValueError(f"recipe {text!r} is not known; allowed: {allowed_recipes()}")
    cls = RECIPES[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    raw: dict[str, str] = {}
    if positional is not None:
        if cls.positional is None:
            raise ValueError(f"recipe {name!r} takes no value (got {text!r}); allowed: {allowed_recipes()}")
        raw[cls.positional] = positional
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"option {item!r} of recipe {name!r} is not KEY=VALUE with KEY one of: "
                             f"{', '.join(fields) or 'none'}")
        raw[key] = value
    return cls(**{key: _convert(cls, key, value, text) for key, value in raw.items()})


@functools.cache
def _adapter(cls: type[RecipeConfig], key: str):
    from pydantic import TypeAdapter  # here, not at the top: the CLI imports this module to list the recipes

    return TypeAdapter(typing.get_type_hints(cls)[key])


def _convert(cls: type[RecipeConfig], key: str, value: str, text: str) -> Any:
    """The option's value as its field's annotated type, by pydantic's rules for strings (`true`, `2`, `1e-3`)."""
    from pydantic import ValidationError

    try:
        return _adapter(cls, key).validate_strings(value)
    except ValidationError:
        kind = getattr(typing.get_type_hints(cls)[key], "__name__", key)
        raise ValueError(f"value {value!r} in recipe {text!r} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
                         f"(option {key!r} of recipe {cls.name!r}); allowed: {recipe_usage(cls)}") from None


def recipe_from_dict(d: dict[str, Any]) -> RecipeConfig:
    d = dict(d)
    name = d.pop("recipe", None)
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is not known; allowed: {', '.join(RECIPES)}")
    return RECIPES[name](**d)


def parse_chain(texts: list[str]) -> list[RecipeConfig]:
    """Parse and check a chain: at least one recipe, each once, in rank order, at most one precision recipe."""
    if not texts:
        raise ValueError(f"give at least one recipe; allowed: {allowed_recipes()}")
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
        if a.rank == 3 and b.rank >= 3:
            raise ValueError(f"{a.name!r} already stores a torch.export program; {b.name!r} cannot follow it")
    return chain


def check_supported(chain: list[RecipeConfig], device_kind: str, compute_capability: float | None, where: str) -> None:
    """Refuse a recipe that cannot run on `where` (a device or a target profile), naming why."""
    for cfg in chain:
        if device_kind not in cfg.devices:
            raise ValueError(f"recipe {cfg.name!r} runs on {' or '.join(sorted(cfg.devices))} only; {where} is "
                             f"{device_kind}" + (f" ({cfg.devices_reason})" if cfg.devices_reason else ""))
        need = cfg.min_compute_capability
        if device_kind == "cuda" and need is not None and (compute_capability or 0) < need:
            raise ValueError(f"recipe {cfg.name!r} needs compute capability {need} or newer (Ampere); {where} has "
                             f"{compute_capability}")


def check_target(chain: list[RecipeConfig], target: TargetProfile) -> None:
    check_supported(chain, target.device, target.compute_capability, f"target {target.name!r}")


def device_capability(device: Device) -> float | None:
    if not device.is_cuda:
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(device.torch_device)
    return major + minor / 10
