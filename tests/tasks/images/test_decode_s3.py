import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import s3fs

from tasks.images.read import ErrorKind, Failure, load_blobs
from tests.conftest import photo_paths


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


def test_denied_and_failed_reads_become_unreadable_rows_without_the_endpoint(s3_bucket, store, monkeypatch):
    photo = photo_paths(1)[0].read_bytes()
    store.pipe({f"{s3_bucket}/in/{k}.jpg": photo for k in ["ok", "denied", "broken"]})
    real = s3fs.S3FileSystem._cat_file

    async def flaky(self, path, *args, **kwargs):
        if "denied" in path:
            raise PermissionError("Access Denied")
        if "broken" in path:
            raise OSError(f'Could not connect to the endpoint URL: "{os.environ["AWS_ENDPOINT_URL"]}/{path}"')
        return await real(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", flaky)
    uris = [f"s3://{s3_bucket}/in/{k}.jpg" for k in ["broken", "denied", "ok"]]
    with ThreadPoolExecutor(2) as pool:
        broken, denied, ok = load_blobs(uris, pool)
    assert ok.data == photo
    assert (denied.kind, denied.message) == (ErrorKind.UNREADABLE, "permission denied: Access Denied")
    assert broken.kind == ErrorKind.UNREADABLE
    assert broken.message == ('read failed: OSError: Could not connect to the endpoint URL: '
                              f'"<AWS_ENDPOINT_URL>/{s3_bucket}/in/broken.jpg"')
    assert os.environ["AWS_ENDPOINT_URL"] not in broken.message  # errors tables never name the endpoint
