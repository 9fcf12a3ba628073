"""Write predictions and errors as Parquet parts that appear only once complete, and the run's commit marker.

Layout of an output folder, read as one dataset by pandas, polars, DuckDB and Spark (they skip names
that start with '_' or '.'):
    <output>/part-<key>.parquet          predictions, one part per shard
    <output>/_errors/part-<key>.parquet  images without a prediction, with the reason
    <output>/_a2k_run.json               written last: counts, model, run id, parts
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

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


def _fs(output: str):
    fs, root = fsspec.core.url_to_fs(str(output))
    return fs, root.rstrip("/")


def write_part(table: pa.Table, output: str | os.PathLike, name: str, subdir: str = "") -> str:
    """Write `table` under a hidden temporary name, then rename it into place; returns the final path."""
    fs, root = _fs(str(output))
    folder = f"{root}/{subdir}" if subdir else root
    fs.makedirs(folder, exist_ok=True)
    final, tmp = f"{folder}/{name}", f"{folder}/.{name}.tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    fs.mv(tmp, final)
    return final


def committed_parts(output: str | os.PathLike) -> set[str]:
    """Names of prediction parts already in place in `output` (temporary files excluded)."""
    fs, root = _fs(str(output))
    if not fs.exists(root):
        return set()
    return {Path(p).name for p in fs.glob(f"{root}/part-*.parquet")}


def remove_parts(output: str | os.PathLike, names: set[str]) -> None:
    fs, root = _fs(str(output))
    for name in names:
        for path in (f"{root}/{name}", f"{root}/{ERRORS_DIR}/{name}"):
            if fs.exists(path):
                fs.rm(path)


def read_part_rows(output: str | os.PathLike, name: str, subdir: str = "") -> int:
    """Row count of a committed part, from its footer."""
    fs, root = _fs(str(output))
    path = f"{root}/{subdir}/{name}" if subdir else f"{root}/{name}"
    if not fs.exists(path):
        return 0
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_run_marker(output: str | os.PathLike, summary: dict[str, Any]) -> str:
    """The commit marker: written last, under a temporary name first, so it is there only when all parts are."""
    fs, root = _fs(str(output))
    final, tmp = f"{root}/{RUN_MARKER}", f"{root}/.{RUN_MARKER}.tmp"
    with fs.open(tmp, "w") as f:
        f.write(json.dumps(summary, indent=2, default=str) + "\n")
    fs.mv(tmp, final)
    return final
