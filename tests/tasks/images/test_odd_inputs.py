"""Every kind of odd image file ends as exactly one outcome on the CPU path: a prediction whose tensor
matches the Pillow + torchvision reference, or an error row of the right kind, whatever batch it is in.

The corpus is real files: Pillow's odd test images (tests.conftest.ODD_IMAGES) and files made here from
real photos (tests.conftest.photo_paths).
"""

from __future__ import annotations

import io
import logging
import os
import random
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.devices import Device
from tasks.images.decode import ImageDecoder
from tasks.images.read import DEFAULT_MAX_PIXELS, Blob, ErrorKind, Failure, check_header, checked_blob, load_blobs
from tasks.images.formats import pillow_reason
from tasks.images.preprocess import Preprocessing, pil_preprocess
from tests.conftest import ODD_IMAGES, photo_paths

CPU = Device("cpu")
PRE = Preprocessing()
# Measured on this corpus, DALI CPU vs the reference, in 0..255 intensity levels after the bilinear resize:
# at most 1.0 (mean <= 0.24) for every 8-bit file, CMYK and YCCK JPEGs and 16-bit grayscale included
# (libjpeg-turbo, libpng and libwebp decode alike; resize rounding differs by one level); 0 for files
# Pillow decodes (routed or rescued), which are the reference itself. So the ordinary parity bound holds.
MAX_LEVELS, MEAN_LEVELS = 1.5, 0.4
# 16-bit RGB: Pillow keeps the high byte (v >> 8), DALI rounds (v / 257), so about half the pixels differ by
# one level before the resize adds its own: measured max 2.0 (plus float error), mean 0.43.
WIDE_RGB = {"tiff_16bit_RGB.tiff", "rgb16.png"}
WIDE_MAX_LEVELS, WIDE_MEAN_LEVELS = 2.01, 0.5
K = ErrorKind


@dataclass(frozen=True)
class Case:
    """One file and what must become of it: `kind` None is a prediction; `how` is the path that decides."""

    name: str
    path: Path
    kind: ErrorKind | None
    how: str  # read | header | dali | pillow (routed before DALI) | rescue (DALI failed, Pillow decoded) | decoder


