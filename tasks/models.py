"""Classifier architectures and the model directory format (model.json + weights.safetensors).

A model directory is self-describing, like torchvision's `Weights` and timm's `PretrainedCfg`: the
entry names the architecture, the class names, the preprocessing and the weights' sha256, and
loading checks the digest and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tasks.preprocess import Preprocessing

FORMAT = "a2k.model/1"
ENTRY_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"

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


def _check_arch(arch: str) -> None:
    if arch not in _ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not known; available: {', '.join(list_architectures())}")


def default_preprocessing(arch: str) -> Preprocessing:
    _check_arch(arch)
    return _DEFAULT_PREPROCESSING[arch]


def build_model(arch: str, num_classes: int, pre: Preprocessing) -> nn.Module:
    """A freshly initialised `arch` for `num_classes` classes and the input `pre` produces (no download)."""
    _check_arch(arch)
    if num_classes < 2:
        raise ValueError(f"num_classes {num_classes!r} must be at least 2")
    return _ARCHITECTURES[arch](num_classes=num_classes, in_channels=pre.channels, image_size=pre.crop)


class SeedCNN(nn.Module):
    """The origin document's classifier: 3 x (conv 3x3 + ReLU + 2x2 max-pool) at 32/64/128 channels,
    flatten, dense 128 + ReLU, dense to the classes."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"seed-cnn needs images of at least 8x8 pixels, not {image_size}")
        blocks: list[nn.Module] = []
        channels = in_channels
        for width in (32, 64, 128):
            blocks += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * side * side, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


register_architecture("seed-cnn", Preprocessing(resize=36, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3))(SeedCNN)


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

    def __post_init__(self) -> None:
        check_model_name(self.name)
        _check_arch(self.architecture)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must hold at least 2 distinct names, got {list(self.class_names)[:10]}")

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
            "weights": {"file": WEIGHTS_FILE, "sha256": self.weights_sha256, "bytes": self.weights_bytes},
            "metrics": self.metrics,
            "lineage": self.lineage,
            "created_at": self.created_at,
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
        )


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    weights = directory / WEIGHTS_FILE
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    entry = ModelEntry(
        name=name,
        version=version,
        architecture=architecture,
        class_names=tuple(class_names),
        preprocessing=preprocessing,
        weights_sha256=sha256_file(weights),
        weights_bytes=weights.stat().st_size,
        metrics=dict(metrics or {}),
        lineage=dict(lineage or {}),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    tmp = directory / f".{ENTRY_FILE}.tmp"
    tmp.write_text(json.dumps(entry.to_dict(), indent=2) + "\n")
    os.replace(tmp, directory / ENTRY_FILE)
    return entry


def read_entry(directory: str | os.PathLike) -> ModelEntry:
    path = Path(directory) / ENTRY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a model directory: it has no {ENTRY_FILE}")
    return ModelEntry.from_dict(json.loads(path.read_text()))


def load_model(directory: str | os.PathLike) -> tuple[ModelEntry, nn.Module]:
    """Rebuild the model from its entry and its weights, after checking the weights' sha256."""
    entry = read_entry(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"model {entry.name} version {entry.version}: {WEIGHTS_FILE} is missing in {directory}")
    actual = sha256_file(weights)
    if actual != entry.weights_sha256:
        raise ValueError(
            f"model {entry.name} version {entry.version}: weights sha256 {actual[:12]}… does not match "
            f"the entry's {entry.weights_sha256[:12]}…; the file is truncated or altered"
        )
    model = build_model(entry.architecture, entry.num_classes, entry.preprocessing)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return entry, model.eval()


def resolve_model_dir(ref: str, store: str | os.PathLike) -> Path:
    """A model directory from a path, or from `NAME` / `NAME/VERSION` in the store (latest when no version)."""
    path = Path(ref).expanduser()
    if (path / ENTRY_FILE).is_file():
        return path
    name, _, version = ref.partition("/")
    check_model_name(name)
    root = Path(store) / name
    versions = sorted((int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / ENTRY_FILE).is_file()))
    if not versions:
        raise FileNotFoundError(f"model {ref!r} is neither a model directory nor a model in the store {str(store)!r}")
    if not version:
        return root / str(versions[-1])
    if not version.isdigit() or int(version) not in versions:
        raise FileNotFoundError(
            f"model {name!r} has no version {version!r}; versions: {', '.join(map(str, versions))}"
        )
    return root / str(int(version))


def next_version_dir(name: str, store: str | os.PathLike) -> Path:
    """A fresh `<store>/<name>/<N>` for the next version (created, so two writers never share one)."""
    root = Path(store) / check_model_name(name)
    root.mkdir(parents=True, exist_ok=True)
    n = max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0) + 1
    while True:
        try:
            (root / str(n)).mkdir()
            return root / str(n)
        except FileExistsError:
            n += 1
