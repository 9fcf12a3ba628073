"""Errors a2k says in one line (a full disk, an S3 endpoint that cannot be reached) keep that one line in the
log: Prefect logs a failed task or flow with its traceback, which for these says nothing the line does not.

An exception class marks itself with `said_in_one_line = True` (tasks.storage.NoSpaceLeft, EndpointUnreachable);
the CLI prints it as `a2k: error: ...` (a2k.cli_logs.is_refusal) and this drops its traceback from every log record.
"""

from __future__ import annotations

import logging
import sys
import threading


def said_in_one_line(error: BaseException | None) -> bool:
    return bool(getattr(error, "said_in_one_line", False))


def install() -> None:
    """From now on, log records of one-line errors carry no traceback; in a fresh process's main thread only (a
    caller that imported Prefect already, a test or a notebook, keeps its logging as it is)."""
    if "prefect" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    make = logging.getLogRecordFactory()

    def record(*args, **kwargs) -> logging.LogRecord:
        r = make(*args, **kwargs)
        if r.exc_info and said_in_one_line(r.exc_info[1]):
            r.exc_info, r.exc_text = None, None
        return r

    logging.setLogRecordFactory(record)
