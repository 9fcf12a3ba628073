"""Write predictions and errors as Parquet parts that appear only once complete, and the run's commit marker
(where each file lies: tasks.classify.output)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.classify.output import EMPTY_PART, Output, is_part, is_temporary
from tasks.images.read import ErrorKind
from tasks.storage import listdir_names, write_atomic, write_parquet_at

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

def settle_empty_parts(out: Output) -> list[str]:
    """Where the output holds no predictions part (0 images listed, or every row dropped) or no errors part (a run
    without errors), write an empty Parquet file of that table's schema, so that `pd.read_parquet(out/_errors)`
    and DuckDB's `*.parquet` read 0 rows instead of raising; where real parts are present, remove the stand-in.
    Returns the URLs of the stand-ins present now."""
    present = []
    for errors, schema in ((False, PREDICTION_SCHEMA), (True, ERROR_SCHEMA)):
        folder = out.errors_dir if errors else out.root
        names = set(listdir_names(out.fs, folder))
        path = out.empty_part(errors)
        if any(is_part(n) for n in names):
            if EMPTY_PART in names:
                out.fs.rm(path)
            continue
        if EMPTY_PART not in names:
            write_parquet_at(schema.empty_table(), out.fs, path, compression="zstd")
        present.append(out.url_of(path))
    return present


def mark_missing(errors: pa.Table, missing: set[str]) -> pa.Table:
    """`errors` with each `vanished` row of a uri in `missing` (a manifest's uri found nowhere when the manifest
    was read: `tasks.images.manifest.NOT_FOUND`) made a `missing` row: it never vanished, it was never there."""
    if not missing or not errors.num_rows:
        return errors
    hit = pc.and_(pc.equal(errors.column("kind"), ErrorKind.VANISHED.value),
                  pc.is_in(errors.column("image_uri"), pa.array(sorted(missing), pa.string())))
    if not pc.any(hit).as_py():
        return errors
    reason = "no file or object at this uri: the manifest names it, but it was not there when the manifest was read"
    columns = {"kind": pc.if_else(hit, ErrorKind.MISSING.value, errors.column("kind")),
               "reason": pc.if_else(hit, reason, errors.column("reason"))}
    for name, values in columns.items():
        i = errors.schema.get_field_index(name)
        errors = errors.set_column(i, errors.schema.field(i), values)
    return errors


def write_part(table: pa.Table, out: Output, name: str, errors: bool = False) -> str:
    """Write `table` as the part `name` (errors=True: the errors part) so it appears only complete (local:
    temporary file renamed into place; S3: one PUT of the final key, serialised in memory first); returns its URL."""
    return write_parquet_at(table, out.fs, out.part(name, errors), compression="zstd")


def committed_parts(out: Output) -> set[str]:
    """Names of prediction parts already in place in `out` (temporary files excluded), listed fresh."""
    return {n for n in listdir_names(out.fs, out.root) if is_part(n)}


def error_parts(out: Output) -> set[str]:
    """Names of the errors parts in `out` (temporary files excluded), listed fresh."""
    return {n for n in listdir_names(out.fs, out.errors_dir) if is_part(n)}


def remove_temporaries(out: Output) -> list[str]:
    """Delete the hidden temporary files a killed run left half-written (local outputs; S3 writes have none)."""
    removed = []
    for folder in (out.root, out.errors_dir):
        for name in listdir_names(out.fs, folder):
            if is_temporary(name):
                out.fs.rm(f"{folder}/{name}")
                removed.append(name)
    return removed


def remove_parts(out: Output, names: set[str]) -> None:
    for errors in (False, True):  # a shard's predictions part (its commit) before its errors part
        present = set(listdir_names(out.fs, out.errors_dir if errors else out.root))
        for name in sorted(names & present):
            out.fs.rm(out.part(name, errors))


def read_part_rows(out: Output, name: str, errors: bool = False) -> int:
    """Row count of a committed part (errors=True: its errors part), from its footer; 0 when there is no such part."""
    path = out.part(name, errors)
    out.fs.invalidate_cache(path)  # s3fs would answer from a listing cached before another worker wrote it
    try:
        with out.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except FileNotFoundError:
        return 0


def write_run_marker(out: Output, summary: dict[str, Any]) -> str:
    """The commit marker: written last and atomically, so it is there only when all parts are."""
    write_atomic(out.fs, out.marker, (json.dumps(summary, indent=2, default=str) + "\n").encode())
    return out.url_of(out.marker)


def remove_shard_parts(out: Output, name: str) -> None:
    """Delete a shard's predictions part (its commit) and then its errors part, where they exist: what a new
    attempt at the shard does first, so no row of an earlier attempt survives beside its own."""
    for path in (out.part(name), out.part(name, errors=True)):
        out.fs.invalidate_cache(path)
        try:
            out.fs.rm(path)
        except FileNotFoundError:
            pass


def drop_rows(out: Output, name: str, uris: frozenset[str] | set[str]) -> int:
    """Rewrite the part `name` (predictions and errors) without the rows of `uris`, each file in one atomic write;
    a part left with no row at all is deleted. Returns the rows dropped; running it again drops nothing more."""
    tables: dict[bool, tuple[pa.Table, pa.Table]] = {}
    for errors in (False, True):
        path = out.part(name, errors)
        out.fs.invalidate_cache(path)
        try:
            with out.fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError:
            continue
        keep = pc.invert(pc.is_in(table.column("image_uri"), pa.array(sorted(uris), pa.string())))
        tables[errors] = (table, table.filter(keep))
    dropped = sum(t.num_rows - k.num_rows for t, k in tables.values())
    if not dropped:
        return 0
    left = sum(k.num_rows for _, k in tables.values())
    for errors, (table, kept) in tables.items():  # predictions first: with no rows left, the shard is uncommitted first
        if left == 0 or (errors and kept.num_rows == 0):
            out.fs.rm(out.part(name, errors))
        elif kept.num_rows != table.num_rows:
            write_part(kept.replace_schema_metadata(table.schema.metadata), out, name, errors)
    return dropped


def read_error_rows(out: Output, name: str) -> dict[str, str]:
    """image_uri -> kind of the errors part `name`; empty when there is no such part."""
    path = out.part(name, errors=True)
    out.fs.invalidate_cache(path)
    try:
        table = pq.read_table(path, columns=["image_uri", "kind"], filesystem=out.fs)
    except FileNotFoundError:
        return {}
    return dict(zip(table.column("image_uri").to_pylist(), table.column("kind").to_pylist()))
