"""Manifests through the real flow on the CPU: relative paths, file:// uris, duplicated uris and uris with nothing
behind them, locally and on S3 (moto's server); each such uri is counted or an error row, never a failed run."""

import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import s3fs

from flows.classify_images import classify_images
from tasks.storage import write_parquet


def test_a_local_manifest_of_relative_file_duplicated_and_missing_uris_is_classified(photos_dir, seed_model_dir,
                                                                                      tmp_path, monkeypatch):
    a, b, c = (str(p) for p in sorted(photos_dir.rglob("*.JPEG"))[:3])
    lists = tmp_path / "lists"
    lists.mkdir()
    uris = [os.path.relpath(a, lists), f"file://{b}", b, c, c, str(tmp_path / "never.jpg")]
    pq.write_table(pa.table({"uri": uris}), lists / "m.parquet")
    monkeypatch.chdir(photos_dir)  # relative paths are the manifest folder's, not the current one's
    out = tmp_path / "out"
    summary = classify_images(input=str(lists / "m.parquet"), output=str(out), model=str(seed_model_dir),
                              device="cpu")
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (4, 3, 1)
    assert summary["skipped"] == json.loads((out / "_a2k_run.json").read_text())["skipped"] == {"duplicate uri": 2}
    assert sorted(pd.read_parquet(out)["image_uri"]) == [a, b, c]
    errors = pd.read_parquet(out / "_errors")
    assert errors[["image_uri", "kind"]].values.tolist() == [[str(tmp_path / "never.jpg"), "missing"]]
    assert errors["reason"].iloc[0].startswith("no file or object at this uri: the manifest names it")


def test_an_s3_manifest_whose_objects_are_missing_or_fail_gives_error_rows(s3_bucket, photos_dir, seed_model_dir):
    store = s3fs.S3FileSystem()
    photos = sorted(photos_dir.rglob("*.JPEG"))[:2]
    store.pipe({f"{s3_bucket}/in/{p.name}": p.read_bytes() for p in photos} | {f"{s3_bucket}/in/cut.jpg": b"\xff\xd8\xff"})
    good = [f"s3://{s3_bucket}/in/{p.name}" for p in photos]
    missing = [f"s3://{s3_bucket}/in/never.jpg", "s3://a2k-no-such-bucket-7f3a/x.jpg", f"s3://{s3_bucket}/in"]
    uris = good + [f"s3://{s3_bucket}/in/cut.jpg", "cut.jpg"] + missing  # "cut.jpg": relative to the manifest's prefix
    manifest = write_parquet(pa.table({"uri": uris}), f"s3://{s3_bucket}/in/m.parquet")
    summary = classify_images(input=manifest, output=f"s3://{s3_bucket}/out", model=str(seed_model_dir), device="cpu",
                              shard_size=2)
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (6, 2, 4)
    assert summary["skipped"] == {"duplicate uri": 1}
    store.invalidate_cache()
    errors = ds.dataset(f"{s3_bucket}/out/_errors", filesystem=store, format="parquet").to_table().to_pylist()
    assert {r["image_uri"]: r["kind"] for r in errors} == {f"s3://{s3_bucket}/in/cut.jpg": "truncated",
                                                         **{u: "missing" for u in missing}}
