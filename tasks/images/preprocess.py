"""Preprocessing settings a model carries with it (timm's PretrainedCfg idea), read by every decode path."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


class Interpolation(str, Enum):
    """Resize filters; each maps once to DALI's and to torchvision's name for it."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"

    @property
    def dali(self):
        from nvidia.dali import types

        return {"nearest": types.INTERP_NN, "bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}[self.value]

    @property
    def torchvision(self):
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.value)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resize`, center-crop `crop` x `crop`, scale to [0, 1], then (x - mean) / std.

    `channels` is 3 (RGB) or 1 (grayscale); `mean` and `std` have one value per channel.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: Interpolation = Interpolation.BILINEAR
    channels: int = 3
    antialias: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "interpolation", Interpolation(self.interpolation))
        if self.channels not in (1, 3):
            raise ValueError(f"channels {self.channels!r} is not one of: 1 (grayscale), 3 (RGB)")
        if not 1 <= self.crop <= self.resize:
            raise ValueError(f"crop {self.crop!r} must be between 1 and resize ({self.resize})")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean {self.mean} and std {self.std} need {self.channels} value(s) each, one per channel"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std {self.std} must be positive")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model's input per image: (channels, crop, crop)."""
        return (self.channels, self.crop, self.crop)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["interpolation"] = list(self.mean), list(self.std), self.interpolation.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(**d)


@dataclass(frozen=True)
class Augmentation:
    """Training-time randomness on top of `Preprocessing`: a random crop position and an optional mirror."""

    flip_probability: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability {self.flip_probability!r} must be in [0, 1]")


def pil_preprocess(data: bytes, pre: Preprocessing):
    """The same preprocessing with Pillow and torchvision: the reference DALI is checked against, and the
    path for files DALI cannot decode (or would decode differently). Applies EXIF orientation, takes a
    GIF's first frame, scales 16-bit samples to 8 bits. Returns float32 CHW."""
    import io

    import torch
    from PIL import Image, ImageOps
    from torchvision.transforms import v2

    with Image.open(io.BytesIO(data)) as im:
        im = _eight_bit(ImageOps.exif_transpose(im)).convert("RGB" if pre.channels == 3 else "L")
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(pre.resize, interpolation=pre.interpolation.torchvision, antialias=pre.antialias),
            v2.CenterCrop(pre.crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(pre.mean), list(pre.std)),
        ]
    )
    return transform(im)


def _eight_bit(im):
    """16-bit grayscale (Pillow modes I;16*) as 8-bit L, round(v * 255 / 65535) as DALI scales it: Pillow's
    own convert clips every value over 255 to white. 16-bit RGB(A) already opens as 8-bit in Pillow."""
    if im.mode not in ("I;16", "I;16L", "I;16B", "I;16N"):
        return im
    import numpy as np
    from PIL import Image

    wide = np.asarray(im).astype(np.uint32)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
