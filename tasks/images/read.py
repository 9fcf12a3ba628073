"""Read image bytes (local files into reusable arenas, objects in a store in one concurrent batch) and refuse,
from the header alone, what should never be decoded. Every file ends as a `Blob` to decode or a `Failure` row."""

from __future__ import annotations

import io
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

import numpy as np
from PIL import Image

from tasks.images.names import path_of_uri, uri_refusal
from tasks.images.formats import is_truncated, pillow_reason, plain_jpeg_size, signature
from tasks.images.s3_reads import describe, fetch_objects, is_permission_error, is_unnamed_key
from tasks.storage import is_url, object_paths, redact

# Formats DALI's image decoder reads (PIL's names for them), and those only Pillow decodes here (the first
# frame of a GIF); anything else is refused before decoding.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "JPEG2000", "PPM"})
PILLOW_FORMATS = frozenset({"GIF"})
# Pillow modes of 32-bit integer and floating-point samples: no standard 8-bit display, so not guessed at
_WIDE_MODES = frozenset({"I", "F"})
DEFAULT_MAX_PIXELS = 100_000_000


class ErrorKind(str, Enum):
    """Why an image has no prediction; one row of the errors table each."""

    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    TOO_LARGE = "too_large"
    UNSUPPORTED = "unsupported"
    UNREADABLE = "unreadable"
    VANISHED = "vanished"  # listed, then gone when it was read
    MISSING = "missing"  # a manifest's uri with no file or object behind it, from the listing on
    INVALID_URI = "invalid_uri"


@dataclass(frozen=True)
class Failure:
    kind: ErrorKind
    message: str


@dataclass(frozen=True, slots=True)
class Blob:
    """An image's encoded bytes that passed `check_header`, and why Pillow decodes it instead of DALI (None
    for nearly every file). `data` may be a view into a `ReadArena`: valid until that arena is reset."""

    data: bytes | memoryview
    pillow_reason: str | None = None


class ReadArena:
    """One reusable buffer a batch of local files is read into, so that reading a file is one copy from the
    page cache into memory that is already mapped. A fresh `bytes` per file costs several times the copy
    itself: the allocator maps new pages for each ~100 kB file and the kernel zero-fills them (about 70 us
    against 20 us a file, measured in bench/NOTES.md). A file that does not fit is read as `bytes`, and the
    next `reset` grows the buffer to what the last batch needed (up to `max_bytes`)."""

    def __init__(self, initial_bytes: int = 64 << 20, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._buffer = np.empty(initial_bytes, dtype=np.uint8)  # pages are mapped on first use only
        self._view = memoryview(self._buffer)
        self._used = self._wanted = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget every view handed out; the caller guarantees none is still in use."""
        if self._wanted > len(self._buffer) and len(self._buffer) < self.max_bytes:
            self._buffer = np.empty(min(self.max_bytes, self._wanted + (self._wanted >> 2)), dtype=np.uint8)
            self._view = memoryview(self._buffer)
        self._used = self._wanted = 0

    def take(self, size: int) -> memoryview | None:
        """A writable view of `size` bytes, or None when the buffer is full."""
        with self._lock:
            self._wanted += size
            if self._used + size > len(self._buffer):
                return None
            start, self._used = self._used, self._used + size
        return self._view[start : start + size]


MAX_FILE_BYTES = 256 << 20  # a local file larger than this is `too_large` and never read
_FILE_TYPES = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def read_image(uri: str, arena: ReadArena | None = None, max_bytes: int = MAX_FILE_BYTES) -> bytes | memoryview | Failure:
    """The file's bytes (in `arena` when one is given and has room), or the reason they cannot be had. Only a
    regular file is opened (a FIFO would wait for a writer forever, a device never end), and at most the size it
    had when opened is read: over `max_bytes` it is not read at all, and one that grows meanwhile is refused."""
    if failure := refused_uri(uri):
        return failure
    try:
        path = path_of_uri(uri)  # the file's own bytes where its name is not UTF-8
        if failure := _not_regular(os.stat(path).st_mode):
            return failure
        # non-blocking: a file swapped for a FIFO since the stat is opened without waiting, and refused below
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if failure := _not_regular(st.st_mode) or _over_size(st.st_size, max_bytes):
                return failure
            return _read_at_most(fd, st.st_size, arena)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return Failure(ErrorKind.VANISHED, f"file vanished after it was listed: {uri}")
    except PermissionError as e:
        return Failure(ErrorKind.UNREADABLE, f"permission denied: {e.strerror}")
    except OSError as e:
        return Failure(ErrorKind.UNREADABLE, f"read failed: {e}")


def refused_uri(uri: str) -> Failure | None:
    """The Failure of a manifest row that is never read: no uri, or a scheme other than a local path or s3://."""
    if refusal := uri_refusal(uri):
        return Failure(ErrorKind(refusal[0]), refusal[1])
    return None


def _not_regular(mode: int) -> Failure | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_TYPES if test(mode)), f"file type {stat.S_IFMT(mode):o}")
    return Failure(ErrorKind.UNREADABLE, f"not a regular file: {kind}")


