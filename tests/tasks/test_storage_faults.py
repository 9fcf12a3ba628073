"""Writes to S3 whose response is lost (the store carried the request out, then a 500 or a reset): retried by
botocore, they must still count as done once, not twice and not as someone else's."""

import pytest
import s3fs

from tasks.models.registry import Registry
from tasks.storage import create_exclusive
from tests.s3_faults import Fault, FaultyS3Proxy


@pytest.fixture
def lossy_puts(s3_endpoint, s3_bucket, monkeypatch):
    """Every PUT is carried out by the store, then its response is lost once (500 or a reset); botocore retries."""
    puts = lambda method, path: method == "PUT"  # noqa: E731
    with FaultyS3Proxy(s3_endpoint, rate=1.0, seed=5, kinds=(Fault.INTERNAL_ERROR, Fault.RESET), max_consecutive=1,
                       matches=puts) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
        monkeypatch.setenv("AWS_RETRY_MODE", "standard")
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy


@pytest.fixture
def direct(s3_endpoint):
    return s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)


def test_an_exclusive_create_whose_response_was_lost_is_still_ours(lossy_puts, s3_bucket, direct):
    fs = s3fs.S3FileSystem()
    path = f"{s3_bucket}/claims/1"
    assert create_exclusive(fs, path, b"mine 7f3a")
    assert lossy_puts.faults[Fault.INTERNAL_ERROR.value] + lossy_puts.faults[Fault.RESET.value] >= 1
    assert direct.cat_file(path) == b"mine 7f3a"
    assert not create_exclusive(fs, path, b"a rival's 9c1d")  # someone else's claim is still refused
    assert direct.cat_file(path) == b"mine 7f3a"


def test_an_event_appended_while_responses_are_lost_is_logged_once(lossy_puts, s3_bucket, direct):
    registry = Registry(f"s3://{s3_bucket}/registry")
    assert [registry.append_event("seed", {"type": "note", "n": n}) for n in range(3)] == [1, 2, 3]
    assert [e["n"] for e in registry.events("seed")] == [0, 1, 2]
    assert registry.claim_version("seed") == 1
    assert direct.ls(f"{s3_bucket}/registry/seed", detail=False) == [
        f"{s3_bucket}/registry/seed/1", f"{s3_bucket}/registry/seed/_events"]
    assert lossy_puts.total_faults >= 4