# Pillow's odd test images: what each must become, and which path decides it
ODD = {
    "dispose_bgnd_rgba.gif": (None, "pillow"),
    "exif_imagemagick_orientation.png": (None, "pillow"),  # orientation 3 in a PNG text chunk
    "flower.webp": (None, "dali"),
    "flower2.jpg": (None, "dali"),
    "hopper.jpg": (None, "dali"),
    "hopper_orientation_2.jpg": (None, "dali"),
    "hopper_orientation_5.jpg": (None, "dali"),
    "hopper_orientation_8.jpg": (None, "dali"),
    "hopper_rle8_grayscale.bmp": (None, "dali"),
    "invalid-exif.jpg": (None, "dali"),
    "orientation_rectangle.jpg": (None, "dali"),  # 2x1 with orientation 8
    # bytes between header segments: DALI refuses the file (and can crash on it within a batch), Pillow skips them
    "photoshop-200dpi-broken.jpg": (None, "pillow"),
    "pil123rgba.png": (None, "dali"),
    "pil_sample_rgb.jpg": (None, "dali"),
    "tiff_16bit_RGB.tiff": (None, "dali"),
    "tiff_16bit_RGBa.tiff": (None, "pillow"),  # premultiplied alpha
    "transparent.webp": (None, "dali"),
    "truncated_end_chunk.png": (K.TRUNCATED, "header"),
    "truncated_exif_dpi.jpg": (None, "dali"),
    "truncated_image.png": (K.TRUNCATED, "header"),
}


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes, extra: bytes = b"") -> bytes:
    """A PNG written by hand: a valid IHDR (with its CRC) that may claim any size, and the IDAT given."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra + _png_chunk(b"IDAT", zlib.compress(idat))
            + _png_chunk(b"IEND", b""))


def _png16(samples: np.ndarray, color_type: int) -> bytes:
    """16-bit PNG (Pillow writes 16 bits for grayscale only): big-endian rows, each with filter byte 0."""
    height, width = samples.shape[:2]
    rows = samples.astype(">u2").reshape(height, -1).view(np.uint8)
    return _png(width, height, 16, color_type, np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes())


def _segment(jpeg: bytes, marker: int) -> tuple[int, int]:
    """(start, end) of the first segment with `marker`, marker bytes included."""
    start = jpeg.index(bytes([0xFF, marker]), 2)
    return start, start + 2 + int.from_bytes(jpeg[start + 2 : start + 4], "big")


def _ycck(photo: Image.Image) -> bytes:
    """A YCCK JPEG, which Pillow cannot write: Pillow writes CMYK with Adobe's inverted convention, so write the
    inverted YCbCr of (C, M, Y) and the inverted K as CMYK, then set the Adobe marker's transform to 2 (YCCK),
    as Photoshop's CMYK JPEGs are stored."""
    cmyk = np.asarray(photo.convert("CMYK")).astype(float)
    c, m, y = cmyk[..., 0], cmyk[..., 1], cmyk[..., 2]
    luma = 0.299 * c + 0.587 * m + 0.114 * y
    cb = -0.168736 * c - 0.331264 * m + 0.5 * y + 128
    cr = 0.5 * c - 0.418688 * m - 0.081312 * y + 128
    stored = np.clip(np.stack([luma, cb, cr, 255 - cmyk[..., 3]], -1).round(), 0, 255).astype(np.uint8)
    data = bytearray(_encode(Image.fromarray(255 - stored, "CMYK"), "JPEG", quality=95))
    start, _ = _segment(bytes(data), 0xEE)
    data[start + 15] = 2  # Adobe APP14: "Adobe", version, flags0, flags1, transform
    return bytes(data)


