"""Classifier architectures and the model directory format (model.json + weights.safetensors).

A model directory is self-describing, like torchvision's `Weights` and timm's `PretrainedCfg`: the
entry names the architecture, the class names, the preprocessing and the weights' sha256, and
loading checks the digest and never unpickles anything.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tasks.images.preprocess import Preprocessing
from tasks.models.exported import load_exported_program  # checks the archive: nothing in it is unpickled or run
from tasks.storage import sha256_of

if TYPE_CHECKING:
    from tasks.devices import Device

FORMAT = "a2k.model/1"
ENTRY_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"


class WeightsFormat(str, Enum):
    """How a model's file is stored; each has one loader in `_LOADERS`."""

    STATE_DICT = "safetensors"  # a registered architecture + its state dict in safetensors
    TORCHSCRIPT = "torchscript"  # a TorchScript archive (architecture inside; no Python pickle)
    EXPORTED_PROGRAM = "torch.export"  # a torch.export program (.pt2)
    INT8_WEIGHTS = "safetensors-int8"  # a state dict with int8 weights + per-channel scales, dequantized at load
    AOTI_PACKAGE = "aoti-package"  # an AOTInductor package a2k compiled: one device architecture, torch and batch


class Status(str, Enum):
    READY = "ready"
    REJECTED = "rejected"
    ARCHIVED = "archived"

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_PREPROCESSING: dict[str, Preprocessing] = {}


def register_architecture(name: str, preprocessing: Preprocessing) -> Callable:
    """Decorator: make a model builder `(num_classes, in_channels, image_size) -> nn.Module` available by name."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHITECTURES[name] = builder
        _DEFAULT_PREPROCESSING[name] = preprocessing
        return builder

    return wrap


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def check_architecture(arch: str) -> str:
    """`arch`, once known: a built-in one, or one of the zoo's (torchvision's by name, timm's as timm:NAME:
    tasks.models.zoo); an unknown name is refused with its close matches."""
    if arch in _ARCHITECTURES:
        return arch
    from tasks.models import zoo

    if not zoo.is_zoo_architecture(arch):
        raise zoo.unknown_architecture(arch, list_architectures())
    return arch


_check_arch = check_architecture


def default_preprocessing(arch: str) -> Preprocessing:
    _check_arch(arch)
    if arch in _DEFAULT_PREPROCESSING:
        return _DEFAULT_PREPROCESSING[arch]
    from tasks.models.zoo import zoo_preprocessing

    return zoo_preprocessing(arch)


def build_model(arch: str, num_classes: int, pre: Preprocessing) -> nn.Module:
    """A freshly initialised `arch` for `num_classes` classes and the input `pre` produces (no download)."""
    _check_arch(arch)
    if num_classes < 2:
        raise ValueError(f"num_classes {num_classes!r} must be at least 2")
    if arch not in _ARCHITECTURES:
        from tasks.models.zoo import build_zoo_model

        return build_zoo_model(arch, num_classes, pre.channels, pre.crop)
    return _ARCHITECTURES[arch](num_classes=num_classes, in_channels=pre.channels, image_size=pre.crop)


class SeedCNN(nn.Module):
    """The origin document's classifier: 3 x (conv 3x3 + ReLU + 2x2 max-pool) at 32/64/128 channels,
    flatten, dense 128 + ReLU, dense to the classes."""

    widths: tuple[int, int, int] = (32, 64, 128)
    hidden: int = 128

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"seed-cnn needs images of at least 8x8 pixels, not {image_size}")
        blocks: list[nn.Module] = []
        channels = in_channels
        for width in self.widths:
            blocks += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, self.hidden), nn.ReLU(inplace=True),
            nn.Linear(self.hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TinyCNN(SeedCNN):
    """seed-cnn at half the width (16/32/64 channels, dense 64): about a quarter of its operations, a student
    for distillation on small images."""

    widths = (16, 32, 64)
    hidden = 64


_SMALL_IMAGES = Preprocessing(resize=36, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
register_architecture("seed-cnn", _SMALL_IMAGES)(SeedCNN)
register_architecture("tiny-cnn", _SMALL_IMAGES)(TinyCNN)


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        import torchvision

        if in_channels != 3:
            raise ValueError(f"architecture {name!r} takes 3 input channels, not {in_channels}")
        return getattr(torchvision.models, name.replace("-", "_"))(weights=None, num_classes=num_classes)

    return build


for _name in ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0"):
    register_architecture(_name, Preprocessing())(_torchvision_builder(_name))


_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    if not _NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(
            f"model name {name!r} is not allowed; use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_class_names(names: Sequence[str], origin: str = "class_names") -> tuple[str, ...]:
    """`names` as a tuple, once checked to be at least 2 distinct class names; `origin` says where they came
    from in the message (e.g. "labels file 'x.txt'")."""
    if isinstance(names, str):
        raise ValueError(f"{origin} is the string {names!r}; pass a sequence of class names")
    names = tuple(names)
    if not names:
        raise ValueError(f"{origin} is empty; a classifier needs at least 2 class names")
    if len(names) < 2:
        raise ValueError(f"{origin} has {len(names)} class name(s) {list(names)}; a classifier needs at least 2")
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)[:10]
    if duplicates:
        raise ValueError(f"{origin} repeats {duplicates}; each class must appear once")
    return names


@dataclass(frozen=True)
class ModelEntry:
    """What model.json holds: enough to rebuild, check, preprocess for and label a classifier."""

    name: str
    version: str
    architecture: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    weights_sha256: str
    weights_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    weights_format: WeightsFormat = WeightsFormat.STATE_DICT
    weights_file: str = WEIGHTS_FILE
    status: Status = Status.READY
    status_reason: str = ""

    def __post_init__(self) -> None:
        check_model_name(self.name)
        object.__setattr__(self, "weights_format", WeightsFormat(self.weights_format))
        object.__setattr__(self, "status", Status(self.status))
        if self.weights_format in (WeightsFormat.STATE_DICT, WeightsFormat.INT8_WEIGHTS):
            _check_arch(self.architecture)
        if "/" in self.weights_file or self.weights_file.startswith("."):
            raise ValueError(f"weights file {self.weights_file!r} must be a plain file name")
        object.__setattr__(self, "class_names", check_class_names(self.class_names, f"class_names of model {self.name!r}"))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        c, h, w = self.preprocessing.input_shape
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "input_signature": {"shape": [None, c, h, w], "layout": "NCHW", "dtype": "float32"},
            "weights": {"file": self.weights_file, "format": self.weights_format.value, "sha256": self.weights_sha256,
                        "bytes": self.weights_bytes},
            "metrics": self.metrics,
            "lineage": self.lineage,
            "created_at": self.created_at,
            "status": self.status.value,
            "status_reason": self.status_reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelEntry":
        if d.get("format") != FORMAT:
            raise ValueError(f"model entry format {d.get('format')!r} is not {FORMAT!r}")
        return cls(
            name=d["name"],
            version=str(d["version"]),
            architecture=d["architecture"],
            class_names=tuple(d["class_names"]),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            weights_sha256=d["weights"]["sha256"],
            weights_bytes=int(d["weights"]["bytes"]),
            metrics=d.get("metrics", {}),
            lineage=d.get("lineage", {}),
            created_at=d.get("created_at", ""),
            weights_format=d["weights"].get("format", WeightsFormat.STATE_DICT.value),
            weights_file=d["weights"].get("file", WEIGHTS_FILE),
            status=d.get("status", Status.READY.value),
            status_reason=d.get("status_reason", ""),
        )


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_of(f)


def save_model_dir(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    name: str,
    version: str,
    architecture: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    metrics: dict[str, float] | None = None,
    lineage: dict[str, Any] | None = None,
) -> ModelEntry:
    """Write weights.safetensors, then model.json naming its digest; model.json last marks it complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    return write_entry(directory, name=name, version=version, architecture=architecture, class_names=class_names,
                       preprocessing=preprocessing, metrics=metrics, lineage=lineage)


