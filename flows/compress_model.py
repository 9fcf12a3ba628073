"""The `compress-model` flow: apply a recipe chain to a registered model, measure parent and child the same way
on the parent's test split, and register the child as `candidate` or as rejected, saying why."""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.devices import resolve_device
from tasks.home import a2k_home
from flows.artifacts import artifact_key
from flows.classify_images import classify_images
from flows.params import BatchSize, DeviceSpec, Threads, one_line
from tasks.compress.recipes import check_supported, check_target, device_capability, parse_chain
from tasks.compress.apply import recorded_splits
from tasks.compress.measure import check_fits, comparison_rows, decide, format_table
from tasks.compress.prefect_tasks import compress_task, measure_pair_task
from tasks.train.evaluate import evaluate_predictions
from tasks.models.entry import Status, read_entry, save_entry
from tasks.models.prefect_tasks import register_model_task
from tasks.models.registry import check_alias, fetch_model, get_model, set_alias
from tasks.targets import get_target, plan_budget


class CompressModelConfig(BaseModel):
    """The checked parameters of one compression run: a bad recipe or target stops it before any work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    recipes: list[str] = Field(min_length=1)
    target: str | None
    max_accuracy_drop: float = Field(ge=0, le=100)
    min_speedup: float = Field(ge=0, le=1000)
    device: DeviceSpec
    batch_size: BatchSize
    num_threads: Threads | None
    alias: str
    registry: str | None

    @field_validator("recipes")
    @classmethod
    def _chain_valid(cls, v: list[str]) -> list[str]:
        parse_chain(v)
        return v

    @field_validator("target")
    @classmethod
    def _target_known(cls, v: str | None) -> str | None:
        return v if v is None else get_target(v).name

    @field_validator("alias")
    @classmethod
    def _alias_valid(cls, v: str) -> str:
        return check_alias(v)


@task(name="score-predictions", cache_policy=NO_CACHE)
def score_task(predictions: str, class_names: list[str]) -> dict[str, Any]:
    evaluation = evaluate_predictions(predictions, class_names)
    return {"top1": evaluation.top1, "top5": evaluation.top5, "images": evaluation.images}


def _evaluate(model: str, test_split: str, output: str, device: str, batch_size: int, registry: str | None,
              class_names: list[str]) -> dict[str, Any]:
    summary = classify_images(input=test_split, output=output, model=model, device=device, batch_size=batch_size,
                              top_k=5, overwrite=True, registry=registry)
    return {**score_task(output, class_names), "pipeline_images_per_second": summary["images_per_second"],
            "errors": summary["errors"]}


@flow(name="compress-model")
def compress_model(
    model: str,
    recipes: list[str],
    target: str | None = None,
    max_accuracy_drop: float = 1.0,
    min_speedup: float = 1.2,
    device: DeviceSpec = "auto",
    batch_size: BatchSize = 256,
    num_threads: Threads | None = None,
    alias: str = "candidate",
    registry: str | None = None,
) -> dict[str, Any]:
    """Compress `model` (a models:/ reference or NAME for NAME@production) with `recipes` in order (e.g.
    ["prune:0.5", "compile"]), evaluate parent and child on the parent's recorded test split through the classify
    path, time both through the executor (on `target`'s budget of SMs when the device is a bigger CUDA card), and
    register the child as the next version: `alias` moves to it when top-1 drops at most `max_accuracy_drop`
    points, it fits `target`'s memory and it is at least `min_speedup` times as fast as the parent (0: speed not
    required); else it is registered as rejected with the reason and its measured numbers."""
    log = get_run_logger()
    try:  # a bad value fails the run in one line naming it, the line the CLI prints
        cfg = CompressModelConfig(model=model, recipes=recipes, target=target, max_accuracy_drop=max_accuracy_drop,
                                  min_speedup=min_speedup, device=device, batch_size=batch_size,
                                  num_threads=num_threads, alias=alias, registry=registry)
    except ValidationError as e:
        raise one_line(e) from None
    chain = parse_chain(cfg.recipes)
    dev = resolve_device(cfg.device)
    check_supported(chain, dev.kind, device_capability(dev), f"device {dev}")
    profile = get_target(cfg.target) if cfg.target else None
    if profile:
        check_target(chain, profile)
    # speed is measured on the target's share of the card when it is a CUDA target and the card is CUDA too
    emulate = profile is not None and profile.device == "cuda" and dev.is_cuda
    budget = plan_budget(profile.name, dev, None, 0.65, None) if emulate else None
    where = f"on {budget.describe()}" if budget else f"on {dev}"
    info = get_model(cfg.model, cfg.registry)  # a bare NAME is NAME@production
    parent_dir = str(fetch_model(info, cfg.registry))
    splits = recorded_splits(info, cfg.registry)
    chain_text = " -> ".join(cfg.recipes)
    run_id = str(flow_run.id)
    work = a2k_home() / "compress" / f"{info.entry.name}-v{info.entry.version}-{run_id[:8]}"
    staging = work / "child"
    log.info("compressing %s with %s on %s%s", info.ref, chain_text, dev, f" for target {profile.name}" if profile else "")
    lineage = {"recipe": f"compress: {chain_text}", "parent": str(info.ref), "chain": [c.to_dict() for c in chain],
               "target": profile.to_dict() if profile else None, "device": str(dev), "run_id": run_id}
    try:
        report = compress_task(parent_dir, [c.to_dict() for c in chain], str(staging), str(dev), cfg.batch_size,
                               splits, cfg.num_threads, lineage)
        names = list(info.entry.class_names)
        measured = measure_pair_task(parent_dir, str(staging), str(dev), cfg.batch_size,
                                     budget.model_sms if budget else None)
        parent = {**_evaluate(str(info.ref), splits["test"], str(work / "parent-predictions"), str(dev),
                              cfg.batch_size, cfg.registry, names), **measured["parent"]}
        child = {**_evaluate(str(staging), splits["test"], str(work / "child-predictions"), str(dev), cfg.batch_size,
                             cfg.registry, names), **measured["child"]}
        fit = check_fits(child["memory_estimate"], child["peak_gpu_memory_bytes"], profile, cfg.batch_size) \
            if profile else ""
        speedup = child["images_per_second"] / parent["images_per_second"]
        decision = decide(parent["top1"], child["top1"], cfg.max_accuracy_drop, fit, speedup, cfg.min_speedup, where)
        rows = comparison_rows(parent, child)
        metrics = {"test_accuracy": child["top1"], "top1": child["top1"], "top5": child["top5"],
                   "parent_top1": parent["top1"], "accuracy_drop_points": decision.accuracy_drop_points,
                   "speedup": speedup, "parent_images_per_second": parent["images_per_second"],
                   **{k: child[k] for k in ("parameters", "flops", "images_per_second", "pipeline_images_per_second")},
                   "peak_gpu_memory_bytes": child["peak_gpu_memory_bytes"] or 0,
                   "memory_estimate_bytes": child["memory_estimate_bytes"]}
        entry = read_entry(staging)
        save_entry(staging, replace(entry, metrics=metrics, lineage={
            **entry.lineage, "comparison": rows, "gate": {
                "max_accuracy_drop": cfg.max_accuracy_drop, "min_speedup": cfg.min_speedup, "speedup": speedup,
                "measured": where, "passed": decision.passed, "reason": decision.reason}}))
        status = Status.READY if decision.passed else Status.REJECTED
        registered = register_model_task(str(staging), info.entry.name, cfg.registry, status.value,
                                         "" if decision.passed else decision.reason)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    version = int(registered["version"])
    if decision.passed:
        set_alias(info.entry.name, cfg.alias, version, cfg.registry)
        log.info("%s passed the gate (%s): %s@%s -> version %d", registered["ref"], decision.reason,
                 info.entry.name, cfg.alias, version)
    else:
        log.warning("%s REJECTED: %s; registered with status rejected, %s@%s not moved", registered["ref"],
                    decision.reason, info.entry.name, cfg.alias)
    create_table_artifact(rows, key=artifact_key(f"{info.entry.name}-v{version}"),
                          description=f"{info.ref} vs {registered['ref']} ({chain_text}): "
                                      f"{'passed' if decision.passed else 'REJECTED'}: {decision.reason}")
    log.info("%s vs %s:\n%s", info.ref, registered["ref"], format_table(rows))
    return {"parent": str(info.ref), "child": registered["ref"], "url": registered["url"], "recipes": cfg.recipes,
            "status": status.value, "passed": decision.passed, "reason": decision.reason,
            "accuracy_drop_points": decision.accuracy_drop_points, "speedup": speedup, "min_speedup": cfg.min_speedup,
            "measured": where,
            "alias": cfg.alias if decision.passed else None,
            "target": cfg.target, "device": str(dev), "steps": report["steps"], "comparison": rows,
            "parent_measures": parent, "child_measures": child}
