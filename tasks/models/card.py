"""The model directory's card: model.json (what a version is: architecture, class names, preprocessing, the weights'
file, format and sha256) read, written and checked without torch, so that a registry look-up or a refusal costs no
torch import; building and loading the model is tasks.models.entry's."""

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
from typing import Any

from tasks.images.preprocess import Preprocessing
from tasks.storage import sha256_of


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
            from tasks.models.entry import check_architecture  # torch: only where an architecture is built

            check_architecture(self.architecture)
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
