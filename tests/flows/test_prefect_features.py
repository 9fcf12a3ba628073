"""What classify-images takes from Prefect, on the session's real test server: retries for transient storage errors
only, a progress and a table artifact, and the global `gpu` concurrency limit (one slot per card)."""

import json
import threading
import uuid

import aiohttp
import botocore.exceptions as bce
import pytest
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.states import Failed
from s3fs.errors import translate_boto_error

from tasks.devices import Device, resolve_device
from flows.classify_images import classify_images
from tasks.runner import GPU_LIMIT, card_limit_name, ensure_limit, gpu_slot, is_transient_error, retry_on_transient


def _client_error(code: str, status: int) -> bce.ClientError:
    return bce.ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "PutObject")


def _wrapped(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


@pytest.mark.parametrize("error, transient", [
    (_client_error("SlowDown", 503), True),
    (_client_error("InternalError", 500), True),
    (_client_error("Throttling", 400), True),
    (translate_boto_error(_client_error("ServiceUnavailable", 503)), True),  # s3fs's OSError, the ClientError its cause
    (bce.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (bce.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
    (aiohttp.ServerDisconnectedError(), True),
    (ConnectionResetError(104, "Connection reset by peer"), True),
    (_client_error("NoSuchKey", 404), False),
    (_client_error("AccessDenied", 403), False),
    (translate_boto_error(_client_error("AccessDenied", 403)), False),
    (FileNotFoundError("s3://bucket/gone.jpg"), False),
    (ValueError("batch_size 0 must be at least 1"), False),
    (_wrapped(ConnectionResetError(), ValueError("bad data, found while the connection dropped")), False),
    (RuntimeError("DALI: unsupported image"), False),
])
def test_only_transient_storage_and_network_errors_are_retried(error, transient):
    assert is_transient_error(error) is transient
    assert retry_on_transient(None, None, Failed(data=error)) is transient  # as Prefect calls it


def test_a_run_leaves_a_progress_and_a_table_artifact(photos_dir, seed_model_dir, tmp_path):
    summary = classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model=str(seed_model_dir),
                              device="cpu", shard_size=4)
    progress = Artifact.get("classify-images-progress")
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description == "images classified, of 9 in 3 shards"  # images, not only shards
    assert str(progress.flow_run_id) == summary["run_id"]
    table = Artifact.get("classify-images-shards")
    rows = json.loads(table.data)
    assert table.type == "table" and str(table.flow_run_id) == summary["run_id"]
    assert [r["images"] for r in rows] == [4, 4, 1] and sorted(r["part"] for r in rows) == summary["parts"]


def _active(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


@pytest.fixture
def gpu_limit():
    """The global `gpu` limit with one slot (a one-card machine); removed afterwards, with the card limits."""
    card = card_limit_name(Device("cuda", 0))
    with get_client(sync_client=True) as client:  # one an earlier CUDA run of this session created
        for name in (GPU_LIMIT, card):
            try:
                client.delete_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                pass
    assert ensure_limit(GPU_LIMIT, 1)
    yield GPU_LIMIT
    with get_client(sync_client=True) as client:
        for name in (GPU_LIMIT, card):
            try:
                client.delete_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                pass


def test_a_cuda_shard_holds_one_slot_of_gpu_and_of_its_card_and_a_second_holder_waits(gpu_limit):
    dev = Device("cuda", 0)
    with gpu_slot(dev) as names:
        assert names == [GPU_LIMIT, card_limit_name(dev)]
        assert (_active(GPU_LIMIT), _active(names[1])) == (1, 1)
        with pytest.raises(TimeoutError):  # e.g. a compress-model run wanting the card meanwhile
            with gpu_slot(dev, timeout_seconds=2):
                pass
    assert (_active(GPU_LIMIT), _active(names[1])) == (0, 0)


def test_shard_tasks_of_one_run_share_the_card_slot_and_others_still_wait(gpu_limit):
    """A Dask worker runs two shard tasks of a run at once (one's bookkeeping overlapping the other's work): they
    share one holding of the card's slot, which another flow, or another run's tasks, still wait for."""
    dev = Device("cuda", 0)
    first_in, second_in, leave = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def task(entered: threading.Event) -> None:
        try:
            with gpu_slot(dev, share_key="run-a", timeout_seconds=20):
                entered.set()
                leave.wait(60)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            entered.set()

    tasks = [threading.Thread(target=task, args=(first_in,)), threading.Thread(target=task, args=(second_in,))]
    tasks[0].start()
    assert first_in.wait(30)
    tasks[1].start()
    assert second_in.wait(10), "the run's second task waited for its own run's slot"
    assert not errors and (_active(GPU_LIMIT), _active(card_limit_name(dev))) == (1, 1)
    with pytest.raises(TimeoutError):  # another run's shard task on this card
        with gpu_slot(dev, share_key="run-b", timeout_seconds=2):
            pass
    with pytest.raises(TimeoutError):  # another flow (compress-model, say)
        with gpu_slot(dev, timeout_seconds=2):
            pass
    leave.set()
    for t in tasks:
        t.join(30)
    assert (_active(GPU_LIMIT), _active(card_limit_name(dev))) == (0, 0)
    with gpu_slot(dev, share_key="run-b", timeout_seconds=10):  # free again
        assert _active(card_limit_name(dev)) == 1


def test_without_a_gpu_limit_prefect_skips_it_and_the_card_limit_still_holds(gpu_limit):
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
    dev = Device("cuda", 0)
    with gpu_slot(dev) as names:  # Prefect logs "do not exist - skipping" for `gpu` and takes the card's slot
        assert _active(names[1]) == 1
    assert _active(names[1]) == 0


def test_the_card_limit_names_the_physical_card_a_dask_cuda_worker_is_pinned_to(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert card_limit_name(Device("cuda", 0)).endswith(":3") and card_limit_name(Device("cuda", 1)).endswith(":1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert card_limit_name(Device("cuda", 2)).startswith("gpu:") and card_limit_name(Device("cuda", 2)).endswith(":2")


def test_a_cpu_run_does_not_need_the_gpu_limit(photos_dir, seed_model_dir, tmp_path, gpu_limit):
    with gpu_slot(Device("cuda", 0)):  # every card busy
        summary = classify_images.with_options(timeout_seconds=120)(
            input=str(photos_dir), output=str(tmp_path / "out"), model=str(seed_model_dir), device="cpu")
    assert summary["predicted"] == 9


@pytest.mark.gpu
@pytest.mark.gpu_memory(1)  # the run sizes its batch from the free memory
def test_a_cuda_run_waits_while_another_flow_holds_the_card(photos_dir, seed_model_dir, tmp_path, gpu_limit):
    out, result = tmp_path / "out", {}
    run = threading.Thread(target=lambda: result.update(classify_images(
        input=str(photos_dir), output=str(out), model=str(seed_model_dir), device="cuda:0")))
    with gpu_slot(resolve_device("cuda:0")):  # as a compress-model run on this card would
        run.start()
        run.join(timeout=20)
        assert run.is_alive() and not list(out.glob("part-*.parquet"))
    run.join(timeout=300)
    assert result["predicted"] == 9 and _active(GPU_LIMIT) == 0
    assert uuid.UUID(result["run_id"])
