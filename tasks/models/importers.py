"""Import an existing classifier (a state dict, a TorchScript file or a torch.export program) into a local
staging model directory, checked against its class names and input shape; the registry takes it from there."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tasks.models.entry import (
    WEIGHTS_FILE, ModelEntry, WeightsFormat, build_model, check_architecture, check_class_names, check_model_name,
    list_architectures,
    sha256_file, state_dict_problems, write_entry,
)
from tasks.models import STAGED_VERSION
from tasks.models.exported import load_exported_program
from tasks.images.preprocess import Preprocessing

_DATAPARALLEL_PREFIX = "module."
_WRAPPER_KEYS = ("state_dict", "model")  # where training checkpoints usually keep the weights


class SourceKind(str, Enum):
    """What an importable file holds; each kind has one entry in `_IMPORTERS`."""

    SAFETENSORS = "safetensors"  # a state dict in safetensors
    TORCH_STATE_DICT = "torch.save"  # a state dict written by torch.save, read with weights_only=True
    TORCHSCRIPT = "torchscript"  # a torch.jit.save archive, kept as-is
    EXPORTED_PROGRAM = "torch.export"  # a torch.export.save program, kept as-is


@dataclass(frozen=True)
class _Target:
    """What the imported model must be: `architecture` is only used (and required) for state dicts."""

    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    architecture: str | None


@dataclass(frozen=True)
class _Importer:
    check: Callable[[Path, _Target], Callable[[Path], None]]  # validates the source, returns a writer
    weights_format: WeightsFormat
    weights_file: str
    architecture: str | None  # None: the caller's architecture (state dicts)


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a `.json` file holding a list of strings, or else one name per line (blank lines skipped)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        if not isinstance(doc, list) or not all(isinstance(n, str) and n.strip() for n in doc):
            raise ValueError(f"labels file {str(path)!r} must hold a JSON list of non-empty strings, not {text[:80]!r}")
        names = [n.strip() for n in doc]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    return list(check_class_names(names, f"labels file {str(path)!r}"))


def detect_source_kind(source: str | os.PathLike) -> SourceKind:
    """The kind of `source`, from its suffix and, for .pt/.pth/.ts, from the files inside its zip archive."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SourceKind.SAFETENSORS
    if suffix == ".pt2":
        if not _zip_has(path, lambda n: n.endswith("/archive_format")):
            raise ValueError(f"{str(path)!r} is not a torch.export archive (no archive_format inside); "
                             "write it with torch.export.save")
        return SourceKind.EXPORTED_PROGRAM
    if suffix in (".pt", ".pth", ".ts"):
        if _zip_has(path, lambda n: n.endswith("/constants.pkl")) and _zip_has(path, lambda n: "/code/" in n):
            return SourceKind.TORCHSCRIPT
        if suffix == ".ts":
            raise ValueError(f"{str(path)!r} is not a TorchScript archive (no constants.pkl and code/ inside)")
        return SourceKind.TORCH_STATE_DICT
    raise ValueError(f"cannot import {str(path)!r}: suffix {suffix!r} is not one of .safetensors, .pt, .pth "
                     "(state dict or TorchScript), .ts (TorchScript), .pt2 (torch.export)")


def _zip_has(path: Path, match: Callable[[str], bool]) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(match(name) for name in archive.namelist())


def import_classifier(
    source: str | os.PathLike,
    staging_dir: str | os.PathLike,
    *,
    name: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    architecture: str | None = None,
    lineage_extra: dict[str, Any] | None = None,
) -> ModelEntry:
    """Check `source` against `class_names` and `preprocessing`, then write it and model.json (version "0")
    into `staging_dir`, which must be empty or absent: everything in it is what the registry copies."""
    path, staging = Path(source), Path(staging_dir)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(source)!r} does not exist")
    check_model_name(name)
    names = list(check_class_names(class_names))
    lineage_extra = dict(lineage_extra or {})
    kind = detect_source_kind(path)
    lineage = {"recipe": "import", "source": str(source), "source_sha256": sha256_file(path),
               "source_kind": kind.value, "parent": None}
    clashes = sorted(set(lineage) & set(lineage_extra))
    if clashes:
        raise ValueError(f"lineage_extra may not set {', '.join(clashes)}; the importer records those")
    if staging.exists() and any(staging.iterdir()):
        raise ValueError(f"staging directory {str(staging)!r} is not empty; it holds "
                         f"{', '.join(sorted(p.name for p in staging.iterdir())[:5])}")
    importer = _IMPORTERS[kind]
    write = importer.check(path, _Target(tuple(names), preprocessing, architecture))  # nothing written before here
    staging.mkdir(parents=True, exist_ok=True)
    write(staging / importer.weights_file)
    return write_entry(staging, weights_file=importer.weights_file, weights_format=importer.weights_format,
                       name=name, version=STAGED_VERSION, architecture=importer.architecture or architecture,
                       class_names=names, preprocessing=preprocessing, lineage={**lineage, **lineage_extra})


