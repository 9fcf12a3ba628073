"""Incremental runs: a rerun classifies only new and changed images, drops the rows of removed ones, and keeps each
listed image exactly once in predictions + errors, on a folder and on S3."""

import json
import os

import pandas as pd
import pyarrow.dataset as ds
import pytest
import s3fs

from flows.classify_images import classify_images
from tasks.classify.output import Output
from tasks.classify.plan import plan_run
from tasks.images.manifest import list_images, write_manifest
from tasks.models.entry import read_entry
from tests.conftest import photo_paths


def _run(photos, out, model, **kw):
    return classify_images(input=str(photos), output=str(out), model=str(model), device="cpu", shard_size=4,
                           batch_size=4, **kw)


def _every_image_once(out, photos) -> pd.DataFrame:
    preds = pd.read_parquet(out)
    errors = pd.read_parquet(out / "_errors") if (out / "_errors").exists() else pd.DataFrame({"image_uri": []})
    uris = [*preds["image_uri"], *errors["image_uri"]]
    assert sorted(uris) == sorted(str(p) for p in photos.rglob("*.JPEG"))
    return preds


def test_a_rerun_classifies_only_new_and_changed_images_and_drops_removed_ones(photos_dir, seed_model_dir, tmp_path):
    out = tmp_path / "out"
    first = _run(photos_dir, out, seed_model_dir)
    assert (first["new"], first["processed_this_run"]) == (9, 9)

    extra = photo_paths(11)[9:]
    for src in extra:  # two new images
        (photos_dir / "birds" / src.name).write_bytes(src.read_bytes())
    birds = sorted((photos_dir / "birds").glob("*.JPEG"))
    changed = sorted((photos_dir / "fish").glob("*.JPEG"))[0]
    changed.write_bytes(extra[0].read_bytes())  # same name, other bytes: a changed image
    removed = next(p for p in birds if p.name not in {s.name for s in extra})
    removed.unlink()

    second = _run(photos_dir, out, seed_model_dir)
    counts = {k: second[k] for k in ("listed", "new", "changed", "unchanged", "removed", "processed_this_run")}
    assert counts == {"listed": 10, "new": 2, "changed": 1, "unchanged": 7, "removed": 1, "processed_this_run": 3}
    preds = _every_image_once(out, photos_dir)
    assert preds["image_uri"].is_unique and len(preds) == 10
    runs = dict(zip(preds["image_uri"], preds["run_id"]))
    assert runs[str(changed)] == second["run_id"]  # its old row is gone, its new one is there
    assert sum(r == second["run_id"] for r in runs.values()) == 3
    marker = json.loads((out / "_a2k_run.json").read_text())
    assert marker["listed"] == marker["predicted"] + marker["errors"] == 10
    assert (marker["new"], marker["changed"], marker["removed"]) == (2, 1, 1) and marker["generation"] == 2
    assert marker["parts"] == sorted(p.name for p in out.glob("part-*.parquet"))

    parts_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    third = _run(photos_dir, out, seed_model_dir)
    assert (third["unchanged"], third["processed_this_run"], third["shards_this_run"]) == (10, 0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == parts_before  # nothing rewritten

    full = _run(photos_dir, out, seed_model_dir, full=True)
    assert (full["full"], full["new"], full["processed_this_run"]) == (True, 10, 10)
    preds = _every_image_once(out, photos_dir)
    assert set(preds["run_id"]) == {full["run_id"]}


def test_a_grown_input_is_classified_incrementally_not_refused(photos_dir, seed_model_dir, tmp_path):
    out = tmp_path / "out"
    _run(photos_dir, out, seed_model_dir)
    src = photo_paths(10)[9]
    (photos_dir / "aaa.JPEG").write_bytes(src.read_bytes())  # sorts first: every old shard boundary would move
    again = _run(photos_dir, out, seed_model_dir)
    assert (again["new"], again["unchanged"], again["processed_this_run"]) == (1, 9, 1)
    assert len(_every_image_once(out, photos_dir)) == 10


def test_a_run_killed_after_dropping_old_rows_loses_nothing_even_if_the_image_changes_back(photos_dir, seed_model_dir,
                                                                                         tmp_path):
    """The killed run took a changed image's old row out of its part; the image is then restored (same bytes and
    mtime as in the state): the next run must still classify it, from pending.json, not trust the state."""
    out = tmp_path / "out"
    _run(photos_dir, out, seed_model_dir)
    image = sorted(photos_dir.rglob("*.JPEG"))[0]
    original, st = image.read_bytes(), image.stat()
    image.write_bytes(photo_paths(10)[9].read_bytes())

    layout = Output(str(out))
    write_manifest(list_images(photos_dir), layout.url_of(layout.manifest))  # what the flow does, up to its plan...
    plan_run(layout, 4, read_entry(str(seed_model_dir)), 5, str(photos_dir), overwrite=False, full=False)
    assert str(image) not in set(pd.read_parquet(out)["image_uri"])  # ...then killed before any shard ran

    image.write_bytes(original)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    resumed = _run(photos_dir, out, seed_model_dir)
    assert (resumed["retried"], resumed["processed_this_run"]) == (1, 1)
    preds = _every_image_once(out, photos_dir)
    assert preds["image_uri"].is_unique and len(preds) == 9
    assert not (out / "_a2k" / "state" / "pending.json").exists()


def test_incremental_runs_on_s3_use_the_etag(s3_bucket, photos_dir, seed_model_dir):
    store = s3fs.S3FileSystem()
    photos = sorted(photos_dir.rglob("*.JPEG"))
    store.pipe({f"{s3_bucket}/in/{p.parent.name}/{p.name}": p.read_bytes() for p in photos[:6]})
    source, out = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"
    first = _run(source, out, seed_model_dir)
    assert (first["listed"], first["processed_this_run"]) == (6, 6)

    store.pipe({f"{s3_bucket}/in/{p.parent.name}/{p.name}": p.read_bytes() for p in photos[6:8]})  # new
    store.pipe_file(f"{s3_bucket}/in/{photos[0].parent.name}/{photos[0].name}", photos[8].read_bytes())  # changed
    store.rm(f"{s3_bucket}/in/{photos[1].parent.name}/{photos[1].name}")  # removed
    second = _run(source, out, seed_model_dir)
    counts = {k: second[k] for k in ("listed", "new", "changed", "unchanged", "removed", "processed_this_run")}
    assert counts == {"listed": 7, "new": 2, "changed": 1, "unchanged": 4, "removed": 1, "processed_this_run": 3}

    store.invalidate_cache()
    preds = ds.dataset(f"{s3_bucket}/out", filesystem=store, format="parquet").to_table().to_pandas()
    listed = {f"s3://{p}" for p in store.find(f"{s3_bucket}/in")}
    assert preds["image_uri"].is_unique and set(preds["image_uri"]) == listed
    changed = f"s3://{s3_bucket}/in/{photos[0].parent.name}/{photos[0].name}"
    assert preds.set_index("image_uri").loc[changed, "run_id"] == second["run_id"]
    marker = json.loads(store.cat_file(f"{s3_bucket}/out/_a2k_run.json"))
    assert marker["listed"] == marker["predicted"] + marker["errors"] == 7
    assert store.exists(f"{s3_bucket}/out/_a2k/state/images.parquet")
    assert not store.exists(f"{s3_bucket}/out/_a2k/state/pending.json")

    again = _run(source, out, seed_model_dir)
    assert (again["unchanged"], again["processed_this_run"]) == (7, 0)


@pytest.mark.parametrize("flag", [[], ["--full"]])
def test_the_cli_runs_incrementally_unless_full(photos_dir, seed_model_dir, tmp_path, flag):
    from a2k.cli import main

    out = tmp_path / "out"
    assert main(["classify", str(photos_dir), str(out), "--model", str(seed_model_dir), "--device", "cpu"]) == 0
    assert main(["classify", str(photos_dir), str(out), "--model", str(seed_model_dir), "--device", "cpu", *flag]) == 0
    marker = json.loads((out / "_a2k_run.json").read_text())
    assert marker["processed_this_run"] == (9 if flag else 0) and marker["full"] == bool(flag)
