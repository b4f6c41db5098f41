"""Progress reporting: library loops emit :class:`ProgressEvent` objects to a callback; the CLI
turns them into bars. Library code never prints.

:func:`progress_task` is the one way a loop reports::

    with progress_task(progress, "share", total=len(layers)) as task:
        for i, layer in enumerate(layers):
            ...
            task.advance(i + 1, layer=name)

It sends ``start`` on entry, ``advance`` on each call, and ``end`` on exit even when the loop
raises, so a bar never stays on screen; with ``progress=None`` every call is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Progress", "ProgressEvent", "ProgressTask", "progress_task"]


@dataclass
class ProgressEvent:
    """What a long loop reports: ``kind`` in {'start', 'advance', 'end'}, ``task`` its name."""

    kind: str
    task: str
    total: int | None = None
    completed: int = 0
    info: dict = field(default_factory=dict)


Progress = Callable[[ProgressEvent], None]


class ProgressTask:
    """A running task of :func:`progress_task` (a context manager)."""

    def __init__(
        self, progress: Progress | None, task: str, total: int | None = None, completed: int = 0
    ) -> None:
        self.progress = progress
        self.task = task
        self.total = total
        self.completed = completed

    def __enter__(self) -> ProgressTask:
        if self.progress:
            self.progress(ProgressEvent("start", self.task, self.total, self.completed))
        return self

    def advance(self, completed: int | None = None, **info: Any) -> None:
        """Report ``completed`` steps done (default: one more than before), with ``info``."""
        self.completed = self.completed + 1 if completed is None else completed
        if self.progress:
            self.progress(
                ProgressEvent("advance", self.task, self.total, self.completed, dict(info))
            )

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress(ProgressEvent("end", self.task))


def progress_task(
    progress: Progress | None, task: str, total: int | None = None, completed: int = 0
) -> ProgressTask:
    """Report a loop's progress to ``progress`` (see the module docstring); ``completed`` is
    where a resumed loop starts."""
    return ProgressTask(progress, task, total, completed)
