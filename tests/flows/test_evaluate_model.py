import json

import pandas as pd
import pytest
from prefect.artifacts import Artifact

from flows.evaluate_model import evaluate_model
from flows.train_model import train_model
from tasks.models.registry import get_model, list_evaluations
from tasks.storage import filesystem


def test_evaluation_on_the_recorded_test_split_is_stored_with_the_version(digits_dir, registry_root):
    trained = train_model(dataset=str(digits_dir), name="ev", epochs=2, flip_probability=0.0, device="cpu",
                          registry=registry_root)
    result = evaluate_model(model=trained["ref"], device="cpu", registry=registry_root)
    assert result["model"] == "models:/ev/1" and result["dataset"].endswith("/ev/1/splits/test.parquet")
    assert result["images"] == trained["split_counts"]["test"] and result["errors"] == 0

    df = pd.read_parquet(json.loads(_read(result["evaluation"]))["predictions"])
    assert result["top1"] == pytest.approx((df["label"] == df["true_label"]).mean())
    top5 = sum(t in list(k)[:5] for t, k in zip(df["true_label"], df["topk_labels"])) / len(df)
    assert result["top5"] == pytest.approx(top5) and result["top5"] >= result["top1"]

    stored = json.loads(_read(result["evaluation"]))["evaluation"]
    assert sum(map(sum, stored["confusion"])) == result["images"]
    assert _read(result["confusion_matrix"])[:8] == b"\x89PNG\r\n\x1a\n"
    listed = list_evaluations(get_model("models:/ev/1", registry_root), registry_root)
    assert [(e["top1"], e["images"]) for e in listed] == [(result["top1"], result["images"])]
    artifact = Artifact.get("evaluate-model-ev-v1")  # keyed by the flow that writes it
    assert artifact is not None and "precision" in str(artifact.data)
    inner = Artifact.get("evaluate-model-classify-images-summary")  # the classify run inside evaluate-model
    assert inner is not None and f"accuracy **{result['top1']:.4f}** over {result['images']} labelled" in inner.data
    assert "![confusion matrix](data:image/png;base64," in inner.data and "| model | models:/ev/1 -> ev v1" in inner.data


def test_a_labelled_folder_can_be_given_instead(digits_dir, tmp_path):
    trained = train_model(dataset=str(digits_dir), name="ev2", epochs=1, device="cpu", registry=str(tmp_path / "r"))
    result = evaluate_model(model="models:/ev2/latest", dataset=str(digits_dir), device="cpu",
                            registry=str(tmp_path / "r"))
    assert result["images"] == 1797 and result["dataset"] == str(digits_dir)
    assert trained["ref"] == result["model"]


def _read(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)
