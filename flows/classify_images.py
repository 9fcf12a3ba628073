"""The `classify-images` flow: a folder, S3 prefix or manifest of images in, a Parquet dataset of predictions out
(in a folder or under an S3 prefix)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, field_validator

from tasks.devices import resolve_device
from flows.params import (
    BatchSize, DaskAddress, DaskWorkers, DeviceSpec, GpuMemoryGb, HwDecoderLoad, ShardSize, TaskRunnerChoice, Threads,
    TopK,
)
from tasks.classify.commit import commit_run, shard_table, summary_markdown
from tasks.classify.plan import PlannedShard, RunContext, RunPlan, ShardOutcome, plan_run, resumed_outcome
from tasks.classify.prefect_tasks import classify_shard_task
from tasks.images.prefect_tasks import list_images_task
from tasks.models.entry import read_entry
from tasks.models.registry import resolve_model
from tasks.runner import GPU_LIMIT, TaskRunnerKind, ensure_gpu_limit, gpu_slot, make_task_runner
from tasks.classify.sink import part_name
from tasks.storage import filesystem, full_url, is_url, redact

MANIFEST_FILE = "_a2k/manifest.parquet"  # under "_", so dataset readers and "*.parquet" globs skip it
WORK_FILE = "_a2k/work.parquet"  # the images this run classifies (new, changed, retried): its shards slice it
PROBE_PREFIX = "_a2k/.write-probe-"


class ClassifyImagesConfig(BaseModel):
    """The checked parameters of one run; built at the flow's start, before any work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    output: str
    model: str
    batch_size: BatchSize | None
    shard_size: ShardSize
    top_k: TopK
    device: DeviceSpec
    num_threads: Threads | None
    hw_decoder_load: HwDecoderLoad
    gpu_memory_gb: GpuMemoryGb | None
    overwrite: bool
    registry: str | None
    full: bool
    task_runner: TaskRunnerKind
    dask_address: DaskAddress | None
    dask_workers: DaskWorkers | None

    @field_validator("input")
    @classmethod
    def _input_exists(cls, v: str) -> str:
        if is_url(v):
            return _check_store_input(v)
        if not Path(v).expanduser().exists():
            raise ValueError(f"input {v!r} does not exist; give a folder of images or a .parquet manifest")
        return str(Path(v).expanduser().resolve())

    @field_validator("output")
    @classmethod
    def _output_writable(cls, v: str) -> str:
        if is_url(v):
            return _check_store_output(v)
        path = Path(v).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"output {v!r} exists and is not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".a2k-write-probe"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise ValueError(f"output {v!r} is not writable: {e.strerror or e}") from None
        return str(path)


def _check_store_input(v: str) -> str:
    """An input in object storage: a .parquet manifest object, or a prefix holding at least one object."""
    fs, path = filesystem(v)
    fs.invalidate_cache(path)
    try:
        if v.lower().endswith(".parquet"):
            if not fs.isfile(path):
                raise ValueError(f"input manifest {v!r} does not exist")
        elif not fs.isdir(path):  # on S3 a prefix exists while an object is under it
            what = "is an object but not a .parquet manifest" if fs.isfile(path) else "does not exist or holds nothing"
            raise ValueError(f"input {v!r} {what}; give a prefix of images (s3://bucket/prefix) or a .parquet manifest")
    except OSError as e:  # e.g. access denied
        raise ValueError(f"input {v!r} cannot be read: {redact(str(e))}") from None
    return full_url(fs, path)


