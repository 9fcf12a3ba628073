"""List images into a sorted, deterministic manifest (an Arrow table) and cut it into shards.

A source is a local folder, an object-store prefix (`s3://bucket/prefix`) or a Parquet manifest on either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa

from tasks.images.listing import describe_suffixes, etag_of, modified_ns, walk_folder, walk_objects
from tasks.images.names import missing_uri, path_of_uri, uri_of_path, uri_refusal
from tasks.storage import is_url, object_paths, read_parquet, sha256_of, write_parquet

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("etag", pa.string()),  # the object's ETag on S3; null for local files
    ]
)

NOT_FOUND = -1  # the mtime_ns of a manifest uri with no file or object behind it when the manifest was read
_NAMED = 3  # uris a warning names before it says how many more
SKIPPED_KEY = b"a2k.skipped"  # the manifest's schema metadata: what the folder listing skipped, by kind


def list_images(source: str | os.PathLike) -> pa.Table:
    """A manifest of every image under a folder or an object-store prefix (recursively), or the rows of a
    Parquet manifest. What a folder or prefix holds besides images (and a manifest's duplicated uris) is counted
    by kind (`skipped_counts`).

    A tree laid out as `<root>/<class>/<file>` gives each file its class as `label`; files at
    other depths get a null label. Rows are sorted by uri, so the same tree gives the same manifest.
    """
    if str(source).lower().endswith(".parquet"):
        return read_manifest(source)
    skipped: Counter[str] = Counter()
    if is_url(source):
        rows = walk_objects(str(source), skipped)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input {str(source)!r} does not exist; give a folder of images or a .parquet manifest")
        if path.is_file():
            if path.suffix.lower() != ".parquet":
                raise ValueError(f"input {str(source)!r} is a file but not a .parquet manifest; give a folder or a manifest")
            return read_manifest(path)
        rows = walk_folder(str(path.resolve()), skipped)
    return with_skipped(sort_manifest(pa.table(rows, schema=MANIFEST_SCHEMA)), skipped)


def nothing_listed(source: str | os.PathLike) -> str:
    """The warning for a listing of no image: what was looked at and what was looked for."""
    if str(source).lower().endswith(".parquet"):
        return f"nothing listed: the manifest {str(source)!r} has no rows; the output is an empty dataset"
    return (f"nothing listed: no file under {str(source)!r} has an image suffix ({describe_suffixes()}, any case); "
            "the output is an empty dataset")


def with_skipped(table: pa.Table, skipped: Counter[str] | dict[str, int]) -> pa.Table:
    """The manifest carrying, in its schema's metadata, how many entries of each kind the listing skipped."""
    metadata = {**(table.schema.metadata or {}), SKIPPED_KEY: json.dumps(dict(sorted(skipped.items()))).encode()}
    return table.replace_schema_metadata(metadata)


def skipped_counts(table: pa.Table) -> dict[str, int]:
    """What `with_skipped` recorded, most first (for a Parquet manifest: only its duplicated uris, if any)."""
    counts = json.loads((table.schema.metadata or {}).get(SKIPPED_KEY, b"{}"))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_skipped(counts: dict[str, int]) -> str:
    """'skipped 12 files: .txt 10, .json 2' (or 'skipped no files'), for the log and the summary."""
    total = sum(counts.values())
    if not total:
        return "skipped no files"
    return f"skipped {total} file{'s' if total != 1 else ''}: " + ", ".join(f"{k} {n}" for k, n in counts.items())


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read a Parquet manifest: it needs a `uri` column; `label`, `bytes`, `mtime_ns` and `etag` are optional.

    Missing sizes and times are read from the files (or objects), so a plain list of paths is a valid manifest;
    a uri found nowhere then gets `mtime_ns` NOT_FOUND (its row becomes a `missing` error, not a failed run).
    A relative path is resolved against the manifest's own folder (or prefix), and `file:///abs/path` is the
    plain path `/abs/path`. A uri given more than once is kept once (its first row) and the others are counted
    in `skipped_counts` as 'duplicate uri' and named in the log.
    """
    table = read_parquet(path)
    given = set(table.column_names)
    if "uri" not in given:
        raise ValueError(f"manifest {str(path)!r} has no 'uri' column; it has: {', '.join(table.column_names)}")
    base = str(path) if is_url(path) else os.path.dirname(os.path.abspath(path))
    if is_url(path):
        base = base.rsplit("/", 1)[0]
    uris = [_manifest_uri(u, row, base) for row, u in enumerate(table.column("uri").to_pylist())]
    first = _first_rows(uris, path)
    duplicates = len(uris) - len(first)
    if duplicates:
        table, uris = table.take(first), [uris[i] for i in first]
    read = [u for u in uris if uri_refusal(u) is None]  # null, empty, http:// ...: error rows, never read
    schemes = {u.split("://", 1)[0].lower() if is_url(u) else "a local path" for u in read}
    if len(schemes) > 1:
        raise ValueError(
            f"manifest {str(path)!r} mixes uri schemes ({', '.join(sorted(schemes))}); its uris must all be "
            "local paths (or file:// uris) or all in one store"
        )

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in given else [None] * len(uris)

    sizes, mtimes, etags = column("bytes"), column("mtime_ns"), column("etag")
    if not {"bytes", "mtime_ns"} <= given:
        found = dict(zip(read, zip(*_stat_all(read)))) if read else {}
        sizes, mtimes, found_etags = ([found.get(u, (0, 0, None))[k] for u in uris] for k in range(3))
        if "etag" not in given:
            etags = found_etags
        _warn_not_found([u for u, m in zip(uris, mtimes) if m == NOT_FOUND], path)
    labels = [None if v is None else str(v) for v in column("label")]
    etags = [None if v is None else str(v) for v in etags]
    columns = {"uri": uris, "bytes": sizes, "mtime_ns": mtimes, "label": labels, "etag": etags}
    manifest = sort_manifest(pa.table(columns, schema=MANIFEST_SCHEMA))
    return with_skipped(manifest, {"duplicate uri": duplicates} if duplicates else {})


def _first_rows(uris: list[str], path: str | os.PathLike) -> list[int]:
    """The row of each uri's first appearance, in order; the rows repeating one are logged (the first few named)."""
    seen: dict[str, int] = {}
    repeated: Counter[str] = Counter()
    for row, uri in enumerate(uris):
        if uri in seen:
            repeated[uri] += 1
        else:
            seen[uri] = row
    if repeated:
        log.warning("manifest %s lists %d uri(s) more than once: %s; each is classified once (its first row), "
                    "%d repeated row(s) skipped", path, len(repeated),
                    _name_few([f"{u!r} ({n + 1} times)" for u, n in repeated.items()]), sum(repeated.values()))
    return sorted(seen.values())


def _name_few(items: list[str]) -> str:
    return ", ".join(items[:_NAMED]) + (f" and {len(items) - _NAMED} more" if len(items) > _NAMED else "")


def _warn_not_found(uris: list[str], path: str | os.PathLike) -> None:
    if uris:
        log.warning("manifest %s names %d uri(s) with no file or object behind them: %s; each is an error row of "
                    "kind 'missing'", path, len(uris), _name_few([repr(u) for u in uris]))


def _manifest_uri(uri: Any, row: int, base: str) -> str:
    """A manifest's uri as the run reads it: a null or empty one gets a stand-in naming its row (an `invalid_uri`
    error row), never the string 'None'; `file:///p` (or `file://localhost/p`) is the path /p; a relative path
    is joined to `base`, the manifest's folder (or its prefix in a store)."""
    if uri is None:
        return missing_uri(row, "null")
    uri = str(uri)
    if not uri.strip():
        return missing_uri(row, "empty")
    if uri[:7].lower() == "file://":
        rest = uri[7:].removeprefix("localhost")
        if rest.startswith("/"):  # file://host/... names another machine: refused per row as unsupported
            return uri_of_path(unquote(rest, errors="surrogateescape"))
    if "://" in uri or uri.startswith("/"):
        return uri
    if is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(f'{rest}/{uri}')}"
    return os.path.normpath(os.path.join(base, uri))


