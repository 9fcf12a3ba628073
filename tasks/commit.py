"""Plan a classify run against what its output already holds, and close it: check that every listed
image is accounted for, write the commit marker, summarise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.classify import RunContext, ShardOutcome, part_key
from tasks.decode import ErrorKind
from tasks.manifest import Shard, make_shards
from tasks.models import ModelEntry
from tasks.sink import (
    ERRORS_DIR, committed_parts, error_parts, keep_only_parts, part_name, read_error_kinds, read_part_rows,
    remove_temporaries, write_run_marker,
)
from tasks.storage import read_parquet


# Kinds of error that say nothing about the image: the store or the disk could not be read this time (after
# botocore's retries), so a later run tries the image again rather than keeping the shard as done.
RETRIED_ERROR_KINDS = frozenset({ErrorKind.UNREADABLE.value})


@dataclass(frozen=True)
class PlannedShard:
    shard: Shard
    key: str
    committed: bool  # its part is already in the output from an earlier run
    retried: bool = False  # it was committed, but with images that could not be read: done again


def plan_shards(
    manifest_path: str, shard_size: int, entry: ModelEntry, top_k: int, output: str, overwrite: bool
) -> list[PlannedShard]:
    """Shard the manifest and match each shard to its part in `output`.

    Parts in `output` that belong to no shard of this plan (another input, model or setting) would mix
    two runs in one dataset: refused, or removed when `overwrite` is set. A committed shard with images that
    could not be read is done again. Every part of a shard about to be done is removed first, so no row of an
    earlier attempt survives beside the new ones.
    """
    shards = make_shards(read_parquet(manifest_path, columns=["uri", "bytes", "mtime_ns", "etag"]), shard_size)
    keys = [part_key(s, entry, top_k) for s in shards]
    existing = committed_parts(output)
    stale = existing - {part_name(k) for k in keys}
    if stale and not overwrite:
        raise ValueError(
            f"output {output!r} holds {len(stale)} part(s) from another input, model or setting "
            f"(e.g. {sorted(stale)[0]}); choose an empty output or pass overwrite=True to replace them"
        )
    with_errors = (existing - stale) & error_parts(output)
    retried = {n for n in with_errors if read_error_kinds(output, n) & RETRIED_ERROR_KINDS}
    done = existing - stale - retried
    keep_only_parts(output, done)
    remove_temporaries(output)  # half-written files of a run that was killed
    return [PlannedShard(s, k, part_name(k) in done, part_name(k) in retried) for s, k in zip(shards, keys)]


def resumed_outcome(output: str, index: int, part: str) -> ShardOutcome:
    """The counts of a shard committed by an earlier run, read from its parts' footers."""
    return ShardOutcome(
        index=index,
        part=part,
        predicted=read_part_rows(output, part),
        errors=read_part_rows(output, part, subdir=ERRORS_DIR),
        decode_infer_seconds=0.0,
        write_seconds=0.0,
        resumed=True,
    )


def commit_run(
    output: str, listed: int, outcomes: list[ShardOutcome], ctx: RunContext, list_seconds: float, extra: dict[str, Any]
) -> dict[str, Any]:
    """Check listed == predicted + errors, then write the marker; a mismatch fails the run loudly."""
    predicted = sum(o.predicted for o in outcomes)
    errors = sum(o.errors for o in outcomes)
    if predicted + errors != listed:
        raise RuntimeError(
            f"{listed} images listed but {predicted} predicted + {errors} errors = {predicted + errors}: "
            "the output is incomplete; no commit marker written"
        )
    processed = sum(o.predicted + o.errors for o in outcomes if not o.resumed)
    stage_seconds = {
        "list": list_seconds,
        "decode_infer": sum(o.decode_infer_seconds for o in outcomes),
        "write": sum(o.write_seconds for o in outcomes),
    }
    busy = stage_seconds["decode_infer"] + stage_seconds["write"]
    summary = {
        "status": "committed",
        "run_id": ctx.run_id,
        "model": {"name": ctx.model_name, "version": ctx.model_version, "sha256": ctx.model_sha256},
        "top_k": ctx.top_k,
        "listed": listed,
        "predicted": predicted,
        "errors": errors,
        "processed_this_run": processed,
        "resumed_shards": sum(o.resumed for o in outcomes),
        "images_per_second": round(processed / busy, 1) if busy > 0 else None,
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        "parts": sorted(o.part for o in outcomes),
        **extra,
    }
    summary["marker"] = write_run_marker(output, summary)
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    m = summary["model"]
    secs = summary["stage_seconds"]
    lines = [
        "# classify-images",
        "",
        "| | |",
        "|---|---|",
        f"| output | `{summary['output']}` |",
        f"| model | {m['name']} v{m['version']} (`{m['sha256'][:12]}`) |",
        f"| device | {summary['device']} |",
        f"| images listed | {summary['listed']} |",
        f"| predicted | {summary['predicted']} |",
        f"| errors | {summary['errors']} (in `{ERRORS_DIR}/`) |",
        f"| processed this run | {summary['processed_this_run']} ({summary['resumed_shards']} shards already committed) |",
        f"| images/s (decode+infer+write) | {summary['images_per_second']} |",
    ]
    lines += [f"| seconds: {k} | {v} |" for k, v in secs.items()]
    return "\n".join(lines) + "\n"
