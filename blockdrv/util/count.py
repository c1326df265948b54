"""Count: an integer that tasks can wait on, cheap to change while nobody waits.

The block port changes ``in_flight`` twice a request, and drained sections wait for it
to reach 0.  trio_util's ``AsyncValue`` does the waiting well but walks three waiter
tables on every store; reading its private tables to skip that would break silently on
an upgrade.  This is the small primitive the port needs, with its own tests:

- ``value`` reads and stores the integer; a store with no waiter is one attribute store;
- ``add(delta)`` is ``value += delta`` in one call;
- ``await wait_value(x)`` returns the value once it equals ``x`` (or ``x(value)`` is true
  for a callable), at once if it already does.  It is a checkpoint either way.
  Waiters whose condition a store makes true are woken by that store (level-triggered:
  the value they get is the one that woke them).
"""

from __future__ import annotations

from typing import Callable

import trio

Condition = int | Callable[[int], bool]


def _holds(condition: Condition, value: int) -> bool:
    return condition(value) if callable(condition) else value == condition


class Count:
    """An integer with waiters (see the module docstring)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self, value: int = 0) -> None:
        self._value = value
        self._waiters: list[tuple[Condition, trio.Event, list[int]]] = []

    @property
    def value(self) -> int:
        """The count."""
        return self._value

    @value.setter
    def value(self, new: int) -> None:
        self._value = new
        if self._waiters:
            self._wake(new)

    def add(self, delta: int) -> None:
        """``value += delta`` in one call (the port's hot path)."""
        self._value += delta
        if self._waiters:
            self._wake(self._value)

    def _wake(self, value: int) -> None:
        still = []
        for waiter in self._waiters:
            condition, event, seen = waiter
            if _holds(condition, value):
                seen.append(value)
                event.set()
            else:
                still.append(waiter)
        self._waiters = still

    async def wait_value(self, condition: Condition) -> int:
        """Wait until the count equals ``condition`` (or ``condition(count)`` holds);
        return the value that satisfied it.

        Raises: nothing (cancellation only).
        """
        if _holds(condition, self._value):
            await trio.lowlevel.checkpoint()
            return self._value
        waiter: tuple[Condition, trio.Event, list[int]] = (condition, trio.Event(), [])
        self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        finally:
            if not waiter[1].is_set():
                self._waiters.remove(waiter)
        return waiter[2][0]

    def __repr__(self) -> str:
        return f"<Count {self._value} ({len(self._waiters)} waiting)>"
