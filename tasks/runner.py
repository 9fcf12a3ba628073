"""How shard tasks run: on which task runner (in-process or Dask), which failures are worth a retry, and which GPU
slot a task holds while it uses a card."""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import threading
from collections.abc import Iterator
from enum import Enum
from typing import Any

from tasks.devices import Device

GPU_LIMIT = "gpu"  # global concurrency limit: one slot per card, shared by every flow that uses a card
# shard tasks at a time on a temporary dask-cuda cluster's worker (one per card); 2 overlaps one shard's Prefect
# bookkeeping with the other's work, but measured no faster on one H200 (bench/NOTES.md, "Dask on one card")
CUDA_WORKER_THREADS = 1


class TaskRunnerKind(str, Enum):
    LOCAL = "local"  # the flow's own process: two shard tasks at a time, overlapping on one worker
    DASK = "dask"  # prefect-dask: a temporary local cluster, or the scheduler at `dask_address`


def make_task_runner(kind: TaskRunnerKind | str, dask_address: str | None, device: Device, dask_workers: int | None):
    """The Prefect task runner for the shard tasks (not started); refuses a combination it cannot run.

    Dask without an address starts a temporary cluster: `dask_cuda.LocalCUDACluster` (one worker per visible GPU)
    on CUDA, else a `LocalCluster` of `dask_workers` processes. A CUDA worker runs two shard tasks at a time (their
    Prefect bookkeeping overlaps the other's work; the model and DALI pipeline the worker process keeps, see
    `tasks.classify.shard.shard_classifier`, take one shard at a time); a CPU worker runs one.
    """
    kind = TaskRunnerKind(kind)
    if kind is TaskRunnerKind.LOCAL:
        if dask_address or dask_workers:
            raise ValueError(f"dask_address {dask_address!r} and dask_workers {dask_workers!r} need task_runner "
                             "'dask'; task_runner is 'local'")
        from prefect.task_runners import ThreadPoolTaskRunner

        # two shard tasks at a time: while one runs on the card, the next goes through Prefect's state changes
        # and API round trips, so that per-shard bookkeeping overlaps the work instead of adding to it; and the
        # worker starts reading and decoding the next shard while the model finishes the one before
        return ThreadPoolTaskRunner(max_workers=2)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        if dask_workers:
            raise ValueError(f"dask_workers {dask_workers} starts a local cluster; with dask_address {dask_address!r} "
                             "the workers are the scheduler's: give one or the other")
        return DaskTaskRunner(address=dask_address)
    # the cluster's worker processes may start processes of their own: a shard reads local files in worker
    # processes (tasks.images.read_procs), which a daemonic process may not have; Dask makes them daemonic by default
    import dask

    dask.config.set({"distributed.worker.daemon": False})
    if device.is_cuda:
        try:
            import dask_cuda  # noqa: F401
        except ImportError:
            raise ValueError(
                f"task_runner 'dask' on {device} without dask_address needs dask-cuda for one worker per GPU "
                "(pip install 'a2k[gpu]'), or give dask_address of a running scheduler"
            ) from None
        # two task threads a worker: one shard's Prefect bookkeeping (state changes, API round trips, the commit)
        # overlaps the other's work, as in the local runner; the worker's one ShardClassifier gives the card to one
        # shard at a time, and both tasks share the card's slot (gpu_slot's share_key: the flow run)
        kwargs: dict[str, Any] = {"threads_per_worker": CUDA_WORKER_THREADS, "dashboard_address": None}
        if dask_workers:
            kwargs["n_workers"] = dask_workers
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs=kwargs)
    workers = dask_workers or max(1, min(4, (os.cpu_count() or 2) // 2))
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


# --- retries ---------------------------------------------------------------------------------------------------------

# S3 error codes that say "try again later", not "this request is wrong"
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled", "TooManyRequests",
    "RequestLimitExceeded", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "BandwidthLimitExceeded", "PriorRequestNotComplete",
})


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_transient_one(error: BaseException) -> bool:
    import aiohttp
    import botocore.exceptions as bce

    if isinstance(error, bce.ClientError):
        err = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return err.get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(error, (
        bce.ConnectionError, bce.HTTPClientError,  # endpoint unreachable, connection closed or reset, read timeouts
        aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError,
        ConnectionError, TimeoutError,  # the builtins: reset, refused, aborted, timed out
    ))


