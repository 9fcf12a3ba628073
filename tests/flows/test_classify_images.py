import json
import shutil

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
from prefect.exceptions import ParameterTypeError

from flows.classify_images import classify_images
from tasks.classify.sink import PREDICTION_SCHEMA


@pytest.fixture
def with_bad_files(photos_dir, truncated_jpeg):
    (photos_dir / "fish" / "cut.jpg").write_bytes(truncated_jpeg)
    (photos_dir / "notes.JPG").write_text("not an image")
    return photos_dir


def test_flow_writes_a_dataset_that_pandas_and_duckdb_read_as_is(with_bad_files, seed_model_dir, tmp_path):
    out = tmp_path / "out"
    summary = classify_images(input=str(with_bad_files), output=str(out), model=str(seed_model_dir), batch_size=4,
                              shard_size=4, top_k=2, device="cpu")
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (11, 9, 2)
    assert len(list(out.glob("part-*.parquet"))) == 3  # ceil(11 / 4) shards, one part each

    df = pd.read_parquet(out)
    assert len(df) == 9 and df["image_uri"].is_unique
    assert pq.read_schema(next(out.glob("part-*.parquet"))).remove_metadata() == PREDICTION_SCHEMA
    assert set(df["true_label"]) == {"birds", "fish"} and set(df["model_name"]) == {"seed"}
    assert df["run_id"].nunique() == 1 and str(df["processed_at"].dtype) == "datetime64[us, UTC]"
    assert duckdb.sql(f"SELECT count(*) FROM '{out}/*.parquet'").fetchall() == [(9,)]

    errors = pd.read_parquet(out / "_errors")
    assert dict(zip(errors["image_uri"].str.rsplit("/", n=1).str[1], errors["kind"])) == {
        "cut.jpg": "truncated", "notes.JPG": "not_an_image"}

    marker = json.loads((out / "_a2k_run.json").read_text())
    assert marker["listed"] == marker["predicted"] + marker["errors"] == 11
    assert marker["model"]["sha256"] == df["model_sha256"].iloc[0]


def test_a_run_killed_before_its_commit_keeps_its_committed_shards_and_duplicates_nothing(photos_dir, seed_model_dir,
                                                                                        tmp_path):
    out = tmp_path / "out"
    first = classify_images(input=str(photos_dir), output=str(out), model=str(seed_model_dir), shard_size=4, device="cpu")
    # as if the run had died before shard 1 and its commit: no part 1, no state, no marker
    sorted(out.glob("part-*.parquet"))[1].unlink()
    (out / "_a2k" / "state" / "images.parquet").unlink()
    (out / "_a2k_run.json").unlink()
    second = classify_images(input=str(photos_dir), output=str(out), model=str(seed_model_dir), shard_size=4, device="cpu")
    assert second["resumed_shards"] == 2 and second["processed_this_run"] == 4
    df = pd.read_parquet(out)
    assert len(df) == 9 and df["image_uri"].is_unique
    assert set(first["parts"]) == set(second["parts"])


def test_a_part_lost_after_the_commit_is_classified_again_and_nothing_else(photos_dir, seed_model_dir, tmp_path):
    out = tmp_path / "out"
    classify_images(input=str(photos_dir), output=str(out), model=str(seed_model_dir), shard_size=4, device="cpu")
    sorted(out.glob("part-*.parquet"))[1].unlink()
    second = classify_images(input=str(photos_dir), output=str(out), model=str(seed_model_dir), shard_size=4, device="cpu")
    assert (second["retried"], second["unchanged"], second["processed_this_run"]) == (4, 5, 4)
    df = pd.read_parquet(out)
    assert len(df) == 9 and df["image_uri"].is_unique


def test_another_setting_or_input_in_the_same_output_is_refused_unless_overwrite(photos_dir, seed_model_dir, tmp_path):
    out = tmp_path / "out"
    classify_images(input=str(photos_dir), output=str(out), model=str(seed_model_dir), device="cpu")
    with pytest.raises(ValueError, match="holds 1 part\\(s\\) from another input, model or setting"):
        classify_images(input=str(photos_dir), output=str(out), model=str(seed_model_dir), device="cpu", top_k=1)
    other = photos_dir.parent / "other"
    (other / "fish").mkdir(parents=True)
    for p in sorted(photos_dir.rglob("*.JPEG"))[:3]:
        (other / "fish" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match="from another input, model or setting"):
        classify_images(input=str(other), output=str(out), model=str(seed_model_dir), device="cpu")
    assert len(pd.read_parquet(out)) == 9  # refused before any change
    summary = classify_images(input=str(other), output=str(out), model=str(seed_model_dir), device="cpu",
                              overwrite=True)
    assert summary["listed"] == 3 and summary["new"] == 3 and len(pd.read_parquet(out)) == 3


