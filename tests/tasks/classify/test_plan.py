import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.classify.output import Output
from tasks.classify.plan import part_key, plan_run, read_shard_rows, write_work
from tasks.classify.state import settings_key
from tasks.images.manifest import MANIFEST_SCHEMA, Shard, list_images, make_shards, write_manifest
from tasks.images.preprocess import Preprocessing
from tasks.models.entry import ModelEntry, read_entry
from tasks.storage import write_parquet

ENTRY = ModelEntry(name="seed", version="1", architecture="seed-cnn", class_names=("birds", "fish"),
                   preprocessing=Preprocessing(resize=72, crop=64), weights_sha256="ab" * 32, weights_bytes=1)


def test_part_and_settings_keys_are_those_existing_outputs_hold():
    """Incremental runs recognise an output by these keys: a change to how settings are serialised must show here."""
    assert settings_key(ENTRY, 5) == "5dff848576ca0913701b"
    assert part_key(Shard(index=3, start=12, stop=16, shard_id="0123456789abcdef"), ENTRY, 5) == "000003-f97c1b7b2f6a710fc5e7"


def test_a_setting_changes_the_settings_key_and_every_part_key_together():
    shard = Shard(index=0, start=0, stop=4, shard_id="0123456789abcdef")
    assert settings_key(ENTRY, 4) != settings_key(ENTRY, 5)
    assert part_key(shard, ENTRY, 4) != part_key(shard, ENTRY, 5)


def _manifest(rows: int) -> pa.Table:
    """Rows with long, distinct uris, so that each shard's row group is larger than a Parquet footer read."""
    uris = [f"/data/images/{i:08d}-{'%064x' % (i * 0x9E3779B97F4A7C15 % (1 << 256))}.jpg" for i in range(rows)]
    return pa.table({"uri": uris, "bytes": [100] * rows, "mtime_ns": [1] * rows, "label": ["birds"] * rows,
                     "etag": [None] * rows}, schema=MANIFEST_SCHEMA)


def test_the_work_file_holds_one_row_group_per_shard_and_each_shard_reads_its_rows(tmp_path):
    out, todo = Output(str(tmp_path / "out")), _manifest(10)
    shards = make_shards(todo, 4)
    write_work(out, todo, 4)
    meta = pq.ParquetFile(out.work).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [s.size for s in shards] == [4, 4, 2]
    for s in shards:
        rows = read_shard_rows(out, s, columns=["uri", "label"])
        assert rows.column("uri").to_pylist() == todo.column("uri").to_pylist()[s.start : s.stop]


def test_a_shard_is_refused_when_the_work_file_does_not_hold_it_as_its_row_group(tmp_path):
    out, todo = Output(str(tmp_path / "out")), _manifest(10)
    write_parquet(todo, out.work)  # one row group, as work files were written before
    shard = make_shards(todo, 4)[1]
    with pytest.raises(RuntimeError, match=r"does not hold shard 1 \(rows 4-7\) as its row group 1"):
        read_shard_rows(out, shard, columns=["uri"])


def _group_spans(path_or_file) -> list[tuple[int, int]]:
    """Byte range of each row group's column chunks in a Parquet file."""
    meta = pq.ParquetFile(path_or_file).metadata
    spans = []
    for g in range(meta.num_row_groups):
        chunks = [meta.row_group(g).column(c) for c in range(meta.num_columns)]
        starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
        spans.append((min(starts), max(s + c.total_compressed_size for s, c in zip(starts, chunks))))
    return spans


def _check_only_own_group_read(reads: list[tuple[int, int]], spans: list[tuple[int, int]], size: int, own: int):
    """No read touches another shard's row group, except the footer read (the file's tail, at most 64 KiB)."""
    assert spans[-1][1] - spans[-1][0] > 64 << 10  # the tail read cannot reach the groups before the last
    tail = [(a, b) for a, b in reads if b == size]
    assert len(tail) <= 2 and all(b - a <= 64 << 10 for a, b in tail)
    touched = {g for a, b in reads if (a, b) not in tail for g, (s, e) in enumerate(spans) if a < e and s < b}
    assert touched == {own}, (reads, spans)
    assert not any(a < spans[0][1] and spans[0][0] < b for a, b in reads)


def test_a_shard_reads_no_byte_of_another_shards_rows(tmp_path, monkeypatch):
    out, todo = Output(str(tmp_path / "out")), _manifest(9000)
    shards = make_shards(todo, 3000)
    write_work(out, todo, 3000)
    reads: list[tuple[int, int]] = []
    opened = out.fs.open

    class Recorded:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            start = self._f.tell()
            data = self._f.read(n)
            reads.append((start, start + len(data)))
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(out.fs, "open", lambda *a, **kw: Recorded(opened(*a, **kw)))
    rows = read_shard_rows(out, shards[1], columns=["uri", "label"])
    monkeypatch.undo()
    assert rows.num_rows == 3000
    _check_only_own_group_read(reads, _group_spans(out.work), out.fs.size(out.work), own=1)


def test_a_shard_on_s3_fetches_only_its_row_group_and_the_footer(s3_bucket, monkeypatch):
    import s3fs.core

    out, todo = Output(f"s3://{s3_bucket}/out"), _manifest(9000)
    shards = make_shards(todo, 3000)
    write_work(out, todo, 3000)
    fetched: list[tuple[int, int]] = []
    fetch = s3fs.core.S3File._fetch_range

    def recorded(self, start, end):
        fetched.append((start, end))
        return fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", recorded)
    rows = read_shard_rows(out, shards[1], columns=["uri", "label"])
    monkeypatch.undo()
    assert rows.column("uri").to_pylist() == todo.column("uri").to_pylist()[3000:6000]
    with out.fs.open(out.work, "rb") as f:
        spans = _group_spans(f)
    _check_only_own_group_read(fetched, spans, out.fs.size(out.work), own=1)


def test_plan_run_writes_the_work_file_its_shards_read(photos_dir, seed_model_dir, tmp_path):
    out = Output(str(tmp_path / "out"))
    write_manifest(list_images(photos_dir), out.url_of(out.manifest))
    plan = plan_run(out, 4, read_entry(str(seed_model_dir)), 5, str(photos_dir), overwrite=False, full=False)
    meta = pq.ParquetFile(out.work).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [p.shard.size for p in plan.shards]
    uris = [u for p in plan.shards for u in read_shard_rows(out, p.shard, ["uri"]).column("uri").to_pylist()]
    assert uris == sorted(str(p) for p in photos_dir.rglob("*.JPEG"))
