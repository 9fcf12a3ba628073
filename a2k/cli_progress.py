"""The terminal's progress display of a command's long steps (tasks.progress): images done of N, images/s and the
time left, drawn by rich; nothing when stdout is not a terminal (a pipe, a file, a scheduler's log)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _columns() -> list[Any]:
    from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:,.0f} images/s" if task.speed else "- images/s")

    return [TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed:,.0f} of {task.total:,.0f} images"), Speed(), TextColumn("ETA"),
            TimeRemainingColumn()]


class TerminalProgress:
    """A tasks.progress.ProgressView on rich's live display: one bar per step, kept on screen when it ends."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(*_columns(), console=Console(file=sys.stdout), transient=False)

    def start(self, what: str, total: int) -> int:
        self.progress.start()  # started at the first step: a command that has none draws nothing
        return self.progress.add_task(what, total=total)

    def advance(self, step: int, n: int) -> None:
        self.progress.advance(step, n)

    def reach(self, step: int, done: int) -> None:
        task = next(t for t in self.progress.tasks if t.id == step)
        if done > task.completed:
            self.progress.advance(step, done - task.completed)  # advance, not update: it keeps the speed's samples

    def finish(self, step: int) -> None:
        self.progress.stop_task(step)
        self.progress.refresh()


@contextmanager
def terminal_progress() -> Iterator[None]:
    """Long steps run inside are shown in the terminal when stdout is one; quiet otherwise."""
    from tasks.progress import shown_by

    if not sys.stdout.isatty():
        yield
        return
    view = TerminalProgress()
    try:
        with shown_by(view):
            yield
    finally:
        view.progress.stop()
