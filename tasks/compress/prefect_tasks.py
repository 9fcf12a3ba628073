"""The Prefect tasks of the compress package: apply a recipe chain, measure a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.compress.apply import CompressContext, compress
from tasks.compress.measure import measure_speeds, model_facts
from tasks.compress.recipes import recipe_from_dict
from tasks.devices import resolve_device
from tasks.models.entry import read_entry


@task(name="compress", cache_policy=NO_CACHE)
def compress_task(parent_dir: str, recipes: list[dict[str, Any]], staging: str, device: str, batch_size: int,
                  splits: dict[str, str], num_threads: int | None, lineage: dict[str, Any]) -> dict[str, Any]:
    """Apply the recipe chain to the parent and stage the child; returns what each step reported."""
    log = get_run_logger()
    ctx = CompressContext(Path(parent_dir), read_entry(parent_dir), resolve_device(device), batch_size, splits,
                          num_threads)
    child, steps = compress(Path(parent_dir), [recipe_from_dict(r) for r in recipes], Path(staging), ctx, lineage)
    for step in steps:
        log.info("%s: %s", step["recipe"], {k: v for k, v in step.items() if k not in ("recipe", "fine_tune")})
    return {"steps": steps, "weights_format": child.weights_format.value, "weights_bytes": child.weights_bytes}

@task(name="measure-models", cache_policy=NO_CACHE)
def measure_pair_task(parent_dir: str, child_dir: str, device: str, batch_size: int,
                      model_sms: int | None = None) -> dict[str, dict[str, Any]]:
    """Parent and child the same way: size, parameters, FLOPs, the memory estimate, and images/s through the
    executor taking turns (on `model_sms` SMs of the card when given), with peak GPU memory."""
    dev = resolve_device(device)
    speeds = measure_speeds({"parent": parent_dir, "child": child_dir}, dev, batch_size, model_sms)
    return {name: {**model_facts(path, batch_size, True), **speeds[name]}
            for name, path in (("parent", parent_dir), ("child", child_dir))}
