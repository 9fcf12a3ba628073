from concurrent.futures import ThreadPoolExecutor

import pytest
import s3fs

from obstore.exceptions import PermissionDeniedError

from tasks.images.read import ErrorKind, Failure, _read_failure, load_blobs
from tests.conftest import photo_paths
from tests.s3_faults import Fault, FaultyS3Proxy


@pytest.fixture
def store(s3_bucket):
    return s3fs.S3FileSystem()


def test_a_batch_of_objects_is_read_in_order_with_a_reason_for_each_bad_one(s3_bucket, store):
    photos = [p.read_bytes() for p in photo_paths(2)]
    objects = {"in/a.jpg": photos[0], "in/b[1].jpg": photos[1], "in/empty.jpg": b"", "in/notes.jpg": b"plain text"}
    store.pipe({f"{s3_bucket}/{k}": v for k, v in objects.items()})
    uris = [f"s3://{s3_bucket}/{k}" for k in ["in/notes.jpg", "in/a.jpg", "in/gone.jpg", "in/b[1].jpg", "in/empty.jpg"]]
    with ThreadPoolExecutor(2) as pool:
        blobs = load_blobs(uris, pool)
    assert blobs[1].data == photos[0] and blobs[3].data == photos[1]  # "[1]" is a name, not a glob
    kinds = [b.kind if isinstance(b, Failure) else None for b in blobs]
    assert kinds == [ErrorKind.NOT_AN_IMAGE, None, ErrorKind.VANISHED, None, ErrorKind.EMPTY]
    assert blobs[2].message == f"object vanished after it was listed: {uris[2]}"


def test_denied_and_failed_reads_become_unreadable_rows_without_the_endpoint(s3_endpoint, s3_bucket, store,
                                                                          monkeypatch):
    """A GET the store keeps failing (500, retries off) is an `unreadable` row naming no endpoint; a denied one says so."""
    photo = photo_paths(1)[0].read_bytes()
    store.pipe({f"{s3_bucket}/in/{k}.jpg": photo for k in ["ok", "broken"]})
    broken = lambda method, path: "broken" in path  # noqa: E731
    with FaultyS3Proxy(s3_endpoint, rate=1.0, kinds=(Fault.INTERNAL_ERROR,), max_consecutive=None,
                       matches=broken) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        uris = [f"s3://{s3_bucket}/in/{k}.jpg" for k in ["broken", "ok"]]
        with ThreadPoolExecutor(2) as pool:
            failed, ok = load_blobs(uris, pool)
        assert ok.data == photo
        assert failed.kind == ErrorKind.UNREADABLE and failed.message.startswith("read failed: GenericError: ")
        assert f"<AWS_ENDPOINT_URL>/{s3_bucket}/in/broken.jpg" in failed.message
        assert proxy.url not in failed.message, failed.message
        assert "\n" not in failed.message and "Debug source" not in failed.message, failed.message
    denied = _read_failure(uris[0], PermissionDeniedError("Access Denied"))
    assert (denied.kind, denied.message) == (ErrorKind.UNREADABLE, "permission denied: Access Denied")
