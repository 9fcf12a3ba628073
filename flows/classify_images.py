"""The `classify-images` flow: a folder, S3 prefix or manifest of images in, a Parquet dataset of predictions out
(in a folder or under an S3 prefix)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.artifacts import artifact_key
from flows.params import (
    AutoBatchSize, DaskAddress, DaskWorkers, DeviceSpec, FullRun, GpuMemoryGb, HwDecoderLoad, InputSource, ModelSpec,
    OutputTarget, Overwrite, RegistryUrl, ShardSize, TargetName, TaskRunnerChoice, Threads, TopK, check_input_source,
    check_output_target,
)
from tasks.classify.commit import commit_run, shard_table, summary_markdown
from tasks.classify.lease import acquire_lease
from tasks.classify.output import Output, part_name
from tasks.classify.plan import PlannedShard, RunContext, RunPlan, ShardOutcome, plan_run, resumed_outcome
from tasks.classify.prefect_tasks import classify_shard_task, report_task
from tasks.devices import resolve_device
from tasks.images.manifest import nothing_listed
from tasks.images.prefect_tasks import list_images_task
from tasks.models.compiled import check_runs_here
from tasks.models import model_label
from tasks.models.entry import WeightsFormat, read_entry, verify_weights
from tasks.models.registry import resolve_model
from tasks.progress import progress_step
from tasks.runner import GPU_LIMIT, TaskRunnerKind, ensure_gpu_limit, gpu_slot, make_task_runner
from tasks.storage import NoSpaceLeft
from tasks.targets import plan_budget


@flow(name="classify-images")
def classify_images(
    input: InputSource,
    output: OutputTarget,
    model: ModelSpec,
    batch_size: AutoBatchSize | None = None,
    shard_size: ShardSize = 4096,
    top_k: TopK = 5,
    device: DeviceSpec = "auto",
    num_threads: Threads | None = None,
    hw_decoder_load: HwDecoderLoad | None = None,
    gpu_memory_gb: GpuMemoryGb | None = None,
    target: TargetName | None = None,
    overwrite: Overwrite = False,
    registry: RegistryUrl | None = None,
    full: FullRun = False,
    task_runner: TaskRunnerChoice = TaskRunnerKind.LOCAL,
    dask_address: DaskAddress | None = None,
    dask_workers: DaskWorkers | None = None,
) -> dict[str, Any]:
    """Classify every image under `input` with `model` and write Parquet parts to `output`.

    `model` is a registry reference (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME/latest`),
    a bare NAME meaning `models:/NAME@production`, or a model directory. It is resolved once, here, and
    every row records the concrete name, version and weights digest.

    Runs are incremental: only images new or changed since the last committed run of the same input, weights and
    settings are classified (`full=True` starts over); rows of images gone from the source are dropped. Shards
    committed by a killed run are kept, not redone. `task_runner="dask"` runs the shards on a temporary local Dask
    cluster (one worker per GPU with dask-cuda) or on the scheduler at `dask_address`. `batch_size=None` takes the
    largest batch (at most 256) that fits the GPU memory free to the run, or 64 on the CPU.
    """
    log = get_run_logger()
    # the signature's types are checked by Prefect (and by the CLI, before any Prefect work); what needs the
    # filesystem is checked here, before any work
    given = {"input_given": input, "model_given": model}  # as the caller wrote them, for the summary
    input, output = check_input_source(input), check_output_target(output)
    task_runner = TaskRunnerKind(task_runner)
    _, local_dir = resolve_model(model, registry)
    model_dir = str(local_dir)
    entry = read_entry(model_dir)
    verify_weights(model_dir, entry)  # altered or truncated weights: refused before anything is written
    dev = resolve_device(device)
    if gpu_memory_gb and not dev.is_cuda:
        raise ValueError(f"gpu_memory_gb {gpu_memory_gb} needs a CUDA device; device {device!r} is {dev}")
    budget = plan_budget(target, dev, num_threads, hw_decoder_load, gpu_memory_gb, batch_size)
    log.info("decoder: %s", budget.decoder)
    if target:
        log.info("running within the budget of %s", budget.describe())
    if entry.weights_format is WeightsFormat.AOTI_PACKAGE:
        check_runs_here(entry, dev)  # a package compiled for another card or torch: refused before any work
    runner = make_task_runner(task_runner, dask_address, dev, dask_workers)  # refused before any work
    if dev.is_cuda and ensure_gpu_limit():
        log.info("created the global concurrency limit %r with one slot per card of this machine", GPU_LIMIT)
    ctx = RunContext(entry.name, entry.version, entry.weights_sha256, str(flow_run.id), top_k)
    log.info("model %s resolved to %s (sha256 %s…) on %s", model, model_label(entry.name, entry.version),
             entry.weights_sha256[:12], dev)

    out = Output(output)
    # one writer at a time: taken before the listing writes anything into the output, released however it ends
    lease, stale = acquire_lease(out, ctx.run_id, input)
    if stale is not None:
        log.warning("took over the stale lease of %s (it expired %s or its process is gone)", stale.describe(),
                    stale.expires)
    try:
        t0 = time.perf_counter()
        listed = list_images_task(input, out.url_of(out.manifest))
        plan = plan_run(out, shard_size, entry, top_k, input, overwrite, full)
        d = plan.delta
        log.info("%d images listed: %d new, %d changed, %d unchanged (skipped), %d retried, %d removed from the "
                 "source (their rows dropped)%s", listed, d.new, d.changed, d.unchanged, d.retried, d.removed,
                 " — full run: the dataset starts over" if full else "")
        list_seconds = time.perf_counter() - t0
        if not listed:
            log.warning(nothing_listed(input))

        # on Dask each worker is pinned to its own card (dask-cuda) or is another machine: it uses its first card
        task_device = str(dev) if task_runner is TaskRunnerKind.LOCAL or not dev.is_cuda else "cuda"

        def parameters(p: PlannedShard) -> dict[str, Any]:
            return {"shard": p.shard, "output": out.url, "key": p.key,
                    "model_dir": model_dir, "weights_sha256": entry.weights_sha256, "device": task_device,
                    "batch_size": budget.batch_size, "num_threads": budget.num_threads,
                    "hw_decoder_load": budget.hw_decoder_load,
                    "ctx": ctx, "gpu_memory_gb": budget.gpu_memory_gb, "take_gpu_slot": not local,
                    "model_sms": budget.model_sms}

        # in this process the run holds the card once, for all its shards (a slot per shard waits in Prefect's
        # acquire back-off between shards: bench/RESULTS.md); Dask workers each take their card's slot per shard
        local = task_runner is TaskRunnerKind.LOCAL
        with gpu_slot(dev) if local else contextlib.nullcontext([]) as slots:
            if slots:
                log.info("holding concurrency slots %s for the run", ", ".join(slots))
            outcomes = _classify_shards(plan, runner, parameters, out)
        lease.check()  # a run that stalled past its lease and lost it commits nothing
        summary = commit_run(
            out, plan, outcomes, ctx, list_seconds,
            extra={"input": input, "output": output, "device": str(dev), "model_dir": model_dir,
                   "task_runner": task_runner.value, **given, **({"budget": budget.describe()} if target else {})},
        )
        report = report_task(out.url, summary["parts"], list(entry.class_names),
                             f"{model_label(entry.name, entry.version)} on {given['input_given']}")
        create_markdown_artifact(summary_markdown(summary) + report, key=artifact_key("summary"),
                                 description=f"a2k run summary: {given['input_given']} with {model}")
        create_table_artifact(shard_table(plan, outcomes), key=artifact_key("shards"),
                              description=f"shards of this run: {summary['processed_this_run']} images classified, "
                                          f"{d.unchanged} unchanged images skipped")
        log.info(
            "%d images: %d predicted, %d errors, %s; predictions in %s",
            listed, summary["predicted"], summary["errors"],
            f"{summary['images_per_second']} images/s" if summary["images_per_second"] is not None
            else "none classified in this run", output,
        )
        return summary
    finally:
        lease.release()


def _classify_shards(
    plan: RunPlan, runner: Any, parameters: Callable[[PlannedShard], dict[str, Any]], out: Output
) -> list[ShardOutcome]:
    """Run the plan's shards on `runner` (those committed by a killed attempt are read back, not redone), updating
    a progress artifact as each one finishes. Every shard runs even when one fails; then the first failure is
    raised, so a rerun has only the failed shards left."""
    log = get_run_logger()
    outcomes = [resumed_outcome(out, p.shard.index, part_name(p.key)) for p in plan.shards if p.committed]
    todo = [p for p in plan.shards if not p.committed]
    images = sum(p.shard.size for p in plan.shards)

    def done() -> int:
        return sum(o.predicted + o.errors for o in outcomes)

    def percent() -> float:
        return 100.0 * done() / images if images else 100.0

    progress = create_progress_artifact(percent(), key=artifact_key("progress"),
                                        description=f"images classified, of {images} in {len(plan.shards)} shards")
    if not todo:
        return outcomes
    failures: list[BaseException] = []
    resumed = done()
    # the terminal's display (a2k's CLI) counts each batch as the model takes it, and each shard when it is committed
    with progress_step("classify", images - resumed) as step, runner:
        futures = [runner.submit(classify_shard_task, parameters=parameters(p)) for p in todo]
        for future in as_completed(futures):
            try:
                outcomes.append(future.result())
            except NoSpaceLeft:  # every other shard would fail the same way: the run stops here
                raise
            except Exception as e:  # kept, and raised once every other shard has had its chance
                failures.append(e)
                log.error("a shard failed: %r; the others go on, and a rerun redoes only what is missing", e)
            update_progress_artifact(progress, percent())
            step.reach(done() - resumed)
    if failures:
        raise failures[0]
    return outcomes
