"""Incremental runs: which listed images a run must classify, given what its output already holds.

The state lives beside the output, under `_a2k/state/` (skipped by dataset readers; paths: tasks.classify.output):
    images.parquet  one row per image of the dataset: its uri, size, mtime and ETag when it was classified, the part
                    holding its row, and its error kind (null when predicted); the file's metadata names the input,
                    the settings key (model weights, preprocessing, top_k) and the generation (runs committed)
    pending.json    written by a run before it changes anything: the parts it plans and the uris whose old rows it
                    drops; a later run finding it (same generation) knows those parts and gaps are its own
An image is unchanged when uri, size, mtime_ns and ETag all match its state row; such images are not classified
again. Images gone from the source lose their rows: the dataset always mirrors the latest listing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from tasks.classify.output import Output
from tasks.models.entry import ModelEntry
from tasks.storage import dumps, listdir_names, read_json, read_parquet_at, write_atomic, write_parquet_at

_META_KEY = b"a2k"

STATE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("part", pa.string(), nullable=False),  # the part's file name, in the output and/or in _errors
        pa.field("error_kind", pa.string()),  # null: the row is a prediction
    ]
)


def serialize_settings(entry: ModelEntry, top_k: int) -> str:
    """The settings that change a row, as text: the weights' digest, the preprocessing and top_k. Hashed into the
    settings key and into every part's key; changing this text changes both, and existing outputs would no longer
    be recognised as the same dataset."""
    settings = json.dumps({"pre": entry.preprocessing.to_dict(), "top_k": top_k}, sort_keys=True)
    return f"{entry.weights_sha256}|{settings}"


def settings_key(entry: ModelEntry, top_k: int) -> str:
    """What makes two runs' rows comparable: the same weights, preprocessing and top_k (as in a part's key)."""
    return hashlib.sha256(serialize_settings(entry, top_k).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class RunState:
    """The committed state of an output: which image sits in which part, as of the last committed run."""

    input: str
    settings_key: str
    generation: int
    images: pa.Table = field(repr=False)  # STATE_SCHEMA

    def __post_init__(self) -> None:
        if self.generation < 0:
            raise ValueError(f"generation {self.generation!r} must be at least 0")


def empty_state_table() -> pa.Table:
    return STATE_SCHEMA.empty_table()


def read_state(out: Output) -> RunState | None:
    """The output's committed state, or None when it has none (a fresh output, or one written before state)."""
    try:
        table = read_parquet_at(out.fs, out.state)  # drops s3fs's cached listing first: another run may have written it
    except FileNotFoundError:
        return None
    meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    if not {"input", "settings_key", "generation"} <= meta.keys():
        raise ValueError(f"state {out.url_of(out.state)!r} has no a2k metadata; remove it (or run with full=True) to "
                         "start over")
    return RunState(meta["input"], meta["settings_key"], int(meta["generation"]), table.cast(STATE_SCHEMA))


def write_state(out: Output, state: RunState) -> str:
    """Replace the state in one atomic write (rename on disk, one PUT on S3); returns its URL."""
    meta = {"input": state.input, "settings_key": state.settings_key, "generation": state.generation}
    table = state.images.cast(STATE_SCHEMA).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    return write_parquet_at(table, out.fs, out.state, compression="zstd")


@dataclass(frozen=True)
class Pending:
    """What an uncommitted run planned: kept until the run commits, so that its resume recognises its own work."""

    input: str
    settings_key: str
    base_generation: int  # the state generation it started from; a later generation means it committed
    parts: frozenset[str]
    dropped: frozenset[str]


def read_pending(out: Output) -> Pending | None:
    out.fs.invalidate_cache(out.pending)
    try:
        doc = read_json(out.fs, out.pending)
    except FileNotFoundError:
        return None
    return Pending(doc["input"], doc["settings_key"], int(doc["base_generation"]), frozenset(doc["parts"]),
                   frozenset(doc["dropped"]))


def write_pending(out: Output, pending: Pending) -> None:
    doc = {"input": pending.input, "settings_key": pending.settings_key, "base_generation": pending.base_generation,
           "parts": sorted(pending.parts), "dropped": sorted(pending.dropped)}
    write_atomic(out.fs, out.pending, dumps(doc))


