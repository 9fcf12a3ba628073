"""List images into a sorted, deterministic manifest (an Arrow table) and cut it into shards.

A source is a local folder, an object-store prefix (`s3://bucket/prefix`) or a Parquet manifest on either.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.images.s3_reads import head_object, list_prefix
from tasks.images.names import missing_uri, path_of_uri, uri_of_path, uri_refusal
from tasks.storage import filesystem, full_url, is_url, object_paths, read_parquet, redact, sha256_of, write_parquet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("etag", pa.string()),  # the object's ETag on S3; null for local files
    ]
)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SKIPPED_KEY = b"a2k.skipped"  # the manifest's schema metadata: what the folder listing skipped, by kind


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def list_images(source: str | os.PathLike) -> pa.Table:
    """A manifest of every image under a folder or an object-store prefix (recursively), or the rows of a
    Parquet manifest. What a folder or prefix holds besides images is counted by kind (`skipped_counts`).

    A tree laid out as `<root>/<class>/<file>` gives each file its class as `label`; files at
    other depths get a null label. Rows are sorted by uri, so the same tree gives the same manifest.
    """
    if str(source).lower().endswith(".parquet"):
        return read_manifest(source)
    if is_url(source):
        return _list_objects(str(source))
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input {str(source)!r} does not exist; give a folder of images or a .parquet manifest")
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise ValueError(f"input {str(source)!r} is a file but not a .parquet manifest; give a folder or a manifest")
        return read_manifest(path)
    rows: dict[str, list] = {"uri": [], "bytes": [], "mtime_ns": [], "label": []}
    skipped: Counter[str] = Counter()
    for folder_rows in _walk_folders(str(path.resolve()), skipped):
        for key, values in zip(("uri", "bytes", "mtime_ns", "label"), folder_rows):
            rows[key] += values
    rows["etag"] = [None] * len(rows["uri"])
    return with_skipped(sort_manifest(pa.table(rows, schema=MANIFEST_SCHEMA)), skipped)


def with_skipped(table: pa.Table, skipped: Counter[str] | dict[str, int]) -> pa.Table:
    """The manifest carrying, in its schema's metadata, how many entries of each kind the listing skipped."""
    metadata = {**(table.schema.metadata or {}), SKIPPED_KEY: json.dumps(dict(sorted(skipped.items()))).encode()}
    return table.replace_schema_metadata(metadata)


def skipped_counts(table: pa.Table) -> dict[str, int]:
    """What `with_skipped` recorded, most first (empty for a Parquet manifest: its rows are the images)."""
    counts = json.loads((table.schema.metadata or {}).get(SKIPPED_KEY, b"{}"))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_skipped(counts: dict[str, int]) -> str:
    """'skipped 12 files: .txt 10, .json 2' (or 'skipped no files'), for the log and the summary."""
    total = sum(counts.values())
    if not total:
        return "skipped no files"
    return f"skipped {total} file{'s' if total != 1 else ''}: " + ", ".join(f"{k} {n}" for k, n in counts.items())


def _walk_folders(root: str, skipped: Counter[str]) -> Iterator[tuple[list, list, list, list]]:
    """The images of each folder under `root` (uris, sizes, mtimes, labels). Hidden files are skipped; links
    to folders are not followed (as `os.walk` does); a file that vanishes while listed was never part of the
    run; a subfolder that cannot be read is logged and skipped. Each skipped entry is counted in `skipped` by
    why: its suffix ('.txt', 'no suffix'), 'hidden', 'dangling symlink', 'symlink loop', 'link to a folder',
    'vanished while listed', 'unreadable folder', 'stat failed'."""
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        files, subfolders = _list_folder(folder, depth, skipped)
        stack += [(sub, depth + 1) for sub in subfolders]  # any order: the manifest is sorted at the end
        if files[0]:
            yield files


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
        if why := _skipped_name(entry.name):
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


def _skipped_name(name: str) -> str | None:
    """Why a file (or object) of this name is no image of the run, or None when it is listed."""
    if name.startswith("."):
        return "hidden"
    if not _is_image(name):
        return os.path.splitext(name)[1].lower() or "no suffix"
    return None


