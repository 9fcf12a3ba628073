"""Where a classify run's files lie in its output (a folder or an S3 prefix): the one owner of that layout.

Read as one dataset by pandas, polars, DuckDB and Spark, which skip names that start with '_' or '.':
    <output>/part-<key>.parquet              predictions, one part per shard
    <output>/_errors/part-<key>.parquet      images without a prediction, with the reason
    <output>/empty.parquet                   no rows, the predictions' schema: there only while no part is
    <output>/_errors/empty.parquet           the same for the errors, so a reader of either finds a dataset
    <output>/_a2k_run.json                   the commit marker, written last: counts, model, run id, parts
    <output>/_a2k/manifest.parquet           the run's listing
    <output>/_a2k/work.parquet               the images this run classifies: one row group per shard
    <output>/_a2k/state/images.parquet       what the dataset holds, for incremental runs (tasks.classify.state)
    <output>/_a2k/state/pending.json         what an uncommitted run planned
    <output>/_a2k/lease.json                 the run writing the output now, while it lives (tasks.classify.lease)
    <output>/_a2k/.write-probe-<hex>         an empty object written and removed to check an S3 output takes writes
    <output>/.part-<key>.parquet.<hex>.tmp   a part half-written by a killed run (local outputs; tasks.storage)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import fsspec

from tasks.storage import filesystem, full_url

MANIFEST_FILE = "_a2k/manifest.parquet"
WORK_FILE = "_a2k/work.parquet"
STATE_FILE = "_a2k/state/images.parquet"
PENDING_FILE = "_a2k/state/pending.json"
LEASE_FILE = "_a2k/lease.json"
PROBE_PREFIX = "_a2k/.write-probe-"
ERRORS_DIR = "_errors"
RUN_MARKER = "_a2k_run.json"
EMPTY_PART = "empty.parquet"  # not a part (is_part): no shard's, never in the state or the marker's parts
_PART_PREFIX, _PART_SUFFIX = "part-", ".parquet"


def part_name(key: str) -> str:
    return f"{_PART_PREFIX}{key}{_PART_SUFFIX}"


def is_part(name: str) -> bool:
    """A committed part's file name (temporaries excluded)."""
    return name.startswith(_PART_PREFIX) and name.endswith(_PART_SUFFIX)


def is_temporary(name: str) -> bool:
    """A part's hidden temporary file (`tasks.storage.write_atomic` writes `.<name>.<hex>.tmp` and renames it)."""
    return name.startswith(f".{_PART_PREFIX}") and name.endswith(".tmp")


@dataclass(frozen=True)
class Output:
    """An output folder or S3 prefix, resolved once: its filesystem, its root, and the path of each of its files.

    Paths are within `fs` (no protocol); `url_of` turns one into a URL a user can pass back in. Pickled as its
    URL (a Prefect or Dask worker resolves the filesystem again where it runs).
    """

    url: str
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False, compare=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        fs, root = filesystem(self.url)
        object.__setattr__(self, "fs", fs)
        object.__setattr__(self, "root", root)

    def __reduce__(self):
        return (Output, (self.url,))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url_of(self, path: str) -> str:
        return full_url(self.fs, path)

    @property
    def manifest(self) -> str:
        return self.path(MANIFEST_FILE)

    @property
    def work(self) -> str:
        return self.path(WORK_FILE)

    @property
    def state(self) -> str:
        return self.path(STATE_FILE)

    @property
    def pending(self) -> str:
        return self.path(PENDING_FILE)

    @property
    def lease(self) -> str:
        return self.path(LEASE_FILE)

    @property
    def marker(self) -> str:
        return self.path(RUN_MARKER)

    @property
    def errors_dir(self) -> str:
        return self.path(ERRORS_DIR)

    def part(self, name: str, errors: bool = False) -> str:
        """The predictions part `name`, or (errors=True) the errors part of the same shard."""
        return f"{self.errors_dir}/{name}" if errors else self.path(name)

    def empty_part(self, errors: bool = False) -> str:
        """The stand-in with no rows that keeps the predictions (errors=True: the errors) a readable dataset."""
        return self.part(EMPTY_PART, errors)

    def new_probe(self) -> str:
        """A fresh name for a write probe, under `_a2k/` (skipped by readers, never a dataset file)."""
        return self.path(f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
