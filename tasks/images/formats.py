"""What an image file's bytes say before it is decoded: its format by signature, whether it was cut short,
and whether DALI would decode it differently from Pillow (the reference), so it must go to Pillow.

Everything here reads markers and chunk headers only (a few microseconds a file); Pillow opens a file
only when its metadata says DALI and Pillow might disagree.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
)
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PLAIN_SOF = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended sequential, progressive (Huffman)
_XMP_NS = b"http://ns.adobe.com/xap/1.0/"
_XMP_ORIENTATION = b"tiff:Orientation"
_PNG_EXIF_TEXT = (b"Raw profile type exif", b"XML:com.adobe.xmp")  # text keywords Pillow reads EXIF from


def signature(data: bytes | memoryview) -> str | None:
    """The format the file's first bytes name (Pillow's name for it), or None when they name none we decode."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and data[6:10] == b"\x00\x00\x00\x00":  # reserved bytes: zero in every BMP
        return "BMP"
    return next((fmt for magic, fmt in _SIGNATURES if data[: len(magic)] == magic), None)


def is_truncated(data: bytes) -> bool:
    """True when the file ends before its format says it does: a JPEG without its end-of-image marker after
    the scan, a PNG without its IEND chunk, a WebP shorter than its RIFF header declares. Other formats
    (GIF, TIFF, BMP) carry no cheap end marker: their decoders say so instead."""
    fmt, tail = signature(data), max(0, len(data) - 64)
    try:
        if fmt == "JPEG":
            if data.find(b"\xff\xd9", tail) >= 0:
                return False
            *_, (_, _, scan) = _jpeg_segments(data)
            return data.find(b"\xff\xd9", scan) < 0  # entropy-coded data never holds FF D9: it is the end
        if fmt == "PNG":
            if data.find(b"IEND\xaeB`\x82", tail) >= 0:
                return False
            for _ in _png_chunks(data):
                pass
            return False
        if fmt == "WEBP":
            return int.from_bytes(data[4:8], "little") + 8 > len(data)
    except EOFError:
        return True
    except ValueError:  # damaged rather than short
        return False
    return False


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's segments up to its scan say, from one walk over the markers."""

    sof: int | None = None  # the frame marker (C0 baseline, C2 progressive, ...); the last if several
    frames: int = 0
    precision: int = 0
    width: int = 0
    height: int = 0
    components: int = 0
    adobe: bool = False  # an Adobe APP14 segment: how CMYK is to be read
    xmp_orientation: bool = False  # an XMP packet that sets tiff:Orientation

    @property
    def cmyk_uninverted_by_dali(self) -> bool:
        return self.components == 4 and not self.adobe


def jpeg_header(data: bytes | memoryview) -> JpegHeader:
    """Walk the segments up to the scan header; EOFError / ValueError as `_jpeg_segments` raises them."""
    found: dict = {}
    for marker, start, end in _jpeg_segments(data):
        if marker in _SOF_MARKERS and end - start >= 6:
            found.update(sof=marker, frames=found.get("frames", 0) + 1, precision=data[start],
                         height=int.from_bytes(data[start + 1 : start + 3], "big"),
                         width=int.from_bytes(data[start + 3 : start + 5], "big"), components=data[start + 5])
        elif marker == 0xEE and data[start : start + 5] == b"Adobe":
            found["adobe"] = True
        elif marker == 0xE1 and data[start : start + len(_XMP_NS)] == _XMP_NS:
            found["xmp_orientation"] = bytes(data[start:end]).find(_XMP_ORIENTATION) >= 0
    return JpegHeader(**found)


