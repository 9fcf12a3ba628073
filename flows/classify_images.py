"""The `classify-images` flow: a folder, S3 prefix or manifest of images in, a Parquet dataset of predictions out
(in a folder or under an S3 prefix)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, field_validator

from a2k.devices import resolve_device
from flows.params import BatchSize, DeviceSpec, GpuMemoryGb, HwDecoderLoad, ShardSize, Threads, TopK
from tasks.classify import RunContext, classify_shard_task
from tasks.commit import commit_run, plan_shards, resumed_outcome, summary_markdown
from tasks.manifest import list_images_task
from tasks.models import read_entry
from tasks.registry import resolve_model
from tasks.sink import part_name
from tasks.storage import filesystem, full_url, is_url, redact

MANIFEST_FILE = "_a2k/manifest.parquet"  # under "_", so dataset readers and "*.parquet" globs skip it
PROBE_PREFIX = "_a2k/.write-probe-"


class ClassifyImagesConfig(BaseModel):
    """The checked parameters of one run; built at the flow's start, before any work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    output: str
    model: str
    batch_size: BatchSize
    shard_size: ShardSize
    top_k: TopK
    device: DeviceSpec
    num_threads: Threads | None
    hw_decoder_load: HwDecoderLoad
    gpu_memory_gb: GpuMemoryGb | None
    overwrite: bool
    registry: str | None

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
    batch_size: BatchSize = 256,
    shard_size: ShardSize = 4096,
    top_k: TopK = 5,
    device: DeviceSpec = "auto",
    num_threads: Threads | None = None,
    hw_decoder_load: HwDecoderLoad = 0.65,
    gpu_memory_gb: GpuMemoryGb | None = None,
    overwrite: bool = False,
    registry: str | None = None,
) -> dict[str, Any]:
    """Classify every image under `input` with `model` and write Parquet parts to `output`.

    `model` is a registry reference (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME/latest`),
    a bare NAME meaning `models:/NAME@production`, or a model directory. It is resolved once, here, and
    every row records the concrete name, version and weights digest. Shards already committed in
    `output` by an earlier run of the same weights and settings are kept, not redone.
    """
    log = get_run_logger()
    cfg = ClassifyImagesConfig(
        input=input, output=output, model=model, batch_size=batch_size, shard_size=shard_size, top_k=top_k,
        device=device, num_threads=num_threads, hw_decoder_load=hw_decoder_load, gpu_memory_gb=gpu_memory_gb,
        overwrite=overwrite,
        registry=registry,
    )
    _, local_dir = resolve_model(cfg.model, cfg.registry)
    model_dir = str(local_dir)
    entry = read_entry(model_dir)
    dev = resolve_device(cfg.device)
    if cfg.gpu_memory_gb and not dev.is_cuda:
        raise ValueError(f"gpu_memory_gb {cfg.gpu_memory_gb} needs a CUDA device; device {cfg.device!r} is {dev}")
    ctx = RunContext(entry.name, entry.version, entry.weights_sha256, str(flow_run.id), cfg.top_k)
    log.info("model %s resolved to %s v%s (sha256 %s…) on %s", cfg.model, entry.name, entry.version,
             entry.weights_sha256[:12], dev)

    t0 = time.perf_counter()
    manifest_path = f"{cfg.output}/{MANIFEST_FILE}"
    listed = list_images_task(cfg.input, manifest_path)
    plan = plan_shards(manifest_path, cfg.shard_size, entry, cfg.top_k, cfg.output, cfg.overwrite)
    if retried := sum(p.retried for p in plan):
        log.info("%d committed shard(s) hold images that could not be read last time: classifying them again", retried)
    list_seconds = time.perf_counter() - t0

    outcomes = [
        resumed_outcome(cfg.output, p.shard.index, part_name(p.key)) if p.committed else classify_shard_task(
            manifest_path, p.shard, cfg.output, p.key, model_dir, entry.weights_sha256, str(dev),
            cfg.batch_size, cfg.num_threads, cfg.hw_decoder_load, ctx, cfg.gpu_memory_gb,
        )
        for p in plan
    ]
    summary = commit_run(
        cfg.output, listed, outcomes, ctx, list_seconds,
        extra={"input": cfg.input, "output": cfg.output, "device": str(dev), "model_dir": model_dir},
    )
    create_markdown_artifact(summary_markdown(summary), key="classify-images-summary", description="a2k run summary")
    log.info(
        "%d images: %d predicted, %d errors, %s images/s; predictions in %s",
        listed, summary["predicted"], summary["errors"], summary["images_per_second"], cfg.output,
    )
    return summary
