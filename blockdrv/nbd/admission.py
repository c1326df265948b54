"""FIFO admission of requests to a connection (qemu's ``free_sema``).

Theory of operation
-------------------
A request may be sent only once the device admits it.  The device states the rule as
``may_admit(admitted)``: while connected, fewer than ``max_in_flight`` are admitted;
while not, none is (the one admitted then performs the reconnect attempt); once the
device is dead, everyone is (to fail at once).

Admission is first come, first served, as qemu's CoQueue is.  A request that arrives
while others wait parks at the back of the queue (a trio ParkingLot, which wakes the
oldest first) even when there happens to be room: the fast path applies only when
nobody waits.  Room is *handed over*, not announced: whenever it appears (a request
leaves, the state changes) :meth:`Admission.grant` counts the oldest waiters as
admitted and then wakes them, so a woken waiter never finds its place taken by a
newcomer and never goes to the back again.  That is what keeps the spread between
callers small when they outnumber ``max_in_flight``.

A waiter that is cancelled while parked leaves the queue (the lot forgets it).  One that
was granted cannot be cancelled out of the park any more (trio delivers the wake-up
first); it is admitted like any other and gives its place back, like every admitted
request, through :meth:`Admission.leave`, which hands it to the next waiter.  Every exit
path of an admitted request must call ``leave()`` exactly once: qemu once lost a wake-up
here and hung under load.
"""

from __future__ import annotations

from typing import Callable, Protocol

import trio


class AdmissionMonitor(Protocol):
    """Watches admission (blockdrv-fuzz's fairness checker implements this).  Every call
    but ``handed_over`` is made in the task of the request it is about."""

    def entered(self, overtaken: int) -> None:
        """A request was admitted at once, passing ``overtaken`` waiting requests
        (0 unless admission is unfair)."""

    def parked(self) -> object:
        """A request starts waiting; returns a token given back to ``granted`` or
        ``abandoned``."""

    def handed_over(self, task: trio.lowlevel.Task) -> None:
        """A place was handed to the waiting request ``task``, which runs later (called
        in the task that made room)."""

    def granted(self, token: object) -> None:
        """A waiting request was admitted (it runs again)."""

    def abandoned(self, token: object) -> None:
        """A waiting request left without being admitted (it was cancelled)."""

    def left(self) -> None:
        """An admitted request gave its place back."""

    def rule_changed(self) -> None:
        """The admission rule changed (the connection state did)."""


class Admission:
    """The admitted count of one device and the queue of requests waiting for room."""

    __slots__ = ("admitted", "monitor", "_queue", "_may_admit")

    def __init__(self, may_admit: Callable[[int], bool]) -> None:
        self.admitted = 0  # qemu's s->in_flight: admitted attempts
        # Not a count of our own: trio forgets a cancelled waiter the moment its scope
        # is cancelled, long before the waiter runs again, so only the lot knows.
        self._queue = trio.lowlevel.ParkingLot()
        self._may_admit = may_admit  # given the admitted count: may one more enter?
        self.monitor: AdmissionMonitor | None = None

    def __repr__(self) -> str:
        return f"<Admission admitted={self.admitted} waiting={self.waiting}>"

    @property
    def waiting(self) -> int:
        """Requests parked in the queue."""
        return len(self._queue)

    def _room(self) -> bool:
        """May a newcomer enter now?  Only if nobody waits and the rule allows it."""
        return not self._queue and self._may_admit(self.admitted)

    def try_enter(self) -> bool:
        """Enter at once if nobody waits and the rule allows it (no checkpoint)."""
        if not self._room():
            return False
        self.admitted += 1
        if self.monitor is not None:
            self.monitor.entered(len(self._queue))
        return True

    async def enter(self) -> bool:
        """Be admitted, in arrival order; True if this had to wait (it yielded)."""
        if self.try_enter():
            return False
        monitor = self.monitor
        if monitor is None:
            await self._queue.park()  # woken only by grant(), which counted us in
            return True
        token = monitor.parked()
        try:
            await self._queue.park()
        except BaseException:
            monitor.abandoned(token)
            raise
        monitor.granted(token)
        return True

    def leave(self) -> None:
        """An admitted request is done with its attempt: its room goes to the oldest
        waiter."""
        self.admitted -= 1
        if self.monitor is not None:
            self.monitor.left()
        if self._queue:
            self.grant()

    def grant(self, *, rule_changed: bool = False) -> None:
        """Admit the oldest waiters while the rule allows (call after any change that
        may make room: a request leaving, a state change: ``rule_changed``)."""
        monitor = self.monitor
        if rule_changed and monitor is not None:
            monitor.rule_changed()
        queue = self._queue
        while queue and self._may_admit(self.admitted):
            self.admitted += 1
            (woken,) = queue.unpark()
            if monitor is not None:
                monitor.handed_over(woken)
