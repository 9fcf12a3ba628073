"""Apply a recipe chain to a parent model and stage the child: each config's handler (registered beside its code),
the parent's recorded splits, and the child written in the format its chain needs (state dict, int8 state dict or
torch.export program)."""

from __future__ import annotations

import importlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tasks.compress.recipes import RECIPES, RecipeConfig
from tasks.models import STAGED_VERSION
from tasks.devices import Device
from tasks.models.entry import ModelEntry, WeightsFormat, build_model, save_model_dir, write_entry


@dataclass
class Candidate:
    """The model being compressed, as the chain leaves it, and the format its weights will be written in."""

    module: nn.Module
    storage: WeightsFormat = WeightsFormat.STATE_DICT
    program: torch.export.ExportedProgram | None = None  # stored as is when set (export, int8-static)
    files: dict[str, bytes] = field(default_factory=dict)  # extra files for the version, e.g. model.onnx
    architecture: str | None = None  # set when the chain changed the architecture (distill)
    package: bytes | None = None  # an AOTInductor package (compile), stored as the weights
    compiled: dict[str, Any] | None = None  # what the package was compiled for (lineage.compiled)


@dataclass(frozen=True)
class CompressContext:
    """What handlers may need besides the model: the parent, the device, and the parent's recorded splits."""

    parent_dir: Path
    entry: ModelEntry
    device: Device
    batch_size: int
    splits: dict[str, str]  # split name -> manifest URL (train, val, test) of the parent
    num_threads: int | None = None

    def split(self, name: str) -> str:
        if name not in self.splits:
            raise ValueError(f"{self.entry.name} v{self.entry.version} has no recorded {name} split (nor has an "
                             f"ancestor); it has: {', '.join(self.splits) or 'none'}")
        return self.splits[name]


# --- the handlers: one per config type, registered where it is written ----------------------------------------------

Handler = Callable[[Candidate, Any, CompressContext], dict[str, Any]]
_HANDLERS: dict[type[RecipeConfig], Handler] = {}
_HANDLER_MODULES = ("tasks.compress.quant", "tasks.compress.prune", "tasks.compress.export", "tasks.compress.compile",
                    "tasks.compress.distill")


def recipe_handler(config: type[RecipeConfig]) -> Callable[[Handler], Handler]:
    """Register the decorated function as what applies `config`; a second handler for one config is refused."""
    def register(handler: Handler) -> Handler:
        if config in _HANDLERS:
            raise ValueError(f"{config.__name__} already has a handler: {_HANDLERS[config].__qualname__}")
        _HANDLERS[config] = handler
        return handler
    return register


def load_handlers() -> dict[type[RecipeConfig], Handler]:
    """Import the handler modules (which fills the table) and check every recipe has its handler."""
    for module in _HANDLER_MODULES:
        importlib.import_module(module)
    missing = [c.__name__ for c in RECIPES.values() if c not in _HANDLERS]
    if missing:
        raise TypeError(f"no handler registered for {', '.join(missing)} in {', '.join(_HANDLER_MODULES)}")
    return dict(_HANDLERS)


def apply_recipe(candidate: Candidate, cfg: RecipeConfig, ctx: CompressContext) -> dict[str, Any]:
    """Run the handler registered for the config's type; it updates `candidate` and returns its report."""
    handlers = load_handlers()
    if type(cfg) not in handlers:
        raise TypeError(f"no handler for {type(cfg).__name__}; known: {', '.join(c.__name__ for c in handlers)}")
    return {"recipe": cfg.name, **handlers[type(cfg)](candidate, cfg, ctx)}


# --- what handlers share -------------------------------------------------------------------------------------------

def sample_images(manifest_url: str, n: int, ctx: CompressContext) -> torch.Tensor:
    """The first `n` images of a split manifest, through the ingest pipeline (reader threads + DALI), fp32 on CPU."""
    from tasks.images.decode import ImageDecoder, decode_files
    from tasks.storage import read_parquet

    uris = read_parquet(manifest_url, columns=["uri"]).column("uri").to_pylist()[:n]
    decoder = ImageDecoder(ctx.entry.preprocessing, ctx.device, min(ctx.batch_size, max(len(uris), 1)),
                           ctx.num_threads)
    with ThreadPoolExecutor(max_workers=4) as readers:
        out = [images.float().cpu() for _, images, _ in decode_files(uris, decoder, readers) if images is not None]
    if not out:
        raise ValueError(f"none of the first {n} images of {manifest_url} could be decoded")
    return torch.cat(out)


def module_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def same_architecture(module: nn.Module, entry: ModelEntry) -> bool:
    """Whether the module's tensors have the shapes of a fresh `entry.architecture` (i.e. a state dict loads)."""
    ref = build_model(entry.architecture, entry.num_classes, entry.preprocessing).state_dict()
    mine = module.state_dict()
    return mine.keys() == ref.keys() and all(mine[k].shape == ref[k].shape for k in ref)


# --- the child -----------------------------------------------------------------------------------------------------

def save_candidate(candidate: Candidate, directory: Path, entry: ModelEntry, lineage: dict[str, Any],
                   metrics: dict[str, float] | None = None) -> ModelEntry:
    """Write the child's weights (in the format its chain needs) and model.json into `directory`."""
    from tasks.compress.export import export_program
    from tasks.compress.quant import save_int8_weights

    if candidate.storage is WeightsFormat.TORCHSCRIPT:
        raise ValueError("compression writes a state dict, int8 weights or a torch.export program, not TorchScript")
    directory.mkdir(parents=True, exist_ok=True)
    architecture = candidate.architecture or entry.architecture
    fields = dict(name=entry.name, version=STAGED_VERSION, architecture=architecture, class_names=list(entry.class_names),
                  preprocessing=entry.preprocessing, metrics=metrics, lineage=lineage)
    for name, data in candidate.files.items():
        (directory / name).write_bytes(data)
    if candidate.storage is WeightsFormat.AOTI_PACKAGE:
        from tasks.models.compiled import PACKAGE_FILE

        (directory / PACKAGE_FILE).write_bytes(candidate.package)
        fields["lineage"] = {**lineage, "compiled": candidate.compiled}
        return write_entry(directory, weights_file=PACKAGE_FILE, weights_format=WeightsFormat.AOTI_PACKAGE, **fields)
    module = candidate.module.cpu()
    if (candidate.storage is WeightsFormat.EXPORTED_PROGRAM or candidate.program is not None
            or not same_architecture(module, replace(entry, architecture=architecture))):
        program = candidate.program or export_program(module, entry.preprocessing)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        (directory / "model.pt2").write_bytes(buffer.getvalue())
        return write_entry(directory, weights_file="model.pt2", weights_format=WeightsFormat.EXPORTED_PROGRAM, **fields)
    if candidate.storage is WeightsFormat.INT8_WEIGHTS:
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
