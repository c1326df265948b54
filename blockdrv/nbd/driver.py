"""The NBD client driver: request tasks that send and receive for themselves.

Theory of operation
-------------------
This is DESIGN.md section 3, i.e. qemu's block/nbd.c after "block/nbd: drop
connection_co", in trio.  trio is single-threaded, so code between two ``await``\\ s is
atomic and qemu's ``requests_lock`` is implicit: every state change below is plain
synchronous code.

*No connection task.*  Nothing reads the socket unless a request is waiting for a reply;
a dead idle server is noticed by the next request.  The connection worker
(:class:`~blockdrv.nbd.connection.ClientConnection`) only connects and negotiates.

*States* (:mod:`blockdrv.nbd.states`): a transport failure while CONNECTED goes to
CONNECTING_WAIT (``reconnect_delay > 0``) or CONNECTING_NOWAIT, and the socket is shut
down so every blocked read and write fails at once.  The reconnect-delay timer (its own
task, started at the failure, removed when the state leaves CONNECTING_WAIT) and
``cancel_in_flight()`` move WAIT to NOWAIT and release a request waiting on the worker.
A protocol violation, or close, is QUIT for good.

*Admission* (qemu ``nbd_co_send_request``).  A request is admitted when CONNECTED with
fewer than ``max_in_flight`` admitted, or when not connected and nobody else is admitted;
in the second case it performs the reconnect attempt itself: it waits for the worker in
WAIT and only takes a finished connection in NOWAIT.  Waiters park in a ParkingLot; every
exit from admission wakes the next one, and every state change wakes all.

*Sending.*  The request takes a free slot (cookie = slot index + 1) and sends header and
payload in one scatter-gather write under ``send_mutex``; the payload is not copied and
stays referenced until the reply (it is sent again after a reconnect).  A send cancelled
part-way leaves the stream out of step: that is a transport failure.

*Receiving* (qemu ``nbd_receive_replies``).  ``_current`` is the reply header being
consumed.  A request waiting for its reply: if ``_current`` is its own, it consumes that
chunk; if it belongs to someone else (or someone is reading a header), it sleeps; if
there is none, it takes ``receive_mutex`` and reads the next header, checks the cookie
against live slots (unknown: protocol violation), makes it current and wakes its owner.
The owner reads the chunk's payload (READ data straight into the caller's buffer) and
then clears ``_current``.  When its reply is complete it hands the stream on as it
leaves: if the next header is already there (buffered, or readable without waiting) it
reads it and wakes that header's owner directly; otherwise it wakes exactly one sleeper,
who becomes the next reader.  Under load replies arrive back to back, so each reply
costs one wake-up, as a coroutine switch does in qemu.  A reply is read only from the
connection its request was sent on; a header that turns up after that connection
failed is a lost connection, never taken for a reply to someone else.

*Retry rule* (qemu iotest 277).  A request loops ``send; receive`` while it fails with a
transport error and the state is CONNECTING_WAIT, so it is sent again, in full, on the
new connection.  Server error replies are returned, never retried, except ESHUTDOWN,
which is the server announcing it is going away: the driver disconnects softly and
treats it as a transport failure.

*Cancellation.*  A request cancelled before it is sent just leaves.  Reading is
resumable: headers are peeked (nothing is consumed until a whole header is there) and a
chunk's progress is kept in its slot, so a cancelled read loses no byte.  Once sent, a
cancelled request goes on reading its own reply, discarding it, under a shield bounded
by ``cancel_timeout``; if the reply does not come in that time the connection is
declared broken.  So cancellation never desynchronizes the stream and never leaves a
reply that nobody reads.

*Drained sections* (:class:`~blockdrv.node.BlockNode`) wait until no request is in
flight through the device (counted from entry to completion, reconnect waits
included); new requests wait at the door; nothing is cancelled.  During an outage a
drain therefore lasts at most ``reconnect_delay``.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import ssl
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, AsyncIterator, Sequence, Union

import trio
from trio_util import AsyncValue

from ..node import BlockNode, Extent
from ..protocol.constants import (
    BASE_ALLOCATION,
    SIMPLE_REPLY_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    OptionReply,
)
from ..protocol.errors import (
    ConnectionLostError,
    InvalidArgumentError,
    NBDError,
    OptionError,
    ProtocolError,
    UnsupportedError,
)
from ..protocol.events import BlockStatus, ReadHole
from ..protocol.export import ExportInfo, check_request
from ..protocol.replies import ReplyState
from ..protocol.uri import NBDAddress, parse_uri
from ..protocol.wire import (
    ReplyHeader,
    decode_reply_header,
    encode_request,
    reply_header_sizes,
)
from ..taskgroups import reraise_alone
from ..tls import TLSMode, client_settings
from ..transport import DEFAULT_READ_AHEAD, Channel, TransportError
from .connection import ClientConnection
from .handshake import HandshakeOptions, StreamFactory, connect_export
from .states import Event, State, next_state

if TYPE_CHECKING:
    from .multiconn import MultiConnDevice

log = logging.getLogger("blockdrv.nbd")

_ZEROES = bytes(1 << 20)
_SCRATCH = bytearray(1 << 16)  # where discarded READ data goes (never read back)
# Hot-path constants: looking up an enum member costs more than the check it is used in.
_READ, _WRITE = Command.READ, Command.WRITE
_OFFSET_DATA, _NONE = int(ChunkType.OFFSET_DATA), int(ChunkType.NONE)


class _TransportFailure(Exception):
    """Internal: this attempt of a request failed with the connection."""


class ConnectError(ConnectionLostError):
    """The device could not be opened: no connection could be made or negotiated."""


@dataclass(frozen=True)
class DeviceStatistics:
    """A snapshot of what a device has done (see :meth:`NBDDevice.statistics`)."""

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


class _Connection:
    """One connection as negotiated: built by ``_install``, referenced by the device
    and by every request sent on it.  Its identity is the connection's: a request's
    ``conn is device._live`` test is "my connection is the one that is up"."""

    __slots__ = ("channel", "wire", "sizes", "context_ids")

    def __init__(self, channel: Channel, wire: ExportInfo) -> None:
        self.channel = channel
        self.wire = wire  # its negotiation
        self.sizes = reply_header_sizes(structured=wire.structured, extended=wire.extended)
        self.context_ids = frozenset(wire.contexts.values())  # its meta context ids


class _Slot:
    """One request in flight on the current connection, and its progress in the reply.

    The reply is consumed chunk by chunk; the chunk being consumed (``chunk``) and how
    far its payload got (``kind``, ``at``, ``left``, ``payload``) live here, so a
    cancelled read picks up exactly where it stopped.
    """

    __slots__ = ("cookie", "conn", "reply", "buffer", "task", "receiving", "extents",
                 "chunk", "kind", "at", "left", "payload")

    def __init__(self, cookie: int, conn: _Connection, reply: ReplyState,
                 buffer: memoryview | None) -> None:
        self.cookie = cookie
        self.conn = conn  # the connection it was sent on: its reply is read from there only
        self.reply = reply
        self.buffer = buffer  # READ destination; None: discard the data
        self.task: trio.lowlevel.Task | None = None  # the request's task, while asleep
        self.receiving = False  # sleeping until its reply is current
        self.extents: dict[int, list[tuple[int, int]]] = {}
        self.chunk: ReplyHeader | None = None  # being consumed right now
        self.kind = ""  # what is left of it: "offset", "data", "payload", ""
        self.at = 0  # where the next data byte goes in the buffer
        self.left = 0  # payload bytes still to read
        self.payload: bytearray | None = None  # a large non-data payload being filled


class NBDDevice(BlockNode):
    """A network block device. Create it with :func:`open_nbd`.

    I/O methods follow libnbd and ``os.pread``: :meth:`pread`, :meth:`pread_into`,
    :meth:`pwrite`, :meth:`zero`, :meth:`trim`, :meth:`flush`, :meth:`cache`,
    :meth:`block_status`.  A write's buffer must stay unchanged until the call returns:
    after a reconnect it is sent again (``guard_writes=True`` detects a change).
    """

    connections = 1
    """How many connections requests go over (see MultiConnDevice for more)."""
    connections_note = ""
    """Why fewer connections are used than were asked for ("" when not)."""

    def __init__(self, address: NBDAddress, options: HandshakeOptions,
                 nursery: trio.Nursery, *, reconnect_delay: float = 0.0,
                 max_in_flight: int = 16, retry_initial: float = 1.0,
                 retry_max: float = 16.0, socket_buffer_size: int | None = None,
                 guard_writes: bool = False, stream_factory: StreamFactory | None = None,
                 connect_timeout: float = 30.0, cancel_timeout: float = 5.0) -> None:
        if reconnect_delay < 0:
            raise ValueError("reconnect_delay must not be negative")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        super().__init__()
        self.address = address
        self.options = options
        self.reconnect_delay = reconnect_delay
        self.max_in_flight = max_in_flight
        self.guard_writes = guard_writes
        self.cancel_timeout = cancel_timeout
        self._nursery = nursery
        self._stream_factory = stream_factory
        self._socket_buffer_size = socket_buffer_size

        self.send_mutex = trio.Lock()
        self.receive_mutex = trio.Lock()
        self._state = AsyncValue(State.CONNECTING_NOWAIT)
        self._admission = trio.lowlevel.ParkingLot()
        self._admission_parked = 0  # tasks parked in _admission (cheaper than len())
        self._admitted = 0  # qemu's s->in_flight: admitted attempts
        self._slots: list[_Slot | None] = [None] * max_in_flight
        self._next_slot = 0
        self._limits: dict[tuple[Command, int], int] = {}  # allowed (command, flags)
        self._current: ReplyHeader | None = None  # qemu's s->reply
        self._sleepers = 0  # slots asleep in _sleep() until _wake()
        self._conn: _Connection | None = None  # the latest connection (None: closed)
        self._live: _Connection | None = None  # _conn while CONNECTED, else None
        self._info: ExportInfo | None = None  # the first connection's (what users see)
        self._fatal: NBDError | None = None
        self._delay_timer: trio.CancelScope | None = None
        self._closing = False
        self._closed = trio.Event()
        self._stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0, "reconnects": 0,
                       "retried": 0, "delay_expired": 0}
        self._worker: ClientConnection[tuple[Channel, ExportInfo]] = ClientConnection(
            self._connect, nursery, close_result=self._close_connection,
            retry_initial=retry_initial, retry_max=retry_max,
            attempt_timeout=connect_timeout)

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

    @property
    def state(self) -> State:
        """The connection state (DESIGN.md section 3)."""
        return self._state.value  # type: ignore[no-any-return]

    async def wait_state(self, *states: State) -> State:
        """Wait until the device is in one of ``states``; returns it."""
        return await self._state.wait_value(lambda s: s in states)  # type: ignore[no-any-return]

    def statistics(self) -> DeviceStatistics:
        """A snapshot of what the device has done (requests, bytes, reconnects...)."""
        s = self._stats
        return DeviceStatistics(
            state=self.state, requests=s["requests"], bytes_read=s["bytes_read"],
            bytes_written=s["bytes_written"], in_flight=self.in_flight.value,
            reconnects=s["reconnects"], retried=s["retried"],
            connect_attempts=self._worker.attempts,
            reconnect_delay_expired=s["delay_expired"],
            reconnect_timer_armed=self._delay_timer is not None)

    # --- opening and closing ---------------------------------------------------------

    async def _connect(self) -> tuple[Channel, ExportInfo]:
        return await connect_export(self.address, self.options,
                                    stream_factory=self._stream_factory,
                                    socket_buffer_size=self._socket_buffer_size)

    @staticmethod
    async def _close_connection(result: tuple[Channel, ExportInfo]) -> None:
        await result[0].aclose()

    async def _open(self, open_timeout: float) -> None:
        """First connection: one attempt, or retries for up to ``open_timeout`` s."""
        worker = self._worker
        worker.retry = open_timeout > 0
        worker.retry_if = _transient
        result = None
        with trio.move_on_after(open_timeout) if open_timeout > 0 else nullcontext():
            result = await worker.get(blocking=True)
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
                conn = self._conn
                if conn is not None and conn is self._live and not conn.channel.broken:
                    await self._send_disc(conn)
                self._fail(Event.CLOSE, ConnectionLostError("the device is closed",
                                                            errno=errno.EBADF))
                await self._worker.close()
                if conn is not None:
                    await conn.channel.aclose()
            finally:
                self._drains.value -= 1
                self._closed.set()

    async def _send_disc(self, conn: _Connection) -> None:
        """NBD_CMD_DISC on ``conn``, best effort, within a second."""
        with trio.move_on_after(1):
            try:
                async with self.send_mutex:
                    await conn.channel.send(encode_request(Command.DISC, 0, 0, 0, 0,
                                                           extended=conn.wire.extended))
            except TransportError:
                pass

    # --- state ------------------------------------------------------------------------

    def _connected(self) -> bool:
        return self._state.value is State.CONNECTED

    def _transition(self, event: Event) -> None:
        old = self._state.value
        new = next_state(old, event, reconnect_delay=self.reconnect_delay)
        if new is old:
            return
        self._state.value = new
        self._live = self._conn if new is State.CONNECTED else None
        if old is State.CONNECTING_WAIT and self._delay_timer is not None:
            self._delay_timer.cancel()  # the timer never outlives CONNECTING_WAIT
            self._delay_timer = None
        if new is State.CONNECTING_WAIT:
            self._start_delay_timer()
        self._admission.unpark_all()

    def _start_delay_timer(self) -> None:
        scope = trio.CancelScope()
        self._delay_timer = scope
        self._nursery.start_soon(self._delay_timer_task, scope, name="nbd-reconnect-delay")

    async def _delay_timer_task(self, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(self.reconnect_delay)
            if self._delay_timer is scope:
                self._delay_timer = None
                self._stats["delay_expired"] += 1
                self._transition(Event.DELAY_EXPIRED)
                self._worker.cancel_wait()

    def _install(self, channel: Channel, info: ExportInfo) -> None:
        self._conn = _Connection(channel, info)
        self._current = None
        self._transition(Event.CONNECTED)

    def _channel_failed(self, conn: _Connection, why: object, *, soft: bool = False) -> None:
        """A transport failure on ``conn`` (idempotent; ignored once it is not live).

        ``soft``: the server asked to go (ESHUTDOWN): nothing more is sent but an
        NBD_CMD_DISC, in the background, before the socket is shut down.
        """
        if conn is not self._live:
            return
        log.info("connection to %s lost: %s", self.address.display, why)
        self._current = None
        if soft:
            self._nursery.start_soon(self._soft_close, conn, name="nbd-soft-close")
        else:
            conn.channel.shutdown()
        self._transition(Event.TRANSPORT_FAILURE)
        self._wake_all_receivers()

    async def _soft_close(self, conn: _Connection) -> None:
        await self._send_disc(conn)  # after any send in progress, under send_mutex
        conn.channel.shutdown()

    def _fail(self, event: Event, error: NBDError) -> None:
        """Go to QUIT for good: every request from now on fails with ``error``."""
        if self._fatal is None:
            self._fatal = error
        self._current = None
        if self._conn is not None:
            self._conn.channel.shutdown()
        self._transition(event)
        self._worker.cancel_wait()
        self._wake_all_receivers()

    def _protocol_violation(self, exc: ProtocolError) -> ProtocolError:
        self._fail(Event.PROTOCOL_VIOLATION, ProtocolError(
            f"connection to {self.address.display} closed after a protocol violation: "
            f"{exc.strerror}"))
        return exc

    def _quit_error(self) -> NBDError:
        if self._fatal is None:
            return ConnectionLostError("the device is closed", errno=errno.EBADF)
        error = self._fatal
        return type(error)(str(error.strerror), errno=error.errno)

    def cancel_in_flight(self) -> None:
        """Fail requests waiting for a reconnect now instead of after reconnect_delay."""
        self._transition(Event.CANCEL_IN_FLIGHT)  # wakes admission if WAIT became NOWAIT
        self._worker.cancel_wait()

    # --- admission --------------------------------------------------------------------

    def _admissible(self) -> bool:
        state = self._state.value
        if state is State.CONNECTED:
            return self._admitted < self.max_in_flight
        return self._admitted == 0 or state is State.QUIT

    async def _admit(self) -> None:
        while not self._admissible():
            self._admission_parked += 1
            try:
                await self._admission.park()
            except BaseException:
                self._admission.unpark()  # pass on a wake-up this task may have used
                raise
            finally:
                self._admission_parked -= 1
        if self._fatal is not None:
            raise self._quit_error()
        self._admitted += 1

    def _release(self) -> None:
        self._admitted -= 1
        if self._admission_parked:
            self._admission.unpark()

    async def wait_connected(self) -> None:
        """Wait until the device is connected again.

        Requests in CONNECTING_NOWAIT fail at once while the worker reconnects in the
        background; this waits for the worker instead (e.g. after ``cancel_in_flight()``,
        before resuming work).  Raises the device's error if it is dead (QUIT).
        """
        while not self._connected():
            await self._admit()
            try:
                if not self._connected():
                    await self._reconnect_attempt(blocking=True)
            finally:
                self._release()

    async def _reconnect_attempt(self, *, blocking: bool | None = None) -> None:
        """Run by the only admitted request while not connected (qemu semantics)."""
        assert self._admitted == 1
        if self._conn is not None:
            old, self._conn = self._conn, None
            await old.channel.aclose()
        if blocking is None:
            blocking = self.state is State.CONNECTING_WAIT
        try:
            result = await self._worker.get(blocking=blocking)
        finally:
            self._admission.unpark_all()
        if result is None or not self.state.connecting:
            if result is not None:
                await result[0].aclose()
            return
        channel, info = result
        problem = self._incompatibility(info)
        if problem is not None:
            await channel.aclose()
            self._fail(Event.PROTOCOL_VIOLATION, ConnectionLostError(
                f"server at {self.address.display} came back with an incompatible export: "
                f"{problem}", errno=errno.ENODEV))
            return
        self._stats["reconnects"] += 1
        log.info("reconnected to %s", self.address.display)
        self._install(channel, info)

    def _incompatibility(self, new: ExportInfo) -> str | None:
        old = self.info
        if new.size != old.size:
            return f"size changed from {old.size} to {new.size}"
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                     "can_df", "can_cache"):
            if getattr(old, flag) and not getattr(new, flag):
                return f"{flag} is no longer offered"
        if new.is_read_only and not old.is_read_only:
            return "the export became read-only"
        if old.structured and not new.structured:
            return "structured replies are no longer offered"
        if old.extended and not new.extended:
            return "extended headers are no longer offered"
        missing = set(old.contexts) - set(new.contexts)
        if missing:
            return f"meta contexts {sorted(missing)} are no longer offered"
        if new.min_block > old.min_block or new.max_payload < old.max_payload:
            return "block size constraints became stricter"
        if new.tls != old.tls:
            return "TLS use changed"
        return None

    # --- one request ------------------------------------------------------------------

    async def _request(self, command: Command, offset: int, length: int, flags: int = 0,
                       *, payload: memoryview | None = None,
                       buffer: memoryview | None = None) -> _Slot:
        """Run one request to completion with the retry rule; returns its slot."""
        if self._closing or self._fatal is not None:
            raise self._quit_error()
        self._stats["requests"] += 1
        digest = None
        if payload is not None and self.guard_writes:
            digest = hashlib.blake2b(payload, digest_size=16).digest()
        while True:
            conn = self._conn
            try:
                slot = await self._send_request(command, offset, length, flags, payload,
                                                buffer, digest)
                conn = slot.conn
                await self._receive_reply(slot)
                return slot
            except _TransportFailure as failure:
                if self.state is State.CONNECTING_WAIT or (
                        self._connected() and self._conn is not conn):
                    self._stats["retried"] += 1  # reconnecting, or already reconnected
                    continue
                if self._fatal is not None:
                    raise self._quit_error() from None
                raise ConnectionLostError(
                    f"{command.name} {offset}+{length} failed: lost the connection to "
                    f"{self.address.display} ({failure})") from None

    def _free_slot(self) -> int:
        """A free slot, taken round-robin so a cookie is not reused at once (a late
        duplicate reply then hits a free slot and is caught as a protocol violation)."""
        slots, n = self._slots, len(self._slots)
        for step in range(n):
            index = (self._next_slot + step) % n
            if slots[index] is None:
                self._next_slot = index + 1
                return index
        raise AssertionError("admitted without a free slot")

    async def _send_request(self, command: Command, offset: int, length: int, flags: int,
                            payload: memoryview | None, buffer: memoryview | None,
                            digest: bytes | None) -> _Slot:
        if self._live is not None and self._admitted < self.max_in_flight \
                and self._fatal is None:
            self._admitted += 1  # connected with room: _admit() in short
        else:
            await self._admit()
        slot = None
        try:
            if self._live is None:
                await self._reconnect_attempt()
                if not self._connected():
                    raise _TransportFailure(_describe(self._worker.error)
                                            if self._worker.error else "no connection")
            conn = self._live
            assert conn is not None
            wire, channel = conn.wire, conn.channel
            index = self._free_slot()
            reply = ReplyState(command, offset, length, flags, structured=wire.structured,
                               extended=wire.extended, context_ids=conn.context_ids)
            slot = self._slots[index] = _Slot(index + 1, conn, reply, buffer)
            header = encode_request(command, flags, slot.cookie, offset, length,
                                    extended=wire.extended)
            send_mutex = self.send_mutex
            await _lock(send_mutex)
            try:
                if conn is not self._live or channel.broken:
                    raise _TransportFailure("connection lost before sending")
                if digest is not None and payload is not None:
                    _check_unchanged(payload, digest)
                try:
                    if payload is None:
                        await channel.send(header)
                    else:
                        await channel.send(header, payload)
                except TransportError as exc:
                    self._channel_failed(conn, exc)
                    raise _TransportFailure(str(exc)) from None
                except BaseException:
                    if channel.broken:  # cancelled part-way: the stream is out of step
                        self._channel_failed(conn, "a send was cancelled part-way")
                    raise
            finally:
                send_mutex.release()
            return slot
        except BaseException:
            if slot is not None:
                self._slots[slot.cookie - 1] = None
            self._release()
            raise

    # --- receiving --------------------------------------------------------------------

    async def _receive_reply(self, slot: _Slot) -> None:
        """Receive the whole reply of ``slot``; the slot is freed whatever happens."""
        try:
            try:
                await self._receive_chunks(slot)
            except trio.Cancelled:
                await self._finish_cancelled(slot)
                raise
            try:
                error = slot.reply.finish()
            except ProtocolError as exc:
                raise self._protocol_violation(exc) from None
            if error is not None and error.errno == errno.ESHUTDOWN:
                self._channel_failed(slot.conn, "the server is shutting down (ESHUTDOWN)",
                                     soft=True)
                raise _TransportFailure("the server is shutting down")
        finally:
            self._slots[slot.cookie - 1] = None
            self._release()
            self._hand_on()
        if error is not None:
            raise error

    async def _finish_cancelled(self, slot: _Slot) -> None:
        """A cancelled request reads the rest of its own reply (discarding it), so the
        stream stays in step; at most ``cancel_timeout`` long, else the connection is
        declared broken."""
        slot.buffer = None
        with trio.CancelScope(shield=True) as shield:
            shield.deadline = trio.current_time() + self.cancel_timeout
            try:
                await self._receive_chunks(slot)
            except (_TransportFailure, NBDError):
                pass
        if shield.cancelled_caught:  # (this also lets go of the current reply, if ours)
            self._channel_failed(slot.conn, "the reply of a cancelled request did not "
                                            "arrive in time")

    async def _receive_chunks(self, slot: _Slot) -> None:
        """Consume chunks until the reply is finished (resumable after cancellation)."""
        reply = slot.reply
        while not (reply.done and slot.chunk is None):
            header = slot.chunk or await self._wait_for_reply(slot)
            try:
                await self._consume_chunk(slot, header)
            except TransportError as exc:
                self._channel_failed(slot.conn, exc)
                raise _TransportFailure(str(exc)) from None
            except ProtocolError as exc:
                raise self._protocol_violation(exc) from None
            if self._current is header:  # (not if the connection failed meanwhile)
                self._current = None  # not done: we read on; done: _hand_on() as we leave

    def _reply_lost(self) -> Exception:
        """Why a reply will not come: the device is dead, or its connection was lost."""
        if self._fatal is not None:
            return self._quit_error()
        return _TransportFailure("connection lost while waiting for the reply")

    async def _wait_for_reply(self, slot: _Slot) -> ReplyHeader:
        """Until the current reply is ``slot``'s, reading headers for others as needed."""
        while True:
            if slot.conn is not self._live:
                raise self._reply_lost()
            current = self._current
            if current is not None:
                if current.cookie == slot.cookie:
                    return current
                await self._sleep(slot)  # someone else's reply is being consumed
                continue
            receive_mutex = self.receive_mutex
            if receive_mutex.locked():
                await self._sleep(slot)  # someone is reading the next header
                continue
            # Free, and nothing awaited since the checks above: they still hold.
            receive_mutex.acquire_nowait()
            try:
                try:
                    owner = await self._read_header(slot.conn)
                except BaseException:
                    self._wake_one_receiver()  # somebody else must read the stream now
                    raise
                if owner is not slot:
                    self._wake(owner)
            finally:
                receive_mutex.release()

    async def _read_header(self, conn: _Connection) -> _Slot:
        """Read the next reply header on ``conn`` (the live connection) and make it the
        current reply; returns its owner."""
        try:
            raw = await conn.channel.peek_framed(conn.sizes)  # cancellation-safe: a peek
            owner = self._take_header(conn, raw)
        except TransportError as exc:
            self._channel_failed(conn, exc)
            raise _TransportFailure(str(exc)) from None
        except ProtocolError as exc:
            raise self._protocol_violation(exc) from None
        if owner is None:
            raise self._reply_lost()
        return owner

    def _take_header(self, conn: _Connection, raw: memoryview) -> _Slot | None:
        """Consume the reply header peeked in ``raw`` from ``conn`` and make it the
        current reply; returns its owner, who is to be woken (or None, taking nothing,
        if ``conn`` failed while the header was awaited: a send cancelled part-way;
        bytes that were already on their way still arrive, but their request is gone).
        Raises ProtocolError for a bad header or an unknown cookie.
        """
        header = decode_reply_header(raw)
        conn.channel.consume(len(raw))
        if conn is not self._live:
            return None
        owner = self._owner(header)
        self._current = header
        return owner

    def _owner(self, header: ReplyHeader) -> _Slot:
        index = header.cookie - 1
        if 0 <= index < len(self._slots):
            owner = self._slots[index]
            if owner is not None and owner.conn is self._conn:
                return owner
        raise ProtocolError(f"server replied with unknown cookie {header.cookie}")

    async def _sleep(self, slot: _Slot) -> None:
        """Sleep until ``_wake(slot)`` (qemu's qemu_coroutine_yield in the receive loop)."""
        slot.task = trio.lowlevel.current_task()
        slot.receiving = True
        self._sleepers += 1

        def abort(_: object) -> trio.lowlevel.Abort:
            slot.receiving = False  # cancelled while asleep: nobody may wake us now
            self._sleepers -= 1
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake(self, slot: _Slot) -> None:
        """Wake a sleeping receiver (qemu's aio_co_wake)."""
        if slot.receiving:
            slot.receiving = False
            self._sleepers -= 1
            assert slot.task is not None
            trio.lowlevel.reschedule(slot.task)

    def _hand_on(self) -> None:
        """A request leaves: if the stream is free and someone sleeps waiting for a reply,
        read the next header now if it is already here and wake its owner; else wake one
        sleeper to read it (see the module docstring)."""
        if self._current is not None or self.receive_mutex.locked():
            return  # someone has the stream
        if not self._sleepers:
            return  # nobody waits: a request arriving later reads for itself
        live = self._live
        if live is not None:
            try:
                raw = live.channel.peek_framed_nowait(live.sizes)
                if raw is not None:
                    owner = self._take_header(live, raw)
                    assert owner is not None  # live, and nothing awaited
                    self._wake(owner)
                    return
            except ProtocolError as exc:
                self._protocol_violation(exc)  # the device fails; everyone is woken
                return
        self._wake_one_receiver()

    def _wake_one_receiver(self) -> None:
        for slot in self._slots:
            if slot is not None and slot.receiving:
                self._wake(slot)
                return

    def _wake_all_receivers(self) -> None:
        for slot in self._slots:
            if slot is not None:
                self._wake(slot)

    async def _consume_chunk(self, slot: _Slot, header: ReplyHeader) -> None:
        """Read one chunk's payload and update the reply.

        Resumable: progress lives in the slot and every read is either a peek
        (nothing consumed until it completes) or a partial read whose count is saved.
        """
        channel, reply = slot.conn.channel, slot.reply
        if slot.chunk is not header:  # first visit: validate the header once
            slot.chunk, slot.kind, slot.payload = header, "", None
            if header.magic == SIMPLE_REPLY_MAGIC:  # header.simple, without a call
                if reply.simple(header.error):  # READ data follows
                    slot.kind, slot.at, slot.left = "data", 0, reply.length
            else:
                reply.chunk(header)
                if header.type == _OFFSET_DATA:
                    slot.kind = "offset"
                elif header.type != _NONE:
                    slot.kind, slot.left = "payload", header.length
        if slot.kind == "offset":
            offset = await channel.receive_u64()  # cancellation-safe: a peek, then consumed
            size = header.length - 8
            slot.kind, slot.at, slot.left = "data", reply.data(offset, size), size
        if slot.kind == "data":
            while slot.left:
                if slot.buffer is None:
                    n = await channel.receive_some_into(
                        memoryview(_SCRATCH)[:min(slot.left, len(_SCRATCH))])
                else:
                    n = await channel.receive_some_into(
                        slot.buffer[slot.at:slot.at + slot.left])
                    self._stats["bytes_read"] += n
                slot.at += n
                slot.left -= n
        elif slot.kind == "payload":
            event = reply.chunk_payload(header, await self._read_payload(slot, channel))
            if isinstance(event, ReadHole):
                if slot.buffer is not None:
                    pos = event.offset - reply.offset
                    _fill_zeroes(slot.buffer[pos:pos + event.length])
            elif isinstance(event, BlockStatus):
                slot.extents[event.context_id] = event.extents
        slot.chunk, slot.kind, slot.payload = None, "", None

    async def _read_payload(self, slot: _Slot, channel: Channel) -> bytes | bytearray:
        length = slot.left
        if length <= DEFAULT_READ_AHEAD:
            data = bytes(await channel.peek(length))
            channel.consume(length)
            slot.left = 0
            return data
        if slot.payload is None:
            slot.payload = bytearray(length)  # capped by ReplyState.chunk()
        view = memoryview(slot.payload)
        while slot.left:
            done = length - slot.left
            slot.left -= await channel.receive_some_into(view[done:])
        return slot.payload

    # --- the node's own I/O (behind the BlockNode port) --------------------------------

    def _pieces(self, command: Command, offset: int, count: int,
                flags: int = 0) -> list[tuple[int, int]]:
        """(offset, length) pieces of a request, checked, each within the server's limit.

        Whether the export allows a (command, flags) pair is checked once and cached;
        after that only the range and alignment are checked, with plain integers.
        """
        limit = self._limits.get((command, flags))
        if limit is None:
            check_request(self.info, command, 0, 0, flags)  # raises if never allowed
            limit = self._limits[(command, flags)] = self.info.max_length(command, flags)
        info = self.info
        align = info.min_block
        if offset < 0 or count < 0 or offset + count > info.size or offset % align \
                or count % align:
            check_request(info, command, offset, count if count <= limit else limit, flags)
            raise InvalidArgumentError(f"{command.name}: bad range {offset}+{count}")
        if count <= limit:
            return [(offset, count)]
        return [(offset + pos, min(limit, count - pos)) for pos in range(0, count, limit)]

    async def pread(self, count: int, offset: int) -> bytes:
        """Read ``count`` bytes at ``offset``."""
        self._pieces(Command.READ, offset, count)  # check before allocating
        return await super().pread(count, offset)

    async def _do_pread_into(self, buf: memoryview, offset: int) -> None:
        pos = 0
        for at, n in self._pieces(_READ, offset, len(buf)):
            await self._request(_READ, at, n, buffer=buf[pos:pos + n])
            pos += n

    async def _do_pwrite(self, buf: memoryview, offset: int, *, fua: bool = False) -> None:
        flags = CommandFlag.FUA if fua else 0
        pos = 0
        for at, n in self._pieces(_WRITE, offset, len(buf), flags):
            await self._request(_WRITE, at, n, flags, payload=buf[pos:pos + n])
            self._stats["bytes_written"] += n
            pos += n

    async def _do_zero(self, count: int, offset: int, *, may_trim: bool = True,
                       fast: bool = False, fua: bool = False) -> None:
        flags = ((0 if may_trim else CommandFlag.NO_HOLE)
                 | (CommandFlag.FAST_ZERO if fast else 0) | (CommandFlag.FUA if fua else 0))
        for at, n in self._pieces(Command.WRITE_ZEROES, offset, count, flags):
            await self._request(Command.WRITE_ZEROES, at, n, flags)

    async def _do_trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        flags = CommandFlag.FUA if fua else 0
        for at, n in self._pieces(Command.TRIM, offset, count, flags):
            await self._request(Command.TRIM, at, n, flags)

    async def _do_flush(self) -> None:
        self._pieces(Command.FLUSH, 0, 0)
        await self._request(Command.FLUSH, 0, 0)

    async def _do_cache(self, count: int, offset: int) -> None:
        for at, n in self._pieces(Command.CACHE, offset, count):
            await self._request(Command.CACHE, at, n)

    async def _do_block_status(self, count: int, offset: int, *,
                               context: str = BASE_ALLOCATION) -> list[Extent]:
        """Extents of ``context`` covering ``offset .. offset+count``, in order.

        The server may answer with less than asked; this asks again from where it
        stopped until the whole range is described.
        """
        if context not in self.info.contexts:
            raise UnsupportedError(f"meta context {context!r} was not negotiated "
                                   f"(have: {sorted(self.info.contexts)})")
        self._pieces(Command.BLOCK_STATUS, offset, count)
        limit = self._limits[(Command.BLOCK_STATUS, 0)]  # cached by that check
        end = offset + count
        extents: list[Extent] = []
        pos = offset
        while pos < end:
            n = min(limit, end - pos)
            self._pieces(Command.BLOCK_STATUS, pos, n)  # one piece: only checks the range
            slot = await self._request(Command.BLOCK_STATUS, pos, n)
            context_id = slot.conn.wire.contexts[context]
            for length, flags in slot.extents.get(context_id, []):
                length = min(length, end - pos)
                if extents and extents[-1].flags == flags:
                    last = extents[-1]
                    extents[-1] = Extent(last.offset, last.length + length, flags)
                else:
                    extents.append(Extent(pos, length, flags))
                pos += length
                if pos >= end:
                    break
        return extents


