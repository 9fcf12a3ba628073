"""The `evaluate-model` flow: classify a labelled set (default: the version's recorded test split) and
store top-1/top-5, per-class precision and recall and a confusion matrix with the version."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.home import a2k_home
from flows.artifacts import artifact_key
from flows.classify_images import classify_images
from flows.params import BatchSize, DeviceSpec
from tasks.train.evaluate import draw_confusion_matrix, evaluate_predictions, evaluation_table
from tasks.models.registry import get_model, recorded_test_split, write_version_file


@task(name="score-evaluation", cache_policy=NO_CACHE)
def score_task(predictions: str, ref: str, registry: str | None, run_id: str, context: dict[str, Any]) -> dict[str, Any]:
    """Compute the metrics from the predictions, draw the matrix, store both under the version."""
    info = get_model(ref, registry)
    evaluation = evaluate_predictions(predictions, list(info.entry.class_names))
    folder = f"evaluations/{run_id}"
    with tempfile.TemporaryDirectory() as tmp:
        png = draw_confusion_matrix(evaluation, Path(tmp) / "confusion.png", title=f"{info.ref} on {context['dataset']}")
        png_url = write_version_file(info, f"{folder}/confusion.png", png.read_bytes(), registry)
    doc = {**context, "model": str(info.ref), "run_id": run_id, "at": datetime.now(timezone.utc).isoformat(),
           "evaluation": evaluation.to_dict()}
    json_url = write_version_file(info, f"{folder}/evaluation.json", json.dumps(doc, indent=2).encode(), registry)
    create_table_artifact(evaluation_table(evaluation), key=artifact_key(f"{info.entry.name}-v{info.entry.version}"),
                          description=f"{info.ref}: top-1 {evaluation.top1:.4f}, top-5 {evaluation.top5:.4f}")
    create_markdown_artifact(
        f"# {info.ref} on {context['dataset']}\n\ntop-1 **{evaluation.top1:.4f}**, top-5 **{evaluation.top5:.4f}** "
        f"over {evaluation.images} images ({context['errors']} could not be classified)\n\n"
        f"confusion matrix: `{png_url}`\n\nstored: `{json_url}`\n",
        key=artifact_key(f"{info.entry.name}-v{info.entry.version}-summary"),
    )
    return {"top1": evaluation.top1, "top5": evaluation.top5, "images": evaluation.images, "evaluation": json_url,
            "confusion_matrix": png_url}


@flow(name="evaluate-model")
def evaluate_model(
    model: str, dataset: str | None = None, device: DeviceSpec = "auto", batch_size: BatchSize = 256,
    registry: str | None = None,
) -> dict[str, Any]:
    """Evaluate a registered version (`model`: a models:/ reference, or NAME for NAME@production) on `dataset`
    (a labelled folder or manifest) or, by default, on the test split recorded when it (or, for a compressed
    child, its parent) was trained."""
    info = get_model(model, registry)  # a bare NAME is NAME@production; resolved once: an alias moving mid-run changes nothing here
    concrete = str(info.ref)
    if dataset is None:
        dataset = recorded_test_split(info, registry)
    run_id = str(flow_run.id)
    output = str(a2k_home() / "evaluations" / info.entry.name / f"v{info.entry.version}-{run_id[:8]}")
    summary = classify_images(input=dataset, output=output, model=concrete, device=device, batch_size=batch_size,
                              top_k=5, overwrite=True, registry=registry)
    result = score_task(output, concrete, registry, run_id,
                        {"dataset": dataset, "errors": summary["errors"], "predictions": output})
    get_run_logger().info("%s: top-1 %.4f, top-5 %.4f over %d images; stored at %s", concrete, result["top1"],
                          result["top5"], result["images"], result["evaluation"])
    return {"model": concrete, "dataset": dataset, "errors": summary["errors"], **result}

