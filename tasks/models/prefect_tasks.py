"""The Prefect tasks of the models package: register a staged model, import a classifier."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.images.preprocess import Preprocessing
from tasks.models.entry import Status
from tasks.models.importers import import_classifier, read_labels
from tasks.models.registry import register_model
from tasks.models.zoo import weights_categories


@task(name="register-model", cache_policy=NO_CACHE)
def register_model_task(staging_dir: str, name: str, registry: str | None, status: str = "ready",
                        reason: str = "") -> dict[str, Any]:
    """Register a staged model directory; returns its reference, version and where it lives."""
    info = register_model(staging_dir, name, registry, Status(status), reason)
    get_run_logger().info("registered %s (%s) at %s", info.ref, info.status.value, info.url)
    return {"ref": str(info.ref), "name": info.entry.name, "version": info.entry.version, "url": info.url,
            "sha256": info.entry.weights_sha256}

@task(name="import-classifier", cache_policy=NO_CACHE)
def import_classifier_task(source: str, staging_dir: str, name: str, labels: str | None, preprocessing: dict[str, Any],
                           architecture: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """Stage `source` with the class names in the file `labels` (None: the categories of the torchvision `weights`
    named, e.g. ResNet50_Weights.IMAGENET1K_V2); returns the staging directory and digests."""
    class_names = read_labels(labels) if labels is not None else weights_categories(weights)
    entry = import_classifier(source, staging_dir, name=name, class_names=class_names,
                              preprocessing=Preprocessing.from_dict(preprocessing), architecture=architecture,
                              lineage_extra={"weights": weights} if weights else None)
    get_run_logger().info("staged %s (%s, %d classes) in %s", source, entry.lineage["source_kind"],
                          entry.num_classes, staging_dir)
    return {"staging_dir": str(staging_dir), "architecture": entry.architecture,
            "source_kind": entry.lineage["source_kind"], "weights_sha256": entry.weights_sha256}
