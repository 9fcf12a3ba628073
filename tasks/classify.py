"""Classify a shard of images: read bytes, decode with DALI, run the model in batches, write one Parquet part."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch

from a2k.devices import Device, resolve_device
from tasks.decode import DEFAULT_MAX_PIXELS, Failure, ImageDecoder, load_blobs
from tasks.manifest import Shard
from tasks.models import ModelEntry, load_model
from tasks.sink import ERROR_SCHEMA, ERRORS_DIR, PREDICTION_SCHEMA, part_name, write_part
from tasks.storage import read_parquet

log = logging.getLogger(__name__)


class Classifier:
    """A loaded model on its device: fp16 and channels_last on CUDA, fp32 on the CPU."""

    def __init__(self, model_dir: str, device: Device) -> None:
        self.entry, model = load_model(model_dir)
        self.device = device
        self.dtype = torch.float16 if device.is_cuda else torch.float32
        model = model.to(device.torch_device, dtype=self.dtype)
        if device.is_cuda:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # load_model returns it ready for inference
        self.class_names = np.asarray(self.entry.class_names, dtype=object)
        self.max_forward: int | None = None  # lowered when the GPU runs out of memory, kept for later batches

    def top_k(self, images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Softmax probabilities and class indices of the k best classes, computed on the device.

        On GPU out-of-memory the batch is run in halves (and so on), and the smaller size is kept.
        """
        n = len(images)
        size = min(self.max_forward or n, n)
        while True:
            try:
                parts = [self._top_k(images[i : i + size], k) for i in range(0, n, size)]
                break
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                torch.cuda.empty_cache()
                log.warning("GPU out of memory running %s on %d images at once; continuing with %d",
                            self.entry.name, size, size // 2)
                size = self.max_forward = size // 2
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @torch.inference_mode()
    def _top_k(self, images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = images.to(self.device.torch_device, dtype=self.dtype, non_blocking=True)
        if self.device.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        probs = self.model(x).float().softmax(dim=1)
        scores, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return scores.cpu().numpy(), indices.cpu().numpy()


def limit_gpu_memory(device: Device, budget_gb: float) -> torch.Tensor | None:
    """Leave only `budget_gb` of the card free for this process (model, activations and DALI's pools alike),
    to run as a smaller card would (e.g. 6 for an RTX A2000 6 GB): the rest is taken by one idle block."""
    if not device.is_cuda:
        raise ValueError(f"gpu_memory_gb {budget_gb} needs a CUDA device; the device is {device}")
    free, total = torch.cuda.mem_get_info(device.torch_device)
    budget = int(budget_gb * 2**30)
    if budget > free:
        raise ValueError(f"gpu_memory_gb {budget_gb} is more than the {free / 2**30:.1f} GiB free on {device} "
                         f"({total / 2**30:.1f} GiB in all)")
    ballast = torch.empty(free - budget, dtype=torch.uint8, device=device.torch_device)
    log.info("GPU memory limited to %.1f GiB of %.1f GiB free on %s", budget_gb, free / 2**30, device)
    return ballast


@dataclass(frozen=True)
class RunContext:
    """What every row of a run shares."""

    model_name: str
    model_version: str
    model_sha256: str
    run_id: str
    top_k: int


@dataclass(frozen=True)
class ShardOutcome:
    """What a shard task reports back: small and serializable."""

    index: int
    part: str
    predicted: int
    errors: int
    decode_infer_seconds: float
    write_seconds: float
    resumed: bool = False


def part_key(shard: Shard, entry: ModelEntry, top_k: int) -> str:
    """A part's name is fixed by its images, the model's weights and the settings that change its rows."""
    settings = json.dumps({"pre": entry.preprocessing.to_dict(), "top_k": top_k}, sort_keys=True)
    digest = hashlib.sha256(f"{shard.shard_id}|{entry.weights_sha256}|{settings}".encode()).hexdigest()[:20]
    return f"{shard.index:06d}-{digest}"  # the index keeps parts in listing order for readers


class ShardClassifier:
    """Everything a worker keeps between shards: the model on its device, the DALI decoder, the reader threads."""

    def __init__(
        self, model_dir: str, device: str, batch_size: int, num_threads: int | None, hw_decoder_load: float = 0.65,
        gpu_memory_gb: float | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.ballast = limit_gpu_memory(self.device, gpu_memory_gb) if gpu_memory_gb else None
        self.classifier = Classifier(model_dir, self.device)
        self.batch_size = batch_size
        self.decoder = ImageDecoder(
            self.classifier.entry.preprocessing, self.device, batch_size, num_threads, hw_decoder_load=hw_decoder_load
        )
        self.readers = ThreadPoolExecutor(max_workers=max(4, 2 * self.decoder.num_threads), thread_name_prefix="a2k-read")
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="a2k-prefetch")

    def run(
        self, uris: list[str], true_labels: list[str | None], ctx: RunContext, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[pa.Table, pa.Table, float]:
        """Predictions and errors for `uris` (every uri lands in exactly one), and seconds spent."""
        start = time.perf_counter()
        pred_batches: list[pa.RecordBatch] = []
        err_rows: list[tuple[str, Failure]] = []
        batches = [range(i, min(i + self.batch_size, len(uris))) for i in range(0, len(uris), self.batch_size)]
        pending: Future | None = None
        for n, rows in enumerate(batches):
            blobs = pending.result() if pending else load_blobs([uris[i] for i in rows], self.readers, max_pixels)
            if n + 1 < len(batches):  # read the next batch's files while this one decodes and runs
                nxt = [uris[i] for i in batches[n + 1]]
                pending = self.prefetch.submit(load_blobs, nxt, self.readers, max_pixels)
            good = [(i, b) for i, b in zip(rows, blobs) if not isinstance(b, Failure)]
            err_rows += [(uris[i], b) for i, b in zip(rows, blobs) if isinstance(b, Failure)]
            if not good:
                continue
            decoded = self.decoder.decode([b for _, b in good])
            err_rows += [(uris[good[p][0]], f) for p, f in decoded.failures.items()]
            if not decoded.ok:
                continue
            scores, indices = self.classifier.top_k(decoded.images, ctx.top_k)
            kept = [good[p][0] for p in decoded.ok]
            pred_batches.append(
                _prediction_batch(
                    [uris[i] for i in kept], [true_labels[i] for i in kept], scores, indices, self.classifier.class_names, ctx
                )
            )
        predictions = pa.Table.from_batches(pred_batches, schema=PREDICTION_SCHEMA)
        errors = _error_table(err_rows, ctx)
        if predictions.num_rows + errors.num_rows != len(uris):
            raise RuntimeError(
                f"{len(uris)} images in, {predictions.num_rows} predicted + {errors.num_rows} errors out: rows were lost"
            )
        return predictions, errors, time.perf_counter() - start


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _prediction_batch(uris, true_labels, scores: np.ndarray, indices: np.ndarray, class_names: np.ndarray, ctx: RunContext):
    n, k = indices.shape
    names = class_names[indices]
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.RecordBatch.from_arrays(
        [
            pa.array(uris, pa.string()),
            pa.array(names[:, 0].tolist(), pa.string()),
            pa.array(scores[:, 0].astype(np.float32)),
            pa.ListArray.from_arrays(offsets, pa.array(names.reshape(-1).tolist(), pa.string())),
            pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1).astype(np.float32))),
            pa.array(true_labels, pa.string()),
            pa.array([ctx.model_name] * n, pa.string()),
            pa.array([ctx.model_version] * n, pa.string()),
            pa.array([ctx.model_sha256] * n, pa.string()),
            pa.array([ctx.run_id] * n, pa.string()),
            pa.array([_now()] * n, pa.timestamp("us", tz="UTC")),
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


@functools.lru_cache(maxsize=2)
def shard_classifier(
    model_dir: str, weights_sha256: str, device: str, batch_size: int, num_threads: int | None, hw_decoder_load: float,
    gpu_memory_gb: float | None = None,
) -> ShardClassifier:
    """One model load and one DALI pipeline per worker process, reused by all of its shards.

    The digest is part of the key so a changed model on disk is never served from the cache.
    """
    return ShardClassifier(model_dir, device, batch_size, num_threads, hw_decoder_load, gpu_memory_gb)


def classify_shard(
    manifest_path: str,
    shard: Shard,
    output: str,
    key: str,
    worker: ShardClassifier,
    ctx: RunContext,
) -> ShardOutcome:
    """Classify one shard and commit it: the errors part first, then the predictions part, each atomically.

    The predictions part is the shard's commit: once it exists, the shard is done.
    """
    rows = read_parquet(manifest_path, columns=["uri", "label"]).slice(shard.start, shard.size)
    uris = rows.column("uri").to_pylist()
    predictions, errors, seconds = worker.run(uris, rows.column("label").to_pylist(), ctx)
    t0 = time.perf_counter()
    if errors.num_rows:
        write_part(errors, output, part_name(key), subdir=ERRORS_DIR)
    write_part(predictions, output, part_name(key))
    return ShardOutcome(
        index=shard.index,
        part=part_name(key),
        predicted=predictions.num_rows,
        errors=errors.num_rows,
        decode_infer_seconds=seconds,
        write_seconds=time.perf_counter() - t0,
    )


# --- Prefect tasks -------------------------------------------------------------------------------
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="classify-shard", cache_policy=NO_CACHE)
def classify_shard_task(
    manifest_path: str,
    shard: Shard,
    output: str,
    key: str,
    model_dir: str,
    weights_sha256: str,
    device: str,
    batch_size: int,
    num_threads: int | None,
    hw_decoder_load: float,
    ctx: RunContext,
    gpu_memory_gb: float | None = None,
) -> ShardOutcome:
    from prefect import get_run_logger

    worker = shard_classifier(model_dir, weights_sha256, device, batch_size, num_threads, hw_decoder_load,
                              gpu_memory_gb)
    outcome = classify_shard(manifest_path, shard, output, key, worker, ctx)
    n = outcome.predicted + outcome.errors
    get_run_logger().info(
        "shard %d: %d images, %d predicted, %d errors, %.0f images/s (decode+infer %.2fs, write %.2fs) on %s",
        shard.index, n, outcome.predicted, outcome.errors, n / max(outcome.decode_infer_seconds, 1e-9),
        outcome.decode_infer_seconds, outcome.write_seconds, worker.device,
    )
    return outcome
