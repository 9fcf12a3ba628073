"""S3 reads and listings through obstore, on moto's server: every object's outcome is its bytes or its error row, the
store's throttling and 5xx answers are retried and nothing else is, and keys obstore cannot name still get through."""

import hashlib

import pytest
import s3fs

from tasks.images.manifest import list_images
from tasks.images.read import ErrorKind, Failure, read_objects
from tasks.images.read_procs import ProcessReaders
from tasks.images.s3_reads import list_prefix
from tests.conftest import photo_paths
from tests.s3_faults import Fault, FaultyS3Proxy


@pytest.fixture
def store(s3_bucket):
    return s3fs.S3FileSystem()


def _through(proxy: FaultyS3Proxy, monkeypatch, attempts: int) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(attempts))


def test_an_object_deleted_after_listing_is_a_vanished_row_and_the_others_are_read(s3_bucket, store):
    photos = [p.read_bytes() for p in photo_paths(3)]
    store.pipe({f"{s3_bucket}/in/{k}.jpg": v for k, v in zip("abc", photos)})
    listed = list_images(f"s3://{s3_bucket}/in").column("uri").to_pylist()
    store.rm_file(f"{s3_bucket}/in/b.jpg")
    a, b, c = read_objects(listed)
    assert (bytes(a), bytes(c)) == (photos[0], photos[2])
    assert b == Failure(ErrorKind.VANISHED, f"object vanished after it was listed: s3://{s3_bucket}/in/b.jpg")


def test_an_object_rewritten_after_listing_is_read_as_it_is_now_and_its_etag_tells_the_next_run(s3_bucket, store):
    """a2k reads what the key holds at read time (as it did through s3fs); the manifest keeps the listed ETag, so
    the incremental state sees the object changed and the next run classifies it again."""
    old, new = (p.read_bytes() for p in photo_paths(2))
    store.pipe_file(f"{s3_bucket}/in/a.jpg", old)
    listed = list_images(f"s3://{s3_bucket}/in")
    store.pipe_file(f"{s3_bucket}/in/a.jpg", new)
    (got,) = read_objects(listed.column("uri").to_pylist())
    assert bytes(got) == new
    relisted = list_images(f"s3://{s3_bucket}/in")
    assert listed.column("etag").to_pylist() == [hashlib.md5(old).hexdigest()]
    assert relisted.column("etag").to_pylist() == [hashlib.md5(new).hexdigest()]


def test_throttled_and_failing_gets_are_retried_until_they_succeed(s3_endpoint, s3_bucket, store, monkeypatch):
    photos = [p.read_bytes() for p in photo_paths(4)]
    store.pipe({f"{s3_bucket}/in/{i}.jpg": v for i, v in enumerate(photos)})
    gets = lambda method, path: method == "GET" and "/in/" in path  # noqa: E731
    kinds = (Fault.SLOW_DOWN, Fault.INTERNAL_ERROR, Fault.RESET)
    with FaultyS3Proxy(s3_endpoint, rate=1.0, seed=4, kinds=kinds, max_consecutive=2, matches=gets) as proxy:
        _through(proxy, monkeypatch, attempts=3)
        got = read_objects([f"s3://{s3_bucket}/in/{i}.jpg" for i in range(4)])
    assert [bytes(g) for g in got] == photos
    assert proxy.total_faults == 8  # each GET failed twice, then went through


def test_a_cut_short_body_is_retried_not_read_as_a_truncated_image(s3_endpoint, s3_bucket, store, monkeypatch):
    photo = photo_paths(1)[0].read_bytes()
    store.pipe_file(f"{s3_bucket}/in/a.jpg", photo)
    gets = lambda method, path: method == "GET" and "/in/" in path  # noqa: E731
    with FaultyS3Proxy(s3_endpoint, rate=1.0, kinds=(Fault.TRUNCATED_BODY,), max_consecutive=1, matches=gets) as proxy:
        _through(proxy, monkeypatch, attempts=3)
        (got,) = read_objects([f"s3://{s3_bucket}/in/a.jpg"])
    assert proxy.faults[Fault.TRUNCATED_BODY.value] == 1
    assert isinstance(got, memoryview) and bytes(got) == photo


def test_a_missing_object_is_asked_for_once_not_retried(s3_endpoint, s3_bucket, store, monkeypatch):
    with FaultyS3Proxy(s3_endpoint, rate=0.0) as proxy:
        _through(proxy, monkeypatch, attempts=5)
        (got,) = read_objects([f"s3://{s3_bucket}/in/none.jpg"])
    assert got.kind == ErrorKind.VANISHED
    assert proxy.requests == 1  # a 404 is an answer, not a transient failure


def test_keys_obstore_cannot_name_are_listed_and_read_through_s3fs(s3_bucket, store):
    photos = [p.read_bytes() for p in photo_paths(3)]
    keys = ["in/a.jpg", "in/x//b.jpg", "in/y/./c.jpg"]
    store.pipe({f"{s3_bucket}/{k}": v for k, v in zip(keys, photos)})
    uris = list_images(f"s3://{s3_bucket}/in").column("uri").to_pylist()
    assert uris == sorted(f"s3://{s3_bucket}/{k}" for k in keys)
    assert [bytes(b) for b in read_objects([f"s3://{s3_bucket}/{k}" for k in keys])] == photos


def test_a_listing_of_more_than_one_page_has_every_key_once_with_its_etag(s3_bucket, store):
    objects = {f"{s3_bucket}/in/c{i % 3}/{i:05d}.jpg": str(i).encode() for i in range(1003)}
    store.pipe(objects)
    listed = list(list_prefix(f"s3://{s3_bucket}/in"))
    assert sorted(o["path"] for o in listed) == sorted(objects)
    assert all(o["ETag"].strip('"') == hashlib.md5(objects[o["path"]]).hexdigest() for o in listed)


def test_reader_processes_fetch_objects_into_shared_memory_under_the_settings_of_the_moment(
        s3_endpoint, s3_bucket, store, monkeypatch):
    """The processes start while AWS_ENDPOINT_URL names a port nothing listens on; the store's address given after
    (as a test, or a user's next run in the same process, sets it) is the one they use."""
    photos = [p.read_bytes() for p in photo_paths(5)]
    store.pipe({f"{s3_bucket}/in/{i}.jpg": v for i, v in enumerate(photos)})
    store.pipe_file(f"{s3_bucket}/in/text.jpg", b"plain text")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    readers = ProcessReaders(workers=2, slots=1, slot_bytes=1 << 20)  # room for ~2 photos: the rest come as bytes
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        uris = [f"s3://{s3_bucket}/in/{k}.jpg" for k in [*range(5), "text", "gone"]]
        got = readers.load(uris, 0)
    finally:
        readers.close()
    assert [bytes(b.data) for b in got[:5]] == photos
    assert any(isinstance(b.data, memoryview) for b in got[:5])  # in the slot
    assert [(b.kind, b.message) for b in got[5:]] == [
        (ErrorKind.NOT_AN_IMAGE, "not a recognised image format (the header matches none)"),
        (ErrorKind.VANISHED, f"object vanished after it was listed: {uris[6]}")]
