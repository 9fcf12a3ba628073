"""An output's lease, on a folder and on S3 (moto's server): one holder at a time, renewed while it lives, removed
when it ends, taken over when stale by exactly one of several takers."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from datetime import datetime, timedelta, timezone

import pytest

from tasks.classify.lease import LeaseOwner, OutputBusy, acquire_lease, read_lease
from tasks.classify.output import Output
from tasks.storage import dumps, listdir_names, write_atomic


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> Output:
    if request.param == "local":
        return Output(str(tmp_path / "out"))
    return Output(f"s3://{request.getfixturevalue('s3_bucket')}/out")


def _held_by(out: Output, *, host: str, pid: int, expires_in: float) -> LeaseOwner:
    """A lease another run left on `out`."""
    now = datetime.now(timezone.utc)
    owner = LeaseOwner(host, pid, "other-run", "/data/other", now.isoformat(),
                       (now + timedelta(seconds=expires_in)).isoformat(), "t" * 32)
    write_atomic(out.fs, out.lease, dumps(asdict(owner)))
    return owner


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_holder_is_refused_naming_the_first_until_it_releases(out):
    lease, stale = acquire_lease(out, "run-a", "/data/a")
    assert stale is None
    with pytest.raises(OutputBusy) as e:
        acquire_lease(out, "run-b", "/data/b")
    assert str(e.value) == (
        f"output {out.url!r} is being written by another a2k run (flow run run-a, pid {lease.owner.pid} on host "
        f"{socket.gethostname()}, input '/data/a', since {lease.owner.since}); wait for it or give another output")
    lease.release()
    assert read_lease(out) is None
    second, _ = acquire_lease(out, "run-b", "/data/b")
    assert read_lease(out).flow_run_id == "run-b"
    second.release()
    assert listdir_names(out.fs, out.path("_a2k")) == []  # no claim or temporary left behind


def test_a_live_lease_of_another_host_is_refused_even_near_its_expiry(out):
    _held_by(out, host="elsewhere", pid=1, expires_in=5)
    with pytest.raises(OutputBusy, match="pid 1 on host elsewhere, input '/data/other'"):
        acquire_lease(out, "run-b", "/data/b")
    assert read_lease(out).flow_run_id == "other-run"


@pytest.mark.parametrize("how", ["expired", "dead process on this host"])
def test_a_stale_lease_is_taken_over_and_said(out, how):
    if how == "expired":
        old = _held_by(out, host="elsewhere", pid=1, expires_in=-1)
    else:
        old = _held_by(out, host=socket.gethostname(), pid=_dead_pid(), expires_in=600)
    lease, stale = acquire_lease(out, "run-b", "/data/b")
    assert stale == old
    assert read_lease(out).flow_run_id == "run-b"
    lease.release()
    assert listdir_names(out.fs, out.path("_a2k")) == []


def test_of_many_takers_of_one_stale_lease_exactly_one_wins(out):
    _held_by(out, host="elsewhere", pid=1, expires_in=-1)
    won, refused = [], []
    start = threading.Barrier(6)

    def take(n: int) -> None:
        start.wait()
        try:
            won.append(acquire_lease(out, f"run-{n}", f"/data/{n}")[0])
        except OutputBusy as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5, refused
    assert read_lease(out).token == won[0].owner.token
    won[0].release()


def test_a_held_lease_is_renewed_and_a_lost_one_stops_the_commit(out):
    lease, _ = acquire_lease(out, "run-a", "/data/a", ttl=60, renew_every=0.2)
    first = datetime.fromisoformat(read_lease(out).expires)
    deadline = time.monotonic() + 20
    while datetime.fromisoformat(read_lease(out).expires) <= first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert datetime.fromisoformat(read_lease(out).expires) > first
    lease.check()
    taker = replace(lease.owner, flow_run_id="run-b", token="b" * 32)  # another run took it while this one stalled
    write_atomic(out.fs, out.lease, dumps(asdict(taker)))
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(RuntimeError, match="this run's lease was lost to flow run run-b"):
        lease.check()
    lease.release()
    assert json.loads(out.fs.cat_file(out.lease))["token"] == "b" * 32  # the taker's lease is left alone


@pytest.mark.parametrize("taker", ["dead", "alive"])
def test_a_claim_left_by_a_taker_that_died_does_not_block_the_output(out, taker):
    """A taker killed between its claim and its new lease leaves the claim; that claim is stale in its turn."""
    old = _held_by(out, host="elsewhere", pid=1, expires_in=-1)
    now = datetime.now(timezone.utc)
    claimant = LeaseOwner(socket.gethostname(), _dead_pid() if taker == "dead" else os.getpid(), "taker-run",
                          "/data/t", now.isoformat(), (now + timedelta(seconds=600)).isoformat(), "c" * 32)
    write_atomic(out.fs, f"{out.lease}.takeover-{old.token}", dumps(asdict(claimant)))
    if taker == "alive":  # a live taker is under way: wait for it
        with pytest.raises(OutputBusy, match=r"another a2k run \(a run taking over a stale lease\)"):
            acquire_lease(out, "run-b", "/data/b")
        return
    lease, stale = acquire_lease(out, "run-b", "/data/b")
    assert stale == old and read_lease(out).flow_run_id == "run-b"
    lease.release()
    assert listdir_names(out.fs, out.path("_a2k")) == []
