"""Architectures beyond the built-in ones: any torchvision classification model by its name (`regnet_y_400mf`),
timm's as `timm:NAME` when timm is installed (`pip install 'a2k[timm]'`), and `NAME:WEIGHTS` (`resnet50:IMAGENET1K_V2`)
for the preprocessing a torchvision Weights enum records. Models are built with random initialisation: nothing is
downloaded; pretrained weights come in through `a2k models import` (a safetensors or .pth state dict)."""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from tasks.images.preprocess import Preprocessing

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class ArchSpec:
    """What an architecture name given by a user resolves to.

    `name` is what model.json records and `build` takes (`resnet50`, `timm:convnext_atto`); `preprocessing` comes
    from the named weights' metadata, else the architecture's default; `weights` names the torchvision weights
    whose preprocessing (and class names, `categories`) were taken, when given."""

    name: str
    preprocessing: Preprocessing
    weights: str | None = None
    categories: tuple[str, ...] | None = None


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """torchvision's classification models (`torchvision.models.list_models(module=torchvision.models)`)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def timm_installed() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def is_zoo_architecture(name: str) -> bool:
    """A torchvision classification model's name, or `timm:NAME` of a model timm (installed) knows."""
    if name.startswith(TIMM_PREFIX):
        if not timm_installed():
            return False
        import timm

        return timm.is_model(name[len(TIMM_PREFIX):])
    return name in torchvision_names()


def unknown_architecture(name: str, builtin: list[str]) -> ValueError:
    """The one-line refusal of an unknown architecture, with its close matches."""
    if name.startswith(TIMM_PREFIX):
        if not timm_installed():
            return ValueError(f"architecture {name!r} needs timm, which is not installed; pip install 'a2k[timm]' "
                              f"(or timm), or give a torchvision model or one of: {', '.join(builtin)}")
        import timm

        bare = name[len(TIMM_PREFIX):]
        close = difflib.get_close_matches(bare, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else "no close match"
        return ValueError(f"architecture {name!r} is not a timm model ({hint}); timm.list_models() lists them")
    close = difflib.get_close_matches(name, sorted({*builtin, *torchvision_names()}), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    timm_text = "timm:NAME for timm's" if timm_installed() else "timm:NAME with timm installed (pip install 'a2k[timm]')"
    return ValueError(f"architecture {name!r} is not known ({hint}); give one of: {', '.join(builtin)}, any of "
                      f"torchvision's {len(torchvision_names())} classification models "
                      f"(torchvision.models.list_models()), or {timm_text}")


def build_zoo_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A randomly initialised zoo model with `num_classes` outputs (nothing downloaded); torchvision's ViTs are
    built for `image_size` (their position embedding has one entry per patch)."""
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels)
    import torchvision

    if in_channels != 3:
        raise ValueError(f"architecture {name!r} takes 3 input channels, not {in_channels}")
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):  # their auxiliary heads return tuples in training; a2k trains one head
        kwargs |= {"aux_logits": False, "init_weights": True}
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size
    return torchvision.models.get_model(name, **kwargs)


def zoo_preprocessing(name: str) -> Preprocessing:
    """A zoo model's default preprocessing: timm's pretrained config, or its torchvision DEFAULT weights' transforms
    (the input size the model was designed for: 299 for inception_v3, 384 for some ViTs), else ImageNet's 256/224."""
    if name.startswith(TIMM_PREFIX):
        return _timm_preprocessing(name[len(TIMM_PREFIX):])
    import torchvision

    weights = torchvision.models.get_model_weights(name)
    return weights_preprocessing(weights.DEFAULT) if len(weights) else Preprocessing()


def weights_preprocessing(weights: Any) -> Preprocessing:
    """Resize, crop, mean, std and interpolation from a torchvision Weights member's `transforms()` metadata."""
    t = weights.transforms()
    resize, crop = t.resize_size[0], t.crop_size[0]
    return Preprocessing(resize=max(resize, crop), crop=crop, mean=tuple(t.mean), std=tuple(t.std),
                         interpolation=t.interpolation.value, antialias=bool(t.antialias))


def _timm_preprocessing(bare: str) -> Preprocessing:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(bare)
    if cfg is None:
        return Preprocessing()
    crop = int(cfg.input_size[-1])
    interpolation = cfg.interpolation if cfg.interpolation in ("nearest", "bilinear", "bicubic") else "bicubic"
    return Preprocessing(resize=math.floor(crop / (cfg.crop_pct or 0.875)), crop=crop, mean=tuple(cfg.mean),
                         std=tuple(cfg.std), interpolation=interpolation)


def resolve_weights(name: str, tag: str) -> Any:
    """The torchvision Weights member `tag` of architecture `name` (`IMAGENET1K_V2`, `DEFAULT` or the full
    `ResNet50_Weights.IMAGENET1K_V2`), refused with the choices when it has none of that name."""
    import torchvision

    if name not in torchvision_names():
        raise ValueError(f"architecture {name!r} in {name + ':' + tag!r} is not a torchvision classification model; "
                         "only torchvision's have named weights (timm: timm:NAME.TAG)")
    enum = torchvision.models.get_model_weights(name)
    member = tag.split(".", 1)[1] if tag.startswith(enum.__name__ + ".") else tag
    choices = [*enum.__members__]
    if member not in choices:
        close = difflib.get_close_matches(member, choices, n=3, cutoff=0.5)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(f"weights {tag!r} are not {name}'s{hint}; {enum.__name__} has: {', '.join(choices) or 'none'}")
    return enum[member]


def resolve_architecture(spec: str) -> ArchSpec:
    """What `spec` names: a built-in architecture, a torchvision model, `timm:NAME`, or a torchvision model with
    named weights (`resnet50:IMAGENET1K_V2`), whose preprocessing and categories come from the weights' metadata.
    Built-in architectures keep their own default preprocessing (resnet50's is 256/224 bilinear, not V2's 232)."""
    from tasks.models.entry import default_preprocessing, list_architectures

    builtin = list_architectures()
    if spec in builtin or spec.startswith(TIMM_PREFIX) or ":" not in spec:
        return ArchSpec(spec, default_preprocessing(spec))  # unknown names refused there, with close matches
    name, _, tag = spec.partition(":")
    if name not in builtin and name not in torchvision_names():
        raise unknown_architecture(name, builtin)
    weights = resolve_weights(name, tag)
    categories = weights.meta.get("categories")
    return ArchSpec(name, weights_preprocessing(weights), str(weights), tuple(categories) if categories else None)


def weights_categories(weights: str | None) -> list[str]:
    """The class names a torchvision Weights member records (`ResNet50_Weights.IMAGENET1K_V2`), for an import
    without a labels file."""
    import torchvision

    categories = torchvision.models.get_weight(weights).meta.get("categories") if weights else None
    if not categories:
        raise ValueError(f"weights {weights!r} record no categories; give the class names in a labels file")
    return list(categories)
