"""The `train-model` flow: train an architecture on a labelled image folder and save a model version."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.devices import resolve_device
from tasks.home import a2k_home
from flows.params import ArchName, BatchSize, DeviceSpec, Epochs, Fraction, Threads
from tasks.models.entry import check_model_name, default_preprocessing
from tasks.models.zoo import resolve_architecture
from tasks.images.preprocess import Preprocessing
from tasks.models.prefect_tasks import register_model_task
from tasks.train.prefect_tasks import split_dataset_task, train_classifier_task
from tasks.train.train import TrainConfig


class TrainModelConfig(BaseModel):
    """The checked parameters of one training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    arch: str
    name: str
    epochs: Epochs
    batch_size: BatchSize
    learning_rate: float = Field(gt=0, le=10)
    seed: int
    val_fraction: Fraction
    test_fraction: Fraction
    flip_probability: float = Field(ge=0, le=1)
    image_size: int | None = Field(ge=8, le=1024)
    device: DeviceSpec
    num_threads: Threads | None
    registry: str | None

    @field_validator("dataset")
    @classmethod
    def _dataset_is_folder(cls, v: str) -> str:
        path = Path(v).expanduser()
        if not path.is_dir():
            raise ValueError(f"dataset {v!r} is not a folder; lay it out as <root>/<class>/<file>")
        return str(path.resolve())

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, v: str) -> str:
        spec = resolve_architecture(v)  # unknown: refused with the close matches
        if spec.weights:
            raise ValueError(f"{v!r} names pretrained weights ({spec.weights}), which train does not download or "
                             f"load: it builds {spec.name!r} with random initialisation; give {spec.name!r}, or import "
                             "the weights with `a2k models import FILE --arch " + v + "`")
        return spec.name

    @field_validator("name")
    @classmethod
    def _name_valid(cls, v: str) -> str:
        return check_model_name(v)

    def preprocessing(self) -> Preprocessing:
        """The architecture's default preprocessing, scaled to `image_size` when one is given."""
        pre = default_preprocessing(self.arch)
        if self.image_size is None:
            return pre
        resize = round(self.image_size * pre.resize / pre.crop)
        return Preprocessing(**{**pre.to_dict(), "crop": self.image_size, "resize": resize})


@flow(name="train-model")
def train_model(
    dataset: str,
    name: str,
    arch: ArchName = "seed-cnn",
    epochs: Epochs = 10,
    batch_size: BatchSize = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    val_fraction: Fraction = 0.15,
    test_fraction: Fraction = 0.15,
    flip_probability: float = 0.5,
    image_size: int | None = None,
    device: DeviceSpec = "auto",
    num_threads: Threads | None = None,
    registry: str | None = None,
) -> dict[str, Any]:
    """Train `arch` on `dataset` (<root>/<class>/<file>) with a seeded train/val/test split and register it
    as the next version of `name` (registry default: $A2K_HOME/models), with the exact split manifests."""
    cfg = TrainModelConfig(
        dataset=dataset, arch=arch, name=name, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, flip_probability=flip_probability,
        image_size=image_size, device=device, num_threads=num_threads, registry=registry,
    )
    dev = resolve_device(cfg.device)
    pre = cfg.preprocessing()
    train_cfg = TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed,
        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, flip_probability=cfg.flip_probability,
    )
    staging = str(a2k_home() / "staging" / f"{cfg.name}-{flow_run.id}")
    get_run_logger().info("training %s as %s on %s (staging in %s)", cfg.arch, cfg.name, dev, staging)
    try:
        counts = split_dataset_task(cfg.dataset, staging, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        lineage = {
            "recipe": "train",
            "parent": None,
            "dataset": cfg.dataset,
            "split": {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
                      "counts": counts, "manifests": {s: f"splits/{s}.parquet" for s in counts}},
            "train_config": asdict(train_cfg),
            "device": str(dev),
            "run_id": str(flow_run.id),
        }
        metrics = train_classifier_task(staging, cfg.name, cfg.arch, pre, train_cfg, str(dev), cfg.num_threads, lineage)
        registered = register_model_task(staging, cfg.name, cfg.registry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**registered, "metrics": metrics, "split_counts": counts}
