"""Ctrl-C and SIGTERM for the `a2k` process: out within seconds, the flow run marked, nothing left running.

The first SIGINT or SIGTERM raises `Interrupted` in the main thread: Prefect's engine marks the flow run Crashed
(its server, started by a2k.server in a session of its own, is still up to hear it) and the CLI ends the process
(`exit_interrupted`: the temporary server stopped, reader processes gone with their owner). A watchdog makes sure
of it: if the process has not ended GRACE_S seconds after the signal (a shard still running, a flush to a server
that does not answer), it marks the flow run Crashed itself and ends the process. A second signal ends it at once.
Parts already committed stay: running the same command again finishes the rest, each image exactly once.
"""

from __future__ import annotations

import multiprocessing.util
import os
import signal
import sys
import threading
from typing import Any

GRACE_S = 3.0  # from the signal to a forced exit; the bound is 5 s
SERVER_STOP_S = 1.0  # how long the exit waits for the temporary server to stop before killing it
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT or SIGTERM (a KeyboardInterrupt: Prefect marks the run
    Crashed, and no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _Stopping:
    """What the first signal saw; one per process (install())."""

    def __init__(self) -> None:
        self.signal: Interrupted | None = None
        self.flow_run_id: Any = None
        self.said = False
        self.lock = threading.Lock()


_STATE = _Stopping()


def install() -> None:
    """Handle SIGINT and SIGTERM from now on, in a fresh process's main thread; a caller that imported Prefect
    already (a test, a notebook) or runs a2k in another thread keeps its own handlers."""
    if "prefect" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    for s in _SIGNALS:
        signal.signal(s, _handle)


def _handle(signum: int, frame: Any) -> None:
    with _STATE.lock:
        first = _STATE.signal is None
        if first:
            _STATE.signal = Interrupted(signum)
            _STATE.flow_run_id = _current_flow_run_id()
    if not first:  # a second Ctrl-C: the user does not want to wait
        _force_exit(Interrupted(signum))
    threading.Thread(target=_watchdog, name="a2k-stop-watchdog", daemon=True).start()
    raise _STATE.signal


def _current_flow_run_id() -> Any:
    """The flow run the main thread is in (a signal handler runs there), or None outside a flow."""
    context = sys.modules.get("prefect.context")
    if context is None:
        return None
    run_context = context.FlowRunContext.get()
    return run_context.flow_run.id if run_context is not None and run_context.flow_run is not None else None


def _watchdog() -> None:
    threading.Event().wait(GRACE_S)
    stop = _STATE.signal
    _mark_crashed(_STATE.flow_run_id, stop)
    _say(stop, f" (the run did not end within {GRACE_S:.0f} s: stopped)")
    _force_exit(stop)


def _mark_crashed(flow_run_id: Any, stop: Interrupted) -> None:
    """Mark the flow run Crashed unless it has a final state already (the engine's own handling got there)."""
    if flow_run_id is None:
        return
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            if not client.read_flow_run(flow_run_id).state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=f"a2k was stopped by {stop.name}"),
                                          force=True)
    except Exception as e:  # noqa: BLE001 - the exit goes on; the run is left as the server has it
        print(f"a2k: could not mark flow run {flow_run_id} crashed: {e}", file=sys.stderr)


def exit_interrupted(stop: Interrupted) -> None:
    """Say how the run was stopped and what to do, then end the process (never returns)."""
    _say(stop)
    # multiprocessing's finalizers, as at a normal exit: the reader pool shut down, its semaphores released (or
    # the resource tracker warns of leaked ones); a reader that does not stop in time is left to the watchdog
    multiprocessing.util._run_finalizers(0)
    _force_exit(stop)


def _say(stop: Interrupted, how: str = "") -> None:
    with _STATE.lock:  # once: the main thread and the watchdog may both get here
        if _STATE.said:
            return
        _STATE.said = True
    print(f"a2k: interrupted by {stop.name}{how}; the parts already written are kept: run the same command again to "
          "finish the rest", file=sys.stderr)


def _force_exit(stop: Interrupted) -> None:
    """Stop the temporary server, then end the process without waiting on anything else: reader processes exit
    when their owner does (tasks.images.read_procs), and every committed file is whole already."""
    from a2k.server import stop_all

    sys.stdout.flush()
    sys.stderr.flush()
    stop_all(SERVER_STOP_S)
    os._exit(stop.exit_code)
