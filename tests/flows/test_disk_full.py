"""A run whose output device fills up stops with one line naming the output and the space needed, not a traceback;
once space is freed the same command finishes the rest, each image once; and temporary files a killed or failed
run left (parts, the state) are removed by the next run."""

import os
import shutil
import subprocess
import sys

import pandas as pd

from flows.classify_images import classify_images
from tests.conftest import photo_paths

N_IMAGES = 60  # 20 parts of about 4 KiB: the 64 KiB device fills up mid-run


def _classify(photos, out, model, env):
    cmd = [sys.executable, "-m", "a2k", "classify", str(photos), str(out), "--model", str(model), "--device", "cpu",
           "--shard-size", "3", "--batch-size", "3"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_a_full_output_device_stops_the_run_in_one_line_and_a_rerun_after_freeing_space_finishes_it(
        tiny_disk, seed_model_dir, tmp_path):
    photos = tmp_path / "photos"
    for i in range(N_IMAGES):
        src = photo_paths(30)[i % 30]
        (photos / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, photos / f"class{i % 2}" / f"{i:03d}_{src.name}")
    out = tiny_disk / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PREFECT_HOME": str(tmp_path / "ph")}

    full = _classify(photos, out, seed_model_dir, env)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr + full.stdout, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"a2k: error: no space left on the device of '{out}") and "free at least" in last, last
    assert not list(out.rglob("*.tmp")), "a write that failed leaves no temporary file"

    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)
    again = _classify(photos, out, seed_model_dir, env)
    assert again.returncode == 0, again.stderr[-3000:]
    df = pd.read_parquet(out)
    assert len(df) == N_IMAGES and df["image_uri"].is_unique
    assert not list(out.rglob("*.tmp"))


def test_temporary_files_left_by_a_killed_run_are_removed_by_the_next(photos_dir, seed_model_dir, tmp_path):
    out = tmp_path / "out"
    run = dict(input=str(photos_dir), output=str(out), model=str(seed_model_dir), device="cpu", shard_size=4,
               batch_size=4)
    classify_images(**run)
    planted = [out / ".part-000000-0123456789abcdef0123.parquet.deadbeef.tmp",
               out / "_errors" / ".part-000001-0123456789abcdef0123.parquet.cafebabe.tmp",
               out / "_a2k" / "state" / ".images.parquet.0badf00d.tmp",
               out / "_a2k" / "state" / ".pending.json.12345678.tmp"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    again = classify_images(**run)
    assert again["unchanged"] == 9
    assert [p for p in planted if p.exists()] == []
    assert len(pd.read_parquet(out)) == 9
