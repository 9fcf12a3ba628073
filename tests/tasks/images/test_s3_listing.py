from collections import Counter
from datetime import datetime, timedelta, timezone

import boto3
import pyarrow as pa
import pytest
import s3fs

from tasks.images import listing
from tasks.images.listing import _add_object, skipped_name
from tasks.images.manifest import MANIFEST_SCHEMA, list_images, skipped_counts, sort_manifest
from tasks.images.s3_reads import list_prefix, list_prefix_table
from tasks.storage import filesystem

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MANY = 1_005  # over one ListObjectsV2 page of 1,000 keys


@pytest.fixture
def tree(s3_bucket):
    """A prefix with class folders, loose files at the top, hidden files, other suffixes, folder markers, names
    that are not ASCII, deeper folders, a sibling prefix sharing its name's start, and > 1,000 keys in one folder."""
    objects = {f"in/many/{i:05d}.jpg": bytes([i % 256]) for i in range(MANY)}
    objects |= {"in/cat/a.JPG": b"aa", "in/cat/.hidden.jpg": b"h", "in/cat/notes.txt": b"n", "in/cat/README": b"r",
                "in/cat/empty.png": b"", "in/cat/deep/x.webp": b"xxx", "in/cat/marker/": b"", "in/dog/b.jpeg": b"b",
                "in/dog/café.PNG": b"c", "in/dog/naïve.TXT": b"t", "in/dog/ÉTÉ": b"e", "in/dog/arch.tar.gz": b"g",
                "in/top.tiff": b"t", "in/.top.jpg": b".", "in/loose.csv": b"l", "in/": b"", "in/empty-dir/": b"",
                "input/sibling.jpg": b"not under in/"}
    s3fs.S3FileSystem().pipe({f"{s3_bucket}/{k}": v for k, v in objects.items()})
    return f"s3://{s3_bucket}/in"


def _expected(source: str) -> tuple[pa.Table, dict[str, int]]:
    """The manifest by boto3's listing and the rules spelled out in Python, key by key."""
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    skipped: Counter[str] = Counter()
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    for obj in (o for page in pages for o in page.get("Contents", [])):
        relative = obj["Key"][len(prefix) + 1 :]
        name = relative.rsplit("/", 1)[-1]
        if not name or (obj["Size"] == 0 and "." not in name):  # a folder marker
            continue
        if why := skipped_name(name):
            skipped[why] += 1
            continue
        rows["uri"].append(f"s3://{bucket}/{obj['Key']}")
        rows["bytes"].append(obj["Size"])
        rows["mtime_ns"].append((obj["LastModified"] - EPOCH) // timedelta(microseconds=1) * 1000)
        rows["label"].append(relative.split("/")[0] if relative.count("/") == 1 else None)
        rows["etag"].append(obj["ETag"].strip('"'))
    return sort_manifest(pa.table(rows, schema=MANIFEST_SCHEMA)), dict(skipped)


def _sequential(source: str) -> tuple[pa.Table, dict[str, int]]:
    """The listing key by key as a2k made it before its Arrow columns: one dict per object."""
    fs, root = filesystem(source)
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    skipped: Counter[str] = Counter()
    for info in list_prefix(source):
        _add_object(rows, skipped, fs, root, info)
    return sort_manifest(pa.table(rows, schema=MANIFEST_SCHEMA)), dict(skipped)


def _sequential_infos(source: str) -> list[dict]:
    return list(list_prefix(source))


def _assert_same(table: pa.Table, expected: pa.Table) -> None:
    for column in MANIFEST_SCHEMA.names:
        assert table.column(column).to_pylist() == expected.column(column).to_pylist(), column


def test_the_listing_equals_one_key_by_key_both_ways(tree):
    table = list_images(tree)
    expected, skipped = _expected(tree)
    assert table.num_rows == MANY + 6
    _assert_same(table, expected)
    assert skipped_counts(table) == dict(sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    assert skipped == {"hidden": 2, ".txt": 2, "no suffix": 2, ".gz": 1, ".csv": 1}
    sequential, sequential_skipped = _sequential(tree)
    _assert_same(table, sequential)
    assert skipped == sequential_skipped
    assert table.column("label").to_pylist().count("many") == MANY


def test_one_prefix_at_a_time_lists_the_same_objects(tree):
    at_once, one_by_one = (list_prefix_table(tree, n).sort_by("path") for n in (32, 1))
    assert at_once.equals(one_by_one)
    assert at_once.num_rows == len(_sequential_infos(tree))
    assert list_images(f"{tree}/").equals(list_images(tree))


def test_a_prefix_without_folders_is_its_delimited_listing(s3_bucket):
    s3fs.S3FileSystem().pipe({f"{s3_bucket}/flat/{i}.png": b"p" for i in range(3)} | {f"{s3_bucket}/flat/x.md": b""})
    table = list_images(f"s3://{s3_bucket}/flat")
    assert [u.rsplit("/", 1)[-1] for u in table.column("uri").to_pylist()] == ["0.png", "1.png", "2.png"]
    assert table.column("label").null_count == 3
    assert skipped_counts(table) == {".md": 1}


def test_the_bucket_root_is_listed_with_its_first_folders_as_labels(s3_bucket):
    s3fs.S3FileSystem().pipe({f"{s3_bucket}/cls/a.jpg": b"a", f"{s3_bucket}/b.jpg": b"b"})
    table = list_images(f"s3://{s3_bucket}")
    assert table.column("uri").to_pylist() == [f"s3://{s3_bucket}/b.jpg", f"s3://{s3_bucket}/cls/a.jpg"]
    assert table.column("label").to_pylist() == [None, "cls"]


def test_no_python_object_per_listed_key(tree, monkeypatch):
    def per_key(*args, **kwargs):
        raise AssertionError("a dict per key")

    monkeypatch.setattr(listing, "_add_object", per_key)
    assert list_images(tree).num_rows == MANY + 6


def test_stamps_are_whole_microseconds_in_nanoseconds(tree):
    assert all(t % 1000 == 0 and t > 0 for t in list_images(tree).column("mtime_ns").to_pylist())
