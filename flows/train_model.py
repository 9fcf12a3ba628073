"""The `train-model` flow: train an architecture on a labelled image folder and save a model version."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tasks.devices import resolve_device
from tasks.home import a2k_home
from flows.params import (
    ArchName, BatchSize, DatasetFolder, DeviceSpec, Epochs, FlipProbability, ImageSize, LearningRate, ModelName,
    RegistryUrl, Seed, TestFraction, Threads, ValFraction, check_architecture, check_dataset_folder, one_line,
)
from tasks.models.entry import check_model_name, default_preprocessing
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
    learning_rate: LearningRate
    seed: int
    val_fraction: ValFraction
    test_fraction: TestFraction
    flip_probability: FlipProbability
    image_size: ImageSize | None
    device: DeviceSpec
    num_threads: Threads | None
    registry: str | None

    @field_validator("dataset")
    @classmethod
    def _dataset_is_folder(cls, v: str) -> str:
        return check_dataset_folder(v)

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, v: str) -> str:
        return check_architecture(v)

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
    dataset: DatasetFolder,
    name: ModelName,
    arch: ArchName = "seed-cnn",
    epochs: Epochs = 10,
    batch_size: BatchSize = 64,
    learning_rate: LearningRate = 2e-3,
    seed: Seed = 0,
    val_fraction: ValFraction = 0.15,
    test_fraction: TestFraction = 0.15,
    flip_probability: FlipProbability = 0.5,
    image_size: ImageSize | None = None,
    device: DeviceSpec = "auto",
    num_threads: Threads | None = None,
    registry: RegistryUrl | None = None,
) -> dict[str, Any]:
    """Train `arch` on `dataset` (<root>/<class>/<file>) with a seeded train/val/test split and register it
    as the next version of `name` (registry default: $A2K_HOME/models), with the exact split manifests."""
    try:  # a bad value fails the run in one line naming it, the line the CLI prints
        cfg = TrainModelConfig(
            dataset=dataset, arch=arch, name=name, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
            seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, flip_probability=flip_probability,
            image_size=image_size, device=device, num_threads=num_threads, registry=registry,
        )
    except ValidationError as e:
        raise one_line(e) from None
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
