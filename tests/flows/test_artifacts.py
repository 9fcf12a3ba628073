"""The artifacts a run leaves, read back from the test server: keyed by the flow (and the flows around it), and a
classify summary that names the input and model as given and shows labels, scores and accuracy."""

import base64
import re

import pandas as pd
from prefect import flow
from prefect.artifacts import Artifact

from flows.artifacts import artifact_key
from flows.classify_images import classify_images


def test_the_classify_summary_shows_labels_scores_and_accuracy(photos_dir, seed_model_dir, tmp_path):
    summary = classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model=str(seed_model_dir),
                              device="cpu")
    artifact = Artifact.get("classify-images-summary")
    assert artifact is not None and str(artifact.flow_run_id) == summary["run_id"]
    text = artifact.data
    df = pd.read_parquet(tmp_path / "out")
    assert f"| input | `{photos_dir}` |" in text
    assert f"| model | {seed_model_dir} -> seed v1 (`{summary['model']['sha256'][:12]}`) |" in text
    for label, n in df["label"].value_counts().items():
        assert f"| {label} | {n} | {n / len(df):.1%} |" in text
    bins = [int(m) for m in re.findall(r"^\| \d\.\d-\d\.\d \| (\d+) \|", text, re.M)]
    assert len(bins) == 10 and sum(bins) == len(df) == 9
    lowest = df.sort_values("score").iloc[0]
    assert f"| `{lowest['image_uri']}` | {lowest['label']} | {lowest['score']:.3f} |" in text
    accuracy = (df["label"] == df["true_label"]).mean()
    assert f"accuracy **{accuracy:.4f}** over 9 labelled images" in text
    png = re.search(r"!\[confusion matrix\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert png and base64.b64decode(png.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    shards = Artifact.get("classify-images-shards")
    assert shards is not None and str(shards.flow_run_id) == summary["run_id"]


def test_true_labels_that_are_no_class_of_the_model_are_counted_not_scored(photos_dir, seed_model_dir, tmp_path):
    (photos_dir / "birds").rename(photos_dir / "owls")  # 5 of 9 images now have a folder name the model lacks
    classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model=str(seed_model_dir), device="cpu")
    text = Artifact.get("classify-images-summary").data
    assert "over 4 labelled images" in text and "5 images have a true label that is not a class of the model" in text


@flow(name="Outer Flow_1")
def _outer(input: str, output: str, model: str) -> str:
    classify_images(input=input, output=output, model=model, device="cpu")
    return artifact_key("x")


def test_a_classify_run_inside_another_flow_is_keyed_by_both(photos_dir, seed_model_dir, tmp_path):
    assert _outer(str(photos_dir), str(tmp_path / "out"), str(seed_model_dir)) == "outer-flow-1-x"
    inner = Artifact.get("outer-flow-1-classify-images-summary")
    assert inner is not None and "## Top-1 scores" in inner.data


def test_a_key_outside_a_flow_run_is_its_name_made_valid():
    assert artifact_key("My Model_v1.2--summary") == "my-model-v1-2-summary"
