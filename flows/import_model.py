"""The `import-model` flow: register an existing classifier (state dict, TorchScript or torch.export)."""

from __future__ import annotations

import shutil
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.params import ArchName
from tasks.home import a2k_home
from tasks.models.prefect_tasks import import_classifier_task, register_model_task
from tasks.models.zoo import resolve_architecture
from tasks.images.preprocess import Preprocessing


@flow(name="import-model")
def import_model(
    source: str, name: str, labels: str | None = None, arch: ArchName | None = None, resize: int | None = None,
    crop: int | None = None, mean: list[float] | None = None, std: list[float] | None = None,
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = None, channels: Literal[1, 3] | None = None,
    registry: str | None = None,
) -> dict[str, Any]:
    """Check the file against its architecture and labels, then register it as the next version of `name`.

    Preprocessing left unset comes from `arch`: the named torchvision weights' metadata (`resnet50:IMAGENET1K_V2`:
    resize 232, crop 224, ...), timm's pretrained config, or the architecture's default; without `arch` (TorchScript,
    torch.export) ImageNet's resize 256, crop 224. `labels` may be left out when `arch` names weights: their
    categories are the class names."""
    spec = resolve_architecture(arch) if arch else None
    base = spec.preprocessing if spec else Preprocessing()
    given = {"resize": resize, "crop": crop, "mean": mean, "std": std, "interpolation": interpolation,
             "channels": channels}
    pre = Preprocessing.from_dict({**base.to_dict(), **{k: v for k, v in given.items() if v is not None}})
    if labels is None and (spec is None or spec.categories is None):
        raise ValueError("labels are needed: a file of class names (one per line, or a JSON list); they may be left "
                         "out only when arch names torchvision weights (e.g. resnet50:IMAGENET1K_V2), whose "
                         f"categories are used; arch is {arch!r}")
    if spec and spec.weights:
        get_run_logger().info("preprocessing from %s: %s", spec.weights, pre.to_dict())
    staging = str(a2k_home() / "staging" / f"{name}-{flow_run.id}")
    try:
        import_classifier_task(source, staging, name, labels, pre.to_dict(), spec.name if spec else None,
                               spec.weights if spec else None)
        return register_model_task(staging, name, registry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
