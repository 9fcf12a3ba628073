"""A real `a2k classify` process killed with SIGKILL mid-run, then run again: each image exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import PREFECT_HOME, many_photos_in


N_IMAGES = 150  # 50 shards of 3: enough that a kill after the third part lands mid-run on a busy machine


@pytest.fixture
def many_photos(tmp_path):
    return many_photos_in(tmp_path / "many", N_IMAGES, 9)


def _classify(photos, out, model, env, log):
    cmd = [sys.executable, "-m", "a2k", "classify", str(photos), str(out), "--model", str(model), "--device", "cpu",
           "--shard-size", "3", "--batch-size", "3"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def test_a_run_killed_mid_way_finishes_only_the_rest_and_writes_each_image_once(many_photos, seed_model_dir, tmp_path):
    out = tmp_path / "out"
    # without the test harness's server URL the child starts its own server, as from a user's shell; on the session's
    # Prefect home (conftest), never the user's: HOME is a folder of the test's, whose .prefect must stay unmade
    user_home = tmp_path / "user-home"
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "HOME": str(user_home)}
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    proc = _classify(many_photos, out, seed_model_dir, env, first_log)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, first_log.read_text()[-2000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and the temporary Prefect server it started
    proc.wait(timeout=30)
    committed = len(list(out.glob("part-*.parquet")))
    assert 3 <= committed < N_IMAGES // 3, "the kill should land mid-run"
    assert not (out / "_a2k_run.json").exists()

    again = _classify(many_photos, out, seed_model_dir, env, second_log)
    assert again.wait(timeout=300) == 0, second_log.read_text()[-3000:]
    marker = json.loads((out / "_a2k_run.json").read_text())
    assert marker["listed"] == marker["predicted"] == N_IMAGES and marker["errors"] == 0
    assert marker["resumed_shards"] >= committed and marker["processed_this_run"] == N_IMAGES - 3 * marker["resumed_shards"]
    df = pd.read_parquet(out)
    assert len(df) == N_IMAGES and df["image_uri"].is_unique
    assert sorted(df["image_uri"]) == sorted(str(p) for p in many_photos.rglob("*.JPEG"))
    assert not [p for p in out.rglob(".*.tmp")], "half-written files of the killed run are cleared"
    assert (PREFECT_HOME / "prefect.db").is_file() and not (user_home / ".prefect").exists()
