"""Odd entries in an input folder, through the real flow on the CPU: a name that is not valid UTF-8 is classified,
a FIFO or a link to a device is an error row, and every entry that is no image is counted in the summary."""

import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.classify_images import classify_images


def test_names_that_are_not_utf8_are_classified_with_escaped_uris_and_the_run_goes_on(photos_dir, seed_model_dir,
                                                                                     tmp_path):
    photo = sorted(photos_dir.rglob("*.JPEG"))[0].read_bytes()
    root = os.fsencode(photos_dir)
    os.mkdir(os.path.join(root, b"caf\xe9"))  # a class folder named in Latin-1: not UTF-8
    for name in (b"fish/caf\xe9-\xff.jpg", b"caf\xe9/photo.jpg", b"fish/back\\slash.jpg"):
        with open(os.path.join(root, name), "wb") as f:
            f.write(photo)
    out = tmp_path / "out"
    summary = classify_images(input=str(photos_dir), output=str(out), model=str(seed_model_dir), shard_size=4,
                              device="cpu")
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (12, 12, 0)
    df = pd.read_parquet(out).set_index("image_uri")
    base = str(photos_dir)
    assert df.loc[f"{base}/fish/caf\\xe9-\\xff.jpg", "true_label"] == "fish"  # each byte that is not UTF-8 as \xNN
    assert df.loc[f"{base}/caf\\xe9/photo.jpg", "true_label"] == "caf\\xe9"
    assert df.loc[f"{base}/fish/back\\\\slash.jpg", "true_label"] == "fish"  # so a backslash is written \\
    marker = json.loads((out / "_a2k_run.json").read_text())
    assert marker["listed"] == marker["predicted"] + marker["errors"] == 12


def test_a_fifo_and_a_device_are_error_rows_and_skipped_entries_are_counted(photos_dir, seed_model_dir, tmp_path):
    os.mkfifo(photos_dir / "fish" / "pipe.jpg")  # read as it was, the run waited for a writer forever
    (photos_dir / "zero.jpg").symlink_to("/dev/zero")
    for name in ("notes.txt", "more.txt", "meta.json", "photo.jpeg.gz", ".name.jpg"):
        (photos_dir / name).write_bytes(b"x")
    (photos_dir / "gone.jpg").symlink_to(photos_dir / "missing.jpg")
    (photos_dir / "loop.jpg").symlink_to(photos_dir / "loop.jpg")  # failed the listing before
    out = tmp_path / "out"
    summary = classify_images(input=str(photos_dir), output=str(out), model=str(seed_model_dir), shard_size=4,
                              device="cpu")
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (11, 9, 2)
    errors = pd.read_parquet(out / "_errors")
    reasons = dict(zip(errors["image_uri"].str.rsplit("/", n=1).str[1], zip(errors["kind"], errors["reason"])))
    assert reasons == {"pipe.jpg": ("unreadable", "not a regular file: fifo"),
                       "zero.jpg": ("unreadable", "not a regular file: character device")}
    skipped = {".txt": 2, ".gz": 1, ".json": 1, "dangling symlink": 1, "hidden": 1, "symlink loop": 1}
    marker = json.loads((out / "_a2k_run.json").read_text())
    assert summary["skipped"] == marker["skipped"] == skipped


@pytest.mark.parametrize("with_sizes", [True, False])  # without sizes and times, the listing stats each uri
def test_a_manifest_row_without_a_uri_or_with_an_http_uri_is_an_error_row_and_nothing_is_fetched(
        photos_dir, seed_model_dir, tmp_path, http_server, with_sizes):
    photos = [str(p) for p in sorted(photos_dir.rglob("*.JPEG"))[:3]]
    uris = photos + [None, "", f"{http_server.url}/photo.jpg"]
    columns = {"uri": pa.array(uris, pa.string())}
    if with_sizes:
        columns |= {"bytes": [1] * len(uris), "mtime_ns": [1] * len(uris)}
    pq.write_table(pa.table(columns), tmp_path / "manifest.parquet")
    out = tmp_path / "out"
    summary = classify_images(input=str(tmp_path / "manifest.parquet"), output=str(out), model=str(seed_model_dir),
                              device="cpu")
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (6, 3, 3)
    errors = pd.read_parquet(out / "_errors", columns=["image_uri", "kind", "reason"]).set_index("image_uri")
    assert "None" not in errors.index
    assert errors.loc["~manifest row 3: null uri"].tolist() == ["invalid_uri", "the manifest's uri in row 3 (0-based) is null"]
    assert errors.loc["~manifest row 4: empty uri"].tolist() == ["invalid_uri", "the manifest's uri in row 4 (0-based) is empty"]
    assert errors.loc[f"{http_server.url}/photo.jpg"].tolist() == [
        "unsupported", "uri scheme 'http' is not read; allowed: local paths and s3://"]
    assert http_server.requests == []
