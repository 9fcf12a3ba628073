"""Prefect's temporary local server, started by a fresh `a2k` process at its first moment.

Without a configured server Prefect starts a temporary one on the flow's first API call: after the flow's imports,
and after importing its own server code into the caller (several seconds), and then it waits for it. A fresh CLI
process instead starts the same server (the same uvicorn command and environment Prefect uses) as soon as its
arguments are checked, so it comes up while torch, DALI, the model and the decoder load, and points Prefect at it
with PREFECT_API_URL before Prefect is imported. At exit it is stopped without waiting for it (the run's data is
committed before).

The server runs in a session of its own, so that a Ctrl-C to the terminal's process group reaches a2k alone: a2k
marks its flow run on the server, then stops it (a2k.signals). It is told to end when a2k ends, however a2k ends
(Linux's parent-death signal): a2k killed with SIGKILL leaves no server behind.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

_OFF = {"0", "false", "no", "off"}
_PR_SET_PDEATHSIG = 1  # prctl(2)
_RUNNING: list[TemporaryServer] = []  # the servers this process started (one at most), for stop_all


def configured_api_url() -> str | None:
    """The Prefect API this process would use without a temporary server: PREFECT_API_URL from the environment,
    the active profile (PREFECT_HOME/profiles.toml) or ./prefect.toml. Read without importing Prefect."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        profiles = {}
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    if url := profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"):
        return url
    try:
        local = tomllib.loads(Path("prefect.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        local = {}
    return local.get("api", {}).get("url")


def temporary_server_wanted() -> bool:
    """No server is configured and Prefect may start a temporary one."""
    allowed = os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").lower() not in _OFF
    return allowed and configured_api_url() is None


class TemporaryServer:
    """The uvicorn process serving Prefect's API on a free local port, as Prefect's own temporary server runs."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent  # found, not imported
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"},
            start_new_session=True, preexec_fn=_end_with_parent if sys.platform == "linux" else None,
        )
        _RUNNING.append(self)
        os.environ["PREFECT_API_URL"] = self.api_url  # before Prefect reads its settings
        atexit.register(self.stop)

    def wait_ready(self, timeout: float) -> float:
        """Block until the API answers /health; the seconds waited here. Raises RuntimeError on a dead server or
        after `timeout` seconds from its start."""
        t0 = time.perf_counter()
        while time.perf_counter() - self.started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {self.process.returncode} "
                                   "before it answered")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"Prefect's temporary server did not answer within {timeout:.0f} s")

    def stop(self, wait: float = 0.0) -> None:
        """Ask the server to stop (SIGTERM). With `wait`, give it that many seconds, then kill it: a process about
        to end at once (a2k.signals) must not leave it behind; otherwise go on, it ends by itself."""
        if self.process.poll() is None:
            self.process.terminate()
            if wait:
                try:
                    self.process.wait(wait)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(wait)


def stop_all(wait: float) -> None:
    """Stop the temporary servers this process started, each within about 2 x `wait` seconds."""
    for server in _RUNNING:
        server.stop(wait)


def _end_with_parent() -> None:
    """In the server's process before it runs: SIGTERM when its parent (a2k) ends, however it ends."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
