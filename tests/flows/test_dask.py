"""The shard tasks on a Dask cluster (prefect-dask): the same rows as in-process, each image exactly once."""

import logging
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


def test_a_two_worker_dask_cluster_writes_the_same_rows_as_the_in_process_run(twelve_photos, seed_model_dir, tmp_path,
                                                                              caplog):
    common = {"input": str(twelve_photos), "model": str(seed_model_dir), "device": "cpu", "shard_size": 3,
              "batch_size": 3, "top_k": 2}
    local = classify_images(output=str(tmp_path / "local"), **common)
    with caplog.at_level(logging.WARNING, logger="distributed.nanny"):
        dask = classify_images(output=str(tmp_path / "dask"), task_runner="dask", dask_workers=2, **common)
    # the workers end when the cluster closes; one that has to be killed (its reader processes kept it waiting)
    # makes the close time out on a GPU worker, whose kill takes longer, and the flow run fails
    assert not [r.getMessage() for r in caplog.records if "still alive" in r.getMessage()]

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
    import os
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
