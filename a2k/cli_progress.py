"""The terminal's progress display of a command's long steps (tasks.progress): images done of N, images/s and the
time left, drawn by rich; nothing when stdout is not a terminal (a pipe, a file, a scheduler's log)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from a2k.cli_logs import prefect_consoles


def _columns() -> list[Any]:
    from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:,.0f} images/s" if task.speed else "- images/s")

    return [TextColumn("{task.description}"), BarColumn(bar_width=24),
            TextColumn("{task.completed:,.0f} of {task.total:,.0f} images"), Speed(), TextColumn("ETA"),
            TimeRemainingColumn()]


class TerminalProgress:
    """A tasks.progress.ProgressView on rich's live display: one bar per step, left on screen when it ends. Drawn
    on stderr where that is the terminal too, with Prefect's log lines printed above the bars (through the same
    console) instead of across them; the display stops between steps, so what the command prints comes after."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress

        stream = sys.stderr if sys.stderr.isatty() else sys.stdout
        self.progress = Progress(*_columns(), console=Console(file=stream), transient=False, redirect_stdout=False,
                                 redirect_stderr=False)
        self._borrowed: list[tuple[Any, Any]] = []

    def start(self, what: str, total: int) -> int:
        if not self.progress.live.is_started:  # started at a step: a command that has none draws nothing
            ours = self.progress.console.file
            self._borrowed = [(h, h.console) for h in prefect_consoles() if h.console.file is ours]
            for handler, _ in self._borrowed:
                handler.console = self.progress.console
            self.progress.start()
        return self.progress.add_task(what, total=total)

    def advance(self, step: int, n: int) -> None:
        self.progress.advance(step, n)

    def reach(self, step: int, done: int) -> None:
        task = next(t for t in self.progress.tasks if t.id == step)
        if done > task.completed:
            self.progress.advance(step, done - task.completed)  # advance, not update: it keeps the speed's samples

    def finish(self, step: int) -> None:
        self.progress.stop_task(step)
        if all(t.stop_time is not None for t in self.progress.tasks):
            self.stop()

    def stop(self) -> None:
        """The bars drawn once more and left where they are; Prefect's consoles given back."""
        self.progress.stop()
        for task in list(self.progress.tasks):
            self.progress.remove_task(task.id)
        for handler, console in self._borrowed:
            handler.console = console
        self._borrowed = []


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
        view.stop()
