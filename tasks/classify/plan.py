"""Plan a classify run: what every row shares, what a shard reports, the parts' names, and which shards a run
must classify given what its output already holds."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from tasks.classify.sink import (
    ERRORS_DIR, committed_parts, drop_rows, error_parts, part_name, read_error_rows, read_part_rows, remove_parts,
    remove_temporaries,
)
from tasks.classify.state import (
    Delta, Pending, diff_listing, read_pending, read_state, remove_state, settings_key, write_pending,
)
from tasks.images.manifest import Shard, make_shards, write_manifest
from tasks.images.read import ErrorKind
from tasks.models.entry import ModelEntry
from tasks.storage import read_parquet

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
    reading: str = ""  # how local files were read: ShardClassifier.reading


def part_key(shard: Shard, entry: ModelEntry, top_k: int) -> str:
    """A part's name is fixed by its images, the model's weights and the settings that change its rows."""
    settings = json.dumps({"pre": entry.preprocessing.to_dict(), "top_k": top_k}, sort_keys=True)
    digest = hashlib.sha256(f"{shard.shard_id}|{entry.weights_sha256}|{settings}".encode()).hexdigest()[:20]
    return f"{shard.index:06d}-{digest}"  # the index keeps parts in listing order for readers


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