def write_entry(directory: str | os.PathLike, *, weights_file: str = WEIGHTS_FILE,
                weights_format: WeightsFormat = WeightsFormat.STATE_DICT, **fields: Any) -> ModelEntry:
    """Digest the weights file already in `directory` and write model.json for it (atomically, last)."""
    directory = Path(directory)
    weights = directory / weights_file
    entry = ModelEntry(
        weights_sha256=sha256_file(weights),
        weights_bytes=weights.stat().st_size,
        weights_file=weights_file,
        weights_format=weights_format,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{**fields, "class_names": tuple(fields["class_names"]), "metrics": dict(fields.get("metrics") or {}),
           "lineage": dict(fields.get("lineage") or {})},
    )
    save_entry(directory, entry)
    return entry


def save_entry(directory: str | os.PathLike, entry: ModelEntry) -> None:
    tmp = Path(directory) / f".{ENTRY_FILE}.tmp"
    tmp.write_text(json.dumps(entry.to_dict(), indent=2) + "\n")
    os.replace(tmp, Path(directory) / ENTRY_FILE)


def read_entry(directory: str | os.PathLike) -> ModelEntry:
    path = Path(directory) / ENTRY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a model directory: it has no {ENTRY_FILE}")
    return ModelEntry.from_dict(json.loads(path.read_text()))


