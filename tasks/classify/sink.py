"""Write predictions and errors as Parquet parts that appear only once complete, and the run's commit marker.

Layout of an output folder or S3 prefix, read as one dataset by pandas, polars, DuckDB and Spark (they skip names
that start with '_' or '.'):
    <output>/part-<key>.parquet          predictions, one part per shard
    <output>/_errors/part-<key>.parquet  images without a prediction, with the reason
    <output>/_a2k_run.json               written last: counts, model, run id, parts
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.storage import filesystem, full_url, listdir_names, write_atomic, write_parquet

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("topk_labels", pa.list_(pa.string()), nullable=False),
        pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("true_label", pa.string()),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

ERRORS_DIR = "_errors"
RUN_MARKER = "_a2k_run.json"


def part_name(key: str) -> str:
    return f"part-{key}.parquet"


def write_part(table: pa.Table, output: str | os.PathLike, name: str, subdir: str = "") -> str:
    """Write `table` so it appears only complete (local: temporary file renamed into place; S3: one PUT of
    the final key, serialised in memory first); returns its URL."""
    folder = f"{str(output).rstrip('/')}/{subdir}" if subdir else str(output).rstrip("/")
    return write_parquet(table, f"{folder}/{name}", compression="zstd")


def committed_parts(output: str | os.PathLike) -> set[str]:
    """Names of prediction parts already in place in `output` (temporary files excluded), listed fresh."""
    fs, root = filesystem(output)
    return {n for n in listdir_names(fs, root) if n.startswith("part-") and n.endswith(".parquet")}


def error_parts(output: str | os.PathLike) -> set[str]:
    """Names of the errors parts in `output` (temporary files excluded), listed fresh."""
    fs, root = filesystem(output)
    return {n for n in listdir_names(fs, f"{root}/{ERRORS_DIR}") if n.startswith("part-") and n.endswith(".parquet")}


def remove_temporaries(output: str | os.PathLike) -> list[str]:
    """Delete the hidden temporary files a killed run left half-written (local outputs; S3 writes have none)."""
    fs, root = filesystem(output)
    removed = []
    for folder in (root, f"{root}/{ERRORS_DIR}"):
        for name in listdir_names(fs, folder):
            if name.startswith(".part-") and name.endswith(".tmp"):
                fs.rm(f"{folder}/{name}")
                removed.append(name)
    return removed


def remove_parts(output: str | os.PathLike, names: set[str]) -> None:
    fs, root = filesystem(output)
    for folder in (root, f"{root}/{ERRORS_DIR}"):  # a shard's predictions part (its commit) before its errors part
        present = set(listdir_names(fs, folder))
        for name in sorted(names & present):
            fs.rm(f"{folder}/{name}")


def read_part_rows(output: str | os.PathLike, name: str, subdir: str = "") -> int:
    """Row count of a committed part, from its footer; 0 when there is no such part."""
    fs, root = filesystem(output)
    path = f"{root}/{subdir}/{name}" if subdir else f"{root}/{name}"
    fs.invalidate_cache(path)  # s3fs would answer from a listing cached before another worker wrote it
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except FileNotFoundError:
        return 0


def write_run_marker(output: str | os.PathLike, summary: dict[str, Any]) -> str:
    """The commit marker: written last and atomically, so it is there only when all parts are."""
    fs, root = filesystem(output)
    write_atomic(fs, f"{root}/{RUN_MARKER}", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    return full_url(fs, f"{root}/{RUN_MARKER}")


def remove_shard_parts(output: str | os.PathLike, name: str) -> None:
    """Delete a shard's predictions part (its commit) and then its errors part, where they exist: what a new
    attempt at the shard does first, so no row of an earlier attempt survives beside its own."""
    fs, root = filesystem(output)
    for path in (f"{root}/{name}", f"{root}/{ERRORS_DIR}/{name}"):
        fs.invalidate_cache(path)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass


def drop_rows(output: str | os.PathLike, name: str, uris: frozenset[str] | set[str]) -> int:
    """Rewrite the part `name` (predictions and errors) without the rows of `uris`, each file in one atomic write;
    a part left with no row at all is deleted. Returns the rows dropped; running it again drops nothing more."""
    fs, root = filesystem(output)
    paths = {subdir: f"{root}/{subdir}/{name}" if subdir else f"{root}/{name}" for subdir in ("", ERRORS_DIR)}
    tables: dict[str, tuple[pa.Table, pa.Table]] = {}
    for subdir, path in paths.items():
        fs.invalidate_cache(path)
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError:
            continue
        keep = pc.invert(pc.is_in(table.column("image_uri"), pa.array(sorted(uris), pa.string())))
        tables[subdir] = (table, table.filter(keep))
    dropped = sum(t.num_rows - k.num_rows for t, k in tables.values())
    if not dropped:
        return 0
    left = sum(k.num_rows for _, k in tables.values())
    for subdir, (table, kept) in tables.items():  # predictions first: with no rows left, the shard is uncommitted first
        if left == 0 or (subdir == ERRORS_DIR and kept.num_rows == 0):
            fs.rm(paths[subdir])
        elif kept.num_rows != table.num_rows:
            write_part(kept.replace_schema_metadata(table.schema.metadata), output, name, subdir=subdir)
    return dropped


def read_error_rows(output: str | os.PathLike, name: str) -> dict[str, str]:
    """image_uri -> kind of the errors part `name`; empty when there is no such part."""
    fs, root = filesystem(output)
    path = f"{root}/{ERRORS_DIR}/{name}"
    fs.invalidate_cache(path)
    try:
        table = pq.read_table(path, columns=["image_uri", "kind"], filesystem=fs)
    except FileNotFoundError:
        return {}
    return dict(zip(table.column("image_uri").to_pylist(), table.column("kind").to_pylist()))
