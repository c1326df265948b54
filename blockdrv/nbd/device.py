"""NBDDevice: the request path, connection states and reconnects of the NBD driver.

Theory of operation
-------------------
This is DESIGN.md section 3, i.e. qemu's block/nbd.c after "block/nbd: drop
connection_co", in trio.  trio is single-threaded, so code between two ``await``\\ s is
atomic and qemu's ``requests_lock`` is implicit: every state change below is plain
synchronous code.  The parts live in their own modules: admission
(:mod:`~blockdrv.nbd.admission`), the receive side and cookies
(:mod:`~blockdrv.nbd.dispatch`), the connection worker
(:mod:`~blockdrv.nbd.connection`), the states (:mod:`~blockdrv.nbd.states`).

*No connection task.*  Nothing reads the socket unless a request waits for a reply; a
dead idle server is noticed by the next request.  The connection worker only connects
and negotiates.

*States.*  A transport failure while CONNECTED goes to CONNECTING_WAIT
(``reconnect_delay > 0``) or CONNECTING_NOWAIT, the socket is shut down so every blocked
read and write fails at once, and the worker starts reconnecting right away, on its
retry schedule, whether or not a request waits (a connection it makes while nobody
waits is installed at once).  The reconnect-delay timer (its own task, started at the
failure, gone when the state leaves CONNECTING_WAIT) and ``cancel_in_flight()`` move WAIT
to NOWAIT and release a request waiting on the worker.  A protocol violation, or close,
is QUIT for good.

*Admission* is FIFO: a freed place goes to the oldest waiter, and a newcomer takes the
fast path only when nobody waits.  While not connected, the one request admitted
performs the reconnect attempt: it waits for the worker in WAIT, and only takes a
finished connection in NOWAIT.

*Sending.*  The request takes a slot (its cookie is unique over the device's life) and
sends header and payload in one scatter-gather write under ``send_mutex``; the payload
is not copied and stays referenced until the reply (it is sent again after a
reconnect).  If the request is cancelled once its first byte is out, the rest is sent
under a shield bounded by ``cancel_timeout`` and the request then counts as sent (its
reply is read and discarded); only if that bound passes is the stream out of step: a
transport failure.

*Receiving* is the dispatcher's turn-taking: each request reads its own reply when it
is current, reads headers for others when the stream is free, and sleeps otherwise.

*Retry rule* (qemu iotest 277).  A request loops ``send; receive`` while it fails with a
transport error and the state is CONNECTING_WAIT, so it is sent again, in full, on the
new connection.  Server error replies are returned, never retried, except ESHUTDOWN,
which is the server announcing it is going away: the driver disconnects softly and
treats it as a transport failure.

*Cancellation.*  A request cancelled before it is sent just leaves.  Once sent, a
cancelled request goes on reading its own reply, discarding it, under a shield bounded
by ``cancel_timeout``; if the reply does not come in that time the connection is
declared broken.  So cancellation never desynchronizes the stream, never fails another
request and never leaves a reply that nobody reads.

*Checkpoints.*  Every request is a checkpoint, as every trio operation is: a cancel
point before anything is sent, and a schedule point by the end, which it usually passes
anyway (waiting for admission, the socket or its turn); if it did not, it takes one as
it returns.  Long replies checkpoint every few chunks.  So deadlines and cancel scopes
fire, and other tasks run, however fast the server answers.

*Drained sections* (:class:`~blockdrv.node.BlockNode`) wait until no request is in
flight through the device (counted from entry to completion, reconnect waits
included); new requests wait at the door; nothing is cancelled.  During an outage a
drain therefore lasts at most ``reconnect_delay``.  The section's owner does its own
I/O through the handle the section yields.
"""

from __future__ import annotations

import errno
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import trio

from ..protocol.errors import (
    ConnectError,
    ConnectionLostError,
    NBDError,
)
from ..protocol.export import ExportInfo
from ..protocol.uri import NBDAddress
from ..util.taskgroups import reraise_alone
from .connection_states import _describe
from .handshake import HandshakeOptions
from .requests import RequestEngine
from .settings import ConnectionSettings
from .states import Event, State


@dataclass(frozen=True)
class DeviceStatistics:
    """A snapshot of what a device has done (see :meth:`NBDDevice.statistics`).

    ``bytes_read`` counts the bytes READ requests delivered to callers, holes included;
    ``hole_bytes_read`` is the part of it that came as holes (no data on the wire).
    ``requests_waiting`` are waiting for admission right now.  ``sends_finished_cancelled``
    counts requests cancelled while their header or payload was going out that finished
    sending (under the ``cancel_timeout`` shield) instead of breaking the connection.
    """

    state: State
    requests: int
    bytes_read: int
    bytes_written: int
    in_flight: int
    reconnects: int
    retried: int
    connect_attempts: int
    reconnect_delay_expired: int
    reconnect_timer_armed: bool
    hole_bytes_read: int = 0
    requests_waiting: int = 0
    sends_finished_cancelled: int = 0