def _check_store_output(v: str) -> str:
    """An output in object storage: its bucket must exist (it is never created) and take a write under `_a2k/`."""
    fs, path = filesystem(v)
    bucket = path.split("/", 1)[0]
    try:
        if not fs.exists(bucket):
            raise ValueError(f"output {v!r}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                             "create it or give an existing bucket")
        probe = f"{path}/{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except OSError as e:
        raise ValueError(f"output {v!r} is not writable: {redact(str(e))}") from None
    return full_url(fs, path)


@flow(name="classify-images")
def classify_images(
    input: str,
    output: str,
    model: str,
    batch_size: BatchSize | None = None,
    shard_size: ShardSize = 4096,
    top_k: TopK = 5,
    device: DeviceSpec = "auto",
    num_threads: Threads | None = None,
    hw_decoder_load: HwDecoderLoad = 0.65,
    gpu_memory_gb: GpuMemoryGb | None = None,
    overwrite: bool = False,
    registry: str | None = None,
    full: bool = False,
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
    cfg = ClassifyImagesConfig(
        input=input, output=output, model=model, batch_size=batch_size, shard_size=shard_size, top_k=top_k,
        device=device, num_threads=num_threads, hw_decoder_load=hw_decoder_load, gpu_memory_gb=gpu_memory_gb,
        overwrite=overwrite, registry=registry, full=full, task_runner=task_runner, dask_address=dask_address,
        dask_workers=dask_workers,
    )
    _, local_dir = resolve_model(cfg.model, cfg.registry)
    model_dir = str(local_dir)
    entry = read_entry(model_dir)
    dev = resolve_device(cfg.device)
    if cfg.gpu_memory_gb and not dev.is_cuda:
        raise ValueError(f"gpu_memory_gb {cfg.gpu_memory_gb} needs a CUDA device; device {cfg.device!r} is {dev}")
    runner = make_task_runner(cfg.task_runner, cfg.dask_address, dev, cfg.dask_workers)  # refused before any work
    if dev.is_cuda and ensure_gpu_limit():
        log.info("created the global concurrency limit %r with one slot per card of this machine", GPU_LIMIT)
    ctx = RunContext(entry.name, entry.version, entry.weights_sha256, str(flow_run.id), cfg.top_k)
    log.info("model %s resolved to %s v%s (sha256 %s…) on %s", cfg.model, entry.name, entry.version,
             entry.weights_sha256[:12], dev)

    t0 = time.perf_counter()
    manifest_path = f"{cfg.output}/{MANIFEST_FILE}"
    listed = list_images_task(cfg.input, manifest_path)
    plan = plan_run(manifest_path, f"{cfg.output}/{WORK_FILE}", cfg.shard_size, entry, cfg.top_k, cfg.input,
                    cfg.output, cfg.overwrite, cfg.full)
    d = plan.delta
    log.info("%d images listed: %d new, %d changed, %d unchanged (skipped), %d retried, %d removed from the source "
             "(their rows dropped)%s", listed, d.new, d.changed, d.unchanged, d.retried, d.removed,
             " — full run: the dataset starts over" if cfg.full else "")
    list_seconds = time.perf_counter() - t0

    # on Dask each worker is pinned to its own card (dask-cuda) or is another machine: it uses its first card
    task_device = str(dev) if cfg.task_runner is TaskRunnerKind.LOCAL or not dev.is_cuda else "cuda"

    def parameters(p: PlannedShard) -> dict[str, Any]:
        return {"manifest_path": plan.work_path, "shard": p.shard, "output": cfg.output, "key": p.key,
                "model_dir": model_dir, "weights_sha256": entry.weights_sha256, "device": task_device,
                "batch_size": cfg.batch_size, "num_threads": cfg.num_threads, "hw_decoder_load": cfg.hw_decoder_load,
                "ctx": ctx, "gpu_memory_gb": cfg.gpu_memory_gb, "take_gpu_slot": not local}

    # in this process the run holds the card once, for all its shards (a slot per shard cost ~2 s of Prefect's
    # acquire back-off between shards on the H100); Dask workers each take their card's slot per shard
    local = cfg.task_runner is TaskRunnerKind.LOCAL
    with gpu_slot(dev) if local else contextlib.nullcontext([]) as slots:
        if slots:
            log.info("holding concurrency slots %s for the run", ", ".join(slots))
        outcomes = _classify_shards(plan, runner, parameters, cfg.output)
    summary = commit_run(
        cfg.output, manifest_path, plan, outcomes, ctx, list_seconds,
        extra={"input": cfg.input, "output": cfg.output, "device": str(dev), "model_dir": model_dir,
               "task_runner": cfg.task_runner.value},
    )
    create_markdown_artifact(summary_markdown(summary), key="classify-images-summary", description="a2k run summary")
    create_table_artifact(shard_table(plan, outcomes), key="classify-images-shards",
                          description=f"shards of this run: {summary['processed_this_run']} images classified, "
                                      f"{d.unchanged} unchanged images skipped")
    log.info(
        "%d images: %d predicted, %d errors, %s images/s; predictions in %s",
        listed, summary["predicted"], summary["errors"], summary["images_per_second"], cfg.output,
    )
    return summary


def _classify_shards(
    plan: RunPlan, runner: Any, parameters: Callable[[PlannedShard], dict[str, Any]], output: str
) -> list[ShardOutcome]:
    """Run the plan's shards on `runner` (those committed by a killed attempt are read back, not redone), updating
    a progress artifact as each one finishes. Every shard runs even when one fails; then the first failure is
    raised, so a rerun has only the failed shards left."""
    log = get_run_logger()
    outcomes = [resumed_outcome(output, p.shard.index, part_name(p.key)) for p in plan.shards if p.committed]
    todo = [p for p in plan.shards if not p.committed]
    total = len(plan.shards)

    def percent() -> float:
        return 100.0 * len(outcomes) / total if total else 100.0

    progress = create_progress_artifact(percent(), key="classify-images-progress",
                                        description=f"shards committed, of {total} in this run")
    if not todo:
        return outcomes
    failures: list[BaseException] = []
    with runner:
        futures = [runner.submit(classify_shard_task, parameters=parameters(p)) for p in todo]
        for future in as_completed(futures):
            try:
                outcomes.append(future.result())
            except Exception as e:  # kept, and raised once every other shard has had its chance
                failures.append(e)
                log.error("a shard failed: %r; the others go on, and a rerun redoes only what is missing", e)
            update_progress_artifact(progress, percent())
    if failures:
        raise failures[0]
    return outcomes