async def _lock(lock: trio.Lock) -> None:
    """Acquire ``lock`` without a scheduler trip when it is free (the common case)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def _fill_zeroes(view: memoryview) -> None:
    for start in range(0, len(view), len(_ZEROES)):
        n = min(len(_ZEROES), len(view) - start)
        view[start:start + n] = _ZEROES[:n]


def _check_unchanged(payload: memoryview, digest: bytes) -> None:
    """guard_writes: the payload about to be sent must be what the caller handed over."""
    if hashlib.blake2b(payload, digest_size=16).digest() != digest:
        raise InvalidArgumentError("the write buffer changed while the write was in flight; "
                                   "refusing to send different bytes")


def _transient(exc: Exception) -> bool:
    """Worth retrying while opening: the server may just not be there yet."""
    if isinstance(exc, OptionError):
        return exc.reply_type == OptionReply.ERR_SHUTDOWN  # a server going down
    return isinstance(exc, (OSError, TimeoutError)) and not isinstance(exc, ProtocolError)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


Device = Union[NBDDevice, "MultiConnDevice"]
"""What :func:`open_nbd` yields: one connection, or several (``connections`` > 1)."""


@asynccontextmanager
async def open_nbd(target: str | NBDAddress, *, export: str | None = None,
                   reconnect_delay: float = 0.0, open_timeout: float = 0.0,
                   max_in_flight: int = 16, retry_initial: float = 1.0,
                   retry_max: float = 16.0, meta_contexts: Sequence[str] = (),
                   socket_buffer_size: int | None = None, guard_writes: bool = False,
                   structured: bool = True, extended: bool = True,
                   connect_timeout: float = 30.0, cancel_timeout: float = 5.0,
                   connections: int = 1, tls: TLSMode | str | bool | None = None,
                   tls_context: ssl.SSLContext | None = None, tls_ca: str | None = None,
                   tls_cert: str | None = None, tls_key: str | None = None,
                   tls_hostname: str | None = None,
                   stream_factory: StreamFactory | None = None,
                   ) -> AsyncIterator[Device]:
    """Open an NBD export as an :class:`NBDDevice` (async context manager).

    ``target`` is an NBD URI (``nbd://host/export``, ``nbd+unix:///export?socket=PATH``)
    or a :func:`~blockdrv.parse_uri` result; ``export`` overrides the URI's export name.
    ``reconnect_delay``: how long requests wait for a reconnect after the connection is
    lost (0: fail at once while the worker keeps reconnecting in the background).
    ``open_timeout``: keep trying to connect for that long before giving up (0: one
    attempt).  ``meta_contexts``: contexts to negotiate besides base:allocation (e.g.
    ``qemu:dirty-bitmap:NAME``).  ``cancel_timeout``: how long a cancelled request may
    keep reading its own reply before the connection is declared broken.
    ``connections`` > 1: a :class:`~blockdrv.nbd.multiconn.MultiConnDevice` spreading
    requests over that many connections when the server advertises multi-conn (over one,
    saying why in its ``connections_note``, when it does not); ``max_in_flight`` is per
    connection.

    TLS (:mod:`blockdrv.tls`): ``tls`` is ``"off"``, ``"allow"`` (use it when the server
    offers it) or ``"require"``; ``nbds://`` URIs mean require, and asking for less on
    one is an error.  The server is verified against ``tls_ca`` (default: the system's
    CAs, or the URI's ``tls-certificates`` directory) and ``tls_hostname`` (default: the
    URI's host; ``localhost`` for Unix sockets); ``tls_cert``/``tls_key`` are a client
    certificate; ``tls_context`` replaces all of these with your own SSLContext.  Every
    reconnect redoes TLS.

    ``stream_factory`` replaces the socket connection (tests use memory streams).
    """
    if connections < 1:
        raise InvalidArgumentError(f"connections must be at least 1, not {connections}")
    address = parse_uri(target) if isinstance(target, str) else target
    if export is not None:
        address = replace(address, export=export)
    contexts = tuple(dict.fromkeys((BASE_ALLOCATION, *meta_contexts)))
    tls_settings = client_settings(address, tls=tls, context=tls_context, ca=tls_ca,
                                   cert=tls_cert, key=tls_key, hostname=tls_hostname)
    options = HandshakeOptions(export=address.export, structured=structured,
                               extended=extended, meta_contexts=contexts, tls=tls_settings)
    single = functools.partial(
        _open_one, address, options, open_timeout=open_timeout,
        reconnect_delay=reconnect_delay, max_in_flight=max_in_flight,
        retry_initial=retry_initial, retry_max=retry_max,
        socket_buffer_size=socket_buffer_size, guard_writes=guard_writes,
        stream_factory=stream_factory, connect_timeout=connect_timeout,
        cancel_timeout=cancel_timeout)
    if connections == 1:
        async with single() as device:
            yield device
        return
    from .multiconn import open_multi  # it builds on this module

    async with open_multi(single, connections) as multi:
        yield multi


@asynccontextmanager
async def _open_one(address: NBDAddress, options: HandshakeOptions, *, open_timeout: float,
                    reconnect_delay: float, max_in_flight: int, retry_initial: float,
                    retry_max: float, socket_buffer_size: int | None, guard_writes: bool,
                    stream_factory: StreamFactory | None, connect_timeout: float,
                    cancel_timeout: float) -> AsyncIterator[NBDDevice]:
    try:
        async with trio.open_nursery() as nursery:
            device = NBDDevice(address, options, nursery, reconnect_delay=reconnect_delay,
                               max_in_flight=max_in_flight, retry_initial=retry_initial,
                               retry_max=retry_max, socket_buffer_size=socket_buffer_size,
                               guard_writes=guard_writes, stream_factory=stream_factory,
                               connect_timeout=connect_timeout,
                               cancel_timeout=cancel_timeout)
            try:
                await device._open(open_timeout)
                yield device
            finally:
                await device.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background tasks never raise, so the group holds the body's exception.
        if len(group.exceptions) == 1:
            reraise_alone(group)
        raise
