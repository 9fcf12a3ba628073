import hashlib
import json

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import s3fs

from flows.classify_images import classify_images
from tasks.classify.sink import PREDICTION_SCHEMA
from tasks.storage import write_parquet

SECRET = "a2k-secret-3f9c1e7b2d"


@pytest.fixture
def store(s3_bucket):
    return s3fs.S3FileSystem()


@pytest.fixture
def s3_input(s3_bucket, store, photos_dir, truncated_jpeg) -> dict[str, bytes]:
    """The photos under s3://<bucket>/in/<class>/, plus a truncated JPEG and an empty file: key -> bytes."""
    objects = {f"in/{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(photos_dir.rglob("*.JPEG"))}
    objects |= {"in/fish/cut.jpg": truncated_jpeg, "in/empty.jpg": b""}
    store.pipe({f"{s3_bucket}/{k}": v for k, v in objects.items()})
    return objects


def _read(store, path: str) -> pd.DataFrame:
    """A dataset under S3 as pyarrow reads it (names starting with '_' or '.' skipped)."""
    return ds.dataset(path, filesystem=store, format="parquet").to_table().to_pandas()


def _run(input, output, seed_model_dir, **kw):
    return classify_images(input=input, output=output, model=str(seed_model_dir), device="cpu", shard_size=4,
                           batch_size=4, **kw)


def test_s3_in_s3_out_accounts_for_every_image_once_and_a_rerun_resumes(s3_bucket, s3_input, seed_model_dir,
                                                                        monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s3fs.S3FileSystem.clear_instance_cache()
    store = s3fs.S3FileSystem()
    source, out = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"
    summary = _run(source, out, seed_model_dir)
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (11, 9, 2)

    preds = _read(store, f"{s3_bucket}/out")
    errors = _read(store, f"{s3_bucket}/out/_errors")
    every = {f"s3://{s3_bucket}/{k}" for k in s3_input}
    assert sorted([*preds["image_uri"], *errors["image_uri"]]) == sorted(every)  # each exactly once
    assert dict(zip(errors["image_uri"], errors["kind"])) == {
        f"s3://{s3_bucket}/in/fish/cut.jpg": "truncated", f"s3://{s3_bucket}/in/empty.jpg": "empty"}
    assert (preds["true_label"] == preds["image_uri"].str.split("/").str[-2]).all()
    assert set(preds["true_label"]) == {"birds", "fish"}
    part = next(p for p in store.find(f"{s3_bucket}/out", maxdepth=1) if p.endswith(".parquet"))
    assert ds.dataset(part, filesystem=store).schema.remove_metadata() == PREDICTION_SCHEMA

    manifest = ds.dataset(f"{s3_bucket}/out/_a2k/manifest.parquet", filesystem=store).to_table()
    keys = [u.removeprefix(f"s3://{s3_bucket}/") for u in manifest.column("uri").to_pylist()]
    assert manifest.column("etag").to_pylist() == [hashlib.md5(s3_input[k]).hexdigest() for k in keys]

    marker = json.loads(store.cat_file(f"{s3_bucket}/out/_a2k_run.json"))
    assert marker["listed"] == marker["predicted"] + marker["errors"] == 11
    assert marker["parts"] == sorted(p.rsplit("/", 1)[-1] for p in store.find(f"{s3_bucket}/out", maxdepth=1)
                                     if p.endswith(".parquet"))
    assert summary["marker"] == f"{out}/_a2k_run.json"

    written = store.find(f"{s3_bucket}/out")
    assert not [p for p in written if p.rsplit("/", 1)[-1].startswith(".")]  # no temporary key, no probe left
    assert not [p for p in written if SECRET.encode() in store.cat_file(p)]
    assert SECRET not in json.dumps(summary, default=str)

    again = _run(source, out, seed_model_dir)
    assert (again["unchanged"], again["processed_this_run"], again["resumed_shards"]) == (11, 0, 0)  # incremental
    assert again["parts"] == summary["parts"]
    assert len(_read(store, f"{s3_bucket}/out")) == 9 and len(_read(store, f"{s3_bucket}/out/_errors")) == 2


def test_a_manifest_on_s3_of_s3_keys_is_classified(s3_bucket, s3_input, store, seed_model_dir):
    keys = sorted(k for k in s3_input if k.startswith("in/birds/"))
    manifest = write_parquet(pa.table({"uri": [f"s3://{s3_bucket}/{k}" for k in keys]}),
                             f"s3://{s3_bucket}/lists/birds.parquet")
    summary = _run(manifest, f"s3://{s3_bucket}/out", seed_model_dir)
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (5, 5, 0)
    assert sorted(_read(store, f"{s3_bucket}/out")["image_uri"]) == [f"s3://{s3_bucket}/{k}" for k in keys]


def test_a_local_folder_into_an_s3_output(s3_bucket, store, photos_dir, seed_model_dir):
    summary = _run(str(photos_dir), f"s3://{s3_bucket}/out", seed_model_dir)
    assert (summary["listed"], summary["predicted"]) == (9, 9)
    preds = _read(store, f"{s3_bucket}/out")
    assert sorted(preds["image_uri"]) == sorted(str(p) for p in photos_dir.rglob("*.JPEG"))
    manifest = ds.dataset(f"{s3_bucket}/out/_a2k/manifest.parquet", filesystem=store).to_table()
    assert manifest.column("etag").null_count == 9


def test_an_s3_input_into_a_local_output(s3_bucket, s3_input, seed_model_dir, tmp_path):
    summary = _run(f"s3://{s3_bucket}/in", str(tmp_path / "out"), seed_model_dir)
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (11, 9, 2)
    preds, errors = pd.read_parquet(tmp_path / "out"), pd.read_parquet(tmp_path / "out" / "_errors")
    assert sorted([*preds["image_uri"], *errors["image_uri"]]) == sorted(f"s3://{s3_bucket}/{k}" for k in s3_input)
    assert json.loads((tmp_path / "out" / "_a2k_run.json").read_text())["listed"] == 11


@pytest.mark.parametrize(
    "source, output, message",
    [
        ("s3://{bucket}/nothing", "s3://{bucket}/out", "input 's3://{bucket}/nothing' does not exist or holds nothing"),
        ("s3://a2k-missing-bucket/in", "s3://{bucket}/out", "input 's3://a2k-missing-bucket/in' does not exist"),
        ("s3://{bucket}/no.parquet", "s3://{bucket}/out", "input manifest 's3://{bucket}/no.parquet' does not exist"),
        ("s3://{bucket}/in/empty.jpg", "s3://{bucket}/out", "is an object but not a .parquet manifest"),
        ("s3://{bucket}/in", "s3://a2k-missing-bucket/out", "bucket 'a2k-missing-bucket' does not exist"),
    ],
)
def test_a_missing_bucket_or_prefix_stops_the_run_before_any_work(s3_bucket, s3_input, store, seed_model_dir,
                                                                  source, output, message):
    fill = {"bucket": s3_bucket}
    with pytest.raises(ValueError, match=message.format(**fill).replace(".", "\\.")):
        _run(source.format(**fill), output.format(**fill), seed_model_dir)
    assert not store.find(f"{s3_bucket}/out")
    assert not store.exists("a2k-missing-bucket")  # never created on the way