def _over_size(size: int, max_bytes: int) -> Failure | None:
    if size > max_bytes:
        return Failure(ErrorKind.TOO_LARGE, f"file of {size} bytes is over the limit of {max_bytes} bytes; not read")
    return None


def _read_at_most(fd: int, size: int, arena: ReadArena | None) -> bytes | memoryview | Failure:
    """`size` bytes of `fd` (fewer when it was cut short meanwhile), or a Failure when there is more."""
    view = arena.take(size) if arena is not None and size else None
    got = 0
    if view is None:
        parts = []
        while got < size and (part := os.read(fd, size - got)):
            parts.append(part)
            got += len(part)
        data: bytes | memoryview = parts[0] if len(parts) == 1 else b"".join(parts)
    else:
        while got < size and (n := os.readv(fd, [view[got:]])):
            got += n
        data = view[:got]
    if got == size and os.read(fd, 1):
        return Failure(ErrorKind.UNREADABLE, f"file grew while it was read (it had {size} bytes when opened)")
    return data


def check_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Failure | None:
    """Refuse, from the header alone, what should never be decoded: empty, not an image, unsupported, over
    `max_pixels` (never allocated), or cut short. Pillow's own decompression-bomb limit (twice
    `PIL.Image.MAX_IMAGE_PIXELS`, about 179 M pixels) still applies above `max_pixels`."""
    if not data:
        return Failure(ErrorKind.EMPTY, "file is empty (0 bytes)")
    if (size := plain_jpeg_size(data)) is not None:  # nearly every photo: no Pillow needed
        return _over_limit("JPEG", *size, max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (width, height) = im.format, im.mode, im.size
    except Image.DecompressionBombError as e:
        return Failure(ErrorKind.TOO_LARGE, f"{e} (a2k's limit: {max_pixels} pixels)")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for garbage; _unreadable_header sorts them
        return _unreadable_header(data, e)
    if fmt not in DALI_FORMATS | PILLOW_FORMATS:
        supported = ", ".join(sorted(DALI_FORMATS | PILLOW_FORMATS))
        return Failure(ErrorKind.UNSUPPORTED, f"format {fmt} is not decoded; supported: {supported}")
    if mode in _WIDE_MODES:
        return Failure(ErrorKind.UNSUPPORTED, f"{fmt} with 32-bit integer or float samples (Pillow mode {mode}) is "
                       "not decoded: it has no standard 8-bit display; 8- and 16-bit samples are")
    if width < 1 or height < 1:
        return Failure(ErrorKind.CORRUPT, f"header says {width}x{height}")
    if too_large := _over_limit(fmt, width, height, max_pixels):
        return too_large
    if is_truncated(data):
        return Failure(ErrorKind.TRUNCATED, f"{fmt} file ends before its end marker ({len(data)} bytes)")
    return None


def _over_limit(fmt: str, width: int, height: int, max_pixels: int) -> Failure | None:
    if width * height > max_pixels:
        return Failure(ErrorKind.TOO_LARGE, f"{fmt} of {width}x{height} is over the limit of {max_pixels} pixels")
    return None


def _unreadable_header(data: bytes, error: Exception) -> Failure:
    """A header Pillow cannot parse: cut short when its format says so, else not (recognisably) an image."""
    fmt = signature(data)
    detail = "" if isinstance(error, Image.UnidentifiedImageError) else f": {type(error).__name__}: {error}"
    if fmt and (is_truncated(data) or "truncated" in detail.lower()):
        return Failure(ErrorKind.TRUNCATED, f"{fmt} file ends inside its header ({len(data)} bytes){detail}"[:500])
    what = f"{fmt} signature, but no {fmt} header behind it" if fmt else "the header matches none"
    return Failure(ErrorKind.NOT_AN_IMAGE, f"not a recognised image format ({what}){detail}"[:500])


def read_objects(uris: list[str]) -> list[bytes | memoryview | Failure]:
    """The bytes of many objects (s3://...), fetched concurrently through obstore (tasks.images.s3_reads), or the
    reason each cannot be had; order follows `uris`. obstore retries throttling, 5xx answers and dropped
    connections with back-off, so a failure here is final."""
    refused = [refused_uri(u) for u in uris]
    wanted = [u for u, r in zip(uris, refused) if r is None]
    if not wanted:
        return refused
    results = fetch_objects(wanted)
    odd = [k for k, r in enumerate(results) if is_unnamed_key(r)]
    for k, r in zip(odd, _read_through_s3fs([wanted[k] for k in odd])):
        results[k] = r
    fetched = iter([r if isinstance(r, (bytes, memoryview)) else _read_failure(uri, r)
                    for uri, r in zip(wanted, results)])
    return [r if r is not None else next(fetched) for r in refused]


def _read_through_s3fs(uris: list[str]) -> list[bytes | BaseException]:
    """Objects whose keys obstore cannot name ('a//b.jpg', 'a/./b.jpg'), through s3fs; botocore retries."""
    if not uris:
        return []
    fs, paths = object_paths(uris)
    # cat_ranges rather than cat: cat expands "[", "*" and "?" in keys as globs and drops what they miss
    return fs.cat_ranges(paths, None, None, on_error="return")


def _read_failure(uri: str, error: BaseException) -> Failure:
    if not isinstance(error, Exception):  # cancellation or interrupt: not a property of the object
        raise error
    if isinstance(error, FileNotFoundError):
        return Failure(ErrorKind.VANISHED, f"object vanished after it was listed: {uri}")
    if is_permission_error(error):
        return Failure(ErrorKind.UNREADABLE, redact(f"permission denied: {describe(error)}")[:500])
    return Failure(ErrorKind.UNREADABLE, redact(f"read failed: {type(error).__name__}: {describe(error)}")[:500])


def checked_blob(data: bytes | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS) -> Blob | Failure:
    """`check_header` and `pillow_reason` in one pass for an ordinary JPEG (a marker walk on the bytes
    where they lie); any other file is copied to `bytes` and goes through both in full."""
    if (size := plain_jpeg_size(data)) is not None:
        return _over_limit("JPEG", *size, max_pixels) or Blob(data)
    data = bytes(data)
    return check_header(data, max_pixels) or Blob(data, pillow_reason(data))


READ_CHUNK = 16  # local files per reader task: fewer futures than one per file, still parallel on slow storage


def load_blobs(
    uris: list[str], pool: ThreadPoolExecutor, max_pixels: int = DEFAULT_MAX_PIXELS, arena: ReadArena | None = None
) -> list[Blob | Failure]:
    """Read and header-check many images at once; order follows `uris`.

    Local files are read in chunks on the thread pool, into `arena` when one is given (its earlier views
    are dropped: `arena.reset()` here); objects in a store (the uris of one manifest share a scheme) are
    fetched as one concurrent batch.
    """

    def _checked(data: bytes | memoryview | Failure) -> Blob | Failure:
        return data if isinstance(data, Failure) else checked_blob(data, max_pixels)

    first = next((u for u in uris if refused_uri(u) is None), None)  # a refused row (http://, no uri) decides nothing
    if first is not None and is_url(first):
        return [_checked(data) for data in read_objects(uris)]
    if arena is not None:
        arena.reset()
    chunks = [uris[i : i + READ_CHUNK] for i in range(0, len(uris), READ_CHUNK)]
    return [b for chunk in pool.map(lambda c: [_checked(read_image(u, arena)) for u in c], chunks) for b in chunk]
