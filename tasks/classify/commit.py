"""Close a classify run: check that every listed image is accounted for exactly once, commit the state and the run
marker, summarise."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from tasks.classify.output import ERRORS_DIR, Output
from tasks.classify.plan import RunContext, RunPlan, ShardOutcome
from tasks.models import model_label
from tasks.classify.sink import committed_parts, read_error_rows, read_part_rows, settle_empty_parts, write_run_marker
from tasks.classify.state import RunState, remove_state, state_rows, write_state
from tasks.images.manifest import describe_skipped, skipped_counts
from tasks.storage import read_parquet_at

REMOVED_POLICY = "rows of images no longer listed are dropped: the dataset mirrors the latest listing"


def _new_state(out: Output, manifest: pa.Table, plan: RunPlan, outcomes: list[ShardOutcome]) -> pa.Table:
    """The state after this run: unchanged images as they were, plus each image classified now, with its part."""
    work = read_parquet_at(out.fs, out.work, columns=["uri"]).column("uri").to_pylist()
    tables = [plan.delta.kept]
    by_index = {o.index: o for o in outcomes}
    for p in plan.shards:
        o = by_index[p.shard.index]
        if o.predicted + o.errors != p.shard.size:
            raise RuntimeError(f"shard {p.shard.index}: {p.shard.size} images in, {o.predicted} predicted + "
                               f"{o.errors} errors out; no commit")
        kinds = read_error_rows(out, o.part) if o.errors else {}
        uris = work[p.shard.start : p.shard.stop]
        if len(kinds) != o.errors or not set(kinds) <= set(uris):
            raise RuntimeError(f"shard {p.shard.index}: its errors part {o.part} does not match its images; no commit")
        tables.append(state_rows(uris, manifest, o.part, kinds))
    return pa.concat_tables(tables)


def _check_parts_hold(out: Output, images: pa.Table) -> None:
    """Each part's row counts (from its footers) are those the state gives it: a row lost or left twice fails."""
    expected: dict[tuple[str, bool], int] = {}
    for part, kind in zip(images.column("part").to_pylist(), images.column("error_kind").to_pylist()):
        expected[part, kind is not None] = expected.get((part, kind is not None), 0) + 1
    names = sorted({p for p, _ in expected})

    def rows(name: str) -> tuple[int, int]:
        return read_part_rows(out, name), read_part_rows(out, name, errors=True)

    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="a2k-footer") as pool:  # one small read per part
        found = dict(zip(names, pool.map(rows, names)))
    wrong = [n for n in names if found[n] != (expected.get((n, False), 0), expected.get((n, True), 0))]
    if wrong:
        n = wrong[0]
        raise RuntimeError(
            f"part {n} holds {found[n][0]} predictions + {found[n][1]} errors but should hold "
            f"{expected.get((n, False), 0)} + {expected.get((n, True), 0)} ({len(wrong)} part(s) differ): "
            "nothing committed"
        )


def commit_run(
    out: Output, plan: RunPlan, outcomes: list[ShardOutcome], ctx: RunContext, list_seconds: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Check that every listed image is in the dataset exactly once (listed == predicted + errors), then commit the
    state and write the marker; any mismatch fails the run loudly and commits nothing."""
    manifest = read_parquet_at(out.fs, out.manifest, columns=["uri", "bytes", "mtime_ns", "etag"])
    listed = manifest.num_rows
    images = _new_state(out, manifest, plan, outcomes)
    uris = images.column("uri").to_pylist()
    if len(uris) != len(set(uris)) or set(uris) != set(manifest.column("uri").to_pylist()):
        raise RuntimeError(f"{listed} images listed but the dataset would hold {len(set(uris))} of them in "
                           f"{len(uris)} rows: the output is inconsistent; nothing committed")
    errors = images.num_rows - images.column("error_kind").null_count
    predicted = images.num_rows - errors
    if predicted + errors != listed:
        raise RuntimeError(f"{listed} images listed but {predicted} predicted + {errors} errors: nothing committed")
    _check_parts_hold(out, images)
    parts = committed_parts(out)
    settle_empty_parts(out)  # no part of a table: an empty file of its schema instead, so readers do not raise
    state_url = write_state(out, RunState(plan.input, plan.settings_key, plan.base_generation + 1, images))
    d = plan.delta
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
        "skipped": skipped_counts(manifest),  # folder entries that are no image of the run, by kind
        "predicted": predicted,
        "errors": errors,
        "full": plan.full,
        "new": d.new,
        "changed": d.changed,
        "unchanged": d.unchanged,
        "retried": d.retried,
        "removed": d.removed,
        "removed_policy": REMOVED_POLICY,
        "old_rows_dropped": plan.dropped_rows,
        "processed_this_run": processed,
        "shards_this_run": len(plan.shards),
        "resumed_shards": sum(o.resumed for o in outcomes),
        "images_per_second": round(processed / busy, 1) if busy > 0 else None,
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        "reading": sorted({o.reading for o in outcomes if o.reading}),  # how images were read, per worker kind
        # when the card (or CPU) had this run's first decoded batch: a fresh process's start-up ends there
        "first_batch_at": min((o.first_batch_at for o in outcomes if o.first_batch_at), default=None),
        "parts": sorted(parts),
        "generation": plan.base_generation + 1,
        "state": state_url,
        **extra,
    }
    summary["marker"] = write_run_marker(out, summary)
    remove_state(out, pending_only=True)
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    m = summary["model"]
    secs = summary["stage_seconds"]
    lines = [
        "# classify-images",
        "",
        "| | |",
        "|---|---|",
        f"| input | `{summary.get('input_given', summary.get('input'))}` |",
        f"| output | `{summary['output']}` |",
        f"| model | {summary.get('model_given', m['name'])} -> {model_label(m['name'], m['version'])} (`{m['sha256'][:12]}`) |",
        f"| device | {summary['device']} |",
        f"| images listed | {summary['listed']} ({describe_skipped(summary.get('skipped') or {})}) |",
        f"| predicted | {summary['predicted']} |",
        f"| errors | {summary['errors']} (in `{ERRORS_DIR}/`) |",
        f"| new / changed / unchanged / retried / removed | {summary['new']} / {summary['changed']} / "
        f"{summary['unchanged']} / {summary['retried']} / {summary['removed']} |",
        f"| processed this run | {summary['processed_this_run']} "
        f"({summary['resumed_shards']} shards already committed) |",
        f"| images/s (decode+infer+write) | {summary['images_per_second']} |",
    ]
    if summary.get("reading"):
        lines.append(f"| images read by | {'; '.join(summary['reading'])} |")
    lines += [f"| seconds: {k} | {v} |" for k, v in secs.items()]
    return "\n".join(lines) + "\n"


def shard_table(plan: RunPlan, outcomes: list[ShardOutcome]) -> list[dict[str, Any]]:
    """One row per shard of this run, for the table artifact."""
    by_index = {o.index: o for o in outcomes}
    rows = []
    for p in plan.shards:
        o = by_index[p.shard.index]
        rows.append({"shard": p.shard.index, "part": o.part, "images": p.shard.size, "predicted": o.predicted,
                     "errors": o.errors, "seconds": round(o.decode_infer_seconds + o.write_seconds, 3),
                     "resumed": o.resumed, "waits": o.waits, "reading": o.reading})
    return rows