def plain_jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) of a complete, ordinary JPEG that DALI decodes as Pillow does, read from its markers
    alone (about 5 us, against 45 us for Pillow's header parser); None for anything else, which the Pillow
    header check and `pillow_reason` then decide. So for a file with a size here, `pillow_reason` is None.

    Ordinary: clean segments up to the scan, an 8-bit baseline, extended or progressive frame of 1, 3 or 4
    components (4 with an Adobe marker) with a non-zero size, no orientation in XMP, and the end-of-image
    marker within the last 64 bytes. Works on a memoryview without copying the file.
    """
    if data[:3] != b"\xff\xd8\xff" or bytes(data[-64:]).find(b"\xff\xd9") < 0:
        return None
    try:
        head = jpeg_header(data)
    except (EOFError, ValueError):
        return None
    if (head.frames != 1 or head.sof not in _PLAIN_SOF or head.precision != 8 or head.components not in (1, 3, 4)
            or head.cmyk_uninverted_by_dali or head.xmp_orientation or min(head.width, head.height) < 1):
        return None
    return head.width, head.height


def pillow_reason(data: bytes) -> str | None:
    """Why this file goes to Pillow instead of DALI, or None (nearly every file).

    Pillow + torchvision is the reference (`tasks.images.preprocess.pil_preprocess`); these are the files where
    DALI 2.4 cannot decode them or would decode them differently from it.
    """
    fmt = signature(data)
    try:
        if fmt == "GIF":
            return "GIF: DALI has no GIF decoder; Pillow decodes the first frame"
        if fmt == "TIFF":
            return _tiff_reason(data)
        if fmt == "JPEG":
            reason, orientation_elsewhere = _jpeg_reason(data)
        elif fmt == "PNG":
            reason, orientation_elsewhere = None, _png_has_exif_text(data)
        elif fmt == "WEBP":
            reason, orientation_elsewhere = _webp_reason(data)
        else:
            return None
    except EOFError:
        return None  # cut short: the header check has refused it already
    except ValueError as e:
        if fmt == "JPEG":
            # bytes between header segments (e.g. a Photoshop block with a wrong length): Pillow skips them;
            # DALI 2.4's CPU decoder refuses the file and, with other files in the batch, can crash the process
            return f"JPEG with bytes between its header segments ({e}): DALI's parser refuses it"
        return None  # damaged: DALI fails on it and the Pillow rescue says how
    if reason or not orientation_elsewhere:
        return reason
    orientation = _orientation_dali_misses(data)
    return orientation and f"EXIF orientation {orientation} is in XMP or PNG text, which DALI does not read"


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, payload start, payload end) of each segment up to and including the first scan header (SOS).

    Raises EOFError when the data ends first and ValueError where there is no marker."""
    i, n = 2, len(data)
    while True:
        if i + 4 > n:
            raise EOFError(f"JPEG ends at byte {n} inside its header")
        if data[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            raise ValueError(f"JPEG segment length {length} at byte {i}")
        end = i + 2 + length
        if end > n:
            raise EOFError(f"JPEG ends at byte {n} inside a segment")
        yield marker, i + 4, end
        if marker == 0xDA:
            return
        i = end


def _jpeg_reason(data: bytes) -> tuple[str | None, bool]:
    head = jpeg_header(data)
    if head.cmyk_uninverted_by_dali:
        # DALI reads such CMYK uninverted; Pillow, like browsers, assumes Adobe's inverted CMYK
        return "CMYK JPEG without an Adobe marker: DALI reads it uninverted", False
    return None, head.xmp_orientation


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, data start, data end) of each chunk up to IEND; EOFError when the data ends first."""
    i, n = 8, len(data)
    while True:
        if i + 8 > n:
            raise EOFError(f"PNG ends at byte {n} before its IEND chunk")
        length, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        if i + 12 + length > n:
            raise EOFError(f"PNG ends at byte {n} inside its {kind!r} chunk")
        yield kind, i + 8, i + 8 + length
        if kind == b"IEND":
            return
        i += 12 + length


def _png_has_exif_text(data: bytes) -> bool:
    """A text chunk Pillow reads EXIF or XMP orientation from (DALI reads only the eXIf chunk)."""
    return any(
        kind in (b"tEXt", b"zTXt", b"iTXt") and data[start:end].split(b"\x00", 1)[0] in _PNG_EXIF_TEXT
        for kind, start, end in _png_chunks(data)
    )


def _webp_reason(data: bytes) -> tuple[str | None, bool]:
    chunks: dict[bytes, tuple[int, int]] = {}
    i = 12
    while i + 8 <= len(data):
        length = int.from_bytes(data[i + 4 : i + 8], "little")
        chunks.setdefault(data[i : i + 4], (i + 8, i + 8 + length))
        i += 8 + length + (length & 1)
    if b"VP8L" in chunks and b"EXIF" in chunks:
        return "lossless WebP with EXIF: DALI 2.4's WebP parser fails on it", False
    xmp = chunks.get(b"XMP ")
    return None, xmp is not None and data.find(_XMP_ORIENTATION, *xmp) >= 0


def _tiff_reason(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            extra_samples = im.tag_v2.get(338, ())
            if 1 in (extra_samples if isinstance(extra_samples, tuple) else (extra_samples,)):
                # DALI keeps the premultiplied colours; Pillow un-premultiplies, as it shows every RGBA file
                return "TIFF with premultiplied alpha: DALI does not un-premultiply it"
            if ORIENTATION not in im.tag_v2 and im.getexif().get(ORIENTATION, 1) in range(2, 9):
                return "TIFF orientation only in XMP, which DALI does not read"
    except Exception:  # noqa: BLE001 - a TIFF Pillow cannot parse: DALI fails on it and the rescue says how
        return None
    return None


def _orientation_dali_misses(data: bytes) -> int | None:
    """The orientation ImageOps.exif_transpose applies when it differs from the one in the EXIF block (the
    one DALI applies), else None. Opens the file with Pillow: only called when such metadata is present."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            applied = im.getexif().get(ORIENTATION, 1)  # may load a PNG, to reach chunks after its pixels
            exif = Image.Exif()
            if "exif" in im.info:
                exif.load(im.info["exif"])
    except Exception:  # noqa: BLE001 - unreadable here means DALI fails too, and the rescue says how
        return None
    seen_by_dali = exif.get(ORIENTATION, 1)
    return applied if applied in range(2, 9) and applied != seen_by_dali else None
