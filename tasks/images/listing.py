"""Walk a folder or an object-store prefix for the images a run classifies, and count by kind everything else it
finds there, so nothing in the input goes unmentioned (the manifest is built from this in `tasks.images.manifest`).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageFile

from tasks.images.names import uri_of_path
from tasks.images.read import DALI_FORMATS, PILLOW_FORMATS
from tasks.storage import filesystem, full_url, redact

log = logging.getLogger(__name__)

Rows = dict[str, Any]  # the manifest's columns (lists or Arrow arrays): uri, bytes, mtime_ns, label, etag
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Pillow registers these but only names them: MPEG reads a video's header, a stub (BUFR, GRIB, HDF5) needs a
# handler an application installs; neither gives pixels, so such files are counted as skipped, not listed
_IDENTIFY_ONLY = frozenset({"MPEG"})


@functools.cache
def image_suffixes() -> frozenset[str]:
    """Every file suffix Pillow opens as an image (its registered extensions: `.gif`, `.ico`, `.tga`, ...), and
    those of the formats a2k decodes. The header check decides what each file is (a format DALI and Pillow cannot
    decode for the model is an `unsupported` row naming it), so a listed file always ends as a row."""
    decoded = DALI_FORMATS | PILLOW_FORMATS
    return frozenset(
        ext.lower() for ext, fmt in Image.registered_extensions().items()
        if fmt in decoded or (fmt in Image.OPEN and fmt not in _IDENTIFY_ONLY and not _is_stub(fmt))
    )


def _is_stub(fmt: str) -> bool:
    factory = Image.OPEN[fmt][0]
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


def describe_suffixes() -> str:
    """The suffixes a listing picks up, for a warning that it found none: '.apng .avif ... .xpm'."""
    return " ".join(sorted(image_suffixes()))


def skipped_name(name: str) -> str | None:
    """Why a file (or object) of this name is no image of the run, or None when it is listed: 'hidden' (a name
    starting with '.'), else its suffix ('.txt', '.gz' for `photo.jpeg.gz`) or 'no suffix'."""
    if name.startswith("."):
        return "hidden"
    suffix = os.path.splitext(name)[1].lower()
    if suffix in image_suffixes():
        return None
    return suffix or "no suffix"


def walk_folder(root: str, skipped: Counter[str]) -> Rows:
    """The images under the folder `root`, recursively (uri, bytes, mtime_ns, label; etag null). Hidden files are
    skipped; links to files are followed wherever they lead (also outside `root`); links to folders are not (as
    `os.walk` does); a file that vanishes while listed was never part of the run; a subfolder that cannot be read
    is logged and skipped. Each skipped entry is counted in `skipped` by why: its suffix ('.txt', 'no suffix'),
    'hidden', 'dangling symlink', 'symlink loop', 'link to a folder', 'vanished while listed', 'unreadable
    folder', 'stat failed'."""
    rows: Rows = {"uri": [], "bytes": [], "mtime_ns": [], "label": []}
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        files, subfolders = _list_folder(folder, depth, skipped)
        stack += [(sub, depth + 1) for sub in subfolders]  # any order: the manifest is sorted at the end
        for key, values in zip(("uri", "bytes", "mtime_ns", "label"), files):
            rows[key] += values
    rows["etag"] = [None] * len(rows["uri"])
    return rows


def _list_folder(folder: str, depth: int, skipped: Counter[str]) -> tuple[tuple[list, list, list, list], list[str]]:
    """One folder's images (uris, sizes, mtimes, labels; os.scandir and plain strings, faster than pathlib:
    bench/NOTES.md, variant 12) and its subfolders; what it skips is counted in `skipped`."""
    uris: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    subfolders: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        if depth == 0:
            raise
        log.warning("skipped folder %s: %s", folder, e.strerror or e)
        skipped["unreadable folder"] += 1
        entries = []
    for entry in entries:
        if entry.is_symlink() and (why := _broken_link(entry.path)):  # before is_dir, which raises on a loop
            skipped[why] += 1
            continue
        if entry.is_dir():
            if not entry.is_symlink():
                subfolders.append(entry.path)
            else:
                skipped["link to a folder"] += 1
            continue
        if why := skipped_name(entry.name):
            skipped[why] += 1
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:  # vanished while listing: never part of this run
            skipped["vanished while listed"] += 1
            continue
        except OSError as e:
            log.warning("skipped %s: %s", uri_of_path(entry.path), e.strerror or e)
            skipped["stat failed"] += 1
            continue
        uris.append(uri_of_path(entry.path))  # a name that is not UTF-8 is escaped, not a failed run
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    label = uri_of_path(os.path.basename(folder)) if depth == 1 else None
    return (uris, sizes, mtimes, [label] * len(uris)), subfolders


def _broken_link(path: str) -> str | None:
    try:
        os.stat(path)
    except FileNotFoundError:
        return "dangling symlink"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        log.warning("skipped %s: %s", uri_of_path(path), e.strerror or e)
        return "stat failed"
    return None


