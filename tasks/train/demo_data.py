"""The demo dataset: scikit-learn's 1,797 real handwritten digit scans, upscaled and written as class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_dataset(root: str | Path, size: int = 32) -> Path:
    """Write `<root>/<digit>/<index>.png` (8-bit grayscale, `size` x `size`); returns `root`.

    Idempotent: an existing complete dataset is left as it is.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    done = root / ".complete"
    if done.exists():
        return root
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        scan = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        scan.resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{index:04d}.png")
    done.write_text(f"{len(digits.images)} images\n")
    return root