class NBDDevice(RequestEngine):
    """A network block device. Create it with :func:`~blockdrv.open_nbd`.

    I/O methods follow libnbd and ``os.pread``: :meth:`pread`, :meth:`pread_into`,
    :meth:`pwrite`, :meth:`zero`, :meth:`trim`, :meth:`flush`, :meth:`cache`,
    :meth:`block_status`.  A write's buffer must stay unchanged until the call returns:
    after a reconnect it is sent again (``guard_writes=True`` detects a change).
    """

    connections = 1
    """How many connections requests go over (see MultiConnDevice for more)."""
    connections_note = ""
    """Why fewer connections are used than were asked for ("" when not)."""


    def __repr__(self) -> str:
        return (f"<NBDDevice {self.address} state={self.state.value} "
                f"in_flight={self.in_flight.value}>")

    # --- public properties ---------------------------------------------------------------

    @property
    def info(self) -> ExportInfo:
        """The export as negotiated on the first connection."""
        if self._info is None:
            raise RuntimeError("the device is not open")
        return self._info

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self.info.size

    def statistics(self) -> DeviceStatistics:
        """A snapshot of what the device has done (requests, bytes, reconnects...)."""
        s, dispatch = self._stats, self._dispatch
        return DeviceStatistics(
            state=self.state, requests=s["requests"], bytes_read=dispatch.bytes_read,
            bytes_written=s["bytes_written"], in_flight=self.in_flight.value,
            reconnects=s["reconnects"], retried=s["retried"],
            connect_attempts=self._worker.attempts,
            reconnect_delay_expired=s["delay_expired"],
            reconnect_timer_armed=self._delay_timer is not None,
            hole_bytes_read=dispatch.hole_bytes_read,
            requests_waiting=self._admission.waiting,
            sends_finished_cancelled=s["sends_finished_cancelled"])


    # --- opening and closing ---------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def opened(cls, address: NBDAddress, options: HandshakeOptions,
                     settings: ConnectionSettings) -> AsyncIterator[NBDDevice]:
        """A device connected to ``address`` (async context manager), its background
        tasks in a nursery of its own, closed on the way out; no ExceptionGroup leaves
        it (:func:`~blockdrv.open_nbd` is the public way in)."""
        try:
            async with trio.open_nursery() as nursery:
                device = cls(address, options, nursery, settings)
                try:
                    await device._open(settings.open_timeout)
                    yield device
                finally:
                    await device.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The background tasks never raise, so the group holds the body's exception.
            if len(group.exceptions) == 1:
                reraise_alone(group)
            raise

    async def _open(self, open_timeout: float) -> None:
        """First connection: one attempt, or retries for up to ``open_timeout`` s."""
        worker = self._worker
        result = await worker.first(open_timeout)
        if result is None:
            await worker.close()
            cause = worker.error
            if isinstance(cause, NBDError) and not isinstance(cause, ConnectionLostError):
                raise cause  # a refusal or a protocol error: as the server said it
            within = f" within {open_timeout:g}s" if open_timeout > 0 else ""
            code = getattr(cause, "errno", None) or errno.ECONNREFUSED
            raise ConnectError(f"cannot open {self.address}{within}: {_describe(cause)}",
                               errno=code) from cause
        worker.retry = True
        worker.retry_if = lambda exc: True
        channel, info = result
        self._info = info
        self._install(channel, info)

    async def aclose(self) -> None:
        """Wait (bounded) for requests in flight, disconnect, stop background tasks.

        Not interrupted by cancellation (every step has its own time bound); calling it
        again waits for the first call to finish.

        Raises: nothing (not even cancellation).
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        with trio.CancelScope(shield=True):
            self._drains.value += 1  # no new requests from now on
            try:
                with trio.move_on_after(self.reconnect_delay + self.cancel_timeout + 1):
                    await self.in_flight.wait_value(0)
                session = self._session
                if session is not None and session is self._dispatch.live \
                        and not session.channel.broken:
                    await self._send_disc(session)
                self._fail(Event.CLOSE, ConnectionLostError("the device is closed",
                                                            errno=errno.EBADF))
                await self._worker.close()
                if session is not None:
                    await session.channel.aclose()
            finally:
                self._drains.value -= 1
                self._closed.set()

