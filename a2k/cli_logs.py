"""Prefect's console log handlers seen from the CLI: a refusal found inside a run (a bad value only the run can
check) is logged there without its traceback, as the CLI prints it in one line; `--debug` keeps the traceback."""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any


def prefect_consoles() -> list[Any]:
    """Prefect's console log handlers (each prints through a rich Console of its own)."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if type(h).__name__ == "PrefectConsoleHandler"]


def is_refusal(e: BaseException) -> bool:
    """A bad argument or a refused request (printed as one line), not a failure of a2k's."""
    if isinstance(e, (ValueError, FileNotFoundError, FileExistsError)):  # pydantic's ValidationError included
        return True
    if getattr(e, "said_in_one_line", False):  # a full disk, an unreachable S3 endpoint (a2k.quiet)
        return True
    exceptions = sys.modules.get("prefect.exceptions")
    return exceptions is not None and isinstance(e, exceptions.ParameterTypeError)


def quiet_refusals(debug: bool) -> None:
    """From now on (Prefect loaded), Prefect's console prints a refusal's log records without the traceback."""
    if debug:
        return
    for handler in prefect_consoles():
        if getattr(handler, "_a2k_quiet", False):
            continue
        original = handler.format

        def format(record: logging.LogRecord, original=original) -> str:
            if record.exc_info and record.exc_info[1] is not None and is_refusal(record.exc_info[1]):
                record = copy.copy(record)  # the API's handler still gets the traceback
                record.exc_info, record.exc_text = None, None
            return original(record)

        handler.format = format
        handler._a2k_quiet = True
