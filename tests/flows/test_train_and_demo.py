import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.demo import DEMO_CHAINS, demo
from flows.train_model import train_model
from tasks.models.registry import get_model


def test_demo_trains_compresses_gates_and_classifies_with_production_at_95_percent_from_the_parquet(tmp_path):
    result = demo(workdir=str(tmp_path / "demo"), device="cpu")
    df = pd.read_parquet(result["output"])
    accuracy = (df["label"] == df["true_label"]).mean()
    assert result["model"] == "models:/digits-cnn/1"
    children = result["children"]
    assert [c["recipes"] for c in children] == [list(chain) for chain in DEMO_CHAINS]
    assert [c["child"] for c in children] == ["models:/digits-cnn/2", "models:/digits-cnn/3", "models:/digits-cnn/4"]
    passed = [c for c in children if c["passed"]]
    assert all(c["accuracy_drop_points"] <= 1.0 and c["speedup"] >= 1.2 for c in passed)
    assert all("not fast enough" in c["reason"] or "dropped" in c["reason"] for c in children if not c["passed"])
    production = max(passed, key=lambda c: c["speedup"])["child"] if passed else "models:/digits-cnn/1"
    assert str(get_model("models:/digits-cnn@production").ref) == production == result["classified_with"]
    assert set(df["model_version"]) == {production.rsplit("/", 1)[1]}
    entry = json.loads((Path(result["model_url"]) / "model.json").read_text())
    counts = entry["lineage"]["split"]["counts"]
    assert sum(counts.values()) == 1797 and len(df) == counts["test"] == result["accuracy"]["labelled"]
    assert accuracy >= 0.95 and accuracy == pytest.approx(result["accuracy"]["accuracy"])
    assert entry["architecture"] == "seed-cnn" and entry["class_names"] == [str(d) for d in range(10)]
    assert entry["metrics"]["test_accuracy"] == pytest.approx(accuracy, abs=0.02)


def test_training_split_is_seeded_stratified_and_disjoint(digits_dir, tmp_path):
    r = train_model(dataset=str(digits_dir), name="tiny", epochs=1, device="cpu", registry=str(tmp_path / "reg"))
    assert r["ref"] == "models:/tiny/1" and r["url"] == str(tmp_path / "reg" / "tiny" / "1")
    splits = {s: pq.read_table(f"{r['url']}/splits/{s}.parquet") for s in ("train", "val", "test")}
    uris = [set(t.column("uri").to_pylist()) for t in splits.values()]
    assert not (uris[0] & uris[1] or uris[0] & uris[2] or uris[1] & uris[2])
    assert sum(map(len, uris)) == 1797
    assert set(splits["test"].column("label").to_pylist()) == {str(d) for d in range(10)}
    test_rows = splits["test"].to_pylist()
    assert all(len(r["sha256"]) == 64 for r in test_rows)  # content hashes make the split checkable later
    import hashlib
    assert hashlib.sha256(open(test_rows[0]["uri"], "rb").read()).hexdigest() == test_rows[0]["sha256"]
    again = train_model(dataset=str(digits_dir), name="tiny", epochs=1, device="cpu", registry=str(tmp_path / "reg"))
    assert again["version"] == "2"
    assert pq.read_table(f"{again['url']}/splits/test.parquet").equals(splits["test"])
    entry = get_model("models:/tiny/2", str(tmp_path / "reg")).entry
    assert entry.lineage["recipe"] == "train" and entry.lineage["parent"] is None
    assert entry.lineage["split"]["counts"] == {k: t.num_rows for k, t in splits.items()}


@pytest.mark.parametrize(
    "override, message",
    [({"arch": "resnet9"}, "architecture 'resnet9' is not known"), ({"name": "../x"}, "model name '../x'"),
     ({"arch": "mobilenet_v3_smal"}, r"not known \(close matches: mobilenet_v3_small"),
     ({"arch": "resnet50:IMAGENET1K_V2"}, r"names pretrained weights \(ResNet50_Weights.IMAGENET1K_V2\), which train "
                                          "does not download or load"),
     ({"dataset": "/nope"}, "dataset '/nope' is not a folder"), ({"epochs": 0}, "epochs")],
)
def test_bad_training_parameters_are_refused(digits_dir, tmp_path, override, message):
    with pytest.raises(Exception, match=message):
        train_model(**{"dataset": str(digits_dir), "name": "m", "registry": str(tmp_path / "s"), **override})
    assert not (tmp_path / "s").exists()


def test_any_torchvision_architecture_trains_and_classifies(digits_dir, tmp_path):
    from flows.classify_images import classify_images

    registry = str(tmp_path / "reg")
    r = train_model(dataset=str(digits_dir), name="mnv3", arch="mobilenet_v3_small", epochs=1, batch_size=128,
                    image_size=32, device="cpu", registry=registry)
    entry = get_model(r["ref"], registry).entry
    assert entry.architecture == "mobilenet_v3_small" and entry.preprocessing.crop == 32
    summary = classify_images(input=f"{r['url']}/splits/test.parquet", output=str(tmp_path / "out"), model=r["ref"],
                              device="cpu", registry=registry)
    df = pd.read_parquet(tmp_path / "out")
    assert summary["predicted"] == len(df) == r["split_counts"]["test"]
    assert set(df["label"]) <= {str(d) for d in range(10)}


def test_a_timm_architecture_trains_and_classifies(digits_dir, tmp_path):
    pytest.importorskip("timm", reason="timm is an optional extra: pip install 'a2k[timm]'")
    from flows.classify_images import classify_images

    registry = str(tmp_path / "reg")
    r = train_model(dataset=str(digits_dir), name="teff", arch="timm:test_efficientnet", epochs=1, batch_size=128,
                    image_size=32, device="cpu", registry=registry)
    entry = get_model(r["ref"], registry).entry
    assert entry.architecture == "timm:test_efficientnet" and entry.preprocessing.crop == 32
    summary = classify_images(input=f"{r['url']}/splits/test.parquet", output=str(tmp_path / "out"), model=r["ref"],
                              device="cpu", registry=registry)
    assert summary["predicted"] == r["split_counts"]["test"]
