import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.demo import demo
from flows.train_model import train_model


def test_demo_trains_on_real_digits_and_reaches_95_percent_measured_from_the_parquet(tmp_path):
    result = demo(workdir=str(tmp_path / "demo"), device="cpu")
    df = pd.read_parquet(result["output"])
    accuracy = (df["label"] == df["true_label"]).mean()
    entry = json.loads((Path(result["model_dir"]) / "model.json").read_text())
    counts = entry["lineage"]["split"]["counts"]
    assert sum(counts.values()) == 1797 and len(df) == counts["test"] == result["accuracy"]["labelled"]
    assert accuracy >= 0.95 and accuracy == pytest.approx(result["accuracy"]["accuracy"])
    assert entry["architecture"] == "seed-cnn" and entry["class_names"] == [str(d) for d in range(10)]
    assert entry["metrics"]["test_accuracy"] == pytest.approx(accuracy, abs=0.02)


def test_training_split_is_seeded_stratified_and_disjoint(digits_dir, tmp_path):
    r = train_model(dataset=str(digits_dir), name="tiny", epochs=1, device="cpu", model_store=str(tmp_path / "store"))
    splits = {s: pq.read_table(f"{r['model_dir']}/splits/{s}.parquet") for s in ("train", "val", "test")}
    uris = [set(t.column("uri").to_pylist()) for t in splits.values()]
    assert not (uris[0] & uris[1] or uris[0] & uris[2] or uris[1] & uris[2])
    assert sum(map(len, uris)) == 1797
    assert set(splits["test"].column("label").to_pylist()) == {str(d) for d in range(10)}
    again = train_model(dataset=str(digits_dir), name="tiny", epochs=1, device="cpu", model_store=str(tmp_path / "store"))
    assert again["version"] == "2"
    assert pq.read_table(f"{again['model_dir']}/splits/test.parquet").equals(splits["test"])


@pytest.mark.parametrize(
    "override, message",
    [({"arch": "resnet9"}, "architecture 'resnet9' is not known"), ({"name": "../x"}, "model name '../x'"),
     ({"dataset": "/nope"}, "dataset '/nope' is not a folder"), ({"epochs": 0}, "epochs")],
)
def test_bad_training_parameters_are_refused(digits_dir, tmp_path, override, message):
    with pytest.raises(Exception, match=message):
        train_model(**{"dataset": str(digits_dir), "name": "m", "model_store": str(tmp_path / "s"), **override})
    assert not (tmp_path / "s").exists()
