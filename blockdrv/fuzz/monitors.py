"""Watching a fuzz run from the side: the event loop, memory, and admission.

Theory of operation
-------------------
Three invariants are about *how* the driver behaves, not what it returns, so they are
measured beside the workload:

- *Liveness of the event loop.*  :class:`StepTimer` is a trio Instrument that times
  every task step in CPU seconds (``time.thread_time``: a step that spins counts, the
  machine being busy with other processes does not).  :class:`LoopMonitor` wakes every
  ``interval`` and records how late it was (wall clock, ``loop_lag_max_s``); whenever a
  step used more than ``limit`` CPU seconds, it reports a violation naming the task and
  where it stopped: a loop over peer data that never reached a checkpoint.
- *Memory.*  :class:`MemoryMonitor` samples the process's resident set
  (``/proc/self/statm``) at the same wake-ups; once the device is open it keeps the
  growth over that baseline within a budget the run computes: twice the bytes of the
  largest set of operations in flight so far (their buffers and copies) plus a fixed
  allowance (the proxy's buffers, the interpreter).  glibc's allocator is set to map
  large buffers and give them back (:func:`steady_allocator`), so the resident set
  follows live memory rather than the heap's high-water mark.  Everything a peer sends that the
  client would keep without a cap shows as growth past the budget.
- *Fairness.*  :class:`FairnessMonitor` implements the driver's ``AdmissionMonitor``:
  a request admitted while older ones wait is an *overtake* (FIFO allows none); a
  request that waited ``w`` seconds while ``k`` others were admitted must have
  ``w <= ceil((k + 1) / places) * s + margin`` (``places``: ``max_in_flight`` while
  connected, one while reconnecting), ``s`` being the longest time
  any request held a place during the wait: the service time of those that left, the
  age of those still in (a request stuck behind a stalled reply holds its place
  throughout, and fewer places turn over).  Each place turns over at least once every
  ``s``, and FIFO hands each freed place to the oldest waiter.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from typing import Callable

import trio

from .watchdog import frames

Report = Callable[[str, str, str, str], None]
"""(operation, expected, found, invariant) -> records a violation."""

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def _where(task: trio.lowlevel.Task) -> str:
    return " > ".join(frames(task.coro)[-4:])


class StepTimer(trio.abc.Instrument):
    """Times each task step in CPU seconds; keeps the longest since the last look."""

    def __init__(self) -> None:
        self._started: float | None = None  # (a step already running when added: none)
        self.longest = 0.0
        self.longest_task = ""
        self.worst = 0.0  # over the whole run

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is None:
            return
        spent = time.thread_time() - self._started
        if spent > self.longest:
            self.longest = spent
            self.longest_task = f"{task.name} (stopped at {_where(task)})"

    def take(self) -> tuple[float, str]:
        """The longest step since the last call, and which task it was."""
        longest, task = self.longest, self.longest_task
        self.worst = max(self.worst, longest)
        self.longest, self.longest_task = 0.0, ""
        return longest, task


class LoopMonitor:
    """Loop lag and long steps (see the module docstring)."""

    def __init__(self, limit: float, report: Report, elapsed: Callable[[], float], *,
                 interval: float = 0.05) -> None:
        self.limit = limit
        self.report = report
        self.elapsed = elapsed
        self.interval = interval
        self.steps = StepTimer()
        self.lag_max = 0.0
        self.memory: MemoryMonitor | None = None

    async def run(self) -> None:
        trio.lowlevel.add_instrument(self.steps)
        try:
            while True:
                due = time.monotonic() + self.interval
                await trio.sleep(self.interval)
                self.lag_max = max(self.lag_max, time.monotonic() - due)
                longest, task = self.steps.take()
                if longest > self.limit:
                    self.report("the event loop", f"no task step longer than "
                                f"{self.limit:g} CPU seconds (loop lag)",
                                f"{task} ran {longest:.2f} s without a checkpoint",
                                "liveness")
                if self.memory is not None:
                    self.memory.sample()
        finally:
            trio.lowlevel.remove_instrument(self.steps)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameters
_M_ARENA_MAX = -8


def steady_allocator() -> None:
    """Make the resident set follow live memory (glibc): buffers of 256 KiB and more are
    mapped and returned on free (glibc otherwise raises that threshold after the first
    large free and serves later large buffers from a heap that only grows: hundreds of
    MiB over ten minutes of 4-8 MiB buffers), and threads share two arenas."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 10)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass  # not glibc: the budget's allowance has to cover the allocator


