"""The Prefect task of the classify package: one shard, classified and committed."""

from __future__ import annotations

import contextlib
import dataclasses

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.classify.output import Output, part_name
from tasks.classify.plan import RunContext, ShardOutcome, resumed_outcome
from tasks.classify.shard import classify_shard, shard_classifier
from tasks.classify.sink import remove_shard_parts
from tasks.devices import resolve_device
from tasks.images.manifest import Shard
from tasks.runner import gpu_slot, retry_on_transient


@task(
    name="classify-shard",
    cache_policy=NO_CACHE,  # the committed part is the cache: the flow skips a shard whose part is in place
    retries=3,
    retry_delay_seconds=[2, 4, 8],  # exponential back-off, with jitter below
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,  # storage and network hiccups only; bad data is an errors row already
)
def classify_shard_task(
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
    take_gpu_slot: bool = True,
    model_sms: int | None = None,
) -> ShardOutcome:
    """Classify and commit one shard of the run planned in `output` (its URL: the task resolves its filesystem
    where it runs). On CUDA it holds a slot of `gpu` and of its card while it runs, unless the caller holds them
    for it (`take_gpu_slot=False`: the flow, for a whole in-process run)."""
    dev = resolve_device(device)
    out = Output(output)
    done = _committed_by_an_earlier_attempt(out, shard, key)
    if done is not None:
        return done
    # shard tasks of this run on one worker (a Dask worker runs two at a time) share the card's slot
    with gpu_slot(dev, share_key=ctx.run_id) if take_gpu_slot else contextlib.nullcontext([]) as slots:
        worker = shard_classifier(model_dir, weights_sha256, device, batch_size, num_threads, hw_decoder_load,
                                  gpu_memory_gb, model_sms)
        remove_shard_parts(out, part_name(key))  # what an earlier, failed attempt left
        outcome = classify_shard(shard, out, key, worker, ctx)
    n = outcome.predicted + outcome.errors
    get_run_logger().info(
        "shard %d: %d images, %d predicted, %d errors, %.0f images/s (decode+infer %.2fs: %s; write %.2fs) on %s, "
        "images read by %s%s",
        shard.index, n, outcome.predicted, outcome.errors, n / max(outcome.decode_infer_seconds, 1e-9),
        outcome.decode_infer_seconds, outcome.waits, outcome.write_seconds, worker.device, outcome.reading,
        f" holding concurrency slots {', '.join(slots)}" if slots else "",
    )
    return outcome


def _committed_by_an_earlier_attempt(out: Output, shard: Shard, key: str) -> ShardOutcome | None:
    """The shard's outcome read back from its parts when its predictions part (its commit) is in place, else None.

    The flow removes a planned shard's parts before submitting it, so a commit found here is this run's own: Dask
    runs a finished task again when the worker holding its result dies (the flow still holds its future), and that
    attempt would delete the committed part and write it anew, racing the run's commit."""
    name = part_name(key)
    out.fs.invalidate_cache(out.part(name))
    if not out.fs.exists(out.part(name)):
        return None
    outcome = dataclasses.replace(resumed_outcome(out, shard.index, name), resumed=False)  # classified in this run
    get_run_logger().info("shard %d: committed already by an earlier attempt of this run (%d predicted, %d errors); "
                          "read back, not redone", shard.index, outcome.predicted, outcome.errors)
    return outcome


@task(name="report-predictions", cache_policy=NO_CACHE)
def report_task(output: str, parts: list[str], class_names: list[str], title: str) -> str:
    """The summary's report of the committed dataset (label counts, score histogram, accuracy and confusion matrix
    when there are true labels), as Markdown."""
    from tasks.classify.report import prediction_report, read_predictions, report_markdown

    out = Output(output)
    return report_markdown(prediction_report(read_predictions(out, parts), class_names, title))
