"""How far a long step is (images done of N), told to whoever shows it: the CLI's terminal display when there is one,
nobody otherwise. The view travels in a context variable, so the flow's tasks (run in threads of a copied context)
reach the view of the command that started the flow, and a flow run elsewhere (a worker, a deployment) reaches none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class ProgressView(Protocol):
    """Shows steps: `start` one of `total` images (returns its id), `advance` it by some, `reach` a count at least,
    `finish` it."""

    def start(self, what: str, total: int) -> int: ...

    def advance(self, step: int, n: int) -> None: ...

    def reach(self, step: int, done: int) -> None: ...

    def finish(self, step: int) -> None: ...


_VIEW: ContextVar[ProgressView | None] = ContextVar("a2k_progress_view", default=None)


@contextmanager
def shown_by(view: ProgressView | None) -> Iterator[None]:
    """Steps started inside (in this context and the contexts copied from it) are shown by `view`."""
    token = _VIEW.set(view)
    try:
        yield
    finally:
        _VIEW.reset(token)


class Step:
    """One step's counter: `advance(n)` as images are done (from any thread), `reach(done)` where a coarser count is
    known (a finished shard), never going back."""

    def __init__(self, view: ProgressView | None, what: str, total: int) -> None:
        self._view = view
        self._id = view.start(what, total) if view is not None else 0
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        if self._view is not None and n:
            with self._lock:
                self._view.advance(self._id, n)

    def reach(self, done: int) -> None:
        if self._view is not None:
            with self._lock:
                self._view.reach(self._id, done)

    def finish(self) -> None:
        if self._view is not None:
            self._view.finish(self._id)
            self._view = None


_STEP: ContextVar[Step | None] = ContextVar("a2k_progress_step", default=None)


@contextmanager
def progress_step(what: str, total: int) -> Iterator[Step]:
    """A step of `total` images; inside it `advance_images` (e.g. in a shard task's thread) counts toward it."""
    step = Step(_VIEW.get(), what, total)
    token = _STEP.set(step)
    try:
        yield step
    finally:
        _STEP.reset(token)
        step.finish()


def advance_images(n: int) -> None:
    """`n` more images of the step this code runs in are done (nothing when no step or no view)."""
    step = _STEP.get()
    if step is not None:
        step.advance(n)