def _list_objects(source: str) -> pa.Table:
    """The images under an object-store prefix, from one recursive listing (pages of 1,000 keys through obstore:
    tasks.images.s3_reads)."""
    fs, root = filesystem(source)
    expected = "give a prefix of images or a .parquet manifest"
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    skipped: Counter[str] = Counter()
    listed = 0
    try:
        for info in list_prefix(source):
            listed += 1
            _add_object(rows, skipped, fs, root, info)
    except FileNotFoundError as e:  # e.g. no such bucket
        raise FileNotFoundError(f"input {source!r} does not exist ({redact(str(e))}); {expected}") from None
    if not listed and head_object(source) is not None:
        raise ValueError(f"input {source!r} is an object but not a .parquet manifest; {expected}")
    if not listed:
        raise FileNotFoundError(f"input {source!r} does not exist (no object under it); {expected}")
    return with_skipped(sort_manifest(pa.table(rows, schema=MANIFEST_SCHEMA)), skipped)


def _add_object(rows: dict[str, list], skipped: Counter[str], fs: Any, root: str, info: dict[str, Any]) -> None:
    """One listed object's manifest row, or its count in `skipped`."""
    path = info["path"]
    relative = path[len(root) + 1 :]
    name = relative.rsplit("/", 1)[-1]
    if not name:  # a folder marker (a key ending in /)
        return
    if why := _skipped_name(name):
        skipped[why] += 1
        return
    rows["uri"].append(full_url(fs, path))
    rows["bytes"].append(info["size"])
    rows["mtime_ns"].append(_modified_ns(info))
    rows["label"].append(relative.split("/", 1)[0] if relative.count("/") == 1 else None)
    rows["etag"].append(_etag(info))


def _modified_ns(info: dict[str, Any]) -> int:
    """An object's LastModified as nanoseconds since the epoch, as `st_mtime_ns` is for a file."""
    stamp = info.get("LastModified")
    return (stamp - _EPOCH) // timedelta(microseconds=1) * 1000 if isinstance(stamp, datetime) else 0