class MemoryMonitor:
    """Resident-set growth against a budget (see the module docstring)."""

    def __init__(self, allowance: int, report: Report) -> None:
        steady_allocator()
        self.allowance = allowance
        self.report = report
        self.baseline: int | None = None
        self.peak = rss()
        self.growth_peak = 0
        self.held_peak = 0  # the most operation bytes in flight at once, so far
        self.reported = False

    def start(self) -> None:
        """From now on growth counts (call once the device is open)."""
        if self.baseline is None:
            self.baseline = rss()

    def holding(self, nbytes: int) -> None:
        """Operations in flight hold ``nbytes`` of buffers right now."""
        self.held_peak = max(self.held_peak, nbytes)

    @property
    def budget(self) -> int:
        return 2 * self.held_peak + self.allowance

    def sample(self) -> None:
        now = rss()
        self.peak = max(self.peak, now)
        if self.baseline is None:
            return
        growth = now - self.baseline
        self.growth_peak = max(self.growth_peak, growth)
        if growth > self.budget and not self.reported:
            self.reported = True  # once: the next samples would say the same
            self.report("the client process", f"resident set growth within "
                        f"{self.budget >> 20} MiB (2 x the largest set of requests in "
                        f"flight, {self.held_peak >> 20} MiB, + {self.allowance >> 20} MiB)",
                        f"grew by {growth >> 20} MiB", "memory")


class FairnessMonitor:
    """The driver's AdmissionMonitor for one connection (see the module docstring).

    Service times are measured here, from a request's admission to its leaving (each
    call comes in the request's own task).  A wait that spans a change of the admission
    rule (an outage: then one request at a time reconnects, by design) is not held to
    the time bound; overtakes are never allowed.
    """

    def __init__(self, max_in_flight: int, report: Report, *, margin: float = 1.0,
                 places: Callable[[], int] | None = None) -> None:
        self.max_in_flight = max_in_flight
        # How many requests the admission rule lets in at once now: max_in_flight while
        # connected, one while reconnecting (that one makes the attempt).
        self.places = places or (lambda: max_in_flight)
        self.report = report
        self.margin = margin
        self.admissions = 0
        self.overtakes = 0
        self.wait_max = 0.0
        self.rule_changes = 0
        self._admitted_at: dict[trio.lowlevel.Task, float] = {}
        self._handed_at: dict[trio.lowlevel.Task, float] = {}  # woken, not yet run
        self._services: list[float] = []  # of requests that left while someone waited
        self._services_base = 0  # how many were dropped from the front
        self._waiting = 0

    def _admitted(self) -> float:
        """Count the current task in; returns when it got its place."""
        task = trio.lowlevel.current_task()
        at = self._handed_at.pop(task, None)
        if at is None:
            at = trio.current_time()
        self.admissions += 1
        self._admitted_at[task] = at
        return at

    def handed_over(self, task: trio.lowlevel.Task) -> None:
        # The place is the waiter's from now on, however late it runs: a busy machine
        # delays its wake-up, which is neither a wait for admission nor service time.
        self._handed_at[task] = trio.current_time()

    def entered(self, overtaken: int) -> None:
        self._admitted()
        if overtaken:
            self.overtakes += overtaken
            self.report("admission", "no request admitted while older ones wait (FIFO)",
                        f"a newcomer went ahead of {overtaken} waiting request(s)",
                        "fairness")

    def parked(self) -> tuple[float, int, int, int, int]:
        self._waiting += 1
        return (trio.current_time(), self.admissions,
                self._services_base + len(self._services), self.rule_changes,
                self.places())

    def abandoned(self, token: object) -> None:
        self._done_waiting()

    def granted(self, token: object) -> None:
        assert isinstance(token, tuple)
        arrived, admissions_then, services_from, rules_then, places = token
        now = self._admitted()
        waited = now - arrived
        self.wait_max = max(self.wait_max, waited)
        if rules_then == self.rule_changes:
            meanwhile = self.admissions - 1 - admissions_then
            # Every place was held meanwhile by a request that has left (its service
            # time) or is still in (its age so far): the longest of both is s.
            longest = max(max(self._services[services_from - self._services_base:],
                              default=0.0),
                          max(now - admitted for admitted in self._admitted_at.values()))
            rounds = math.ceil((meanwhile + 1) / places)  # (same rule all along)
            bound = rounds * longest + self.margin
            if waited > bound:
                self.report("admission", f"admitted within {bound:.2f} s ({rounds} "
                            f"round(s) of the longest service time, {meanwhile} admitted "
                            "meanwhile)", f"waited {waited:.2f} s for admission", "fairness")
        self._done_waiting()

    def _done_waiting(self) -> None:
        self._waiting -= 1
        if not self._waiting:  # nobody waits: older service times matter no more
            self._services_base += len(self._services)
            self._services.clear()

    def left(self) -> None:
        admitted = self._admitted_at.pop(trio.lowlevel.current_task(), None)
        if admitted is not None and self._waiting:
            self._services.append(trio.current_time() - admitted)

    def rule_changed(self) -> None:
        self.rule_changes += 1
