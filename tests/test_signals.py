"""A real `a2k classify` stopped by a Ctrl-C to its process group, or by SIGTERM to the process: it exits with the
shell's code in seconds, saying so in one line, its flow run marked Crashed, nothing it started left running, and
the same command run again finishes the rest with each image exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from tests.conftest import many_photos_in

N_IMAGES = 150  # 50 shards of 3: a signal after the first part lands mid-run on a busy machine
EXIT_BOUND_S = 30  # generous: what it catches is the 78 s hang (events flushed to a server the Ctrl-C had killed)


@pytest.fixture
def many_photos(tmp_path):
    return many_photos_in(tmp_path / "many", N_IMAGES, 30)


def _classify(photos, out, model, env, log):
    cmd = [sys.executable, "-m", "a2k", "classify", str(photos), str(out), "--model", str(model), "--device", "cpu",
           "--shard-size", "3", "--batch-size", "3"]
    # a session of its own, as a shell's job: its process group is what a terminal's Ctrl-C reaches
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _flow_run_states(env) -> list[str]:
    """The flow runs' states in the child's database, read through Prefect's client in a process of its own
    (Prefect's temporary server on the child's PREFECT_HOME)."""
    code = ("import json\nfrom prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    print(json.dumps([r.state.type.value for r in c.read_flow_runs()]))")
    env = {**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240"}  # a busy machine's start
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _still_running(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(p.cmdline())[:120])
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM to the process"])
def test_a_signal_ends_the_run_crashed_with_nothing_left_and_a_rerun_finishes_it_once(
        how, many_photos, seed_model_dir, tmp_path):
    out = tmp_path / "out"
    home = tmp_path / "prefect-home"  # the child's server and database alone, so its flow runs are this test's
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PREFECT_HOME": str(home)}
    first_log = tmp_path / "first.log"
    proc = _classify(many_photos, out, seed_model_dir, env, first_log)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("part-*.parquet")):
        assert proc.poll() is None, first_log.read_text()[-2000:]
        time.sleep(0.01)
    started = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(p.cmdline()) for p in started), "the child should run its temporary server"
    assert any("forkserver" in " ".join(p.cmdline()) for p in started), "the child should run reader processes"
    if how == "SIGINT to the group":
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        code, name = 130, "SIGINT"
    else:
        proc.send_signal(signal.SIGTERM)
        code, name = 143, "SIGTERM"
    try:
        rc = proc.wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"a2k did not exit within {EXIT_BOUND_S} s of {name}: {first_log.read_text()[-2000:]}")
    text = first_log.read_text()
    assert rc == code, text[-2000:]
    said = [line for line in text.splitlines() if line.startswith("a2k: ")]
    assert len(said) == 1 and said[0].startswith(f"a2k: interrupted by {name}"), said
    assert "the parts already written are kept: run the same command again" in said[0]
    assert "Traceback" not in text, text[-3000:]
    deadline = time.time() + EXIT_BOUND_S
    while _still_running(started) and time.time() < deadline:
        time.sleep(0.1)
    assert not _still_running(started), "left running after a2k's exit"
    committed = len(list(out.glob("part-*.parquet")))
    assert 1 <= committed < N_IMAGES // 3, "the signal should land mid-run"

    assert _flow_run_states(env) == ["CRASHED"]

    second_log = tmp_path / "second.log"
    again = _classify(many_photos, out, seed_model_dir, env, second_log)
    assert again.wait(timeout=300) == 0, second_log.read_text()[-3000:]
    marker = json.loads((out / "_a2k_run.json").read_text())
    assert marker["listed"] == marker["predicted"] == N_IMAGES and marker["errors"] == 0
    assert marker["processed_this_run"] == N_IMAGES - 3 * marker["resumed_shards"]
    df = pd.read_parquet(out)
    assert len(df) == N_IMAGES and df["image_uri"].is_unique
    assert sorted(df["image_uri"]) == sorted(str(p) for p in many_photos.rglob("*.JPEG"))
    assert sorted(_flow_run_states(env)) == ["COMPLETED", "CRASHED"]