# --- state dicts: rebuilt as a registered architecture, checked key by key, saved as safetensors ----------

def _check_safetensors(path: Path, target: _Target) -> Callable[[Path], None]:
    _require_architecture(path, target)
    return _fit_state_dict(load_file(str(path)), path, target)


def _check_torch_state_dict(path: Path, target: _Target) -> Callable[[Path], None]:
    _require_architecture(path, target)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1][:300]
        raise ValueError(f"{str(path)!r} holds pickled Python objects that torch.load(weights_only=True) refuses "
                         f"(only tensors and plain containers are read): {reason}") from err
    return _fit_state_dict(_unwrap_state_dict(obj, path), path, target)


def _require_architecture(path: Path, target: _Target) -> None:
    if target.architecture is None:
        raise ValueError(f"{str(path)!r} is a state dict: say which architecture it is for with architecture= (one "
                         f"of {', '.join(list_architectures())}, a torchvision classification model or timm:NAME)")
    check_architecture(target.architecture)  # an unknown one is refused with its close matches


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, also when a checkpoint keeps them under 'state_dict' or 'model'."""
    if isinstance(obj, dict):
        obj = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of named tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{str(path)!r} is not a state dict: entry {key!r} is a {type(value).__name__}, "
                             f"not a tensor (weights are looked for at the top level or under {_WRAPPER_KEYS})")
    return obj


def _fit_state_dict(state: dict[str, torch.Tensor], path: Path, target: _Target) -> Callable[[Path], None]:
    if all(k.startswith(_DATAPARALLEL_PREFIX) for k in state):  # saved from nn.DataParallel / DDP
        state = {k[len(_DATAPARALLEL_PREFIX):]: v for k, v in state.items()}
    arch, n = target.architecture, len(target.class_names)
    model = build_model(arch, n, target.preprocessing)
    problems = state_dict_problems(state, model.state_dict(), f"{arch} with {n} classes")
    if problems:
        raise ValueError(f"{str(path)!r} does not fit {arch} with {n} classes: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)

    def write(dest: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(dest))

    return write


# --- TorchScript and torch.export: kept byte for byte, after one run on the model's input shape --------

def _check_torchscript(path: Path, target: _Target) -> Callable[[Path], None]:
    _check_outputs(torch.jit.load(str(path), map_location="cpu").eval(), path, target)
    return lambda dest: shutil.copyfile(path, dest)


def _check_exported_program(path: Path, target: _Target) -> Callable[[Path], None]:
    _check_outputs(load_exported_program(path).module(), path, target)  # an exported module refuses .eval()
    return lambda dest: shutil.copyfile(path, dest)


def _check_outputs(module: nn.Module, path: Path, target: _Target) -> None:
    """One image must give one score per class; two must work too, as classification runs in batches."""
    n = len(target.class_names)
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 2):
        x = torch.randn(batch, *target.preprocessing.input_shape, generator=generator)
        try:
            with torch.inference_mode():
                out = module(x)
        except (RuntimeError, AssertionError) as err:  # shape guards of exported programs raise AssertionError
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            fixed = " (exported with a fixed batch size? export with a dynamic batch dimension)" if batch > 1 else ""
            raise ValueError(f"{str(path)!r} fails on an input of shape {list(x.shape)}{fixed}: {first}") from err
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if shape != [batch, n]:
            raise ValueError(f"{str(path)!r} gives output {shape} for an input of shape {list(x.shape)}; "
                             f"{n} class names need [{batch}, {n}]")


_IMPORTERS: dict[SourceKind, _Importer] = {
    SourceKind.SAFETENSORS: _Importer(_check_safetensors, WeightsFormat.STATE_DICT, WEIGHTS_FILE, None),
    SourceKind.TORCH_STATE_DICT: _Importer(_check_torch_state_dict, WeightsFormat.STATE_DICT, WEIGHTS_FILE, None),
    SourceKind.TORCHSCRIPT: _Importer(_check_torchscript, WeightsFormat.TORCHSCRIPT, "model.ts", "torchscript"),
    SourceKind.EXPORTED_PROGRAM: _Importer(_check_exported_program, WeightsFormat.EXPORTED_PROGRAM, "model.pt2",
                                           "torch.export"),
}
