"""A hang detector for fuzz runs: a deadline pushed forward by progress.

:class:`Watchdog` holds a cancel scope whose deadline is moved forward every time the
run makes progress (an operation completes, a fault finishes).  If the deadline passes,
nothing moved for ``limit`` seconds: the watchdog records where every task is waiting
(:func:`task_tree`) and cancels the run, so a hang becomes a reported violation instead
of a run that never ends.  No polling: trio wakes the watchdog at the deadline.
"""

from __future__ import annotations

from typing import Callable

import trio


def frames(coro: object) -> list[str]:
    """Where a coroutine (and what it awaits) stands, outermost first."""
    out = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        out.append(f"{frame.f_code.co_name}@{frame.f_code.co_filename.rsplit('/', 1)[-1]}"
                   f":{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return out


def task_tree(task: trio.lowlevel.Task | None = None, depth: int = 0) -> list[str]:
    """One line per task: its name and where it is waiting (innermost last)."""
    task = task or trio.lowlevel.current_root_task()
    if task is None:
        return []
    lines = ["  " * depth + f"{task.name}: " + " > ".join(frames(task.coro)[-4:])]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            lines += task_tree(child, depth + 1)
    return lines


class Watchdog:
    """Cancel ``victim`` when no progress is reported for ``limit`` seconds."""

    def __init__(self, limit: float, victim: trio.CancelScope,
                 on_hang: Callable[[list[str]], None]) -> None:
        self.limit = limit
        self.victim = victim
        self.on_hang = on_hang
        self._scope = trio.CancelScope()
        self._stopped = False
        self.fired = False

    def progress(self) -> None:
        self._scope.deadline = trio.current_time() + self.limit

    async def run(self) -> None:
        self.progress()
        with self._scope:
            await trio.sleep_forever()
        if self._scope.cancelled_caught and not self._stopped:
            self.fired = True
            self.on_hang(task_tree())
            self.victim.cancel()

    def stop(self) -> None:
        """End :meth:`run` without reporting a hang."""
        self._stopped = True
        self._scope.cancel()
