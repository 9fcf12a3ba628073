"""Train a classifier on an image folder through the same DALI loader the classify path uses."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from tasks.devices import Device
from tasks.images.decode import ImageDecoder, decode_files
from tasks.models.entry import build_model
from tasks.images.preprocess import Augmentation, Preprocessing
from tasks.progress import progress_step

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run; recorded with the model it makes."""

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    flip_probability: float = 0.5

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs {self.epochs!r} and batch_size {self.batch_size!r} must be at least 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate {self.learning_rate!r} must be positive")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"val_fraction {self.val_fraction!r} and test_fraction {self.test_fraction!r} must be in (0, 1) "
                "and leave some images for training"
            )


def split_manifest(manifest: pa.Table, val_fraction: float, test_fraction: float, seed: int) -> dict[str, pa.Table]:
    """A seeded split, stratified by label: each class is shuffled and cut into train / val / test."""
    if manifest.column("label").null_count:
        raise ValueError("training needs a label for every image: lay the dataset out as <root>/<class>/<file>")
    rng = np.random.default_rng(seed)
    labels = np.asarray(manifest.column("label").to_pylist(), dtype=object)
    picks: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in sorted(set(labels)):
        rows = np.flatnonzero(labels == label)
        rng.shuffle(rows)
        n_test = max(1, round(len(rows) * test_fraction))
        n_val = max(1, round(len(rows) * val_fraction))
        if len(rows) < n_test + n_val + 1:
            raise ValueError(f"class {label!r} has {len(rows)} images; it needs at least {n_test + n_val + 1} to split")
        picks["test"] += rows[:n_test].tolist()
        picks["val"] += rows[n_test : n_test + n_val].tolist()
        picks["train"] += rows[n_test + n_val :].tolist()
    return {s: manifest.take(sorted(picks[s])) for s in SPLITS}


class LabelledBatches:
    """Decoded, labelled batches of a manifest; bad files are skipped and counted."""

    def __init__(self, table: pa.Table, class_index: dict[str, int], decoder: ImageDecoder, readers: ThreadPoolExecutor):
        self.uris = table.column("uri").to_pylist()
        self.targets = np.asarray([class_index[v] for v in table.column("label").to_pylist()], dtype=np.int64)
        self.decoder, self.readers = decoder, readers
        self.skipped: set[str] = set()

    def __iter__(self):
        return self.iterate(np.arange(len(self.uris)))

    def iterate(self, order: np.ndarray):
        uris = [self.uris[i] for i in order]
        for ok, images, failures in decode_files(uris, self.decoder, self.readers):
            self.skipped |= {uris[p] for p in failures}
            if images is None:
                continue
            target = torch.from_numpy(self.targets[order[ok]])
            yield images.float(), target.to(images.device)


@torch.inference_mode()
def accuracy(model: nn.Module, batches: LabelledBatches) -> float:
    model.eval()
    correct = total = 0
    for images, target in batches:
        correct += (model(images).argmax(dim=1) == target).sum().item()
        total += len(target)
    return correct / total if total else float("nan")


def train_epoch(
    model: nn.Module,
    batches: LabelledBatches,
    order: np.ndarray,
    optimizer: torch.optim.Optimizer,
    step_schedule: Callable[[], None],
    loss_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """One pass over `batches` in `order`, a step per batch; `loss_of(logits, target, images)`. The mean loss."""
    model.train()
    loss_sum, seen = 0.0, 0
    for images, target in batches.iterate(order):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(images), target, images)
        loss.backward()
        optimizer.step()
        step_schedule()
        loss_sum, seen = loss_sum + loss.item() * len(target), seen + len(target)
    return loss_sum / max(seen, 1)


def train_classifier(
    splits: dict[str, pa.Table],
    arch: str,
    pre: Preprocessing,
    cfg: TrainConfig,
    device: Device,
    num_threads: int | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Train `arch` on splits['train']; report accuracy on 'val' each epoch (to `on_epoch`) and on 'test' at the end."""
    torch.manual_seed(cfg.seed)
    class_names = sorted(pc.unique(splits["train"].column("label")).to_pylist())
    class_index = {c: i for i, c in enumerate(class_names)}
    model = build_model(arch, len(class_names), pre).to(device.torch_device)
    readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="a2k-train-read")
    train_decoder = ImageDecoder(
        pre, device, cfg.batch_size, num_threads, augment=Augmentation(cfg.flip_probability, seed=cfg.seed)
    )
    eval_decoder = ImageDecoder(pre, device, cfg.batch_size, num_threads)
    train = LabelledBatches(splits["train"], class_index, train_decoder, readers)
    val = LabelledBatches(splits["val"], class_index, eval_decoder, readers)
    test = LabelledBatches(splits["test"], class_index, eval_decoder, readers)

    steps = cfg.epochs * math.ceil(splits["train"].num_rows / cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.learning_rate, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(cfg.seed)
    history = []
    n_train = len(train.uris)
    seen = {"epochs": 0, "batches": 0}  # for the terminal's display: training images done, of epochs x the split

    with progress_step(f"train ({cfg.epochs} epochs)", cfg.epochs * n_train) as shown:
        def step_schedule() -> None:
            if schedule.last_epoch + 1 < steps:
                schedule.step()
            seen["batches"] += 1
            shown.reach(seen["epochs"] * n_train + min(seen["batches"] * cfg.batch_size, n_train))

        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            seen.update(epochs=epoch - 1, batches=0)
            loss = train_epoch(model, train, rng.permutation(n_train), optimizer, step_schedule,
                               lambda logits, target, _: loss_fn(logits, target))
            history.append({"epoch": epoch, "loss": loss, "val_accuracy": accuracy(model, val),
                            "seconds": time.perf_counter() - t0})
            if on_epoch:
                on_epoch(history[-1])
    metrics = {
        "train_loss": history[-1]["loss"],
        "val_accuracy": history[-1]["val_accuracy"],
        "test_accuracy": accuracy(model, test),
    }
    skipped = sorted(train.skipped | val.skipped | test.skipped)
    report = {"metrics": metrics, "history": history, "skipped_images": skipped, "config": asdict(cfg)}
    readers.shutdown()
    return model.eval().cpu(), class_names, report


def split_counts(splits: dict[str, pa.Table]) -> dict[str, int]:
    return {s: t.num_rows for s, t in splits.items()}


def splits_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / "splits"
