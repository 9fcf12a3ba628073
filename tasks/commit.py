"""Plan a classify run against what its output already holds, and close it: check that every listed image is
accounted for exactly once, commit the state and the run marker, summarise."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tasks.classify import RunContext, ShardOutcome, part_key
from tasks.read import ErrorKind
from tasks.incremental import (
    Delta, Pending, RunState, diff_listing, read_pending, read_state, remove_state, settings_key, state_rows,
    write_pending, write_state,
)
from tasks.manifest import Shard, make_shards, write_manifest
from tasks.models import ModelEntry
from tasks.sink import (
    ERRORS_DIR, committed_parts, drop_rows, error_parts, part_name, read_error_rows, read_part_rows,
    remove_parts, remove_temporaries, write_run_marker,
)
from tasks.storage import read_parquet

# Kinds of error that say nothing about the image: the store or the disk could not be read this time (after
# botocore's retries), so a later run tries the image again rather than keeping it as done.
RETRIED_ERROR_KINDS = frozenset({ErrorKind.UNREADABLE.value})

REMOVED_POLICY = "rows of images no longer listed are dropped: the dataset mirrors the latest listing"


@dataclass(frozen=True)
class PlannedShard:
    shard: Shard
    key: str
    committed: bool  # its part is already in the output, from a killed or failed attempt of this same run
    retried: bool = False  # it was committed, but with images that could not be read: done again


@dataclass(frozen=True)
class RunPlan:
    """What a run does: the shards of the images to classify (listed in `work_path`), what stays as it is."""

    input: str
    settings_key: str
    work_path: str  # the manifest of the images classified this run; shards are slices of it
    shards: list[PlannedShard]
    delta: Delta
    base_generation: int
    full: bool
    dropped_rows: int  # old rows taken out of committed parts (changed, retried and removed images)


def plan_run(
    manifest_path: str, work_path: str, shard_size: int, entry: ModelEntry, top_k: int, input: str, output: str,
    overwrite: bool, full: bool,
) -> RunPlan:
    """Compare the listing with the output's state and prepare the output for this run.

    Refused, before any change, when the output holds parts of another input, model or setting (unless
    `overwrite`, which removes them). `full` starts the dataset over. Otherwise only new and changed images (and
    those unreadable last time) are classified; the old rows of changed and removed images are taken out of
    their parts first, each part rewritten atomically, after the plan is recorded in `pending.json`.
    """
    manifest = read_parquet(manifest_path)
    key = settings_key(entry, top_k)
    state = read_state(output)
    preds, errs = committed_parts(output), error_parts(output)
    foreign = state is not None and (state.input != input or state.settings_key != key)
    if foreign and not overwrite:
        raise ValueError(
            f"output {output!r} holds {len(preds | errs)} part(s) from another input, model or setting (a dataset of "
            f"{state.input!r}); choose an empty output or pass overwrite=True to replace them"
        )
    if foreign or full:
        remove_parts(output, preds | errs)
        remove_state(output)
        state, preds, errs = None, set(), set()
    base = state.generation if state else 0
    pending = read_pending(output)
    if pending and (pending.input, pending.settings_key, pending.base_generation) != (input, key, base):
        pending = None  # it committed since (or belonged to another setting, whose parts are stale below)
    forced = pending.dropped if pending else frozenset()

    delta = diff_listing(manifest, state.images if state else None, RETRIED_ERROR_KINDS, forced, preds, errs)
    write_manifest(delta.todo, work_path)
    shards = make_shards(delta.todo, shard_size)
    keys = [part_key(s, entry, top_k) for s in shards]
    planned = {part_name(k) for k in keys}
    in_state = set(state.images.column("part").to_pylist()) if state else set()
    own = pending.parts if pending else frozenset()
    stale = (preds | errs) - in_state - planned - own
    if stale and not overwrite:
        raise ValueError(
            f"output {output!r} holds {len(stale)} part(s) from another input, model or setting "
            f"(e.g. {sorted(stale)[0]}); choose an empty output or pass overwrite=True to replace them"
        )
    retried = {n for n in planned & preds & errs if set(read_error_rows(output, n).values()) & RETRIED_ERROR_KINDS}
    done = (planned & preds) - retried
    write_pending(output, Pending(input, key, base, frozenset(planned), forced.union(*delta.drop.values())))
    # from here on the output changes; pending.json lets a resumed run recognise all of it as its own
    remove_parts(output, stale | (((own & (preds | errs)) - planned - in_state)) | (planned - done))
    remove_temporaries(output)  # half-written files of a run that was killed
    dropped = sum(drop_rows(output, part, uris) for part, uris in sorted(delta.drop.items()) if part not in planned)
    return RunPlan(
        input=input, settings_key=key, work_path=work_path, base_generation=base, full=full, dropped_rows=dropped,
        delta=delta,
        shards=[PlannedShard(s, k, part_name(k) in done, part_name(k) in retried) for s, k in zip(shards, keys)],
    )


def resumed_outcome(output: str, index: int, part: str) -> ShardOutcome:
    """The counts of a shard committed by an earlier attempt, read from its parts' footers."""
    return ShardOutcome(
        index=index,
        part=part,
        predicted=read_part_rows(output, part),
        errors=read_part_rows(output, part, subdir=ERRORS_DIR),
        decode_infer_seconds=0.0,
        write_seconds=0.0,
        resumed=True,
    )


