"""Seconds since this process was exec'd: the CLI's start-up line and the benchmarks' fresh-process rows."""

import os
import time

_LOADED = time.perf_counter()


def _age_at_load() -> tuple[float, str]:
    """Seconds the process had run when this module loaded, and which clock says so: its start time in
    /proc/self/stat (field 22, clock ticks after boot) against /proc/uptime (Linux; 10 ms steps)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started - (time.perf_counter() - _LOADED)), "process start, /proc/self/stat"
    except (OSError, ValueError, IndexError):
        return 0.0, "the clock module's load, no /proc/self/stat"


AGE_AT_LOAD, CLOCK = _age_at_load()


def process_age() -> float:
    """Seconds since the process began (since this module loaded where /proc cannot say: see CLOCK)."""
    return AGE_AT_LOAD + time.perf_counter() - _LOADED