def is_transient_error(error: BaseException) -> bool:
    """True for a storage or network failure that may pass: throttling, a 5xx, a connection that failed or timed out
    (also when wrapped, as s3fs wraps botocore's errors in an OSError). Never for bad data, a bad parameter
    (ValueError), a missing or forbidden object, or a bug."""
    if isinstance(error, (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError)):
        return False
    return any(_is_transient_one(e) for e in _chain(error))


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` for Prefect tasks: retry only when the failure is transient."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception as e:  # the result could not be read back: that failure is what we judge
        error = e
    return isinstance(error, BaseException) and is_transient_error(error)


# --- the GPU slot ----------------------------------------------------------------------------------------------------

def card_limit_name(device: Device) -> str:
    """The per-card limit name: host and physical card (dask-cuda pins a worker with CUDA_VISIBLE_DEVICES, so
    cuda:0 of two workers are two cards)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    card = visible[device.index] if device.index is not None and device.index < len(visible) else str(device.index)
    return f"{GPU_LIMIT}:{socket.gethostname()}:{card}"


def ensure_limit(name: str, limit: int) -> bool:
    """Create the global concurrency limit `name` with `limit` slots if the server has none by that name; an
    existing one is left as its owner set it. True when it was created here."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:  # another process made it in between
            return False
        return True


class _SharedSlot:
    """One holding of the limits `names`, taken and kept by a thread of its own (Prefect's lease is renewed there)
    while any task of the same share key is inside `gpu_slot`, released when the last one leaves."""

    def __init__(self, names: list[str], timeout_seconds: float | None) -> None:
        self.users = 0
        self.error: BaseException | None = None
        self.acquired, self.released = threading.Event(), threading.Event()
        context = contextvars.copy_context()  # Prefect's settings and client context, as the caller has them
        self.thread = threading.Thread(target=context.run, args=(self._hold, names, timeout_seconds), daemon=True,
                                       name="a2k-gpu-slot")
        self.thread.start()

    def _hold(self, names: list[str], timeout_seconds: float | None) -> None:
        from prefect.concurrency.sync import concurrency

        try:
            with concurrency(names, occupy=1, timeout_seconds=timeout_seconds):
                self.acquired.set()
                self.released.wait()
        except BaseException as e:  # noqa: BLE001 - raised in every task waiting on this holding
            self.error = e
        finally:
            self.acquired.set()


_SHARED: dict[tuple[tuple[str, ...], str], _SharedSlot] = {}
_SHARED_LOCK = threading.Lock()


@contextlib.contextmanager
def gpu_slot(device: Device, timeout_seconds: float | None = None, share_key: str | None = None) -> Iterator[list[str]]:
    """Hold one slot of the global limit `gpu` and the card's own limit (one slot) while using a CUDA device, so
    two flows (say compress-model and classify-images) never share a card unasked; on the CPU, hold nothing.

    Tasks of this process given the same `share_key` (a flow run's id: its shard tasks on one Dask worker, which
    runs two at a time) share one holding: the second does not wait for the first's slot, and the slot is released
    when the last of them leaves. Without a key every holder takes its own slot.

    Prefect skips (with a warning) a limit that does not exist; the card's limit is created here when missing,
    `gpu` by the flow (`ensure_limit(GPU_LIMIT, cards)`) or by the operator: `prefect gcl create gpu --limit N`.
    """
    if not device.is_cuda:
        yield []
        return
    from prefect.concurrency.sync import concurrency

    names = [GPU_LIMIT, card_limit_name(device)]
    ensure_limit(names[1], 1)  # one GET per shard: cheap beside a shard, and a deleted limit comes back
    if share_key is None:
        with concurrency(names, occupy=1, timeout_seconds=timeout_seconds):
            yield names
        return
    key = (tuple(names), share_key)
    with _SHARED_LOCK:
        slot = _SHARED.get(key) or _SHARED.setdefault(key, _SharedSlot(names, timeout_seconds))
        slot.users += 1
    try:
        slot.acquired.wait()
        if slot.error is not None:
            raise slot.error
        yield names
    finally:
        with _SHARED_LOCK:
            slot.users -= 1
            last = slot.users == 0
            if last and _SHARED.get(key) is slot:
                del _SHARED[key]
        if last:
            slot.released.set()
            slot.thread.join()


def ensure_gpu_limit() -> bool:
    """Create the global limit `gpu` with one slot per card of this machine, unless the server has it already."""
    import torch

    return ensure_limit(GPU_LIMIT, max(1, torch.cuda.device_count()))
