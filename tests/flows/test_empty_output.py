"""An output is a readable dataset however little a run finds: with no image listed, predictions and errors are
empty files of their schemas (and the run warns what it looked for); with no error, `_errors` is one; a later run's
parts take over from the stand-ins, and the commit's counts never include them."""

import json
import logging
import shutil

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from flows.classify_images import classify_images
from tasks.classify.sink import ERROR_SCHEMA, PREDICTION_SCHEMA


def _run(input, out, seed_model_dir):
    return classify_images(input=str(input), output=str(out), model=str(seed_model_dir), shard_size=4, device="cpu")


def _files(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet") if not p.relative_to(out).parts[0] == "_a2k")


def test_no_image_then_images_then_a_bad_one_always_leave_a_dataset_readers_read(photos_dir, seed_model_dir, tmp_path,
                                                                                 truncated_jpeg, caplog):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "notes.txt").write_text("no image here")
    caplog.set_level(logging.WARNING)
    summary = _run(src, out, seed_model_dir)
    assert (summary["listed"], summary["predicted"], summary["errors"], summary["parts"]) == (0, 0, 0, [])
    assert summary["skipped"] == {".txt": 1}
    assert f"nothing listed: no file under {str(src)!r} has an image suffix (.apng" in caplog.text
    assert "None images/s" not in caplog.text
    assert _files(out) == ["_errors/empty.parquet", "empty.parquet"]
    assert pq.read_schema(out / "empty.parquet").remove_metadata() == PREDICTION_SCHEMA
    assert pq.read_schema(out / "_errors" / "empty.parquet").remove_metadata() == ERROR_SCHEMA
    assert len(pd.read_parquet(out)) == len(pd.read_parquet(out / "_errors")) == 0
    assert duckdb.sql(f"SELECT count(*) FROM '{out}/*.parquet'").fetchall() == [(0,)]
    assert duckdb.sql(f"SELECT count(*) FROM '{out}/_errors/*.parquet'").fetchall() == [(0,)]

    shutil.copytree(photos_dir, src, dirs_exist_ok=True)  # 9 photos, no bad file: the errors stay an empty file
    summary = _run(src, out, seed_model_dir)
    assert (summary["listed"], summary["predicted"], summary["errors"], len(summary["parts"])) == (9, 9, 0, 3)
    assert "empty.parquet" not in _files(out) and "_errors/empty.parquet" in _files(out)
    assert len(pd.read_parquet(out)) == 9 and len(pd.read_parquet(out / "_errors")) == 0

    (src / "cut.jpg").write_bytes(truncated_jpeg)
    summary = _run(src, out, seed_model_dir)
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (10, 9, 1)
    assert not [f for f in _files(out) if f.endswith("empty.parquet")]
    assert pd.read_parquet(out / "_errors")["kind"].tolist() == ["truncated"]
    marker = json.loads((out / "_a2k_run.json").read_text())
    assert marker["listed"] == marker["predicted"] + marker["errors"] == 10
    assert sorted(marker["parts"]) == sorted(f for f in _files(out) if "/" not in f)