def _etag(info: dict[str, Any]) -> str | None:
    etag = info.get("ETag")
    return str(etag).strip('"') if etag else None


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read a Parquet manifest: it needs a `uri` column; `label`, `bytes`, `mtime_ns` and `etag` are optional.

    Missing sizes and times are read from the files (or objects), so a plain list of paths is a valid manifest.
    """
    table = read_parquet(path)
    given = set(table.column_names)
    if "uri" not in given:
        raise ValueError(f"manifest {str(path)!r} has no 'uri' column; it has: {', '.join(table.column_names)}")
    uris = [_manifest_uri(u, row) for row, u in enumerate(table.column("uri").to_pylist())]
    read = [u for u in uris if uri_refusal(u) is None]  # null, empty, http:// ...: error rows, never read
    schemes = {u.split("://", 1)[0].lower() if is_url(u) else "a local path" for u in read}
    if len(schemes) > 1:
        raise ValueError(
            f"manifest {str(path)!r} mixes uri schemes ({', '.join(sorted(schemes))}); its uris must all be "
            "local paths or all in one store"
        )

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in given else [None] * len(uris)

    sizes, mtimes, etags = column("bytes"), column("mtime_ns"), column("etag")
    if not {"bytes", "mtime_ns"} <= given:
        found = dict(zip(read, zip(*_stat_all(read)))) if read else {}
        sizes, mtimes, found_etags = ([found.get(u, (0, 0, None))[k] for u in uris] for k in range(3))
        if "etag" not in given:
            etags = found_etags
    labels = [None if v is None else str(v) for v in column("label")]
    etags = [None if v is None else str(v) for v in etags]
    columns = {"uri": uris, "bytes": sizes, "mtime_ns": mtimes, "label": labels, "etag": etags}
    return sort_manifest(pa.table(columns, schema=MANIFEST_SCHEMA))


def _manifest_uri(uri: Any, row: int) -> str:
    """A manifest's uri as a string; a null or empty one gets a stand-in naming its row (an `invalid_uri` error
    row), never the string 'None'."""
    if uri is None:
        return missing_uri(row, "null")
    uri = str(uri)
    return uri if uri.strip() else missing_uri(row, "empty")


def _stat_all(uris: list[str]) -> tuple[list[int], list[int], list[str | None]]:
    """Size, mtime and ETag of each uri; 0, 0 and null where it cannot be had (decoding records why)."""
    if not uris or not is_url(uris[0]):
        stats = [_stat_or_none(u) for u in uris]
        return [s.st_size if s else 0 for s in stats], [s.st_mtime_ns if s else 0 for s in stats], [None] * len(uris)
    fs, paths = object_paths(uris)

    def info(path: str) -> dict[str, Any] | None:
        try:
            return fs.info(path)
        except OSError:  # the decode step records it as vanished or unreadable
            return None

    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="a2k-stat") as pool:  # one HEAD per object
        infos = list(pool.map(info, paths))
    return ([i["size"] if i else 0 for i in infos], [_modified_ns(i) if i else 0 for i in infos],
            [_etag(i) if i else None for i in infos])


def _stat_or_none(uri: str) -> os.stat_result | None:
    try:
        return os.stat(path_of_uri(uri))
    except OSError:  # the decode step records it as vanished or unreadable
        return None


def sort_manifest(table: pa.Table) -> pa.Table:
    table = table.sort_by([("uri", "ascending")])
    uris = table.column("uri")
    if len(uris) != len(set(uris.to_pylist())):
        raise ValueError("manifest lists the same uri more than once; each image must appear exactly once")
    return table


def write_manifest(table: pa.Table, path: str | os.PathLike) -> str:
    """Write a manifest (atomically, to a folder or S3): the standard columns first, then any extra ones
    (such as `sha256`); returns where it went."""
    if "etag" not in table.column_names:
        table = table.append_column("etag", pa.nulls(table.num_rows, pa.string()))
    extra = [c for c in table.column_names if c not in MANIFEST_SCHEMA.names]
    standard = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    standard = standard.replace_schema_metadata(table.schema.metadata)  # the skip counts travel with the manifest
    for name in extra:
        standard = standard.append_column(table.schema.field(name), table.column(name))
    return write_parquet(standard, path)


def with_content_hashes(table: pa.Table) -> pa.Table:
    """The manifest plus a `sha256` column of each file's bytes, so a split can be checked later."""

    def digest(uri: str) -> str:
        with open(path_of_uri(uri), "rb") as f:
            return sha256_of(f)

    return table.append_column("sha256", pa.array([digest(u) for u in table.column("uri").to_pylist()], pa.string()))


@dataclass(frozen=True)
class Shard:
    """A contiguous slice of the sorted manifest; `shard_id` hashes its members' uri, size, mtime and ETag."""

    index: int
    start: int
    stop: int
    shard_id: str

    @property
    def size(self) -> int:
        return self.stop - self.start


def make_shards(manifest: pa.Table, shard_size: int) -> list[Shard]:
    """Cut the manifest into shards of `shard_size` rows (the last may be smaller)."""
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size!r} must be at least 1")
    uris = manifest.column("uri").to_pylist()
    sizes = manifest.column("bytes").to_pylist()
    mtimes = manifest.column("mtime_ns").to_pylist()
    etags = manifest.column("etag").to_pylist() if "etag" in manifest.column_names else [None] * len(uris)
    shards = []
    for index, start in enumerate(range(0, len(uris), shard_size)):
        stop = min(start + shard_size, len(uris))
        digest = hashlib.sha256()
        for i in range(start, stop):
            member = f"{uris[i]}\0{sizes[i]}\0{mtimes[i]}"
            if etags[i] is not None:  # an object rewritten within LastModified's second keeps size and time
                member += f"\0{etags[i]}"  # added only when known, so a local file's shard id is unchanged
            digest.update(f"{member}\n".encode())
        shards.append(Shard(index=index, start=start, stop=stop, shard_id=digest.hexdigest()[:16]))
    return shards