def remove_state(out: Output, pending_only: bool = False) -> None:
    for path in (out.pending,) if pending_only else (out.pending, out.state):
        try:
            out.fs.rm(path)
        except FileNotFoundError:
            pass


def remove_state_temporaries(out: Output) -> list[str]:
    """Delete the hidden temporary files that a state or pending.json write left when its run was killed or its
    disk was full (`.images.parquet.<hex>.tmp`: local outputs; S3 writes have none). Called under the lease: no
    other run writes there. Returns their names."""
    folder = out.fs._parent(out.state)
    removed = []
    for name in listdir_names(out.fs, folder):
        if name.startswith(".") and name.endswith(".tmp"):
            out.fs.rm(f"{folder}/{name}")
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Delta:
    """How the listing differs from the state: what to classify, which old rows to drop, and the counts."""

    todo: pa.Table  # manifest rows to classify this run, sorted by uri
    kept: pa.Table  # state rows of unchanged images (STATE_SCHEMA)
    drop: dict[str, frozenset[str]]  # part name -> uris whose old rows must leave that part
    new: int
    changed: int
    unchanged: int
    retried: int  # same image again: unreadable last time, its part lost, or its row dropped by a killed run
    removed: int  # in the state, gone from the source: their rows are dropped


def diff_listing(manifest: pa.Table, state: pa.Table | None, retry_kinds: frozenset[str], forced: frozenset[str],
                 predictions: set[str], errors: set[str]) -> Delta:
    """Compare the listing with the state row by row.

    `predictions` and `errors` are the part names present in the output: an image whose part went missing is
    classified again. `forced` are uris a killed run already dropped from their parts: classified again too.
    """
    state = state if state is not None else empty_state_table()
    known = {
        u: (b, m, e, p, k)
        for u, b, m, e, p, k in zip(*(state.column(n).to_pylist() for n in STATE_SCHEMA.names))
    }
    uris = manifest.column("uri").to_pylist()
    sizes, mtimes = manifest.column("bytes").to_pylist(), manifest.column("mtime_ns").to_pylist()
    etags = manifest.column("etag").to_pylist()
    todo_rows: list[int] = []
    kept_uris: list[str] = []
    drop: dict[str, set[str]] = {}
    new = changed = unchanged = retried = 0
    for i, uri in enumerate(uris):
        old = known.get(uri)
        if old is None:
            new += 1
            todo_rows.append(i)
            continue
        size, mtime, etag, part, kind = old
        present = part in (predictions if kind is None else errors)
        if (size, mtime, etag) != (sizes[i], mtimes[i], etags[i]):
            changed += 1
        elif kind in retry_kinds or uri in forced or not present:
            retried += 1
        else:
            unchanged += 1
            kept_uris.append(uri)
            continue
        todo_rows.append(i)
        drop.setdefault(part, set()).add(uri)
    listed = set(uris)
    removed = 0
    for uri, (_, _, _, part, _) in known.items():
        if uri not in listed:
            removed += 1
            drop.setdefault(part, set()).add(uri)
    kept = state.filter(pc.is_in(state.column("uri"), pa.array(kept_uris, pa.string())))
    return Delta(
        todo=manifest.take(pa.array(todo_rows, pa.int64())), kept=kept.cast(STATE_SCHEMA),
        drop={p: frozenset(u) for p, u in drop.items()},
        new=new, changed=changed, unchanged=unchanged, retried=retried, removed=removed,
    )


def state_rows(uris: list[str], manifest: pa.Table, part: str, error_kinds: dict[str, str]) -> pa.Table:
    """State rows for images just classified into `part` (their signature as listed, their error kind if any)."""
    rows = manifest.filter(pc.is_in(manifest.column("uri"), pa.array(uris, pa.string())))
    got = rows.column("uri").to_pylist()
    return pa.table(
        {
            "uri": got,
            "bytes": rows.column("bytes"),
            "mtime_ns": rows.column("mtime_ns"),
            "etag": rows.column("etag"),
            "part": [part] * len(got),
            "error_kind": [error_kinds.get(u) for u in got],
        },
        schema=STATE_SCHEMA,
    )
