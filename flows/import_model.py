"""The `import-model` flow: register an existing classifier (state dict, TorchScript or torch.export)."""

from __future__ import annotations

import shutil
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run

from tasks.home import a2k_home
from tasks.models.prefect_tasks import import_classifier_task, register_model_task
from tasks.images.preprocess import Preprocessing


@flow(name="import-model")
def import_model(
    source: str, name: str, labels: str, arch: str | None = None, resize: int = 256, crop: int = 224,
    mean: list[float] = [0.485, 0.456, 0.406], std: list[float] = [0.229, 0.224, 0.225],  # noqa: B006 - pydantic copies
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear", channels: Literal[1, 3] = 3,
    registry: str | None = None,
) -> dict[str, Any]:
    """Check the file against its architecture and labels, then register it as the next version of `name`."""
    pre = Preprocessing(resize=resize, crop=crop, mean=tuple(mean), std=tuple(std), interpolation=interpolation,
                        channels=channels)
    staging = str(a2k_home() / "staging" / f"{name}-{flow_run.id}")
    try:
        import_classifier_task(source, staging, name, labels, pre.to_dict(), arch)
        return register_model_task(staging, name, registry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
