"""The Prefect tasks of the train package: split a dataset, train a classifier."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.devices import resolve_device
from tasks.images.manifest import list_images, with_content_hashes, write_manifest
from tasks.images.preprocess import Preprocessing
from tasks.models import STAGED_VERSION
from tasks.models.entry import save_model_dir
from tasks.train.train import SPLITS, TrainConfig, split_counts, split_manifest, splits_dir, train_classifier


@task(name="split-dataset", cache_policy=NO_CACHE)
def split_dataset_task(dataset: str, model_dir: str, val_fraction: float, test_fraction: float, seed: int) -> dict[str, int]:
    """List the dataset, split it, and store the three manifests with the model; returns the counts."""

    splits = split_manifest(list_images(dataset), val_fraction, test_fraction, seed)
    for name, table in splits.items():
        write_manifest(with_content_hashes(table), splits_dir(model_dir) / f"{name}.parquet")
    counts = split_counts(splits)
    get_run_logger().info("split %s (seed %d): %s", dataset, seed, counts)
    return counts

@task(name="train-classifier", cache_policy=NO_CACHE)
def train_classifier_task(
    model_dir: str, name: str, arch: str, pre: Preprocessing, cfg: TrainConfig, device: str,
    num_threads: int | None, lineage: dict[str, Any],
) -> dict[str, float]:
    """Train on the stored splits and save the (staging) model directory; returns the metrics."""
    logger = get_run_logger()
    splits = {s: pq.read_table(splits_dir(model_dir) / f"{s}.parquet") for s in SPLITS}
    model, class_names, report = train_classifier(
        splits, arch, pre, cfg, resolve_device(device), num_threads,
        on_epoch=lambda row: logger.info("epoch %(epoch)d: loss %(loss).4f, val accuracy %(val_accuracy).4f (%(seconds).1fs)", row),
    )
    if report["skipped_images"]:
        logger.warning("%d images could not be decoded and were left out: %s", len(report["skipped_images"]),
                       report["skipped_images"][:5])
    lineage = {**lineage, "history": report["history"], "skipped_images": report["skipped_images"]}
    entry = save_model_dir(
        model, model_dir, name=name, version=STAGED_VERSION, architecture=arch, class_names=class_names,
        preprocessing=pre, metrics=report["metrics"], lineage=lineage,
    )
    logger.info("trained %s: %s", entry.name, report["metrics"])
    return report["metrics"]
