"""Classify a shard of images: read bytes, decode with DALI, run the model in batches, write one Parquet part.

The stages overlap: reader threads fetch and header-check batches ahead, a decode thread streams them through
DALI with a batch queued behind the one it decodes (on its own CUDA stream), and the calling thread runs the
model on the batch before (on another stream) and builds its Arrow rows. Shards given from two threads overlap
too: the next shard's reads and decoding start as soon as the shard before has left the decode stage, while the
model finishes that shard's last batches.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch

import tasks
from tasks.classify.infer import MAX_AUTO_BATCH, Classifier, fit_batch_size, limit_gpu_memory
from tasks.classify.output import Output, part_name
from tasks.classify.plan import RunContext, ShardOutcome, read_shard_rows
from tasks.classify.sink import ERROR_SCHEMA, PREDICTION_SCHEMA, mark_missing, write_part
from tasks.devices import resolve_device
from tasks.images.decode import STREAM_DEPTH, DecodedBatch, ImageDecoder, default_threads
from tasks.images.manifest import NOT_FOUND, Shard
from tasks.images.preprocess import Preprocessing
from tasks.images.read import DEFAULT_MAX_PIXELS, Failure, ReadArena, load_blobs
from tasks.images.read_procs import MIN_SLOT_BYTES, SLOT_BYTES_PER_IMAGE, ProcessReaders, read_processes_available
from tasks.models.entry import read_entry
from tasks.progress import advance_images
from tasks.storage import is_url
from tasks.targets import plan_budget

log = logging.getLogger(__name__)

READ_AHEAD = 3  # batches read and header-checked ahead of the decoder
DECODE_AHEAD = 2  # decoded batches waiting for the model (each holds its images on the device)
# Read arenas in the ring: batch n is read into arena n % ARENAS. When the decoder takes batch n, the read of
# n + READ_AHEAD is submitted; batches n - STREAM_DEPTH .. n - 1 may still be held by the decoder (in DALI, or
# behind one that is; their bytes are needed again if DALI fails on them: ImageDecoder.decode_stream), and
# n + 1 .. n + READ_AHEAD - 1 are read or being read: the ring spans READ_AHEAD + STREAM_DEPTH + 1 batches.
ARENAS = READ_AHEAD + STREAM_DEPTH + 1
# Threads reading local files where worker processes cannot (see READ_PROCESSES). Reads from the page cache
# hold the GIL the decode and model threads need: a shard ran at 6,398 images/s with 1 reader thread, 6,269
# with 2 and 5,108 with 4 on the H100 machine (bench/NOTES.md, variant 7).
LOCAL_READERS = 1
# Worker processes reading and header-checking local files into shared memory (tasks.images.read_procs): a quarter of
# the usable cores, 1 to 4. 0 reads in threads.
MAX_READ_PROCESSES = 4
# Objects in a store are fetched READ_AHEAD batches at once (each in its own arena), by reader processes of their own:
# READ_AHEAD times the local files' count, each batch split over as many as the local files' batches. Read one batch
# at a time, a batch's fetch costs a whole round trip to the store, and the run ran at 256 / (round trip + service):
# 4,624 images/s at 20 ms against 9,519 from a folder on the H200 (bench/NOTES.md, "S3 reads in flight").


def default_read_processes() -> int:
    return max(1, min(MAX_READ_PROCESSES, default_threads() // 4))


@dataclass
class ShardTiming:
    """Seconds a shard run took, and what each stage spent waiting on another: where the time goes. The model
    waiting for decode means decoding (or reading) bounds the run; decode waiting for the model means the
    model does."""

    started: float = 0.0  # perf_counter() when the model's turn came to the shard
    seconds: float = 0.0
    model_for_decode: float = 0.0
    decode_for_reads: float = 0.0
    decode_for_model: float = 0.0
    first_batch_at: float = 0.0  # time.time() when the model had the first decoded batch

    def describe(self) -> str:
        return (f"model waited {self.model_for_decode:.2f}s for decode, decode {self.decode_for_reads:.2f}s for "
                f"reads and {self.decode_for_model:.2f}s for the model")


@dataclass
class _Decoded:
    """One batch after the decode stage: which rows it holds, which failed and why, and the images."""

    rows: list[int]  # manifest rows of `decoded.images`, in order
    failures: list[tuple[int, Failure]]
    images: torch.Tensor | None
    ready: torch.cuda.Event | None  # recorded on the decode stream once `images` is complete


class ShardClassifier:
    """Everything a worker keeps between shards: the model on its device, the DALI decoder, the threads.

    `batch_size=None` picks the largest batch that fits the GPU memory free to the process (`fit_batch_size`).
    """

    def __init__(
        self, model_dir: str, device: str, batch_size: int | None, num_threads: int | None,
        hw_decoder_load: float = 0.65, gpu_memory_gb: float | None = None, local_readers: int = LOCAL_READERS,
        read_processes: int | None = None, model_sms: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if self.device.is_cuda and tasks.CUDA_STARTED_FIRST:
            log.warning("CUDA was started in this process before a2k was imported, so its "
                        "CUDA_DEVICE_MAX_CONNECTIONS=32 came too late: decoding and the model may take turns on the "
                        "card (DALI's decoding ~3x slower beside the model on an H200, bench/NOTES.md variant 14). "
                        "Import a2k first, or set CUDA_DEVICE_MAX_CONNECTIONS=32 before the process starts")
        t0 = time.perf_counter()
        self.ballast = limit_gpu_memory(self.device, gpu_memory_gb) if gpu_memory_gb else None
        # the reader processes (separate processes: their start-up runs in parallel) and, when the batch size is
        # given, the DALI pipeline build in a thread, while the model loads here; the CUDA graph is recorded once
        # the decoder is built (no other thread's CUDA work during the capture)
        steps: dict[str, float] = {}
        build = ThreadPoolExecutor(max_workers=2, thread_name_prefix="a2k-build")
        threads = f"{local_readers} reader thread{'s' if local_readers > 1 else ''}"
        workers = default_read_processes() if read_processes is None else read_processes
        readers = build.submit(self._timed, steps, "readers", self._start_read_processes, workers, threads,
                               batch_size or MAX_AUTO_BATCH)
        pre = read_entry(model_dir).preprocessing  # the entry alone: the decoder is built beside the model's load
        decoder = None
        if batch_size is not None:
            decoder = build.submit(self._timed, steps, "decoder", self._build_decoder, pre, batch_size, num_threads,
                                   hw_decoder_load)
        try:
            self.classifier = self._timed(steps, "model", Classifier, model_dir, self.device, True, None, model_sms)
            compiled = self.classifier.compiled_batch
            if compiled and batch_size is not None and batch_size != compiled:
                log.warning("%s is compiled for batches of %d; batches of %d are padded or cut to that size",
                            self.classifier.entry.name, compiled, batch_size)
            self.class_names = pa.array(list(self.classifier.entry.class_names), pa.string())
            if batch_size is None:
                fit = self._timed(steps, "batch fit", fit_batch_size, self.classifier, pre)
                log.info("automatic batch size on %s: %s", self.device, fit.describe())
                batch_size = fit.batch_size
            self.batch_size = batch_size
            self.decoder = decoder.result() if decoder is not None else self._timed(
                steps, "decoder", self._build_decoder, pre, batch_size, num_threads, hw_decoder_load)
            if self.device.is_cuda and self._timed(steps, "graph", self.classifier.capture, batch_size):
                log.info("%s captured as a CUDA graph at batch %d", self.classifier.entry.name, batch_size)
            self.process_readers, self.reading = readers.result()
        finally:
            build.shutdown(wait=True)
        self.readers = ThreadPoolExecutor(max_workers=local_readers, thread_name_prefix="a2k-read")
        self.read_stage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="a2k-read-batch")
        self._store_reads: tuple[ProcessReaders, ThreadPoolExecutor] | None = None  # started by the first store shard
        self._store_lock = threading.Lock()
        self.decode_stage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="a2k-decode")
        self.decode_stream = torch.cuda.Stream(self.device.torch_device) if self.device.is_cuda else None
        # not the legacy default stream: DALI's streams wait for all of that one's work, and it for theirs; the
        # classifier's own (on a share of the SMs when the run emulates a smaller card)
        self.model_stream = self.classifier.stream
        self.arenas = [ReadArena() for _ in range(ARENAS)]
        self.build_seconds = time.perf_counter() - t0
        self.build_steps = steps
        log.info("shard worker ready on %s in %.1f s (%s)", self.device, self.build_seconds,
                 ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
        # shards given from several threads take tickets: the decode stage (one thread) runs them in ticket order,
        # and so does the model, one shard at a time (the CUDA graph has one input buffer)
        self._model_turn = threading.Condition()
        self._tickets = 0  # the next shard's ticket
        self._serving = 0  # the ticket whose turn it is on the model

    def close(self) -> None:
        """Stop the reader processes and the stage threads (the worker is not used again)."""
        if self.process_readers is not None:
            self.process_readers.close()
        if self._store_reads is not None:
            self._store_reads[0].close()
            self._store_reads[1].shutdown(wait=True, cancel_futures=True)
        for pool in (self.readers, self.read_stage, self.decode_stage):
            pool.shutdown(wait=True, cancel_futures=True)

    def store_reads(self) -> tuple[ProcessReaders, ThreadPoolExecutor] | None:
        """Reader processes for objects in a store and the threads that load READ_AHEAD batches of them at once
        (started at the first shard that reads a store: a folder's run starts none), or None where reads run in
        threads of this process."""
        if self.process_readers is None:
            return None
        with self._store_lock:
            if self._store_reads is None:
                local = self.process_readers
                t0 = time.perf_counter()
                readers = ProcessReaders(local.workers * READ_AHEAD, ARENAS, local.slot_bytes, chunks=local.workers)
                self._store_reads = (readers, ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="a2k-read-store"))
                log.info("objects in a store are read by %d reader processes, %d batches at once (started in %.1fs)",
                         readers.workers, READ_AHEAD, time.perf_counter() - t0)
        return self._store_reads

    def reading_for(self, uris: list[str]) -> str:
        """How this worker reads a shard of `uris`, in words (the shard's log line, the run's summary)."""
        if uris and is_url(uris[0]) and self._store_reads is not None:
            return (f"{self._store_reads[0].workers} reader processes, {READ_AHEAD} batches at once (objects in a "
                    "store)")
        return f"{self.reading} (local files)" if not (uris and is_url(uris[0])) else self.reading

    @staticmethod
    def _timed(steps: dict[str, float], name: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            steps[name] = time.perf_counter() - t0

    def _build_decoder(self, pre: Preprocessing, batch_size: int, num_threads: int | None,
                       hw_decoder_load: float) -> ImageDecoder:
        decoder = ImageDecoder(pre, self.device, batch_size, num_threads, hw_decoder_load=hw_decoder_load)
        decoder.prepare_stream()  # DALI's pipeline for the shards' stream, built here rather than at the first batch
        return decoder

    def _start_read_processes(self, workers: int, threads: str, batch_size: int) -> tuple[ProcessReaders | None, str]:
        """Reader processes for local files and S3 objects (each process fetches with its own obstore client), or
        None (threads of this process read them) where they cannot run; and how images are read, in words, for the
        shard's log line and the run's summary. The slots are sized for `batch_size` images (sparse: unread pages
        take no memory)."""
        if workers < 1:
            return None, threads
        slot_bytes = max(MIN_SLOT_BYTES, batch_size * SLOT_BYTES_PER_IMAGE)
        if why_not := read_processes_available():
            log.info("local files are read in threads: %s", why_not)
            return None, f"{threads} ({why_not})"
        readers = ProcessReaders(workers, ARENAS, slot_bytes)
        return readers, f"{workers} reader process{'es' if workers > 1 else ''} x {readers.threads} threads"

    def run(
        self, uris: list[str], true_labels: list[str | None], ctx: RunContext, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[pa.Table, pa.Table, ShardTiming]:
        """Predictions and errors for `uris` (every uri lands in exactly one), and the time from the moment the
        model's turn came to this shard until the model was done with it (its reads and decoding may have begun
        earlier, while the model finished the shard before: counted there, so consecutive shards' times tile the
        time the worker was busy, and images / their sum is the worker's rate).

        Thread-safe: shards given from several threads are served in the order they came, and overlap where the
        stages allow it: a shard's reads and decoding start when the shard before it has been decoded, while the
        model still runs on that shard's last batches."""
        timing = ShardTiming()
        batches = [list(range(i, min(i + self.batch_size, len(uris)))) for i in range(0, len(uris), self.batch_size)]
        decoded: queue.Queue[_Decoded | BaseException] = queue.Queue(maxsize=DECODE_AHEAD)
        stop = threading.Event()
        with self._model_turn:  # the ticket and the place in the decode stage's queue agree
            ticket, self._tickets = self._tickets, self._tickets + 1
            stage = self.decode_stage.submit(self._decode_all, uris, batches, max_pixels, decoded, stop, timing)
        try:
            with self._model_turn:
                self._model_turn.wait_for(lambda: self._serving == ticket)
            timing.started = time.perf_counter()
            try:
                pred_batches, err_rows = self._predict(uris, true_labels, ctx, batches, decoded, timing)
            finally:
                with self._model_turn:
                    timing.seconds = time.perf_counter() - timing.started  # consecutive shards' times tile
                    self._serving += 1
                    self._model_turn.notify_all()
        finally:  # a failed stage: the decode stage stops before the next shard reuses the decoder
            stop.set()
            stage.exception()
        predictions = pa.Table.from_batches(pred_batches, schema=PREDICTION_SCHEMA)
        errors = _error_table(err_rows, ctx)
        if predictions.num_rows + errors.num_rows != len(uris):
            raise RuntimeError(
                f"{len(uris)} images in, {predictions.num_rows} predicted + {errors.num_rows} errors out: rows were lost"
            )
        return predictions, errors, timing

    def _predict(self, uris: list[str], true_labels: list[str | None], ctx: RunContext, batches: list[list[int]],
                 decoded: queue.Queue[_Decoded | BaseException], timing: ShardTiming):
        """The model stage: each decoded batch's top k, as Arrow rows, and the failures the stages before found."""
        pred_batches: list[pa.RecordBatch] = []
        err_rows: list[tuple[str, Failure]] = []
        uri_array, label_array = pa.array(uris, pa.string()), pa.array(true_labels, pa.string())
        with torch.cuda.stream(self.model_stream):  # no stream (CPU): no-op
            for _ in batches:
                t0 = time.perf_counter()
                batch = decoded.get()
                timing.model_for_decode += time.perf_counter() - t0
                if isinstance(batch, BaseException):
                    raise batch
                err_rows += [(uris[i], f) for i, f in batch.failures]
                advance_images(len(batch.failures) + len(batch.rows))  # the terminal's display, where there is one
                if batch.images is None:
                    continue
                timing.first_batch_at = timing.first_batch_at or time.time()
                if batch.ready is not None:
                    self.model_stream.wait_event(batch.ready)
                    batch.images.record_stream(self.model_stream)
                scores, indices = self.classifier.top_k(batch.images, ctx.top_k)
                rows = pa.array(batch.rows, pa.int32())
                pred_batches.append(_prediction_batch(uri_array.take(rows), label_array.take(rows), scores, indices,
                                                      self.class_names, ctx))
        return pred_batches, err_rows

    def _decode_all(self, uris: list[str], batches: list[list[int]], max_pixels: int,
                    out: queue.Queue[_Decoded | BaseException], stop: threading.Event, timing: ShardTiming) -> None:
        """The decode stage, on its own thread (and CUDA stream): the shard's batches read ahead, streamed
        through the decoder, and put on `out` in order; an error is put on `out` in place of a batch."""
        reads: deque[Future] = deque()
        read_failures: deque[tuple[list[int], list[tuple[int, Failure]]]] = deque()
        store = self.store_reads() if uris and is_url(uris[0]) else None

        def read(n: int) -> Future:
            batch = [uris[i] for i in batches[n]]
            if store is not None:
                return store[1].submit(store[0].load, batch, n % ARENAS, max_pixels)
            if self.process_readers is not None:
                return self.read_stage.submit(self.process_readers.load, batch, n % ARENAS, max_pixels)
            return self.read_stage.submit(load_blobs, batch, self.readers, max_pixels, self.arenas[n % ARENAS])

        def blob_batches():
            for n in range(min(READ_AHEAD, len(batches))):
                reads.append(read(n))
            for n in range(len(batches)):
                t0 = time.perf_counter()
                blobs = reads.popleft().result()
                timing.decode_for_reads += time.perf_counter() - t0
                if n + READ_AHEAD < len(batches):
                    reads.append(read(n + READ_AHEAD))
                good = [i for i, b in zip(batches[n], blobs) if not isinstance(b, Failure)]
                read_failures.append((good, [(i, b) for i, b in zip(batches[n], blobs) if isinstance(b, Failure)]))
                yield [b for b in blobs if not isinstance(b, Failure)]

        try:
            with contextlib.closing(self.decoder.decode_stream(blob_batches())) as stream, \
                    torch.cuda.stream(self.decode_stream):  # no stream (CPU): no-op
                for batch in stream:
                    good, failures = read_failures.popleft()
                    decoded = self._decoded(batch, good, failures)
                    t0 = time.perf_counter()
                    if not _put(out, decoded, stop):
                        return
                    timing.decode_for_model += time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - handed to the model thread, which raises it
            _put(out, e, stop)
        finally:
            for f in reads:
                f.cancel()
            for f in reads:
                if not f.cancelled():
                    f.exception()

    def _decoded(self, decoded: DecodedBatch, good: list[int], failures: list[tuple[int, Failure]]) -> _Decoded:
        """A decoded batch in manifest rows, with an event the model's stream waits on before using it."""
        failures = failures + [(good[p], f) for p, f in decoded.failures.items()]
        if not decoded.ok:
            return _Decoded([], failures, None, None)
        ready = None
        if self.decode_stream is not None:
            ready = torch.cuda.Event()
            ready.record(self.decode_stream)
        return _Decoded([good[p] for p in decoded.ok], failures, decoded.images, ready)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` on `out` unless the consumer has stopped; False when it has."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _prediction_batch(uris: pa.Array, true_labels: pa.Array, scores: np.ndarray, indices: np.ndarray,
                      class_names: pa.Array, ctx: RunContext) -> pa.RecordBatch:
    """One batch's rows, built in Arrow's C++ (takes and repeats, no Python object per value): this runs on the
    model's thread, beside the decode thread that needs the GIL."""
    n, k = indices.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))

    def same(value, type_: pa.DataType) -> pa.Array:
        return pa.repeat(pa.scalar(value, type_), n)

    return pa.RecordBatch.from_arrays(
        [
            uris,
            class_names.take(pa.array(indices[:, 0])),
            pa.array(scores[:, 0].astype(np.float32)),
            pa.ListArray.from_arrays(offsets, class_names.take(pa.array(indices.reshape(-1)))),
            pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1).astype(np.float32))),
            true_labels,
            same(ctx.model_name, pa.string()),
            same(ctx.model_version, pa.string()),
            same(ctx.model_sha256, pa.string()),
            same(ctx.run_id, pa.string()),
            same(_now(), pa.timestamp("us", tz="UTC")),
        ],
        schema=PREDICTION_SCHEMA,
    )


def _error_table(rows: list[tuple[str, Failure]], ctx: RunContext) -> pa.Table:
    now = _now()
    return pa.table(
        {
            "image_uri": [u for u, _ in rows],
            "kind": [f.kind.value for _, f in rows],
            "reason": [f.message for _, f in rows],
            "model_name": [ctx.model_name] * len(rows),
            "model_version": [ctx.model_version] * len(rows),
            "run_id": [ctx.run_id] * len(rows),
            "processed_at": [now] * len(rows),
        },
        schema=ERROR_SCHEMA,
    )


_BUILDING = threading.Lock()


def shard_classifier(
    model_dir: str, weights_sha256: str, device: str, batch_size: int, num_threads: int | None, hw_decoder_load: float,
    gpu_memory_gb: float | None = None, model_sms: int | None = None,
) -> ShardClassifier:
    """One model load and one DALI pipeline per worker process, reused by all of its shards.

    The digest is part of the key so a changed model on disk is never served from the cache. Two shard tasks
    asking at once get the same one (built once, under a lock).
    """
    with _BUILDING:
        return _cached_shard_classifier(model_dir, weights_sha256, device, batch_size, num_threads, hw_decoder_load,
                                        gpu_memory_gb, model_sms)


@functools.lru_cache(maxsize=2)
def _cached_shard_classifier(model_dir, weights_sha256, device, batch_size, num_threads, hw_decoder_load,
                             gpu_memory_gb, model_sms) -> ShardClassifier:
    return ShardClassifier(model_dir, device, batch_size, num_threads, hw_decoder_load, gpu_memory_gb,
                           model_sms=model_sms)


shard_classifier.cache_clear = _cached_shard_classifier.cache_clear  # type: ignore[attr-defined]


def classify_shard(shard: Shard, out: Output, key: str, worker: ShardClassifier, ctx: RunContext) -> ShardOutcome:
    """Classify one shard (its rows of the output's work file, read alone) and commit it: the errors part first,
    then the predictions part, each atomically.

    The predictions part is the shard's commit: once it exists, the shard is done.
    """
    rows = read_shard_rows(out, shard, columns=["uri", "label", "mtime_ns"])
    uris = rows.column("uri").to_pylist()
    predictions, errors, timing = worker.run(uris, rows.column("label").to_pylist(), ctx)
    errors = mark_missing(errors, {u for u, m in zip(uris, rows.column("mtime_ns").to_pylist()) if m == NOT_FOUND})
    t0 = time.perf_counter()
    if errors.num_rows:
        write_part(errors, out, part_name(key), errors=True)
    write_part(predictions, out, part_name(key))
    return ShardOutcome(
        index=shard.index,
        part=part_name(key),
        predicted=predictions.num_rows,
        errors=errors.num_rows,
        decode_infer_seconds=timing.seconds,
        write_seconds=time.perf_counter() - t0,
        waits=timing.describe(),
        reading=worker.reading_for(uris),
        first_batch_at=timing.first_batch_at,
    )


def prepare_shard_worker(
    model: str, registry: str | None, device: str, batch_size: int | None, num_threads: int | None,
    hw_decoder_load: float | None, gpu_memory_gb: float | None, target: str | None = None, reads_store: bool = False,
) -> ShardClassifier:
    """The shard worker an in-process classify run of these parameters asks for, built before the run: a fresh
    `a2k classify` builds it while Prefect loads and its server starts, and the run's shard tasks find it built
    (`shard_classifier` keys it on the same values the flow passes: the resolved model folder, its digest, the
    resolved device)."""
    from tasks.models.registry import resolve_model

    _, local_dir = resolve_model(model, registry)
    entry = read_entry(local_dir)
    dev = resolve_device(device)
    budget = plan_budget(target, dev, num_threads, hw_decoder_load, gpu_memory_gb, batch_size)
    worker = shard_classifier(str(local_dir), entry.weights_sha256, str(dev), budget.batch_size, budget.num_threads,
                              budget.hw_decoder_load, budget.gpu_memory_gb, budget.model_sms)
    if reads_store:  # the input is in a store: its reader processes start now too, not at the first shard
        t0 = time.perf_counter()
        worker.store_reads()
        worker.build_steps["store readers"] = time.perf_counter() - t0
    return worker
