"""classify-images on S3 behind a proxy that throttles, fails, resets and cuts short requests: every image is
still accounted for exactly once, and no storage secret reaches a log or an artifact."""

from __future__ import annotations

import json
import logging
import os
import uuid

import pyarrow.dataset as ds
import pytest
import s3fs

from flows.classify_images import classify_images
from tests.conftest import photo_paths
from tests.s3_faults import Fault, FaultyS3Proxy

N_PHOTOS = 12
SHARD_SIZE = 3


@pytest.fixture
def photos_in_s3(s3_bucket, truncated_jpeg) -> dict[str, str]:
    """12 photos under s3://<bucket>/in/<class>/ and a truncated JPEG, uploaded straight to the store: uri -> class."""
    photos = enumerate(photo_paths(N_PHOTOS))
    objects = {f"in/{'birds' if i < N_PHOTOS // 2 else 'fish'}/{p.name}": p.read_bytes() for i, p in photos}
    objects["in/fish/cut.jpg"] = truncated_jpeg
    s3fs.S3FileSystem().pipe({f"{s3_bucket}/{k}": v for k, v in objects.items()})
    return {f"s3://{s3_bucket}/{k}": k.split("/")[1] for k in objects}


def _through(proxy: FaultyS3Proxy, monkeypatch, max_attempts: int) -> None:
    """Point s3fs (everything the flow opens from here on) at the proxy, with botocore's standard retries."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(max_attempts))
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    s3fs.S3FileSystem.clear_instance_cache()


def _direct(s3_endpoint: str) -> s3fs.S3FileSystem:
    """A filesystem on the store itself, past the proxy, for checking what was really written."""
    return s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)


def _classify(bucket: str, model: os.PathLike) -> dict:
    return classify_images(input=f"s3://{bucket}/in", output=f"s3://{bucket}/out", model=str(model), device="cpu",
                           shard_size=SHARD_SIZE, batch_size=3)


def _read(store: s3fs.S3FileSystem, path: str) -> list[dict]:
    store.invalidate_cache()  # s3fs keeps listings; the flow may have written since
    return ds.dataset(path, filesystem=store, format="parquet").to_table().to_pylist()


def _check_output(store: s3fs.S3FileSystem, bucket: str, listed: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """Every listed image exactly once across predictions and errors; the marker agrees with the parts; no
    temporary or probe object left behind. Returns (predictions, errors)."""
    out = f"{bucket}/out"
    preds, errors = _read(store, out), _read(store, f"{out}/_errors")
    assert sorted([r["image_uri"] for r in preds] + [r["image_uri"] for r in errors]) == sorted(listed)
    assert all(r["true_label"] == listed[r["image_uri"]] for r in preds)

    marker = json.loads(store.cat_file(f"{out}/_a2k_run.json"))
    assert marker["listed"] == marker["predicted"] + marker["errors"] == len(listed)
    assert (marker["predicted"], marker["errors"]) == (len(preds), len(errors))
    written = store.find(out)
    parts = sorted(p.rsplit("/", 1)[-1] for p in written if p.count("/") == 2 and p.endswith(".parquet"))
    assert marker["parts"] == parts and len(parts) == -(-len(listed) // SHARD_SIZE)
    others = {p.removeprefix(f"{out}/") for p in written} - set(parts) - {"_a2k_run.json"}
    others = {p for p in others if not p.startswith("_a2k/") or p.rsplit("/", 1)[-1].startswith(".")}
    # no temporary object, no write probe left; a run without errors leaves _errors/empty.parquet (no rows)
    assert others <= {f"_errors/{name}" for name in parts} | {"_errors/empty.parquet"}, others
    assert not store.exists(f"{out}/_a2k/state/pending.json")  # the run committed its state
    return preds, errors


def test_random_throttling_errors_resets_and_cut_bodies_lose_and_duplicate_nothing(
        s3_endpoint, s3_bucket, photos_in_s3, seed_model_dir, monkeypatch):
    with FaultyS3Proxy(s3_endpoint, rate=0.3, seed=20261125) as proxy:
        _through(proxy, monkeypatch, max_attempts=10)
        summary = _classify(s3_bucket, seed_model_dir)

    # about 35 faults in 120 requests (listing pages, HEADs, image GETs, part PUTs...); else this proves nothing
    assert all(proxy.faults[f.value] >= 2 for f in Fault) and proxy.total_faults >= 24, dict(proxy.faults)

    preds, errors = _check_output(_direct(s3_endpoint), s3_bucket, photos_in_s3)
    assert {r["image_uri"]: r["kind"] for r in errors} == {f"s3://{s3_bucket}/in/fish/cut.jpg": "truncated"}
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (13, 12, 1)


def _is_listing(method: str, path: str) -> bool:
    return method == "GET" and "list-type=2" in path


def _is_image_read(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and "/in/" in path and "?" not in path


def _is_output_write(method: str, path: str) -> bool:
    return method == "PUT" and "/out/" in path


@pytest.mark.parametrize("matches", [_is_listing, _is_image_read, _is_output_write], ids=["list", "read", "write"])
def test_every_request_of_a_stage_failing_twice_before_it_succeeds_loses_and_duplicates_nothing(
        s3_endpoint, s3_bucket, photos_in_s3, seed_model_dir, monkeypatch, matches):
    """Each request of the stage (listing pages; image HEADs and GETs; part, manifest and marker PUTs) fails
    twice, with a random one of the faults, before the store is let through."""
    with FaultyS3Proxy(s3_endpoint, rate=1.0, seed=7, max_consecutive=2, matches=matches) as proxy:
        _through(proxy, monkeypatch, max_attempts=5)
        _classify(s3_bucket, seed_model_dir)

    assert proxy.total_faults >= 2 and all(matches(m, p) for m, p, _ in proxy.failed_requests)
    _, errors = _check_output(_direct(s3_endpoint), s3_bucket, photos_in_s3)
    assert {r["image_uri"]: r["kind"] for r in errors} == {f"s3://{s3_bucket}/in/fish/cut.jpg": "truncated"}


def test_with_retries_off_an_image_that_cannot_be_fetched_is_an_unreadable_error_not_a_silent_gap(
        s3_endpoint, s3_bucket, photos_in_s3, seed_model_dir, monkeypatch):
    """Every GET of an image object fails (503, 500 or reset) and botocore does not retry: the run does not fail;
    each such image is a row in `_errors`, kind `unreadable`, saying why, and the marker still balances."""
    reads = lambda m, p: m == "GET" and "/in/" in p and "?" not in p  # noqa: E731
    kinds = (Fault.SLOW_DOWN, Fault.INTERNAL_ERROR, Fault.RESET)
    with FaultyS3Proxy(s3_endpoint, rate=1.0, seed=3, kinds=kinds, max_consecutive=None, matches=reads) as proxy:
        _through(proxy, monkeypatch, max_attempts=1)
        summary = _classify(s3_bucket, seed_model_dir)

    assert {f: proxy.faults[f.value] > 0 for f in kinds} == dict.fromkeys(kinds, True)
    store = _direct(s3_endpoint)
    preds, errors = _check_output(store, s3_bucket, photos_in_s3)
    assert preds == [] and (summary["predicted"], summary["errors"]) == (0, 13)
    assert {r["kind"] for r in errors} == {"unreadable"}
    assert all(r["reason"].startswith("read failed: ") and len(r["reason"]) > len("read failed: ") for r in errors)
    assert not [r for r in errors if s3_endpoint in r["reason"]]  # the endpoint is redacted from the reason


def test_no_storage_key_reaches_the_logs_or_the_summary_artifact(
        s3_endpoint, s3_bucket, photos_in_s3, seed_model_dir, monkeypatch, caplog, capsys):
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    key_id, secret = "AKIAA2K7QX4Z9TESTKEY", f"a2k-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    for name in ("prefect", "tasks", "flows", "a2k"):
        caplog.set_level(logging.DEBUG, logger=name)
    # faults on the image reads make botocore's and s3fs's retry paths (and their debug logging) run too
    with FaultyS3Proxy(s3_endpoint, rate=0.3, seed=11, max_consecutive=1,
                       matches=lambda m, p: m == "GET" and "/in/" in p) as proxy:
        _through(proxy, monkeypatch, max_attempts=2)
        summary = _classify(s3_bucket, seed_model_dir)
    APILogWorker.drain_all(timeout=10)  # the run's logs reach the API in batches

    with get_client(sync_client=True) as client:
        api_logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(summary["run_id"])])))
    artifact = Artifact.get("classify-images-summary")
    assert artifact is not None and str(artifact.flow_run_id) == summary["run_id"]
    captured = capsys.readouterr()
    texts = {
        "log records": "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records),
        "stdout and stderr": captured.out + captured.err,
        "flow run logs in the API": "\n".join(log.message for log in api_logs),
        "summary artifact": f"{artifact.description} {artifact.data}",
    }
    assert proxy.total_faults > 0
    assert "shard 0:" in texts["log records"] and "listed 13 images" in texts["flow run logs in the API"]
    assert "images listed | 13" in texts["summary artifact"]
    for where, text in texts.items():
        assert secret not in text, where
        assert key_id not in text, where


def test_a_run_that_fails_after_writing_a_shards_errors_part_leaves_no_stale_error_rows_for_the_rerun(
        s3_endpoint, s3_bucket, photos_in_s3, seed_model_dir, monkeypatch):
    """Shard 0 writes its errors part (one image unreadable), then its predictions part cannot be written, in each
    of the task's attempts (Prefect retries the throttled write): the run fails once the other shards are done.
    The rerun reads that image fine: it must not also stay in `_errors` from the failed attempts."""
    from flows.classify_images import classify_shard_task

    monkeypatch.setattr(classify_shard_task, "retry_delay_seconds", [0])  # the back-off itself is not under test
    first = "/" + min(photos_in_s3).removeprefix("s3://")
    part_0 = f"/{s3_bucket}/out/part-000000-"
    fail = lambda m, p: (m == "GET" and p == first) or (m == "PUT" and p.startswith(part_0))  # noqa: E731
    # SlowDown refuses a request before the store carries it out, so the predictions part is really not written
    with FaultyS3Proxy(s3_endpoint, rate=1.0, kinds=(Fault.SLOW_DOWN,), max_consecutive=None, matches=fail) as proxy:
        _through(proxy, monkeypatch, max_attempts=1)
        with pytest.raises(OSError):
            _classify(s3_bucket, seed_model_dir)
    store = _direct(s3_endpoint)
    assert _last_failed_shard_task().run_count == 1 + 3  # Prefect retried the throttled shard three times
    assert {r["image_uri"]: r["kind"] for r in _read(store, f"{s3_bucket}/out/_errors")}[min(photos_in_s3)] == "unreadable"
    assert not store.exists(f"{s3_bucket}/out/_a2k_run.json")

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    summary = _classify(s3_bucket, seed_model_dir)
    assert (summary["predicted"], summary["errors"], summary["resumed_shards"]) == (12, 1, 4)  # all but shard 0
    _, errors = _check_output(store, s3_bucket, photos_in_s3)
    assert {r["image_uri"]: r["kind"] for r in errors} == {f"s3://{s3_bucket}/in/fish/cut.jpg": "truncated"}


def _last_failed_shard_task():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import TaskRunSort

    failed = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.FAILED])))
    with get_client(sync_client=True) as client:
        (run,) = client.read_task_runs(task_run_filter=failed, sort=TaskRunSort.END_TIME_DESC, limit=1)
    assert run.task_key.endswith("classify_shard_task") or run.name.startswith("classify-shard"), run.name
    return run


def test_images_that_could_not_be_read_are_retried_by_the_rerun_not_kept_as_committed(
        s3_endpoint, s3_bucket, photos_in_s3, seed_model_dir, monkeypatch):
    """A store outage turns images into `unreadable` rows of a committed run; running again once the store is back
    redoes just those shards, so each image ends up predicted, once."""
    outage = lambda m, p: m == "GET" and "/in/birds/" in p and "?" not in p  # noqa: E731
    with FaultyS3Proxy(s3_endpoint, rate=1.0, kinds=(Fault.INTERNAL_ERROR,), max_consecutive=None,
                       matches=outage) as proxy:
        _through(proxy, monkeypatch, max_attempts=1)
        hit = _classify(s3_bucket, seed_model_dir)
    assert (hit["predicted"], hit["errors"]) == (6, 7)

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    again = _classify(s3_bucket, seed_model_dir)
    assert (again["retried"], again["unchanged"], again["processed_this_run"]) == (6, 7, 6)  # just the six birds
    assert (again["predicted"], again["errors"]) == (12, 1)
    _, errors = _check_output(_direct(s3_endpoint), s3_bucket, photos_in_s3)
    assert {r["image_uri"]: r["kind"] for r in errors} == {f"s3://{s3_bucket}/in/fish/cut.jpg": "truncated"}
