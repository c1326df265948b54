"""When the server could not be reached: a fuzz run's record of the outages it caused.

Theory of operation
-------------------
The fault model keeps each outage shorter than ``reconnect_delay`` (``max_outage + 2 <
reconnect_delay``), but faults come one after another, and a killed server takes time
to start again (seconds, on a loaded machine).  Outages can therefore chain past the
delay, and then the driver is right to give up.  So the run keeps, for every fault,
the interval in which that fault kept the device from connecting:

- a kill (or a crash): from the kill until the server listens again;
- a stall or a slow reply: its length;
- a fault that breaks one connection or handshake (cut, reset, malformed,
  duplicate, flood, unrequested context): an instant.

Each interval is then stretched by ``slack``: the client's longest retry interval plus
one handshake.  An expired reconnect delay (or an open that timed out) is explained
only if these intervals cover the whole delay before it.  Any moment they leave
uncovered was a chance to reconnect, and the driver missed it.  A worker that stops
retrying, or backs off far past ``retry_max``, is caught that way.

Likewise an operation may outlast its time bound only in a storm: when, over its whole
life, faults left the server reachable for less than ``HANG_REACHABLE`` seconds in all.
(The watchdog still reports a standstill of the whole run, storm or not.)
"""

from __future__ import annotations

import math
from collections import deque

import trio

HANG_REACHABLE = 10.0  # seconds of reachable server after which an operation must be done


class Availability:
    """Intervals in which the server could not be reached (see the module docstring)."""

    def __init__(self, slack: float, horizon: float) -> None:
        self.slack = slack
        self.horizon = horizon  # intervals that ended longer ago than this are forgotten
        self._intervals: deque[tuple[float, float]] = deque()
        self._down_since: float | None = None

    def broken(self, seconds: float = 0.0) -> None:
        """A fault kept connections from working for ``seconds`` from now."""
        now = trio.current_time()
        self._add(now, now + seconds)

    def down(self) -> None:
        """The server stopped (killed or crashed)."""
        if self._down_since is None:
            self._down_since = trio.current_time()

    def up(self) -> None:
        """The server listens again."""
        if self._down_since is not None:
            self._add(self._down_since, trio.current_time())
            self._down_since = None

    def _add(self, start: float, end: float) -> None:
        intervals = self._intervals
        intervals.append((start, end + self.slack))
        forget_before = trio.current_time() - self.horizon
        while intervals and intervals[0][1] < forget_before:
            intervals.popleft()

    def reachable_for(self, seconds: float) -> float:
        """For how long, in total, of the last ``seconds`` nothing kept the server away."""
        end = trio.current_time()
        covered_to = start = end - seconds
        spans = list(self._intervals)
        if self._down_since is not None:
            spans.append((self._down_since, math.inf))
        reachable = 0.0
        for begin, stop in sorted(spans):
            if begin >= end:
                break
            if begin > covered_to:
                reachable += begin - covered_to  # a gap: the server was there
            covered_to = max(covered_to, stop)
        reachable += max(0.0, end - max(covered_to, start))
        return reachable

    def unreachable_throughout(self, seconds: float) -> bool:
        """Did faults keep the server away for all of the last ``seconds``?"""
        return self.reachable_for(seconds) == 0.0
