"""Plan a classify run: what every row shares, what a shard reports, the parts' names, which shards a run must
classify given what its output already holds, and the work file that gives each shard its rows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.classify.output import Output, part_name
from tasks.classify.sink import (
    committed_parts, drop_rows, error_parts, read_error_rows, read_part_rows, remove_parts, remove_temporaries,
)
from tasks.classify.state import (
    Delta, Pending, diff_listing, read_pending, read_state, remove_state, remove_state_temporaries, serialize_settings,
    settings_key, write_pending,
)
from tasks.images.manifest import Shard, make_shards
from tasks.images.read import ErrorKind
from tasks.models.entry import ModelEntry
from tasks.storage import read_parquet_at, write_parquet_at

# Kinds of error that say nothing about the image: the store or the disk could not be read this time (after
# botocore's retries), so a later run tries the image again rather than keeping it as done.
RETRIED_ERROR_KINDS = frozenset({ErrorKind.UNREADABLE.value})


@dataclass(frozen=True)
class RunContext:
    """What every row of a run shares."""

    model_name: str
    model_version: str
    model_sha256: str
    run_id: str
    top_k: int


@dataclass(frozen=True)
class ShardOutcome:
    """What a shard task reports back: small and serializable."""

    index: int
    part: str
    predicted: int
    errors: int
    decode_infer_seconds: float
    write_seconds: float
    resumed: bool = False
    waits: str = ""  # ShardTiming.describe()
    reading: str = ""  # how the shard's images were read: ShardClassifier.reading_for
    first_batch_at: float = 0.0  # time.time() when the model had the shard's first batch (0: none)


def part_key(shard: Shard, entry: ModelEntry, top_k: int) -> str:
    """A part's name is fixed by its images, the model's weights and the settings that change its rows."""
    digest = hashlib.sha256(f"{shard.shard_id}|{serialize_settings(entry, top_k)}".encode()).hexdigest()[:20]
    return f"{shard.index:06d}-{digest}"  # the index keeps parts in listing order for readers


@dataclass(frozen=True)
class PlannedShard:
    shard: Shard
    key: str
    committed: bool  # its part is already in the output, from a killed or failed attempt of this same run
    retried: bool = False  # it was committed, but with images that could not be read: done again


@dataclass(frozen=True)
class RunPlan:
    """What a run does: the shards of the images to classify (rows of the output's work file), what stays as it is."""

    input: str
    settings_key: str
    shards: list[PlannedShard]
    delta: Delta
    base_generation: int
    full: bool
    dropped_rows: int  # old rows taken out of committed parts (changed, retried and removed images)


def plan_run(
    out: Output, shard_size: int, entry: ModelEntry, top_k: int, input: str, overwrite: bool, full: bool,
) -> RunPlan:
    """Compare the listing (the output's manifest) with the output's state and prepare the output for this run.

    Refused, before any change, when the output holds parts of another input, model or setting (unless
    `overwrite`, which removes them). `full` starts the dataset over. Otherwise only new and changed images (and
    those unreadable last time) are classified; the old rows of changed and removed images are taken out of
    their parts first, each part rewritten atomically, after the plan is recorded in `pending.json`.
    """
    remove_state_temporaries(out)  # a killed run's half-written state: it holds space, and nothing else removes it
    manifest = read_parquet_at(out.fs, out.manifest)
    key = settings_key(entry, top_k)
    state = read_state(out)
    preds, errs = committed_parts(out), error_parts(out)
    foreign = state is not None and (state.input != input or state.settings_key != key)
    if foreign and not overwrite:
        raise ValueError(
            f"output {out.url!r} holds {len(preds | errs)} part(s) from another input, model or setting (a dataset of "
            f"{state.input!r}); choose an empty output or pass overwrite=True to replace them"
        )
    if foreign or full:
        remove_parts(out, preds | errs)
        remove_state(out)
        state, preds, errs = None, set(), set()
    base = state.generation if state else 0
    pending = read_pending(out)
    if pending and (pending.input, pending.settings_key, pending.base_generation) != (input, key, base):
        pending = None  # it committed since (or belonged to another setting, whose parts are stale below)
    forced = pending.dropped if pending else frozenset()

    delta = diff_listing(manifest, state.images if state else None, RETRIED_ERROR_KINDS, forced, preds, errs)
    shards = make_shards(delta.todo, shard_size)
    write_work(out, delta.todo, shard_size)
    keys = [part_key(s, entry, top_k) for s in shards]
    planned = {part_name(k) for k in keys}
    in_state = set(state.images.column("part").to_pylist()) if state else set()
    own = pending.parts if pending else frozenset()
    stale = (preds | errs) - in_state - planned - own
    if stale and not overwrite:
        raise ValueError(
            f"output {out.url!r} holds {len(stale)} part(s) from another input, model or setting "
            f"(e.g. {sorted(stale)[0]}); choose an empty output or pass overwrite=True to replace them"
        )
    retried = {n for n in planned & preds & errs if set(read_error_rows(out, n).values()) & RETRIED_ERROR_KINDS}
    done = (planned & preds) - retried
    write_pending(out, Pending(input, key, base, frozenset(planned), forced.union(*delta.drop.values())))
    # from here on the output changes; pending.json lets a resumed run recognise all of it as its own
    remove_parts(out, stale | (((own & (preds | errs)) - planned - in_state)) | (planned - done))
    remove_temporaries(out)  # half-written files of a run that was killed
    dropped = sum(drop_rows(out, part, uris) for part, uris in sorted(delta.drop.items()) if part not in planned)
    return RunPlan(
        input=input, settings_key=key, base_generation=base, full=full, dropped_rows=dropped, delta=delta,
        shards=[PlannedShard(s, k, part_name(k) in done, part_name(k) in retried) for s, k in zip(shards, keys)],
    )


def resumed_outcome(out: Output, index: int, part: str) -> ShardOutcome:
    """The counts of a shard committed by an earlier attempt, read from its parts' footers."""
    return ShardOutcome(
        index=index,
        part=part,
        predicted=read_part_rows(out, part),
        errors=read_part_rows(out, part, errors=True),
        decode_infer_seconds=0.0,
        write_seconds=0.0,
        resumed=True,
    )


def write_work(out: Output, todo: pa.Table, shard_size: int) -> str:
    """The manifest rows this run classifies, one Parquet row group per shard (shards are contiguous slices of
    `shard_size` rows), so a shard task reads its own rows and nothing else: one ranged read on S3."""
    return write_parquet_at(todo, out.fs, out.work, row_group_size=shard_size)


def read_shard_rows(out: Output, shard: Shard, columns: list[str]) -> pa.Table:
    """The rows of `shard` in the output's work file: its row group only (the footer, then that group's column
    chunks), checked to hold exactly the shard's slice of the work rows."""
    out.fs.invalidate_cache(out.work)
    with out.fs.open(out.work, "rb", cache_type="none") as f:  # no read-ahead: ranged reads of this group only
        parquet = pq.ParquetFile(f)
        meta = parquet.metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if shard.index >= len(groups) or (sum(groups[: shard.index]), groups[shard.index]) != (shard.start, shard.size):
            raise RuntimeError(
                f"work file {out.url_of(out.work)!r} does not hold shard {shard.index} (rows {shard.start}-"
                f"{shard.stop - 1}) as its row group {shard.index}: row groups of {groups[:8]} rows; plan the run again"
            )
        return parquet.read_row_group(shard.index, columns=columns)
