"""One writer per output: a lease object (`_a2k/lease.json`) created exclusively, renewed while the run lives,
removed when it ends; a lease past its expiry, or held by a dead process of this host, may be taken over.

Works wherever `tasks.storage.create_exclusive` does (a local folder: a hard link; S3: a conditional PUT), so
two runs on two machines writing one S3 prefix are kept apart as well as two on one machine.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

from tasks.classify.output import Output
from tasks.storage import create_exclusive, dumps, write_atomic

log = logging.getLogger(__name__)

LEASE_TTL_S = 150.0  # a lease not renewed for this long belongs to a run that is gone
RENEW_EVERY_S = 30.0


class OutputBusy(FileExistsError):
    """The output's lease is held by another live run (a refusal: the CLI prints it as one line)."""


@dataclass(frozen=True)
class LeaseOwner:
    """Who holds an output's lease, and until when (times in UTC, ISO 8601)."""

    host: str
    pid: int
    flow_run_id: str
    input: str
    since: str
    expires: str
    token: str  # unique per acquisition: says whose the lease file is, when it is renewed or removed

    def describe(self) -> str:
        return (f"flow run {self.flow_run_id}, pid {self.pid} on host {self.host}, input {self.input!r}, "
                f"since {self.since}")

    def is_stale(self, now: datetime) -> bool:
        """Past its expiry, or its process is gone (checked only on the host it ran on: a pid means nothing
        elsewhere)."""
        return datetime.fromisoformat(self.expires) <= now or (self.host == socket.gethostname()
                                                                and not _alive(self.pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _now() -> datetime:
    return datetime.now(timezone.utc)


def read_lease(out: Output) -> LeaseOwner | None:
    """The lease now on `out`, or None."""
    return _read_owner(out, out.lease)


def _read_owner(out: Output, path: str) -> LeaseOwner | None:
    out.fs.invalidate_cache(path)
    try:
        data = out.fs.cat_file(path)
    except FileNotFoundError:
        return None
    return LeaseOwner(**json.loads(data))


class Lease:
    """An output's lease, held: a daemon thread renews it every `renew_every` seconds; `release` stops it and
    removes the lease. If another run took it over meanwhile (this process stalled past the expiry), `check`
    raises, so the run commits nothing."""

    def __init__(self, out: Output, owner: LeaseOwner, ttl: float, renew_every: float) -> None:
        self.out, self.owner, self.ttl = out, owner, ttl
        self.lost: str | None = None  # who holds it now, once another run took it over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, args=(renew_every,), name="a2k-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.renew()
            except OSError as e:  # a store that failed this time: the next renewal tries again before the expiry
                log.warning("could not renew the lease on %s: %s; trying again in %.0f s", self.out.url, e, every)
            if self.lost:
                return

    def renew(self) -> None:
        current = read_lease(self.out)
        if current is None or current.token != self.owner.token:
            self.lost = current.describe() if current else "nobody (it was removed)"
            log.error("the lease on %s was taken over by %s; this run will commit nothing", self.out.url, self.lost)
            return
        self.owner = _with_expiry(self.owner, self.ttl)
        write_atomic(self.out.fs, self.out.lease, dumps(asdict(self.owner)))

    def check(self) -> None:
        if self.lost is not None:
            raise RuntimeError(f"output {self.out.url!r}: this run's lease was lost to {self.lost} "
                               "(this run stalled past its expiry); nothing committed")

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours. Called in a `finally`: a store that fails now is
        logged, not raised over the run's own outcome; the lease then expires by itself."""
        self._stop.set()
        self._thread.join()
        try:
            current = read_lease(self.out)
            if current is not None and current.token == self.owner.token:
                self.out.fs.rm(self.out.lease)
        except OSError as e:
            log.warning("could not remove the lease on %s: %s; it expires at %s", self.out.url, e, self.owner.expires)


def _with_expiry(owner: LeaseOwner, ttl: float) -> LeaseOwner:
    return LeaseOwner(**{**asdict(owner), "expires": (_now() + timedelta(seconds=ttl)).isoformat()})


def acquire_lease(out: Output, flow_run_id: str, input: str, ttl: float = LEASE_TTL_S,
                  renew_every: float = RENEW_EVERY_S) -> tuple[Lease, LeaseOwner | None]:
    """Take `out`'s lease, or raise `OutputBusy` naming the run that holds it. Returns the lease and the stale
    lease taken over (None when the output was free)."""
    now = _now()
    owner = LeaseOwner(socket.gethostname(), os.getpid(), flow_run_id, input, now.isoformat(),
                       (now + timedelta(seconds=ttl)).isoformat(), uuid.uuid4().hex)
    data = dumps(asdict(owner))
    if create_exclusive(out.fs, out.lease, data):
        return Lease(out, owner, ttl, renew_every), None
    current = read_lease(out)
    if current is None:  # released between our try and our read: one more try, then it is someone's
        if create_exclusive(out.fs, out.lease, data):
            return Lease(out, owner, ttl, renew_every), None
        current = read_lease(out)
    if current is None or not current.is_stale(_now()):
        raise _busy(out, current)
    _replace_stale(out, out.lease, current, data)
    return Lease(out, owner, ttl, renew_every), current


def _replace_stale(out: Output, path: str, stale: LeaseOwner, data: bytes) -> None:
    """Replace `path` (the lease, or a claim on it), which holds `stale`, with ours. Takers first create a claim
    named after the stale token, which only one of them can: two takers of one lease never both win, and a late one
    finds a newer token and stops. A claim left by a taker that died is stale in its turn, and replaced the same way."""
    claim = f"{path}.takeover-{stale.token}"
    if not create_exclusive(out.fs, claim, data):
        other = _read_owner(out, claim)
        if other is None or not other.is_stale(_now()):
            raise _busy(out, read_lease(out))
        _replace_stale(out, claim, other, data)  # the claim is ours now
    try:
        current = _read_owner(out, path)
        if current is not None and (current.token != stale.token or not current.is_stale(_now())):
            raise _busy(out, read_lease(out))  # renewed by a run that was slow, not gone, or already replaced
        if current is not None:
            out.fs.rm(path)
        if not create_exclusive(out.fs, path, data):  # a fresh run found nothing there and took it meanwhile
            raise _busy(out, read_lease(out))
    finally:
        out.fs.rm(claim)


def _busy(out: Output, holder: LeaseOwner | None) -> OutputBusy:
    who = "a run taking over a stale lease" if holder is None or holder.is_stale(_now()) else holder.describe()
    return OutputBusy(f"output {out.url!r} is being written by another a2k run ({who}); wait for it or give "
                      "another output")