def _stat_all(uris: list[str]) -> tuple[list[int], list[int], list[str | None]]:
    """Size, mtime and ETag of each uri: 0, NOT_FOUND and null where there is no such file or object, 0, 0 and
    null where it cannot be had otherwise (the read then says why)."""
    if not uris or not is_url(uris[0]):
        stats = [_stat_or_none(u) for u in uris]
        return ([s.st_size if isinstance(s, os.stat_result) else 0 for s in stats],
                [s.st_mtime_ns if isinstance(s, os.stat_result) else s for s in stats], [None] * len(uris))
    fs, paths = object_paths(uris)

    def info(path: str) -> dict[str, Any] | int:
        try:
            found = fs.info(path)
        except FileNotFoundError:
            return NOT_FOUND
        except OSError:  # the read records it as unreadable
            return 0
        return found if found.get("type") == "file" else NOT_FOUND  # a prefix: no object of that name

    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="a2k-stat") as pool:  # one HEAD per object
        infos = list(pool.map(info, paths))
    return ([i["size"] if isinstance(i, dict) else 0 for i in infos],
            [modified_ns(i) if isinstance(i, dict) else i for i in infos],
            [etag_of(i) if isinstance(i, dict) else None for i in infos])


def _stat_or_none(uri: str) -> os.stat_result | int:
    """The file's stat, or NOT_FOUND, or 0 where it cannot be had otherwise (the read says why)."""
    try:
        return os.stat(path_of_uri(uri))
    except FileNotFoundError:
        return NOT_FOUND
    except OSError:
        return 0




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
