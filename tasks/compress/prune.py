"""Sparsity recipes: structured channel pruning with fine-tuning (torch-pruning), and 2:4 semi-structured sparsity."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn
from torch.nn import functional as F

from tasks.compress.apply import Candidate, CompressContext, recipe_handler
from tasks.compress.measure import count_flops, count_parameters
from tasks.compress.recipes import PruneConfig, Sparse24Config, device_capability
from tasks.models.entry import WeightsFormat, load_model
from tasks.storage import read_parquet


def _classifier_head(module: nn.Module, num_classes: int) -> list[nn.Module]:
    """The layer(s) producing the class logits: their outputs must stay num_classes wide."""
    heads = [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return heads[-1:]


def prune_channels(module: nn.Module, ratio: float, input_shape: tuple[int, ...], num_classes: int,
                   round_to: int = 1) -> dict[str, Any]:
    """Remove `ratio` of the channels of every prunable layer (and what depends on them), lowest L2 norm first,
    keeping a multiple of `round_to` channels in each."""
    import torch_pruning as tp

    module = module.float().cpu().eval()
    example = torch.zeros((1, *input_shape))
    before = {"parameters": count_parameters(module), "flops": count_flops(module, input_shape)}
    pruner = tp.pruner.MetaPruner(module, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=_classifier_head(module, num_classes),
                                  round_to=round_to if round_to > 1 else None)
    pruner.step()
    after = {"parameters": count_parameters(module), "flops": count_flops(module, input_shape)}
    if after["parameters"] >= before["parameters"]:
        raise RuntimeError(f"pruning at ratio {ratio} removed nothing ({before['parameters']} parameters before and after)")
    return {"parameters_before": before["parameters"], "parameters_after": after["parameters"],
            "flops_before": before["flops"], "flops_after": after["flops"],
            "parameter_reduction": 1 - after["parameters"] / before["parameters"],
            "flop_reduction": 1 - after["flops"] / before["flops"]}


def fine_tune(module: nn.Module, teacher: nn.Module | None, ctx: CompressContext, epochs: int, learning_rate: float,
              temperature: float = 4.0, alpha: float = 0.5) -> list[dict]:
    """Train on the parent's recorded train split through the training loader; report val accuracy per epoch.
    With a teacher (the parent), the loss is `alpha` x cross-entropy + (1 - alpha) x T^2 x KL towards the teacher's
    soft predictions at temperature T (distillation)."""
    from tasks.images.decode import ImageDecoder
    from tasks.images.preprocess import Augmentation
    from tasks.train.train import LabelledBatches, accuracy, train_epoch

    pre, device = ctx.entry.preprocessing, ctx.device
    flip = float(ctx.entry.lineage.get("train_config", {}).get("flip_probability", 0.0))  # as the parent was trained
    train_table = read_parquet(ctx.split("train"), columns=["uri", "label"])
    val_table = read_parquet(ctx.split("val"), columns=["uri", "label"])
    class_index = {c: i for i, c in enumerate(ctx.entry.class_names)}
    unknown = set(pc.unique(train_table.column("label")).to_pylist()) - set(class_index)
    if unknown:
        raise ValueError(f"train split labels {sorted(unknown)[:5]} are not classes of {ctx.entry.name}")
    module = module.to(device.torch_device)
    teacher = teacher.to(device.torch_device).eval() if teacher is not None else None
    history = []
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="a2k-tune-read") as readers:
        train_decoder = ImageDecoder(pre, device, min(ctx.batch_size, 64), ctx.num_threads,
                                     augment=Augmentation(flip, seed=0))
        train = LabelledBatches(train_table, class_index, train_decoder, readers)
        val = LabelledBatches(val_table, class_index, ImageDecoder(pre, device, ctx.batch_size, ctx.num_threads), readers)
        steps = max(1, epochs * math.ceil(train_table.num_rows / train.decoder.max_batch_size))
        optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        rng = np.random.default_rng(0)
        def loss_of(logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(logits, target)
            if teacher is None:
                return loss
            with torch.no_grad():  # distillation from the parent
                soft = (teacher(images) / temperature).softmax(1)
            kl = F.kl_div((logits / temperature).log_softmax(1), soft, reduction="batchmean")
            return alpha * loss + (1 - alpha) * temperature**2 * kl

        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            loss = train_epoch(module, train, rng.permutation(len(train.uris)), optimizer, schedule.step, loss_of)
            history.append({"epoch": epoch, "loss": loss, "val_accuracy": accuracy(module, val),
                            "seconds": time.perf_counter() - t0})
    return history


@recipe_handler(PruneConfig)
def prune(candidate: Candidate, cfg: PruneConfig, ctx: CompressContext) -> dict[str, Any]:
    module = candidate.module
    report = prune_channels(module, cfg.ratio, ctx.entry.preprocessing.input_shape, ctx.entry.num_classes,
                            cfg.round_to)
    teacher = load_model(ctx.parent_dir)[1].float() if cfg.distill else None
    report["fine_tune"] = fine_tune(module, teacher, ctx, cfg.epochs, cfg.learning_rate, cfg.temperature) \
        if cfg.epochs else []
    candidate.module = module.cpu().eval()
    candidate.storage = WeightsFormat.EXPORTED_PROGRAM  # a pruned shape: stored as a program
    return report


# --- 2:4 semi-structured sparsity -----------------------------------------------------------------------------------

SPARSE_ROWS, SPARSE_COLS = 32, 64  # the fp16 CUTLASS kernels' shape multiples (torch.sparse.semi_structured)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude values of every 4 consecutive inputs (the 2:4 pattern), zero the rest."""
    groups = weight.detach().reshape(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(weight.shape)


def sparse_layers(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)
            and m.out_features % SPARSE_ROWS == 0 and m.in_features % SPARSE_COLS == 0]


@recipe_handler(Sparse24Config)
def sparsify_2_4(candidate: Candidate, cfg: Sparse24Config, ctx: CompressContext) -> dict[str, Any]:
    """2:4-prune the Linear layers the sparse kernels take, and check each converts and multiplies on this card.

    The weights are stored dense with the 2:4 zeros (safetensors has no sparse layout);
    `to_sparse_semi_structured` at run time is what makes them fast (see bench/compress.py)."""
    cc = device_capability(ctx.device)
    if not ctx.device.is_cuda or cc is None or cc < 8.0:
        raise ValueError(f"sparse-2:4 needs an Ampere or newer CUDA card (compute capability 8.0+); the device is "
                         f"{ctx.device}" + (f" with {cc}" if cc else ""))
    from torch.sparse import to_sparse_semi_structured

    layers = sparse_layers(candidate.module)
    if not layers:
        raise RuntimeError("sparse-2:4 found no Linear layer of a shape the 2:4 kernels take (out % 32, in % 64); "
                           "nothing would be sparse")
    checked = []
    with torch.no_grad():
        for name, layer in layers:
            layer.weight.copy_(prune_2_4(layer.weight))
            dense = layer.weight.detach().to(ctx.device.torch_device, torch.float16)
            x = torch.randn(64, layer.in_features, device=ctx.device.torch_device, dtype=torch.float16)
            diff = (F.linear(x, to_sparse_semi_structured(dense)) - F.linear(x, dense)).abs().max().item()
            checked.append({"layer": name, "shape": list(layer.weight.shape), "sparse_vs_dense_max_diff": diff})
    total = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in candidate.module.modules())
    return {"sparse_layers": checked, "layers": total}
