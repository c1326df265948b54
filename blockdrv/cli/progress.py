"""Progress of a copy: a bar on the terminal, or nbdcopy's machine-readable lines.

A :class:`Progress` is called with each completed piece's byte count.  It keeps the
total done (what an interrupted copy reports) and passes it on to its outputs:
:class:`FdLines` writes ``N/100`` lines to a file descriptor exactly as
``nbdcopy --progress=FD`` does (``0/100`` first, a line whenever the whole percentage
changes, ``100/100`` when the copy is complete), and :func:`terminal_bar` draws a
transient rich bar on standard error.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator


class FdLines:
    """``N/100`` lines on file descriptor ``fd`` (nbdcopy's ``--progress=FD``); a
    ``total`` of None (a stream of unknown size) gives ``0/100`` and ``100/100`` only."""

    def __init__(self, fd: int, total: int | None) -> None:
        self.fd, self.total = fd, total
        self.percent = -1
        try:
            self.show(0)
        except OSError as exc:
            raise OSError(exc.errno, f"--progress={fd}: {exc.strerror}") from None

    def show(self, percent: int) -> None:
        if percent != self.percent:
            self.percent = percent
            os.write(self.fd, f"{percent}/100\n".encode())

    def update(self, percent: int) -> None:
        """:meth:`show`, where a reader that went away does not stop the copy (as
        nbdcopy, which does not look at these writes' results)."""
        try:
            self.show(percent)
        except OSError:
            pass

    def __call__(self, done: int) -> None:
        if self.total:  # 100 only once everything is done
            self.update(min(done * 100 // self.total, 100))

    def finish(self) -> None:
        self.update(100)


@contextlib.contextmanager
def terminal_bar(total: int | None, *, force: bool = False) -> Iterator[Callable[[int], None]]:
    """A transient byte progress bar on stderr; yields the function that sets how much
    is done.  ``force``: draw it even when stderr is not a terminal (``-p``)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True, force_terminal=True if force else None)
    with Progress("[progress.description]{task.description}", BarColumn(),
                  DownloadColumn(binary_units=True), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True, console=console) as bar:
        task = bar.add_task("copying", total=total)
        yield lambda done: bar.update(task, completed=done)


class Progress:
    """Counts the bytes done and tells every output (see the module docstring)."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.done = 0
        self.outputs: list[Callable[[int], None]] = []
        self._lines: list[FdLines] = []

    def to_fd(self, fd: int) -> None:
        lines = FdLines(fd, self.total)
        self._lines.append(lines)
        self.outputs.append(lines)

    def __call__(self, count: int) -> None:
        self.done += count
        for output in self.outputs:
            output(self.done)

    def finish(self) -> None:
        """The copy is complete."""
        for lines in self._lines:
            lines.finish()
