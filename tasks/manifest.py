"""List images into a sorted, deterministic manifest (an Arrow table) and cut it into shards."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
        pa.field("label", pa.string()),
    ]
)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def list_images(source: str | os.PathLike) -> pa.Table:
    """A manifest of every image under a folder (recursively), or the rows of a Parquet manifest.

    A folder laid out as `<root>/<class>/<file>` gives each file its class as `label`; files at
    other depths get a null label. Rows are sorted by uri, so the same tree gives the same manifest.
    """
    if str(source).lower().endswith(".parquet"):
        return read_manifest(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input {str(source)!r} does not exist; give a folder of images or a .parquet manifest")
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise ValueError(f"input {str(source)!r} is a file but not a .parquet manifest; give a folder or a manifest")
        return read_manifest(path)
    root = path.resolve()
    rows: dict[str, list] = {"uri": [], "bytes": [], "mtime_ns": [], "label": []}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        depth = len(Path(dirpath).relative_to(root).parts)
        for name in filenames:
            if name.startswith(".") or not _is_image(name):
                continue
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except FileNotFoundError:  # vanished while listing: it was never part of this run
                continue
            rows["uri"].append(str(full))
            rows["bytes"].append(st.st_size)
            rows["mtime_ns"].append(st.st_mtime_ns)
            rows["label"].append(Path(dirpath).name if depth == 1 else None)
    return sort_manifest(pa.table(rows, schema=MANIFEST_SCHEMA))


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read a Parquet manifest: it needs a `uri` column; `label`, `bytes` and `mtime_ns` are optional.

    Missing sizes and times are read from the files, so a plain list of paths is a valid manifest.
    """
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    table = pq.read_table(fs_path, filesystem=fs)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {str(path)!r} has no 'uri' column; it has: {', '.join(table.column_names)}")
    uris = [str(u) for u in table.column("uri").to_pylist()]
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(uris)
    if "bytes" in table.column_names and "mtime_ns" in table.column_names:
        sizes, mtimes = table.column("bytes").to_pylist(), table.column("mtime_ns").to_pylist()
    else:
        stats = [_stat_or_none(u) for u in uris]
        sizes = [s.st_size if s else 0 for s in stats]
        mtimes = [s.st_mtime_ns if s else 0 for s in stats]
    out = pa.table(
        {"uri": uris, "bytes": sizes, "mtime_ns": mtimes, "label": [None if v is None else str(v) for v in labels]},
        schema=MANIFEST_SCHEMA,
    )
    return sort_manifest(out)


def _stat_or_none(uri: str) -> os.stat_result | None:
    try:
        return os.stat(uri)
    except OSError:  # the decode step records it as vanished or unreadable
        return None


def sort_manifest(table: pa.Table) -> pa.Table:
    table = table.sort_by([("uri", "ascending")])
    uris = table.column("uri")
    if len(uris) != len(set(uris.to_pylist())):
        raise ValueError("manifest lists the same uri more than once; each image must appear exactly once")
    return table


def write_manifest(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write a manifest: the standard columns first, then any extra ones (such as `sha256`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = [c for c in table.column_names if c not in MANIFEST_SCHEMA.names]
    standard = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    for name in extra:
        standard = standard.append_column(table.schema.field(name), table.column(name))
    pq.write_table(standard, path)
    return path


def with_content_hashes(table: pa.Table) -> pa.Table:
    """The manifest plus a `sha256` column of each file's bytes, so a split can be checked later."""

    def digest(uri: str) -> str:
        h = hashlib.sha256()
        with open(uri, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    return table.append_column("sha256", pa.array([digest(u) for u in table.column("uri").to_pylist()], pa.string()))


@dataclass(frozen=True)
class Shard:
    """A contiguous slice of the sorted manifest; `shard_id` hashes its members' uri, size and mtime."""

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
    shards = []
    for index, start in enumerate(range(0, len(uris), shard_size)):
        stop = min(start + shard_size, len(uris))
        digest = hashlib.sha256()
        for i in range(start, stop):
            digest.update(f"{uris[i]}\0{sizes[i]}\0{mtimes[i]}\n".encode())
        shards.append(Shard(index=index, start=start, stop=stop, shard_id=digest.hexdigest()[:16]))
    return shards


# --- Prefect tasks -------------------------------------------------------------------------------
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="list-images", cache_policy=NO_CACHE)
def list_images_task(source: str, manifest_path: str) -> int:
    """List the source into a manifest file beside the output; returns the number of images."""
    from prefect import get_run_logger

    table = list_images(source)
    write_manifest(table, manifest_path)
    labelled = table.num_rows - table.column("label").null_count
    get_run_logger().info("listed %d images (%d with a label from the folder layout) under %s", table.num_rows, labelled, source)
    return table.num_rows
