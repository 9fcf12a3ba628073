"""Apply a recipe chain to a parent model and stage the child: the parent's recorded splits, the chain, and the
child written in the format its chain needs (state dict, int8 state dict or torch.export program)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from tasks.compress.recipes import (
    Candidate, CompressContext, RecipeConfig, Storage, apply_recipe, same_architecture,
)
from tasks.models.entry import ModelEntry, WeightsFormat, save_model_dir, write_entry


def save_candidate(candidate: Candidate, directory: Path, entry: ModelEntry, lineage: dict[str, Any],
                   metrics: dict[str, float] | None = None) -> ModelEntry:
    """Write the child's weights (in the format its chain needs) and model.json into `directory`."""
    from tasks.compress.export import export_program
    from tasks.compress.quant import save_int8_weights

    directory.mkdir(parents=True, exist_ok=True)
    fields = dict(name=entry.name, version="0", architecture=entry.architecture, class_names=list(entry.class_names),
                  preprocessing=entry.preprocessing, metrics=metrics, lineage=lineage)
    for name, data in candidate.files.items():
        (directory / name).write_bytes(data)
    module = candidate.module.cpu()
    if candidate.storage is Storage.PROGRAM or candidate.program is not None or not same_architecture(module, entry):
        program = candidate.program or export_program(module, entry.preprocessing)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        (directory / "model.pt2").write_bytes(buffer.getvalue())
        return write_entry(directory, weights_file="model.pt2", weights_format=WeightsFormat.EXPORTED_PROGRAM, **fields)
    if candidate.storage is Storage.INT8_WEIGHTS:
        save_int8_weights(module, directory / "weights.safetensors")
        return write_entry(directory, weights_format=WeightsFormat.INT8_WEIGHTS, **fields)
    return save_model_dir(module, directory, **fields)


def recorded_splits(info, registry: str | None = None) -> dict[str, str]:
    """The split manifests (train, val, test) recorded with the version or its nearest ancestor that has them."""
    from tasks.models.registry import nearest_split_urls

    urls = nearest_split_urls(info, registry)
    if urls is None:
        raise ValueError(f"{info.ref} has no recorded train/val/test split (nor has an ancestor): compression "
                         "fine-tunes, calibrates and evaluates on the parent's splits; train the parent with `a2k train`")
    return urls


def compress(parent_dir: Path, chain: list[RecipeConfig], staging: Path, ctx: CompressContext,
             lineage: dict[str, Any]) -> tuple[ModelEntry, list[dict[str, Any]]]:
    """Load the parent, apply the chain in order, save the child (status decided later) into `staging`."""
    from tasks.models.entry import load_model

    entry, module = load_model(parent_dir)
    if entry.weights_format is not WeightsFormat.STATE_DICT:
        raise ValueError(f"{entry.name} v{entry.version} is stored as {entry.weights_format.value}; compression "
                         "starts from a state dict (safetensors) model")
    candidate = Candidate(module.float().eval())
    steps = [apply_recipe(candidate, cfg, ctx) for cfg in chain]
    child = save_candidate(candidate, staging, entry, {**lineage, "steps": steps})
    return child, steps
