"""The Prefect tasks of the compress package: apply a recipe chain, measure a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.compress.apply import CompressContext, compress
from tasks.compress.measure import estimate_memory, measure_model
from tasks.compress.recipes import recipe_from_dict
from tasks.devices import resolve_device
from tasks.models.entry import load_model, read_entry


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

@task(name="measure-model", cache_policy=NO_CACHE)
def measure_task(model_dir: str, device: str, batch_size: int) -> dict[str, Any]:
    """Size, parameters, FLOPs, model images/s, peak GPU memory, and the computed memory estimate."""
    dev = resolve_device(device)
    result = measure_model(model_dir, dev, batch_size)
    entry, module = load_model(model_dir)
    estimate = estimate_memory(module, entry.preprocessing, batch_size, on_cuda=True)
    return {**result, "memory_estimate": estimate, "memory_estimate_bytes": estimate["total"]}
