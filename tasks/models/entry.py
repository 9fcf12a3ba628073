"""Classifier architectures and the model directory format (model.json + weights.safetensors).

A model directory is self-describing, like torchvision's `Weights` and timm's `PretrainedCfg`: the
entry names the architecture, the class names, the preprocessing and the weights' sha256, and
loading checks the digest and never unpickles anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tasks.images.preprocess import Preprocessing
from tasks.models.card import (  # noqa: F401  (the card's names, where callers have always found them)
    ENTRY_FILE, FORMAT, WEIGHTS_FILE, ModelEntry, Status, WeightsFormat, check_class_names, check_model_name, read_entry,
    save_entry, sha256_file, verify_weights, write_entry,
)
from tasks.models.exported import load_exported_program  # checks the archive: nothing in it is unpickled or run

if TYPE_CHECKING:
    from tasks.devices import Device

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
