"""The three image sizes issue #19's targets are measured on, built from the same real photographs: thumbnails
(shorter side 160 px, quality 85), the photos as they are (ImageNet-sized, ~500 x 375), and multi-megapixel photos
(longer side 2,000 px, quality 92-95, at least 400 kB: re-encoded from upscaled photos, so the pixels a decoder
handles are those of a camera's JPEG, if not its detail).

    python -m bench.image_sizes --source ../shared/data/imagenet-sample --out /tmp/sizes
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

SIZES = ("thumbs", "asis", "photos")
MIN_PHOTO_BYTES = 400_000


def _thumb(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        scale = 160 / min(im.size)
        im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS).save(
            dst, "JPEG", quality=85)


def _photo(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        scale = 2000 / max(im.size)
        big = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
    for quality in (92, 95, 97):
        big.save(dst, "JPEG", quality=quality)
        if dst.stat().st_size >= MIN_PHOTO_BYTES:
            return


def build(source: Path, out: Path) -> dict[str, dict]:
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    jobs = []
    for size in SIZES:
        (out / size).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        for p in photos:
            name = p.stem + ".jpg"
            shutil.copyfile(p, out / "asis" / name)
            jobs.append(pool.submit(_thumb, p, out / "thumbs" / name))
            jobs.append(pool.submit(_photo, p, out / "photos" / name))
        for j in jobs:
            j.result()
    stats = {}
    for size in SIZES:
        files = sorted((out / size).iterdir())
        with Image.open(files[0]) as im:
            first = im.size
        stats[size] = {"files": len(files), "median_bytes": int(statistics.median(f.stat().st_size for f in files)),
                       "first_size": first}
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    for size, s in build(args.source, args.out).items():
        print(f"{size}: {s['files']} files, median {s['median_bytes'] / 1000:.0f} kB, e.g. {s['first_size']}")


if __name__ == "__main__":
    main()