def _new_state(output: str, manifest: pa.Table, plan: RunPlan, outcomes: list[ShardOutcome]) -> pa.Table:
    """The state after this run: unchanged images as they were, plus each image classified now, with its part."""
    work = read_parquet(plan.work_path, columns=["uri"]).column("uri").to_pylist()
    tables = [plan.delta.kept]
    by_index = {o.index: o for o in outcomes}
    for p in plan.shards:
        o = by_index[p.shard.index]
        if o.predicted + o.errors != p.shard.size:
            raise RuntimeError(f"shard {p.shard.index}: {p.shard.size} images in, {o.predicted} predicted + "
                               f"{o.errors} errors out; no commit")
        kinds = read_error_rows(output, o.part) if o.errors else {}
        uris = work[p.shard.start : p.shard.stop]
        if len(kinds) != o.errors or not set(kinds) <= set(uris):
            raise RuntimeError(f"shard {p.shard.index}: its errors part {o.part} does not match its images; no commit")
        tables.append(state_rows(uris, manifest, o.part, kinds))
    return pa.concat_tables(tables)


def _check_parts_hold(output: str, images: pa.Table) -> None:
    """Each part's row counts (from its footers) are those the state gives it: a row lost or left twice fails."""
    expected: dict[tuple[str, bool], int] = {}
    for part, kind in zip(images.column("part").to_pylist(), images.column("error_kind").to_pylist()):
        expected[part, kind is not None] = expected.get((part, kind is not None), 0) + 1
    names = sorted({p for p, _ in expected})

    def rows(name: str) -> tuple[int, int]:
        return read_part_rows(output, name), read_part_rows(output, name, subdir=ERRORS_DIR)

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
    output: str, manifest_path: str, plan: RunPlan, outcomes: list[ShardOutcome], ctx: RunContext,
    list_seconds: float, extra: dict[str, Any],
) -> dict[str, Any]:
    """Check that every listed image is in the dataset exactly once (listed == predicted + errors), then commit the
    state and write the marker; any mismatch fails the run loudly and commits nothing."""
    manifest = read_parquet(manifest_path, columns=["uri", "bytes", "mtime_ns", "etag"])
    listed = manifest.num_rows
    images = _new_state(output, manifest, plan, outcomes)
    uris = images.column("uri").to_pylist()
    if len(uris) != len(set(uris)) or set(uris) != set(manifest.column("uri").to_pylist()):
        raise RuntimeError(f"{listed} images listed but the dataset would hold {len(set(uris))} of them in "
                           f"{len(uris)} rows: the output is inconsistent; nothing committed")
    errors = images.num_rows - images.column("error_kind").null_count
    predicted = images.num_rows - errors
    if predicted + errors != listed:
        raise RuntimeError(f"{listed} images listed but {predicted} predicted + {errors} errors: nothing committed")
    _check_parts_hold(output, images)
    parts = committed_parts(output)
    state_url = write_state(output, RunState(plan.input, plan.settings_key, plan.base_generation + 1, images))
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
        "reading": sorted({o.reading for o in outcomes if o.reading}),  # how local files were read, per worker kind
        "parts": sorted(parts),
        "generation": plan.base_generation + 1,
        "state": state_url,
        **extra,
    }
    summary["marker"] = write_run_marker(output, summary)
    remove_state(output, pending_only=True)
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
        f"| new / changed / unchanged / retried / removed | {summary['new']} / {summary['changed']} / "
        f"{summary['unchanged']} / {summary['retried']} / {summary['removed']} |",
        f"| processed this run | {summary['processed_this_run']} "
        f"({summary['resumed_shards']} shards already committed) |",
        f"| images/s (decode+infer+write) | {summary['images_per_second']} |",
    ]
    if summary.get("reading"):
        lines.append(f"| local files read by | {'; '.join(summary['reading'])} |")
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
