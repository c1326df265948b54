"""A FIFO mutex for the request path, cheaper than ``trio.Lock`` where it is free.

Theory of operation
-------------------
The driver takes ``send_mutex`` once per request and ``receive_mutex`` once per reply
header it reads, almost always when nobody holds them.  ``trio.Lock`` pays for
features the driver does not use on every take and give (the owner task, found with
``current_task()``, and a parking-lot breaker registered for it, so a task that dies
holding the lock breaks it): about 1.6 us a pair on a slow machine, a few per cent of
a request.  :class:`FifoMutex` keeps a flag and a ParkingLot: taking a free mutex sets
the flag, giving it back clears it, and only a contended mutex parks.

Ownership is *handed over*, as ``trio.Lock`` does: ``release()`` with waiters leaves
the mutex held and wakes the oldest, who owns it when it runs, so a newcomer can never
take it in between (FIFO, no overtaking).  A woken waiter cannot be cancelled out of
its wake-up (trio delivers the wake-up first), so a handed-over mutex is never lost.
Nothing checks that the releasing task is the owner: the driver's code pairs every
take with one give in ``try``/``finally``.
"""

from __future__ import annotations

from types import TracebackType

import trio


class FifoMutex:
    """A FIFO mutual-exclusion lock (``trio.Lock``'s interface, minus owner checks)."""

    __slots__ = ("held", "_waiters")

    def __init__(self) -> None:
        self.held = False
        self._waiters = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        state = "locked" if self.held else "unlocked"
        return f"<FifoMutex {state} waiting={len(self._waiters)}>"

    def locked(self) -> bool:
        """Someone holds the mutex (or it is being handed to a woken waiter)."""
        return self.held

    def acquire_nowait(self) -> None:
        """Take the mutex if it is free and nobody waits (no checkpoint), else raise
        ``trio.WouldBlock``."""
        if self.held:
            raise trio.WouldBlock
        self.held = True

    async def acquire(self) -> None:
        """Take the mutex, waiting behind earlier waiters (a checkpoint)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.held:
            await self._waiters.park()  # release() handed the mutex to us
        else:
            self.held = True
            await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self) -> None:
        """Give the mutex back: to the oldest waiter if there is one."""
        if not self.held:
            raise RuntimeError("release of a FifoMutex that is not held")
        if self._waiters:
            self._waiters.unpark()  # still held: the waiter owns it now
        else:
            self.held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
