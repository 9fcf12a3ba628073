"""The shard tasks on a Dask cluster (prefect-dask): the same rows as in-process, each image exactly once."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.classify_images import classify_images
from tests.conftest import photo_paths


@pytest.fixture
def twelve_photos(tmp_path):
    root = tmp_path / "photos"
    for i, src in enumerate(photo_paths(12)):
        dest = root / ("birds" if i % 2 else "fish") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
    return root


def _rows(out) -> pd.DataFrame:
    return pd.read_parquet(out, columns=["image_uri", "label", "score"]).sort_values("image_uri").reset_index(drop=True)


def test_a_two_worker_dask_cluster_writes_the_same_rows_as_the_in_process_run(twelve_photos, seed_model_dir, tmp_path):
    common = {"input": str(twelve_photos), "model": str(seed_model_dir), "device": "cpu", "shard_size": 3,
              "batch_size": 3, "top_k": 2}
    local = classify_images(output=str(tmp_path / "local"), **common)
    dask = classify_images(output=str(tmp_path / "dask"), task_runner="dask", dask_workers=2, **common)
    # This test once also asserted that no worker was killed on close ("Worker process still alive after 4.0
    # seconds, killing"), for reader processes that kept a worker's exit waiting; it failed on a busy 2-core machine
    # with no reader left: the nanny gives a worker's close and its exit 4 s (0.8 of Nanny.close's fixed 5 s), and
    # stacks dumped in the worker's exit showed Prefect's at-exit drain (the task runs' logs and events sent to the
    # API server, as slow as the busy server) and DALI's unload taking that long, the readers long stopped. The
    # readers' part is now checked without Dask's clock: test_a_process_with_reader_processes_exits_by_itself.

    assert dask["task_runner"] == "dask" and local["task_runner"] == "local"
    assert (dask["listed"], dask["predicted"], dask["errors"], dask["processed_this_run"]) == (12, 12, 0, 12)
    assert dask["parts"] == local["parts"]  # same shards, same deterministic part names
    # the cluster's workers are not daemonic, so they read local files in processes of their own, as in-process runs do
    assert dask["reading"] == local["reading"] and all("reader process" in r for r in dask["reading"]), dask["reading"]
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "dask")
    assert b["image_uri"].is_unique and sorted(b["image_uri"]) == sorted(str(p) for p in twelve_photos.rglob("*.JPEG"))
    assert list(a["image_uri"]) == list(b["image_uri"]) and list(a["label"]) == list(b["label"])
    assert (a["score"] - b["score"]).abs().max() <= 1e-6


def test_a_dask_address_with_a_local_cluster_size_is_refused_before_any_work(photos_dir, seed_model_dir, tmp_path):
    with pytest.raises(ValueError, match="dask_workers 2 starts a local cluster; with dask_address 'tcp://127.0.0.1:"):
        classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model=str(seed_model_dir), device="cpu",
                        task_runner="dask", dask_address="tcp://127.0.0.1:1", dask_workers=2)
    with pytest.raises(ValueError, match="need task_runner 'dask'"):
        classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model=str(seed_model_dir), device="cpu",
                        dask_workers=2)
    assert not list((tmp_path / "out").glob("**/*.parquet"))


@pytest.fixture
def long_lived_cluster(tmp_path):
    """A scheduler and two workers started from Dask's command line, as an operator runs them, outliving the flow
    runs; the workers not daemonic (`DASK_DISTRIBUTED__WORKER__DAEMON=False`), so a2k may start reader processes."""
    import socket
    import subprocess
    import sys

    from distributed import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    logs = open(tmp_path / "dask.log", "w")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], env=env, stdout=logs, stderr=logs)]
    procs += [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                "--nworkers", "2", "--no-dashboard"], env=env, stdout=logs, stderr=logs)]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            yield address, client
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


def test_a_long_lived_cluster_serves_two_runs_and_its_workers_keep_the_model(twelve_photos, seed_model_dir, tmp_path,
                                                                           long_lived_cluster):
    address, client = long_lived_cluster
    common = {"input": str(twelve_photos), "model": str(seed_model_dir), "device": "cpu", "shard_size": 3,
              "batch_size": 3, "top_k": 2, "task_runner": "dask", "dask_address": address}
    local = classify_images(output=str(tmp_path / "local"), **{**common, "task_runner": "local", "dask_address": None})
    want = list(_rows(tmp_path / "local")["image_uri"])
    for i in (1, 2):
        run = classify_images(output=str(tmp_path / f"run{i}"), **common)
        assert (run["listed"], run["predicted"], run["errors"]) == (12, 12, 0) and run["parts"] == local["parts"]
        assert all("reader process" in r for r in run["reading"]), run["reading"]
        assert list(_rows(tmp_path / f"run{i}")["image_uri"]) == want
    # the workers outlived the first run: each built its ShardClassifier (model, DALI pipeline, readers) at most
    # once, whichever runs' shards it served
    built = client.run(lambda: __import__("tasks.classify.shard").classify.shard._cached_shard_classifier.cache_info().misses)
    assert len(built) == 2 and max(built.values()) == 1, built


CHILD = """
import multiprocessing, sys, time
from tasks.images.read_procs import ProcessReaders

def serve(photo):  # a Dask worker's part: readers built for a shard, kept (cached) until the process ends
    global READERS
    READERS = ProcessReaders(2, 2, 1 << 22)
    assert len(READERS.load([photo], 0)) == 1

if __name__ == "__main__":
    worker = multiprocessing.get_context("spawn").Process(target=serve, args=(sys.argv[1],))  # as a nanny starts one
    worker.start()
    t0 = time.time()
    worker.join(float(sys.argv[2]))
    print("exit code", worker.exitcode, "after", round(time.time() - t0, 1), "s")
    if worker.exitcode is None:
        worker.kill()
"""


def test_a_process_with_reader_processes_exits_by_itself(tmp_path):
    """A non-daemonic process ending through multiprocessing (a Dask worker, spawned by its nanny) joins its children
    before the interpreter's exit handlers run: reader processes nobody told to stop kept such a worker alive until
    Dask killed it (tasks.images.read_procs stops them in a multiprocessing finalizer that runs first). No time limit
    that load could break: the wait is unbounded when the readers are not stopped."""
    script = tmp_path / "worker.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    out = subprocess.run([sys.executable, str(script), str(photo_paths(1)[0]), "240"], capture_output=True, text=True,
                         env=env, timeout=400)
    assert out.returncode == 0 and "exit code 0 " in out.stdout, (out.stdout, out.stderr[-2000:], time.time() - t0)