def walk_objects(source: str, skipped: Counter[str]) -> Rows:
    """The images under an object-store prefix, listed through obstore (tasks.images.s3_reads: its first-level
    prefixes at once, as Arrow columns, which `_object_columns` turns into the manifest's); what else is there is
    counted in `skipped` as `skipped_name` says."""
    from tasks.images.s3_reads import head_object, list_prefix, list_prefix_table

    fs, root = filesystem(source)
    expected = "give a prefix of images or a .parquet manifest"
    rows: Rows = {name: [] for name in ("uri", "bytes", "mtime_ns", "label", "etag")}
    listed = 0
    try:
        table = list_prefix_table(source)
        if table is not None:
            listed = table.num_rows
            rows = _object_columns(table, root, skipped)
        else:  # a key obstore cannot name: key by key, the rest through s3fs
            for info in list_prefix(source):
                listed += 1
                _add_object(rows, skipped, fs, root, info)
    except FileNotFoundError as e:  # e.g. no such bucket
        raise FileNotFoundError(f"input {source!r} does not exist ({redact(str(e))}); {expected}") from None
    if not listed and head_object(source) is not None:
        raise ValueError(f"input {source!r} is an object but not a .parquet manifest; {expected}")
    if not listed:
        raise FileNotFoundError(f"input {source!r} does not exist (no object under it); {expected}")
    return rows


def _object_columns(table: pa.Table, root: str, skipped: Counter[str]) -> Rows:
    """The manifest's columns of obstore's listing (keys under `root`, 'bucket/prefix') with Arrow compute, as
    `_add_object` makes them one by one; only names that are not ASCII (whose case Python folds) and the
    skipped objects' kinds outside ASCII take `skipped_name` per key."""
    bucket, _, prefix = root.partition("/")
    key = table.column("path")
    relative = pc.utf8_slice_codeunits(key, start=len(prefix) + 1) if prefix else key
    name = pc.replace_substring_regex(relative, pattern="^.*/", replacement="")
    # a folder marker ('a/' listed by obstore as 'a'), or an empty object without suffix taken for one
    marker = pc.or_(pc.equal(name, ""), pc.and_(pc.equal(table.column("size"), 0),
                                                pc.invert(pc.match_substring(name, "."))))
    hidden = pc.starts_with(name, ".")
    suffix = pc.utf8_lower(pc.struct_field(pc.extract_regex(name, pattern=r"(?P<s>\.[^.]*)$"), [0]))
    ascii_ = pc.string_is_ascii(name)
    image = pc.and_(pc.and_(ascii_, pc.invert(hidden)),
                    pc.fill_null(pc.is_in(suffix, value_set=pa.array(sorted(image_suffixes()))), False))
    image = pc.and_not(image, marker)
    other = pc.and_not(pc.invert(ascii_), marker)  # not ASCII: decided by skipped_name, as in _add_object
    if pc.any(other).as_py():
        image = pc.or_(image, _python_decides(name, other, skipped))
    why = pc.if_else(hidden, "hidden", pc.fill_null(suffix, "no suffix"))
    counted = pc.filter(why, pc.and_not(pc.and_not(ascii_, marker), image))
    for kind in pc.value_counts(counted).to_pylist():
        skipped[kind["values"]] += kind["counts"]
    kept = table.filter(image)
    relative = pc.filter(relative, image)
    etag = pc.utf8_trim(kept.column("e_tag"), '"')
    label = pc.replace_substring_regex(relative, pattern="/.*$", replacement="")
    null = pa.scalar(None, pa.string())
    return {
        "uri": pc.binary_join_element_wise(f"s3://{bucket}/", kept.column("path"), ""),
        "bytes": pc.cast(kept.column("size"), pa.int64()),
        "mtime_ns": pc.multiply(pc.cast(pc.cast(kept.column("last_modified"), pa.timestamp("us", "UTC")),
                                        pa.int64()), 1000),
        "label": pc.if_else(pc.equal(pc.count_substring(relative, "/"), 1), label, null),
        "etag": pc.if_else(pc.equal(kept.column("e_tag"), ""), null, etag),
    }


def _python_decides(name: pa.ChunkedArray, rows: pa.ChunkedArray, skipped: Counter[str]) -> pa.Array:
    """Images among the `rows` of `name` by `skipped_name` (the others counted in `skipped`)."""
    image = []
    for one, take in zip(name.to_pylist(), rows.to_pylist()):
        why = skipped_name(one) if take else "-"
        if take and why:
            skipped[why] += 1
        image.append(take and why is None)
    return pa.array(image)


def _add_object(rows: Rows, skipped: Counter[str], fs: Any, root: str, info: dict[str, Any]) -> None:
    """One listed object's manifest row, or its count in `skipped`."""
    path = info["path"]
    relative = path[len(root) + 1 :]
    name = relative.rsplit("/", 1)[-1]
    if not name:  # a folder marker (a key ending in /)
        return
    if why := skipped_name(name):
        skipped[why] += 1
        return
    rows["uri"].append(full_url(fs, path))
    rows["bytes"].append(info["size"])
    rows["mtime_ns"].append(modified_ns(info))
    rows["label"].append(relative.split("/", 1)[0] if relative.count("/") == 1 else None)
    rows["etag"].append(etag_of(info))


def modified_ns(info: dict[str, Any]) -> int:
    """An object's LastModified as nanoseconds since the epoch, as `st_mtime_ns` is for a file."""
    stamp = info.get("LastModified")
    return (stamp - _EPOCH) // timedelta(microseconds=1) * 1000 if isinstance(stamp, datetime) else 0


def etag_of(info: dict[str, Any]) -> str | None:
    etag = info.get("ETag")
    return str(etag).strip('"') if etag else None