@pytest.mark.parametrize(
    "override, error, message",
    [
        ({"batch_size": 0}, ParameterTypeError, "batch_size"),
        ({"top_k": -1}, ParameterTypeError, "top_k"),
        ({"device": "gpu2"}, ParameterTypeError, "device 'gpu2' is not one of: auto, cpu, cuda, cuda:N"),
        ({"device": "cuda:3"}, ValueError, "device 'cuda:3' not found; available: auto, cpu"),
        ({"input": "/no/such/folder"}, ValueError, "input '/no/such/folder' does not exist"),
        ({"model": "no-such-model"}, FileNotFoundError, "model 'no-such-model' is not in the registry"),
        ({"model": "/no/such/dir"}, FileNotFoundError, "'/no/such/dir' is neither a model directory"),
    ],
)
def test_bad_parameters_stop_the_run_before_any_work(photos_dir, seed_model_dir, tmp_path, override, error, message):
    params = {"input": str(photos_dir), "output": str(tmp_path / "out"), "model": str(seed_model_dir), "device": "cpu"}
    with pytest.raises(error, match=message):
        classify_images(**{**params, **override})
    assert not list((tmp_path / "out").glob("**/*.parquet"))


def test_unwritable_output_is_refused(photos_dir, seed_model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        classify_images(input=str(photos_dir), output=str(blocker), model=str(seed_model_dir), device="cpu")


def test_a_registry_reference_is_resolved_once_and_recorded_in_every_row(photos_dir, seed_model_dir, tmp_path,
                                                                        registry_root):
    from tasks.models.registry import register_model, set_alias

    first = register_model(seed_model_dir, "seed", registry_root)
    register_model(seed_model_dir, "seed", registry_root)
    set_alias("seed", "production", 1, registry_root)
    summary = classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model="seed",
                              registry=registry_root, device="cpu")
    df = pd.read_parquet(tmp_path / "out")
    assert summary["model"]["version"] == "1" and set(df["model_version"]) == {"1"}
    assert set(df["model_sha256"]) == {first.entry.weights_sha256} and set(df["model_name"]) == {"seed"}
    latest = classify_images(input=str(photos_dir), output=str(tmp_path / "out2"), model="models:/seed/latest",
                             registry=registry_root, device="cpu")
    assert latest["model"]["version"] == "2"


def test_half_written_files_of_a_killed_run_are_cleared_on_the_next_run(photos_dir, seed_model_dir, tmp_path):
    out = tmp_path / "out"
    (out / "_errors").mkdir(parents=True)
    leftovers = [out / ".part-000000-abc.parquet.1234abcd.tmp", out / "_errors" / ".part-000001-abc.parquet.99.tmp"]
    for p in leftovers:
        p.write_bytes(b"PAR1 half a file")
    classify_images(input=str(photos_dir), output=str(out), model=str(seed_model_dir), device="cpu")
    assert not any(p.exists() for p in leftovers)
    assert len(pd.read_parquet(out)) == 9


def test_a_gpu_memory_limit_without_a_gpu_is_refused_before_any_work(photos_dir, seed_model_dir, tmp_path):
    with pytest.raises(ValueError, match="gpu_memory_gb 6.0 needs a CUDA device; device 'cpu' is cpu"):
        classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model=str(seed_model_dir), device="cpu",
                        gpu_memory_gb=6)
    assert not list((tmp_path / "out").glob("**/*.parquet"))


def test_weights_altered_after_registration_are_refused_before_anything_is_written(photos_dir, seed_model_dir,
                                                                                   tmp_path):
    """The digest was checked only in the shard task, after the manifest, work file and pending.json were written."""
    model = tmp_path / "altered"
    shutil.copytree(seed_model_dir, model)
    weights = model / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: the file still loads, the digest differs
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model seed version 1: weights sha256 \w+… does not match the entry's \w+…; "
                                         "the file is truncated or altered"):
        classify_images(input=str(photos_dir), output=str(out), model=str(model), device="cpu")
    assert not [p for p in out.rglob("*")], "nothing written into the output"


def test_weights_of_another_shape_fail_the_run_in_one_line_naming_the_file(photos_dir, seed_model_dir, tmp_path):
    from dataclasses import replace

    from safetensors.torch import save

    from tasks.models.entry import build_model, default_preprocessing, read_entry, save_entry, sha256_file

    model = tmp_path / "three-classes"
    shutil.copytree(seed_model_dir, model)
    weights = model / "weights.safetensors"  # registered with its digest, but for 3 classes where the entry says 2
    weights.write_bytes(save(build_model("seed-cnn", 3, default_preprocessing("seed-cnn")).state_dict()))
    save_entry(model, replace(read_entry(model), weights_sha256=sha256_file(weights)))
    with pytest.raises(ValueError) as e:
        classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model=str(model), device="cpu")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"model seed version 1: weights file {str(weights)!r} does not fit seed-cnn with "
                                   "2 classes: shape mismatch: ")