def verify_weights(directory: str | os.PathLike, entry: ModelEntry) -> Path:
    """The weights file, after checking it is there, is no link out of `directory`, and its sha256 is the entry's."""
    weights = Path(directory) / entry.weights_file
    if not weights.is_file():
        raise FileNotFoundError(f"model {entry.name} version {entry.version}: {entry.weights_file} is missing in {directory}")
    folder, real = Path(directory).resolve(), weights.resolve()
    if real.parent != folder:  # a link to a file elsewhere: what is loaded must be what the registry holds
        raise ValueError(f"model {entry.name} version {entry.version}: {entry.weights_file} in {str(directory)!r} "
                         f"resolves to {str(real)!r}, outside its model directory; links out of it are refused")
    actual = sha256_file(weights)
    if actual != entry.weights_sha256:
        raise ValueError(
            f"model {entry.name} version {entry.version}: weights sha256 {actual[:12]}… does not match "
            f"the entry's {entry.weights_sha256[:12]}…; the file is truncated or altered"
        )
    return weights


def _with_weights(entry: ModelEntry, state: dict[str, torch.Tensor], weights: Path) -> nn.Module:
    """The architecture with `state` (read from `weights`) as its tensors, in fp32 (as a copy into fresh
    parameters would give): built on the meta device, so its random initialisation is skipped (2.5 s for a
    ResNet-50 on the CPU). A state that does not fit is refused in one line naming the file and the first
    differences."""
    try:
        with torch.device("meta"):
            model = build_model(entry.architecture, entry.num_classes, entry.preprocessing)
    except (NotImplementedError, RuntimeError):  # a builder computing with tensors (regnet's widths) cannot on meta
        model = build_model(entry.architecture, entry.num_classes, entry.preprocessing)
    fits = f"{entry.architecture} with {entry.num_classes} classes"
    problems = state_dict_problems(state, model.state_dict(), fits)
    if problems:
        raise ValueError(f"model {entry.name} version {entry.version}: weights file {str(weights)!r} does not fit "
                         f"{fits}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # a buffer the state dict does not hold
        model = build_model(entry.architecture, entry.num_classes, entry.preprocessing)
        model.load_state_dict(state, strict=True)
    return model.float()


def state_dict_problems(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: str) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, the first few of each, as readable lines."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: file has {list(found[k].shape)}, {model} expects {list(v.shape)}"
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    problems = []
    for label, items in (("shape mismatch", shapes), ("missing from the file", missing),
                         ("not in the model", unexpected)):
        if items:
            more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    return problems


def _read_safetensors(entry: ModelEntry, weights: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights))
    except SafetensorError as e:  # a damaged header: safetensors' own message is one line
        raise ValueError(f"model {entry.name} version {entry.version}: weights file {str(weights)!r} is not a "
                         f"readable safetensors file: {e}") from None


def _load_state_dict(entry: ModelEntry, weights: Path) -> nn.Module:
    return _with_weights(entry, _read_safetensors(entry, weights), weights)


INT8_SCALE_PREFIX = "__int8_scale__."  # the scale of int8 tensor K is stored under INT8_SCALE_PREFIX + K


def _load_int8_weights(entry: ModelEntry, weights: Path) -> nn.Module:
    """int8 tensors with a per-output-channel scale are dequantized (q * scale) before loading."""
    stored = _read_safetensors(entry, weights)
    scales = {k[len(INT8_SCALE_PREFIX):]: v for k, v in stored.items() if k.startswith(INT8_SCALE_PREFIX)}
    state = {k: v.float() * scales[k].view(-1, *[1] * (v.dim() - 1)) if k in scales else v
             for k, v in stored.items() if not k.startswith(INT8_SCALE_PREFIX)}
    return _with_weights(entry, state, weights)


def _load_torchscript(entry: ModelEntry, weights: Path) -> nn.Module:
    return torch.jit.load(str(weights), map_location="cpu")


def _load_exported_program(entry: ModelEntry, weights: Path) -> nn.Module:
    return load_exported_program(weights).module()  # captured in eval mode; its module refuses .eval()


_LOADERS: dict[WeightsFormat, Callable[[ModelEntry, Path], nn.Module]] = {
    WeightsFormat.STATE_DICT: _load_state_dict,
    WeightsFormat.TORCHSCRIPT: _load_torchscript,
    WeightsFormat.EXPORTED_PROGRAM: _load_exported_program,
    WeightsFormat.INT8_WEIGHTS: _load_int8_weights,
}


def load_model(directory: str | os.PathLike, device: Device | None = None) -> tuple[ModelEntry, nn.Module]:
    """Rebuild the model from its entry and its weights, after checking the weights' sha256. Never unpickles.

    An AOTInductor package is loaded onto `device` (it runs there only, after `compiled.check_runs_here`) as a
    `compiled.CompiledModel`; every other format comes as an nn.Module on the CPU, and `device` is not used."""
    entry = read_entry(directory)
    weights = verify_weights(directory, entry)
    if entry.weights_format is WeightsFormat.AOTI_PACKAGE:
        from tasks.models.compiled import load_compiled

        return entry, load_compiled(entry, weights, device)
    model = _LOADERS[entry.weights_format](entry, weights)
    return entry, model if entry.weights_format is WeightsFormat.EXPORTED_PROGRAM else model.eval()
