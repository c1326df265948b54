"""The connection worker: connect + negotiate, retry with backoff, one result slot.

Theory of operation
-------------------
This is qemu's nbd/client-connection.c as a trio task.  qemu runs it in an OS thread
because its connect is blocking; here it is a task in the device's nursery, separate
from every request task, so a request never connects by itself.

- :meth:`ClientConnection.get` hands out a finished connection if one is waiting in the
  *result slot*; otherwise it makes sure the worker runs and, when ``blocking``, waits
  for it.  There is at most one waiter (the driver only lets one request reconnect).
- The worker tries ``attempt()`` until it succeeds, sleeping between failures with
  exponential backoff (``retry_initial`` doubling up to ``retry_max``; qemu: 1, 2, 4, 8,
  16, 16, ... s), unless retrying is off (then one attempt).  Each attempt is bounded by
  ``attempt_timeout`` so a server that accepts and then says nothing cannot wedge it.
- :meth:`cancel_wait` wakes the waiter *without* stopping the worker (the reconnect
  delay expired, or ``cancel_in_flight()``): a later success is kept for the next
  request.  Likewise, cancelling the waiting task never cancels the attempt.
- :meth:`start` starts the worker without waiting (the driver calls it the moment a
  connection fails, so retries follow the schedule even while no request waits, as with
  ``reconnect_delay=0``).  A success that nobody waits for is offered to ``on_ready``
  (the driver installs it at once); if that declines, it waits in the result slot.
- :meth:`close` stops the worker and closes an unclaimed connection.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Awaitable, Callable, Generic, TypeVar

import trio

from ..protocol.constants import OptionReply
from ..protocol.errors import InvalidArgumentError, OptionError, ProtocolError

log = logging.getLogger("blockdrv.nbd")

T = TypeVar("T")


class ClientConnection(Generic[T]):
    """Connect with retries in the background; see the module docstring."""

    def __init__(self, attempt: Callable[[], Awaitable[T]], nursery: trio.Nursery, *,
                 close_result: Callable[[T], Awaitable[None]],
                 on_ready: Callable[[T], bool] | None = None,
                 retry_initial: float = 1.0, retry_max: float = 16.0,
                 attempt_timeout: float = 30.0) -> None:
        if not 0 < retry_initial <= retry_max:
            raise InvalidArgumentError(f"need 0 < retry_initial <= retry_max, not "
                                       f"{retry_initial} and {retry_max}")
        self._attempt = attempt
        self._nursery = nursery
        self._close_result = close_result
        self._on_ready = on_ready
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.attempt_timeout = attempt_timeout
        self.retry = False  # off for a single attempt (open with open_timeout=0)
        self.retry_if: Callable[[Exception], bool] = lambda exc: True
        self.running = False
        self.attempts = 0
        self.error: Exception | None = None  # why the last attempt failed
        self._result: T | None = None
        self._waiter: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (f"<ClientConnection running={self.running} ready={self._result is not None} "
                f"attempts={self.attempts} error={self.error!r}>")

    async def first(self, open_timeout: float) -> T | None:
        """The first connection of an open: one attempt when ``open_timeout`` is 0,
        else attempts (retrying only what :func:`worth_retrying_open` allows) until
        ``open_timeout`` runs out.  None when none succeeded (the cause is in
        :attr:`error`).  The one open policy of the device and of handshake-only
        queries."""
        self.retry = open_timeout > 0
        self.retry_if = worth_retrying_open
        with trio.move_on_after(open_timeout) if open_timeout > 0 else nullcontext():
            return await self.get(blocking=True)
        return None

    async def get(self, *, blocking: bool) -> T | None:
        """A new connection, or None (not blocking and none ready; or the wait was
        cancelled with :meth:`cancel_wait`; or the worker gave up: see :attr:`error`)."""
        if self._waiter is not None:
            raise RuntimeError("only one task may wait for a connection at a time")
        if not self.running:
            if self._result is not None:
                return self._take()
            self.start()
        if not blocking:
            await trio.lowlevel.checkpoint()
            return None
        waiter = self._waiter = trio.Event()
        try:
            await waiter.wait()
        finally:
            self._waiter = None
        if self.running:  # woken by cancel_wait(): the attempt goes on
            return None
        return self._take()

    def cancel_wait(self) -> None:
        """Wake the waiting task, if any, without stopping the worker."""
        if self._waiter is not None:
            self._waiter.set()

    def _take(self) -> T | None:
        result, self._result = self._result, None
        return result

    def start(self) -> None:
        """Make sure the worker runs (no-op if it does, or a result is ready)."""
        if self._closed or self.running or self._result is not None:
            return
        self.running = True
        self._scope = trio.CancelScope()
        self._nursery.start_soon(self._run, self._scope, name="nbd-connection-worker")

    async def _run(self, scope: trio.CancelScope) -> None:
        delay = self.retry_initial
        try:
            with scope:
                while True:
                    self.attempts += 1
                    try:
                        with trio.fail_after(self.attempt_timeout):
                            result = await self._attempt()
                    except trio.TooSlowError:
                        self.error = TimeoutError(
                            f"connection attempt took longer than {self.attempt_timeout}s")
                    except Exception as exc:
                        self.error = exc
                    else:
                        self.error = None
                        if self._waiter is None and self._on_ready is not None \
                                and self._on_ready(result):
                            return
                        self._result = result
                        return
                    log.debug("connection attempt %d failed: %s", self.attempts, self.error)
                    assert self.error is not None
                    if not (self.retry and self.retry_if(self.error)):
                        return
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.retry_max)
        finally:
            self.running = False
            self.cancel_wait()

    async def close(self) -> None:
        """Stop the worker and close a connection nobody claimed."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        result = self._take()
        if result is not None:
            await self._close_result(result)


def worth_retrying_open(exc: Exception) -> bool:
    """Whether an attempt to open is worth repeating: the server may just not be there
    yet, or is restarting (a refusal or a protocol error is final)."""
    if isinstance(exc, OptionError):
        return exc.reply_type == OptionReply.ERR_SHUTDOWN  # a server going down
    return isinstance(exc, (OSError, TimeoutError)) and not isinstance(exc, ProtocolError)