def _made_files() -> dict[str, tuple[bytes, ErrorKind | None, str]]:
    """Files made from real photos: name -> (bytes, expected kind, path that decides)."""
    photo_path, second_path = photo_paths(2)
    jpeg = photo_path.read_bytes()
    photo = Image.open(photo_path).convert("RGB")  # 376x263: not square, so orientation changes the crop
    sos, _ = _segment(jpeg, 0xDA)
    flipped = bytearray(jpeg)
    flipped[len(jpeg) // 2] ^= 0x08  # in the entropy-coded scan: a damaged picture, still decodable
    broken_sos = bytearray(jpeg)
    broken_sos[sos + 5] ^= 0x01  # the scan's first component id: no longer one the frame declares
    adobe = _encode(photo.convert("CMYK"), "JPEG", quality=95)
    start, end = _segment(adobe, 0xEE)
    sof, _ = _segment(jpeg, 0xC0)
    huge = bytearray(jpeg)
    huge[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)  # SOF0: precision, height, width
    rgb = np.asarray(photo).astype(np.int64) * 257  # 8-bit v as 16-bit: v * 257, plus the low bits a sensor adds
    rgb16 = np.minimum(rgb + np.random.default_rng(0).integers(0, 257, rgb.shape), 65535)
    gray16 = np.minimum(np.asarray(photo.convert("L")).astype(np.int64) * 257 + rgb16[..., 0] % 257, 65535)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    second = Image.open(second_path).convert("RGB").resize(photo.size)
    webp = _encode(photo, "WEBP")
    return {
        "zero-bytes.jpg": (b"", K.EMPTY, "header"),
        "text.jpg": (b"This is a text file that someone named .jpg\n" * 20, K.NOT_AN_IMAGE, "header"),
        "cut-in-header.jpg": (jpeg[: sos - 40], K.TRUNCATED, "header"),
        "cut-at-scan.jpg": (jpeg[:sos], K.TRUNCATED, "header"),  # the header only
        "cut-half.jpg": (jpeg[: len(jpeg) // 2], K.TRUNCATED, "header"),
        "cut-last-10.jpg": (jpeg[:-10], K.TRUNCATED, "header"),
        "bitflip-scan.jpg": (bytes(flipped), None, "dali"),
        "bitflip-sos.jpg": (bytes(broken_sos), K.CORRUPT, "decoder"),
        "cmyk-adobe.jpg": (adobe, None, "dali"),
        "ycck-adobe.jpg": (_ycck(photo), None, "dali"),
        "cmyk-no-adobe.jpg": (adobe[:start] + adobe[end:], None, "pillow"),
        "progressive.jpg": (_encode(photo, "JPEG", progressive=True, quality=90), None, "dali"),
        "gray.jpg": (_encode(photo.convert("L"), "JPEG"), None, "dali"),
        "gray.png": (_encode(photo.convert("L"), "PNG"), None, "dali"),
        "palette.png": (_encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0), None, "dali"),
        "rgba.png": (_encode(rgba, "PNG"), None, "dali"),
        "gray16.png": (_encode(Image.fromarray(gray16.astype(np.uint16)), "PNG"), None, "dali"),
        "rgb16.png": (_png16(rgb16, color_type=2), None, "dali"),
        "two-frames.gif": (_encode(photo, "GIF", save_all=True, append_images=[second], duration=100), None, "pillow"),
        "photo.bmp": (_encode(photo, "BMP"), None, "dali"),
        "photo.webp": (webp, None, "dali"),
        "cut-half.webp": (webp[: len(webp) // 2], K.TRUNCATED, "header"),
        "lossless-exif6.webp": (_encode(photo, "WEBP", lossless=True, exif=_exif(6)), None, "pillow"),
        "photo.tiff": (_encode(photo, "TIFF"), None, "dali"),
        "exif6.jpg": (_encode(photo, "JPEG", exif=_exif(6)), None, "dali"),
        "exif6.png": (_encode(photo, "PNG", exif=_exif(6)), None, "dali"),
        "exif6.webp": (_encode(photo, "WEBP", exif=_exif(6)), None, "dali"),
        "exif6.tiff": (_encode(photo, "TIFF", exif=_exif(6)), None, "dali"),
        "xmp6.jpg": (_encode(photo, "JPEG", xmp=xmp.encode()), None, "pillow"),
        "bomb.png": (_png(100_000, 100_000, 8, 2, bytes(301)), K.TOO_LARGE, "header"),
        "huge-header.jpg": (bytes(huge), K.TOO_LARGE, "header"),
        "float32.tiff": (_encode(Image.fromarray(np.asarray(photo.convert("F"))), "TIFF"), K.UNSUPPORTED, "header"),
        "int32.tiff": (_encode(Image.fromarray(rgb16[..., 0].astype(np.int32)), "TIFF"), K.UNSUPPORTED, "header"),
        "photo.tga": (_encode(photo, "TGA"), K.UNSUPPORTED, "header"),
        "photo.ico": (_encode(photo, "ICO"), K.UNSUPPORTED, "header"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Case]:
    root = tmp_path_factory.mktemp("odd")
    cases = [Case(name, ODD_IMAGES / name, kind, how) for name, (kind, how) in ODD.items()]
    for name, (data, kind, how) in _made_files().items():
        (root / name).write_bytes(data)
        cases.append(Case(name, root / name, kind, how))
    (root / "folder.jpg").mkdir()  # a directory where a file was listed
    cases.append(Case("folder.jpg", root / "folder.jpg", K.UNREADABLE, "read"))
    (root / "vanished.jpg").write_bytes(photo_paths(1)[0].read_bytes())
    cases.append(Case("vanished.jpg", root / "vanished.jpg", K.VANISHED, "read"))
    (root / "vanished.jpg").unlink()  # listed above, gone before it is read
    return cases


@dataclass
class Outcome:
    kind: ErrorKind | None
    how: str
    image: torch.Tensor | None


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _classify(cases: list[Case], batch_size: int, device: Device = CPU) -> dict[str, Outcome]:
    """Each file's outcome through load_blobs + ImageDecoder.decode, as the classify flow runs them."""
    with ThreadPoolExecutor(4) as pool:
        blobs = load_blobs([str(c.path) for c in cases], pool)
    decoder = ImageDecoder(PRE, device, batch_size)
    warnings = _Warnings()
    logging.getLogger("tasks.images.decode").addHandler(warnings)
    outcomes: dict[str, Outcome] = {}
    try:
        for start in range(0, len(cases), batch_size):
            rows = range(start, min(start + batch_size, len(cases)))
            for r in rows:
                if isinstance(blobs[r], Failure):
                    stage = "read" if blobs[r].kind in (K.UNREADABLE, K.VANISHED) else "header"
                    outcomes[cases[r].name] = Outcome(blobs[r].kind, stage, None)
            good = [r for r in rows if not isinstance(blobs[r], Failure)]
            warnings.records.clear()
            out = decoder.decode([blobs[r] for r in good])
            rescued = {record.args[0] for record in warnings.records}  # "DALI could not decode image %d"
            for p, failure in out.failures.items():
                outcomes[cases[good[p]].name] = Outcome(failure.kind, "decoder", None)
            for row, p in enumerate(out.ok):
                how = "pillow" if blobs[good[p]].pillow_reason else "rescue" if p in rescued else "dali"
                outcomes[cases[good[p]].name] = Outcome(None, how, out.images[row])
    finally:
        logging.getLogger("tasks.images.decode").removeHandler(warnings)
    return outcomes


@pytest.fixture(scope="module")
def all_at_once(corpus) -> dict[str, Outcome]:
    return _classify(corpus, len(corpus))


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).abs() * torch.tensor(PRE.std).view(-1, 1, 1) * 255


def test_every_file_ends_as_exactly_its_expected_outcome(corpus, all_at_once):
    assert len({c.name for c in corpus}) == len(corpus) == len(all_at_once)
    got = {name: (o.kind and o.kind.value, o.how) for name, o in all_at_once.items()}
    assert got == {c.name: (c.kind and c.kind.value, c.how) for c in corpus}


@pytest.mark.parametrize("name", [n for n, (kind, _) in ODD.items() if kind is None] + [
    "bitflip-scan.jpg", "cmyk-adobe.jpg", "ycck-adobe.jpg", "cmyk-no-adobe.jpg", "progressive.jpg", "gray.jpg",
    "gray.png", "palette.png", "rgba.png", "gray16.png", "rgb16.png", "two-frames.gif", "photo.bmp", "photo.webp",
    "lossless-exif6.webp", "photo.tiff", "exif6.jpg", "exif6.png", "exif6.webp", "exif6.tiff", "xmp6.jpg"])
def test_a_decodable_file_matches_the_pillow_reference(name, corpus, all_at_once):
    case = next(c for c in corpus if c.name == name)
    outcome = all_at_once[name]
    assert outcome.kind is None and outcome.image.shape == PRE.input_shape, outcome
    diff = _levels(outcome.image, pil_preprocess(case.path.read_bytes(), PRE))
    most, mean = (WIDE_MAX_LEVELS, WIDE_MEAN_LEVELS) if name in WIDE_RGB else (MAX_LEVELS, MEAN_LEVELS)
    assert diff.max() <= most and diff.mean() <= mean, (diff.max(), diff.mean())


@pytest.mark.parametrize("batch_size, seed", [(1, 1), (3, 2), (3, 3), (None, 4)], ids=["1", "3", "3-again", "all"])
def test_outcomes_do_not_depend_on_the_batch(batch_size, seed, corpus, all_at_once):
    shuffled = random.Random(seed).sample(corpus, len(corpus))
    outcomes = _classify(shuffled, batch_size or len(corpus))
    for case in corpus:
        mixed, reference = outcomes[case.name], all_at_once[case.name]
        assert (mixed.kind, mixed.how) == (reference.kind, reference.how), case.name
        if reference.image is not None:  # good files decode to the same tensor alone and beside bad ones
            assert torch.equal(mixed.image, reference.image), case.name


def test_dali_applies_exif_orientation_as_exif_transpose_does(corpus, all_at_once):
    photo = pil_preprocess(photo_paths(1)[0].read_bytes(), PRE)
    for name in ("exif6.jpg", "exif6.png", "exif6.webp", "exif6.tiff", "lossless-exif6.webp", "xmp6.jpg"):
        case = next(c for c in corpus if c.name == name)
        image = all_at_once[name].image
        assert _levels(image, pil_preprocess(case.path.read_bytes(), PRE)).max() <= MAX_LEVELS, name
        assert _levels(image, photo).mean() > 20, f"{name} was decoded without turning it"
    # DALI itself turns by the EXIF block's orientation; only XMP or PNG-text orientation goes to Pillow
    by_dali = ("exif6.jpg", "exif6.png", "exif6.webp", "exif6.tiff", "hopper_orientation_5.jpg")
    assert {n: all_at_once[n].how for n in by_dali} == dict.fromkeys(by_dali, "dali")


def test_a_gif_gives_its_first_frame(corpus, all_at_once):
    photo, second = photo_paths(2)
    image = all_at_once["two-frames.gif"].image
    first_frame = pil_preprocess(_encode(Image.open(photo).convert("RGB"), "PNG"), PRE)
    assert _levels(image, first_frame).mean() < 8  # GIF's 256-colour palette costs a few levels
    assert _levels(image, pil_preprocess(second.read_bytes(), PRE)).mean() > 20


def test_16_bit_and_cmyk_files_look_like_the_photo_they_were_made_from(all_at_once):
    photo = Image.open(photo_paths(1)[0]).convert("RGB")
    gray, rgb = pil_preprocess(_encode(photo.convert("L"), "PNG"), PRE), pil_preprocess(_encode(photo, "PNG"), PRE)
    # scaled, not clipped to white; the 16-bit file's low bytes round half its pixels one level up
    assert _levels(all_at_once["gray16.png"].image, gray).max() <= WIDE_MAX_LEVELS
    assert _levels(all_at_once["rgb16.png"].image, rgb).max() <= WIDE_MAX_LEVELS
    for name in ("cmyk-adobe.jpg", "ycck-adobe.jpg", "cmyk-no-adobe.jpg"):  # not inverted, not colour-swapped
        assert _levels(all_at_once[name].image, rgb).mean() < 3, name


def test_the_one_pass_check_of_a_view_decides_as_the_full_checks_on_bytes(corpus):
    """checked_blob walks an ordinary JPEG's markers once, on a memoryview into the read arena; whatever it
    decides must be what check_header + pillow_reason decide on the file's bytes, for every odd file and for
    every real photo."""
    photos = [Case(p.name, p, None, "dali") for p in photo_paths(500)]
    fast = 0
    for case in [*corpus, *photos]:
        data = case.path.read_bytes() if case.path.is_file() else b""
        got = checked_blob(memoryview(bytearray(data)))
        expected = check_header(data) or Blob(data, pillow_reason(data))
        if isinstance(expected, Failure):
            assert (got.kind, got.message) == (expected.kind, expected.message), case.name
        else:
            assert isinstance(got, Blob) and got.pillow_reason == expected.pillow_reason, case.name
            assert bytes(got.data) == data, case.name
            fast += isinstance(got.data, memoryview)  # left where it lies: the ordinary JPEGs
    assert fast >= 500  # every photo took the fast path


def test_the_decoder_alone_gives_bad_files_the_header_checks_kind(corpus):
    """Without the header check (a caller that skips load_blobs), DALI's failure and the Pillow rescue reach
    the same verdict, and the good files beside them are untouched."""
    by_name = {c.name: c for c in corpus}
    bad = ["text.jpg", "cut-in-header.jpg", "cut-at-scan.jpg", "cut-half.jpg", "cut-last-10.jpg",
           "truncated_image.png", "truncated_end_chunk.png"]
    good = ["hopper.jpg", "gray16.png", "two-frames.gif", "photo.webp"]
    names = [good[0], *bad[:4], good[1], good[2], *bad[4:], good[3]]
    blobs = [by_name[n].path.read_bytes() for n in names]
    out = ImageDecoder(PRE, CPU, len(blobs)).decode(blobs)
    assert {names[p]: f.kind for p, f in out.failures.items()} == {n: by_name[n].kind for n in bad}
    alone = ImageDecoder(PRE, CPU, len(good)).decode([by_name[n].path.read_bytes() for n in good])
    assert [names[p] for p in out.ok] == good and torch.equal(out.images, alone.images)


def test_the_pixel_limit_is_refused_from_the_header_and_configurable(corpus):
    bomb = next(c for c in corpus if c.name == "bomb.png").path.read_bytes()
    assert len(bomb) < 1000  # 10^10 pixels claimed: never allocated, refused from the IHDR
    assert check_header(bomb).kind == K.TOO_LARGE
    claims_120m = _png(12_000, 10_000, 8, 0, bytes(12_001))
    assert DEFAULT_MAX_PIXELS < 120_000_000
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow only warns over 89 M; a2k's limit decides
        refused = check_header(claims_120m)
        assert check_header(claims_120m, max_pixels=150_000_000) is None
    assert refused.kind == K.TOO_LARGE and "12000x10000" in refused.message
    small = photo_paths(1)[0].read_bytes()
    assert check_header(small, max_pixels=1000).kind == K.TOO_LARGE


def test_a_file_without_read_permission_is_unreadable(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(photo_paths(1)[0].read_bytes())
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): a mode-000 file is still readable")
        with ThreadPoolExecutor(1) as pool:
            (failure,) = load_blobs([str(path)], pool)
        assert failure.kind == K.UNREADABLE and "permission denied" in failure.message
    finally:
        path.chmod(0o600)


def test_a_read_that_fails_with_an_io_error_is_unreadable():
    path = Path("/proc/self/mem")  # reading offset 0 of a process's memory fails with EIO, even for root
    try:
        path.open("rb").read(1)
    except OSError:
        pass
    else:
        pytest.skip("this platform reads /proc/self/mem at offset 0; no I/O error to test with")
    with ThreadPoolExecutor(1) as pool:
        (failure,) = load_blobs([str(path)], pool)
    assert failure.kind == K.UNREADABLE and "read failed" in failure.message


@pytest.mark.gpu
def test_gpu_decoding_gives_every_file_the_cpu_outcome(corpus, all_at_once):
    gpu = _classify(corpus, len(corpus), Device("cuda", 0))
    # measured on an H100: nvJPEG decodes a scan header with a bit-flipped component id that libjpeg-turbo refuses
    tolerated = {"bitflip-sos.jpg"}
    kinds = {n: o.kind for n, o in gpu.items() if n not in tolerated}
    assert kinds == {n: o.kind for n, o in all_at_once.items() if n not in tolerated}
    assert gpu["bitflip-sos.jpg"].kind in (None, K.CORRUPT)
    # nvJPEG's IDCT and chroma upsampling and the fp16 output differ from libjpeg-turbo by a few levels on
    # average; edges differ more where a small picture is enlarged (hopper.jpg, 128 px to 224: mean 1.25, max 33)
    far = {}
    for name, outcome in all_at_once.items():
        if outcome.image is not None and gpu[name].image is not None:
            diff = _levels(gpu[name].image.float().cpu(), outcome.image)
            if diff.mean() > 2.0 or diff.flatten().quantile(0.99) > 24:
                far[name] = (round(diff.mean().item(), 2), round(diff.flatten().quantile(0.99).item(), 1))
    assert not far, far
