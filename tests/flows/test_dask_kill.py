"""A long-lived Dask cluster started from Dask's command line, one of its two workers SIGKILLed mid-run, the run
repeated on the survivor: each listed image exactly once in the output (issue #22, its CPU part)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.classify_images import classify_images
from tasks.classify.output import is_temporary
from tests.conftest import many_photos_in

N_IMAGES = 90  # 30 shards of 3
KILL_AFTER_PARTS = 10  # a third of the shards committed: mid-run however the two workers' start-ups spread
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def many_photos(tmp_path):
    return many_photos_in(tmp_path / "many", N_IMAGES, 9)


def _dask(*args, log, env) -> subprocess.Popen:
    """`dask ...` of this environment, in a session of its own: a worker's nanny, its worker process and the worker's
    reader processes share one process group, killed together."""
    dask_cli = Path(sys.executable).with_name("dask")
    return subprocess.Popen([str(dask_cli), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture
def cli_cluster(tmp_path, request):
    """`dask scheduler` and two `dask worker` processes (one thread each, named a and b), as an operator starts
    them; yields the scheduler's address, a client and the processes by name. `request.param`: the scheduler's
    `distributed.scheduler.allowed-failures` (how many workers may die running one task before it fails)."""
    from distributed import Client

    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(request.param),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    scheduler_file = tmp_path / "scheduler.json"
    logs = {name: open(tmp_path / f"dask-{name}.log", "w") for name in ("scheduler", "a", "b")}
    procs = {"scheduler": _dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                "--scheduler-file", str(scheduler_file), log=logs["scheduler"], env=env)}
    try:
        deadline = time.time() + 300
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert time.time() < deadline and procs["scheduler"].poll() is None, \
                (tmp_path / "dask-scheduler.log").read_text()
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for name in ("a", "b"):
            procs[name] = _dask("worker", address, "--nworkers", "1", "--nthreads", "1", "--name", name,
                                "--no-dashboard", log=logs[name], env=env)
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=300)
            yield address, client, procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs.values():
            f.close()


def _stamp(path: Path) -> tuple[int, int]:
    """A file's inode and modification time: a part written anew (removed, then renamed into place) changes its
    time; the inode alone may not change (a freed inode is reused at once)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _kill_mid_shard(out: Path, victim: subprocess.Popen, client, seen: dict,
                    run_ended: threading.Event) -> threading.Thread:
    """SIGKILL `victim` (worker a) once KILL_AFTER_PARTS parts are in `out` and a holds finished shards' results
    and runs another (never, if the run ends first); `seen` records the parts then (name: _stamp) and what a held
    and ran."""
    address = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "a")

    def on_a(dask_scheduler):  # run on the scheduler (pickled by value: the scheduler cannot import the tests)
        ws = dask_scheduler.workers.get(address)
        return (len(ws.has_what), len(ws.processing)) if ws is not None else (0, 0)

    def watch():
        while not run_ended.is_set():
            if len(list(out.glob("part-*.parquet"))) >= KILL_AFTER_PARTS:
                held, running = client.run_on_scheduler(on_a)
                if held and running:
                    break
            time.sleep(0.05)
        else:
            return
        seen["parts"] = {p.name: _stamp(p) for p in out.glob("part-*.parquet")}
        seen["held_running"] = client.run_on_scheduler(on_a)
        os.killpg(victim.pid, signal.SIGKILL)  # the nanny, its worker and the worker's reader processes
        victim.wait()
        seen["killed"] = True

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("cli_cluster", [3, 0], indirect=True, ids=["rescheduled", "killed-worker-error"])
def test_a_worker_killed_mid_run_then_the_run_repeated_leaves_each_image_exactly_once(many_photos, seed_model_dir,
                                                                                      tmp_path, cli_cluster):
    """Dask's default (allowed-failures 3): the shards a was running go to b and the run commits. With 0 they fail
    with KilledWorker (the shard task's own retries never see it: it is raised to the flow, not in the task), the
    other shards go on, the run fails committing nothing, and the repeated run redoes only those shards. Either way
    the shards a had finished are not redone: Dask reruns them (the flow holds their futures, whose results died
    with a) and the task reads their committed parts back instead of rewriting them."""
    address, client, procs = cli_cluster
    out = tmp_path / "out"
    common = {"input": str(many_photos), "output": str(out), "model": str(seed_model_dir), "device": "cpu",
              "shard_size": 3, "batch_size": 3, "top_k": 2, "task_runner": "dask", "dask_address": address}
    seen: dict = {}
    run_ended = threading.Event()
    watcher = _kill_mid_shard(out, procs["a"], client, seen, run_ended)
    try:
        first = classify_images(**common)
    except Exception as e:  # what a lost worker does to the run is checked below, then the run is repeated
        first = e
    run_ended.set()
    watcher.join(timeout=300)
    assert seen.get("killed"), f"worker a was never killed: the run ended first ({first!r})"
    assert KILL_AFTER_PARTS <= len(seen["parts"]) < N_IMAGES // 3, "the kill should land mid-run"
    print("parts at the kill:", len(seen["parts"]), "; shard results held and shards running on a:",
          seen["held_running"], "; the first run:", repr(first) if isinstance(first, Exception) else
          {k: first[k] for k in ("listed", "predicted", "errors", "processed_this_run")})
    assert len(client.scheduler_info()["workers"]) == 1  # the scheduler saw worker a go; b is left
    if isinstance(first, Exception):
        assert "KilledWorker" in type(first).__name__, repr(first)
        assert not (out / "_a2k_run.json").exists()  # a run that fails commits nothing
    else:
        assert (first["listed"], first["predicted"], first["errors"]) == (N_IMAGES, N_IMAGES, 0)
        assert first["processed_this_run"] == N_IMAGES
        assert sorted(p.name for p in out.glob("part-*.parquet")) == first["parts"]

    again = classify_images(**common)  # on the surviving worker alone
    marker = json.loads((out / "_a2k_run.json").read_text())
    assert marker["listed"] == N_IMAGES == marker["predicted"] + marker["errors"] and marker["errors"] == 0
    assert (again["listed"], again["predicted"], again["errors"]) == (N_IMAGES, N_IMAGES, 0)
    if isinstance(first, Exception):  # only the shards that failed with a are redone
        assert 0 < again["processed_this_run"] == N_IMAGES - 3 * again["resumed_shards"] <= 3 * seen["held_running"][1]
    else:
        assert again["processed_this_run"] == 0
    df = pd.read_parquet(out)
    assert len(df) == N_IMAGES and df["image_uri"].is_unique
    assert sorted(df["image_uri"]) == sorted(str(p) for p in many_photos.rglob("*.JPEG"))
    on_disk = {p.name: _stamp(p) for p in out.glob("part-*.parquet")}
    assert sorted(on_disk) == sorted(marker["parts"]), "every committed part is the marker's, and only those"
    rewritten = sorted(n for n, ino in seen["parts"].items() if on_disk.get(n) != ino)
    assert not rewritten, f"{len(rewritten)} part(s) committed before the kill were written again: {rewritten[:3]}"
    assert not [p for p in out.rglob("*") if is_temporary(p.name)], "half-written parts of the killed worker cleared"
