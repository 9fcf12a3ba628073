import hashlib
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from tasks.images.manifest import list_images, make_shards, skipped_counts, write_manifest
from tasks.storage import write_parquet


@pytest.fixture
def store(s3_bucket):
    return s3fs.S3FileSystem()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # a single-part PUT's ETag


def test_lists_a_prefix_recursively_with_labels_sizes_and_etags(s3_bucket, store):
    objects = {"b/z.JPG": b"zz", "a/y.png": b"y", "a/sub/x.WebP": b"xxx", "top.tiff": b"t", "a/notes.txt": b"n",
               "a/.hidden.jpg": b"h", "c/s.jpeg": b"ss"}
    store.pipe({f"{s3_bucket}/in/{k}": v for k, v in objects.items()})
    store.pipe({f"{s3_bucket}/input/sibling.jpg": b"not under in/", f"{s3_bucket}/in/a/folder-marker/": b""})
    before = time.time_ns()
    table = list_images(f"s3://{s3_bucket}/in")
    rel = [u.removeprefix(f"s3://{s3_bucket}/in/") for u in table.column("uri").to_pylist()]
    assert rel == ["a/sub/x.WebP", "a/y.png", "b/z.JPG", "c/s.jpeg", "top.tiff"]
    assert table.column("label").to_pylist() == [None, "a", "b", "c", None]
    assert table.column("bytes").to_pylist() == [len(objects[r]) for r in rel]
    assert table.column("etag").to_pylist() == [_md5(objects[r]) for r in rel]
    assert all(abs(t - before) < 120e9 for t in table.column("mtime_ns").to_pylist())  # LastModified, in ns
    assert skipped_counts(table) == {".txt": 1, "hidden": 1}


def test_listing_is_one_recursive_listing_not_a_request_per_key(s3_bucket, store, monkeypatch):
    store.pipe({f"{s3_bucket}/in/cls/{i}.jpg": bytes([i]) for i in range(5)})

    async def no_head(*args, **kwargs):
        raise AssertionError("a HEAD per key")

    monkeypatch.setattr(s3fs.S3FileSystem, "_info", no_head)
    assert list_images(f"s3://{s3_bucket}/in").num_rows == 5


def test_a_rewritten_object_changes_its_shard_even_with_the_same_size_and_time():
    rows = {"uri": ["s3://b/k.jpg"], "bytes": [4], "mtime_ns": [1_700_000_000_000_000_000], "label": [None]}
    first = make_shards(pa.table({**rows, "etag": ["aaa"]}), 1)
    second = make_shards(pa.table({**rows, "etag": ["bbb"]}), 1)
    assert first[0].shard_id != second[0].shard_id


def test_local_files_get_a_null_etag_and_the_shard_ids_they_always_had(photos_dir):
    table = list_images(photos_dir)
    assert table.column("etag").null_count == table.num_rows == 9
    digest = hashlib.sha256()
    for uri, size, mtime in zip(*(table.column(c).to_pylist()[:4] for c in ("uri", "bytes", "mtime_ns"))):
        digest.update(f"{uri}\0{size}\0{mtime}\n".encode())
    assert make_shards(table, 4)[0].shard_id == digest.hexdigest()[:16]


def test_a_manifest_on_s3_of_bare_keys_is_completed_from_the_store(s3_bucket, store, photos_dir):
    for path in photos_dir.rglob("*.JPEG"):
        store.pipe_file(f"{s3_bucket}/in/{path.parent.name}/{path.name}", path.read_bytes())
    listed = list_images(f"s3://{s3_bucket}/in")
    manifest = f"s3://{s3_bucket}/lists/bare.parquet"
    write_parquet(pa.table({"uri": list(reversed(listed.column("uri").to_pylist()))}), manifest)
    again = list_images(manifest)
    for column in ("uri", "bytes", "mtime_ns", "etag"):
        assert again.column(column).to_pylist() == listed.column(column).to_pylist(), column
    assert again.column("label").null_count == again.num_rows


def test_a_manifest_round_trips_through_s3(s3_bucket, store):
    store.pipe({f"{s3_bucket}/in/cls/a.jpg": b"a", f"{s3_bucket}/in/b.png": b"b"})
    listed = list_images(f"s3://{s3_bucket}/in")
    url = write_manifest(listed, f"s3://{s3_bucket}/out/_a2k/manifest.parquet")
    assert url == f"s3://{s3_bucket}/out/_a2k/manifest.parquet"
    assert list_images(url).equals(listed)
    assert not [p for p in store.find(f"{s3_bucket}/out") if p.rsplit("/", 1)[-1].startswith(".")]


@pytest.mark.parametrize(
    "where, error, message",
    [
        ("{bucket}/nothing", FileNotFoundError, "does not exist \\(no object under it\\)"),
        ("a2k-no-such-bucket/in", FileNotFoundError, "'s3://a2k-no-such-bucket/in' does not exist"),
        ("{bucket}/in/cls/a.jpg", ValueError, "is an object but not a .parquet manifest"),
    ],
)
def test_a_missing_prefix_or_bucket_is_refused_with_the_reason(s3_bucket, store, where, error, message):
    store.pipe_file(f"{s3_bucket}/in/cls/a.jpg", b"a")
    with pytest.raises(error, match=message):
        list_images("s3://" + where.format(bucket=s3_bucket))


def test_a_manifest_mixing_local_paths_and_s3_keys_is_refused(tmp_path):
    pq.write_table(pa.table({"uri": ["/data/a.jpg", "s3://bucket/b.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="mixes uri schemes \\(a local path, s3\\)"):
        list_images(tmp_path / "m.parquet")
