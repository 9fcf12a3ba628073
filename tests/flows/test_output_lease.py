"""One writer per output: a run into an output another live run holds is refused before it writes anything; a
stale lease is taken over; two real `a2k classify` processes into one output leave exactly the winner's images."""

import hashlib
import os
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pyarrow.dataset as ds
import pytest

from a2k.cli import main
from flows.classify_images import classify_images
from tasks.classify.lease import OutputBusy, read_lease
from tasks.classify.output import Output
from tests.conftest import photo_paths
from tests.tasks.classify.test_lease import _held_by  # a lease another run left on an output


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> Output:
    if request.param == "local":
        return Output(str(tmp_path / "out"))
    return Output(f"s3://{request.getfixturevalue('s3_bucket')}/out")


def _run(photos, out: Output, model, **kw):
    return classify_images(input=str(photos), output=out.url, model=str(model), device="cpu", shard_size=4,
                           batch_size=4, **kw)


def _files(out: Output) -> dict[str, str]:
    """Every object under the output, with a digest of its bytes."""
    out.fs.invalidate_cache()
    return {p: hashlib.sha256(out.fs.cat_file(p)).hexdigest() for p in out.fs.find(out.root)}


def _uris(out: Output) -> list[str]:
    out.fs.invalidate_cache()
    preds = ds.dataset(out.root, filesystem=out.fs, format="parquet").to_table(columns=["image_uri"])
    return sorted(preds.column("image_uri").to_pylist())


def test_a_run_into_an_output_a_live_run_holds_is_refused_and_writes_nothing(out, photos_dir, seed_model_dir,
                                                                             tmp_path, capsys):
    _run(photos_dir, out, seed_model_dir)
    holder = _held_by(out, host=socket.gethostname(), pid=os.getpid(), expires_in=120)  # this live process
    before = _files(out)
    line = (f"output {out.url!r} is being written by another a2k run ({holder.describe()}); wait for it or give "
            "another output")
    for photos in (photos_dir, tmp_path / "other"):  # the holder's own input or another one: refused alike
        photos.mkdir(exist_ok=True)
        shutil.copy(photo_paths(10)[9], photos / "new.JPEG")  # a new image either way: a run would write
        with pytest.raises(OutputBusy) as e:
            _run(photos, out, seed_model_dir)
        assert str(e.value) == line
        assert _files(out) == before
    capsys.readouterr()
    code = main(["classify", str(photos_dir), out.url, "--model", str(seed_model_dir), "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == f"a2k: error: {line}"
    assert _files(out) == before


def test_a_stale_lease_is_taken_over_and_the_run_completes_once(out, photos_dir, seed_model_dir, caplog):
    _held_by(out, host="a-gone-machine", pid=4242, expires_in=-30)
    with caplog.at_level("WARNING"):
        summary = _run(photos_dir, out, seed_model_dir)
    assert "took over the stale lease of flow run other-run, pid 4242 on host a-gone-machine" in caplog.text
    assert summary["listed"] == summary["predicted"] == summary["processed_this_run"] == 9
    assert _uris(out) == sorted(str(p) for p in photos_dir.rglob("*.JPEG"))
    assert read_lease(out) is None  # released when the run ended


def test_the_lease_is_released_when_a_run_fails(photos_dir, seed_model_dir, tmp_path):
    out = Output(str(tmp_path / "out"))
    _run(photos_dir, out, seed_model_dir)
    with pytest.raises(ValueError, match="from another input"):
        _run(tmp_path, out, seed_model_dir)  # refused by the plan, after the lease was taken
    assert read_lease(out) is None
    _run(photos_dir, out, seed_model_dir)  # the output is free again


def _photos(root, first: int, n: int):
    for i, src in enumerate(photo_paths(first + n)[first:]):
        dest = root / f"class{i % 2}" / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    return root


@pytest.mark.parametrize("inputs", ["different", "same"])
def test_two_concurrent_processes_into_one_output_exactly_one_wins(tmp_path, seed_model_dir, inputs):
    """The issue's repro: before the lease both exited 0 and the output mixed their images under one plan (with
    one input, the loser died with a traceback: "part ... holds 0 predictions ... should hold 3")."""
    # a run of 240 one-image shards holds the lease for many seconds: longer than the spread of the two processes'
    # start-up (imports, each its own temporary server), so they overlap however busy the machine is
    a = _photos(tmp_path / "a", 0, 240)
    inputs = [a, _photos(tmp_path / "b", 240, 240) if inputs == "different" else a]
    out = tmp_path / "out"
    # each starts its own server, on a Prefect home of its own: two servers creating one new database at once race
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    procs = [subprocess.Popen([sys.executable, "-m", "a2k", "classify", str(src), str(out), "--model",
                               str(seed_model_dir), "--device", "cpu", "--shard-size", "1", "--batch-size", "1"],
                              env={**env, "PREFECT_HOME": str(tmp_path / f"prefect-{i}")}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i, src in enumerate(inputs)]
    results = [p.communicate(timeout=500) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], results
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    error = [x for x in results[loser][1].splitlines() if x.startswith("a2k: error: ")]
    assert len(error) == 1, results[loser][1][-3000:]
    assert error[0].startswith(f"a2k: error: output {str(out)!r} is being written by another a2k run (flow run ")
    assert error[0].endswith("; wait for it or give another output")
    assert f"input {str(inputs[winner])!r}" in error[0]
    df = pd.read_parquet(out)
    assert df["image_uri"].is_unique
    assert sorted(df["image_uri"]) == sorted(str(p) for p in inputs[winner].rglob("*.JPEG"))
    assert not (out / "_a2k" / "lease.json").exists()
