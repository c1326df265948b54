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
import hashlib
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import trio
from trio_util import AsyncValue

from ..block.node import BLOCK_STATUS_WINDOW, BlockNode, BlockStatus, Extent
from ..io.transport import Channel, TransportError
from ..protocol.constants import Command, CommandFlag
from ..protocol.errors import (
    ConnectError,
    ConnectionLostError,
    InvalidArgumentError,
    NBDError,
    ProtocolError,
    UnsupportedError,
)
from ..protocol.export import ExportInfo, check_request
from ..protocol.replies import ReplyCursor
from ..protocol.uri import NBDAddress
from ..protocol.wire import encode_request
from .admission import Admission, AdmissionMonitor
from .connection import ClientConnection, worth_retrying_open
from .dispatch import MAX_SLOTS, Dispatcher, ReplyLost, Session, Slot
from .handshake import HandshakeOptions, StreamFactory, connect_export
from .locks import FifoMutex
from .states import Event, State, next_state

log = logging.getLogger("blockdrv.nbd")

# Hot-path constants: looking up an enum member costs more than the check it is used in.
_READ, _WRITE = Command.READ, Command.WRITE
_READ_KEY, _WRITE_KEY = (_READ, 0), (_WRITE, 0)  # (command, flags) keys of _limits


class _TransportFailure(Exception):
    """Internal: this attempt of a request failed with the connection."""


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


class NBDDevice(BlockNode):
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

    def __init__(self, address: NBDAddress, options: HandshakeOptions,
                 nursery: trio.Nursery, *, reconnect_delay: float = 0.0,
                 max_in_flight: int = 16, retry_initial: float = 1.0,
                 retry_max: float = 16.0, socket_buffer_size: int | None = None,
                 guard_writes: bool = False, stream_factory: StreamFactory | None = None,
                 connect_timeout: float = 30.0, cancel_timeout: float = 5.0) -> None:
        if reconnect_delay < 0:
            raise InvalidArgumentError("reconnect_delay must not be negative")
        if not 1 <= max_in_flight <= MAX_SLOTS:
            raise InvalidArgumentError(f"max_in_flight must be within 1..{MAX_SLOTS}")
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

        self.send_mutex = FifoMutex()
        self._dispatch = Dispatcher(max_in_flight)
        self.receive_mutex = self._dispatch.receive_mutex
        self._state = AsyncValue(State.CONNECTING_NOWAIT)
        self._admission = Admission(self._may_admit)
        self._limits: dict[tuple[Command, int], int] = {}  # allowed (command, flags)
        self._session: Session | None = None  # the latest connection (None: closed)
        self._info: ExportInfo | None = None  # the first connection's (what users see)
        self._fatal: NBDError | None = None
        self._delay_timer: trio.CancelScope | None = None
        self._closing = False
        self._closed = trio.Event()
        self._stats = {"requests": 0, "bytes_written": 0, "reconnects": 0, "retried": 0,
                       "delay_expired": 0, "sends_finished_cancelled": 0}
        self._worker: ClientConnection[tuple[Channel, ExportInfo]] = ClientConnection(
            self._connect, nursery, close_result=self._close_connection,
            on_ready=self._adopt, retry_initial=retry_initial, retry_max=retry_max,
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
        """Wait until the device is in one of ``states``; returns it.

        Raises: nothing (cancellation only).
        """
        return await self._state.wait_value(lambda s: s in states)  # type: ignore[no-any-return]

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
        worker.retry_if = worth_retrying_open
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

    async def _send_disc(self, session: Session) -> None:
        """NBD_CMD_DISC on ``session``, best effort, within a second."""
        with trio.move_on_after(1):
            try:
                async with self.send_mutex:
                    await session.channel.send(encode_request(
                        Command.DISC, 0, 0, 0, 0, extended=session.wire.extended))
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
        self._dispatch.live = self._session if new is State.CONNECTED else None
        if old is State.CONNECTING_WAIT and self._delay_timer is not None:
            self._delay_timer.cancel()  # the timer never outlives CONNECTING_WAIT
            self._delay_timer = None
        if new is State.CONNECTING_WAIT:
            self._start_delay_timer()
        self._admission.grant(rule_changed=True)  # the oldest waiters may enter now

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
        old = self._session
        if old is not None and old.channel is not channel:
            self._discard(old.channel)
        self._session = Session(channel, info)
        self._dispatch.current = None
        self._transition(Event.CONNECTED)

    def _discard(self, channel: Channel) -> None:
        """Stop all I/O on a connection now and close it in the background."""
        channel.shutdown()
        self._nursery.start_soon(channel.aclose, name="nbd-close-connection")

    def _channel_failed(self, session: Session, why: object, *, soft: bool = False) -> None:
        """A transport failure on ``session`` (idempotent; ignored once it is not live).

        ``soft``: the server asked to go (ESHUTDOWN): nothing more is sent but an
        NBD_CMD_DISC, in the background, before the socket is shut down.
        """
        if session is not self._dispatch.live:
            return
        log.info("connection to %s lost: %s", self.address.display, why)
        if soft:
            self._nursery.start_soon(self._soft_close, session, name="nbd-soft-close")
        else:
            session.channel.shutdown()
        self._transition(Event.TRANSPORT_FAILURE)
        self._dispatch.wake_all()
        self._worker.start()  # reconnect now, on the retry schedule, waited for or not

    async def _soft_close(self, session: Session) -> None:
        await self._send_disc(session)  # after any send in progress, under send_mutex
        session.channel.shutdown()

    def _fail(self, event: Event, error: NBDError) -> None:
        """Go to QUIT for good: every request from now on fails with ``error``."""
        if self._fatal is None:
            self._fatal = error
        if self._session is not None:
            self._session.channel.shutdown()
        self._transition(event)
        self._worker.cancel_wait()
        self._dispatch.wake_all()

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
        self._transition(Event.CANCEL_IN_FLIGHT)  # lets waiters in if WAIT became NOWAIT
        self._worker.cancel_wait()

    # --- admission and reconnecting -----------------------------------------------------

    def monitor_admission(self, monitor: AdmissionMonitor | None) -> None:
        """Report every admission to ``monitor`` (blockdrv-fuzz's fairness check)."""
        self._admission.monitor = monitor

    def _may_admit(self, admitted: int) -> bool:
        state = self._state._value  # (AsyncValue's getter, inlined: once a request)
        if state is State.CONNECTED:
            return admitted < self.max_in_flight
        return admitted == 0 or state is State.QUIT

    async def wait_connected(self) -> None:
        """Wait until the device is connected again.

        Requests in CONNECTING_NOWAIT fail at once while the worker reconnects in the
        background; this waits for the worker instead (e.g. after ``cancel_in_flight()``,
        before resuming work).  Raises the device's error if it is dead (QUIT).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._connected():
            await self._admission.enter()
            try:
                if self._fatal is not None:
                    raise self._quit_error()
                if not self._connected():
                    await self._reconnect_attempt(blocking=True)
            finally:
                self._admission.leave()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _reconnect_attempt(self, *, blocking: bool | None = None) -> None:
        """Run by the only admitted request while not connected (qemu semantics)."""
        if blocking is None:
            blocking = self.state is State.CONNECTING_WAIT
        result = await self._worker.get(blocking=blocking)
        if result is None:
            return
        if not self.state.connecting:  # closed meanwhile
            await result[0].aclose()
            return
        self._adopt(result)

    def _adopt(self, result: tuple[Channel, ExportInfo]) -> bool:
        """Install a new connection if the export is still the same (the worker's
        ``on_ready`` too); True if the result was taken (installed or refused)."""
        if self._info is None or not self.state.connecting:
            return False  # not open yet (open() takes it), or closed
        channel, info = result
        problem = self._incompatibility(info)
        if problem is not None:
            self._discard(channel)
            self._fail(Event.PROTOCOL_VIOLATION, ConnectionLostError(
                f"server at {self.address.display} came back with an incompatible export: "
                f"{problem}", errno=errno.ENODEV))
            return True
        self._stats["reconnects"] += 1
        log.info("reconnected to %s", self.address.display)
        self._install(channel, info)
        return True

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
                       buffer: memoryview | None = None) -> Slot:
        """Run one request to completion with the retry rule; returns its slot."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closing or self._fatal is not None:
            raise self._quit_error()
        self._stats["requests"] += 1
        digest = None
        if payload is not None and self.guard_writes:
            digest = hashlib.blake2b(payload, digest_size=16).digest()
        while True:
            session = self._session
            try:
                slot = await self._send_request(command, offset, length, flags, payload,
                                                buffer, digest)
                session = slot.session
                await self._receive_reply(slot)
            except _TransportFailure as failure:
                if self.state is State.CONNECTING_WAIT or (
                        self._connected() and self._session is not session):
                    self._stats["retried"] += 1  # reconnecting, or already reconnected
                    continue
                if self._fatal is not None:
                    raise self._quit_error() from None
                raise ConnectionLostError(
                    f"{command.name} {offset}+{length} failed: lost the connection to "
                    f"{self.address.display} ({failure})") from None
            if not slot.yielded and slot.session.channel.waits == slot.waits:
                # Served without waiting for anything: still a schedule point, as every
                # trio operation is, so a fast server cannot starve the other tasks.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return slot

    async def _send_request(self, command: Command, offset: int, length: int, flags: int,
                            payload: memoryview | None, buffer: memoryview | None,
                            digest: bytes | None) -> Slot:
        """Admission, a slot, and the request on the wire; returns the slot."""
        admission = self._admission
        waited = False if admission.try_enter() else await admission.enter()
        slot = None
        try:
            if self._fatal is not None:
                raise self._quit_error()
            if self._dispatch.live is None:
                waited = True
                await self._reconnect_attempt()
                if not self._connected():
                    raise _TransportFailure(_describe(self._worker.error)
                                            if self._worker.error else "no connection")
            session = self._dispatch.live
            assert session is not None
            wire, channel = session.wire, session.channel
            cursor = ReplyCursor(command, offset, length, flags, structured=wire.structured,
                                 extended=wire.extended, context_ids=session.context_ids)
            slot = self._dispatch.open_slot(session, cursor, buffer)
            slot.yielded = waited
            header = encode_request(command, flags, slot.cookie, offset, length,
                                    extended=wire.extended)
            send_mutex = self.send_mutex
            if send_mutex.held:
                slot.yielded = True
                await send_mutex.acquire()
            else:
                send_mutex.held = True  # free: the common case, no scheduler trip
            try:
                if session is not self._dispatch.live or channel.broken:
                    raise _TransportFailure("connection lost before sending")
                if digest is not None and payload is not None:
                    _check_unchanged(payload, digest)
                try:
                    if payload is None:
                        slot.cancelled_at = await channel.send(
                            header, finish_within=self.cancel_timeout)
                    else:
                        slot.cancelled_at = await channel.send(
                            header, payload, finish_within=self.cancel_timeout)
                    if slot.cancelled_at is not None:
                        self._stats["sends_finished_cancelled"] += 1
                except TransportError as exc:
                    self._channel_failed(session, exc)
                    raise _TransportFailure(str(exc)) from None
                except BaseException:
                    if channel.broken:  # cancelled part-way, and it could not be finished
                        self._channel_failed(session, "a cancelled send could not be "
                                                      "finished in time")
                    raise
            finally:
                send_mutex.release()
            return slot
        except BaseException:
            if slot is not None:
                self._dispatch.close_slot(slot)
            admission.leave()
            raise

    # --- receiving --------------------------------------------------------------------

    async def _receive_reply(self, slot: Slot) -> None:
        """Receive the whole reply of ``slot``; the slot is freed whatever happens."""
        try:
            try:
                await self._dispatch.receive(slot)
            except trio.Cancelled:
                await self._finish_cancelled(slot)
                raise
            except (TransportError, ProtocolError, ReplyLost) as exc:
                raise self._receive_failed(slot, exc) from None
            try:
                error = slot.cursor.finish()
            except ProtocolError as exc:
                raise self._protocol_violation(exc) from None
            if error is not None and error.errno == errno.ESHUTDOWN:
                self._channel_failed(slot.session, "the server is shutting down (ESHUTDOWN)",
                                     soft=True)
                raise _TransportFailure("the server is shutting down")
        finally:
            self._dispatch.close_slot(slot)
            self._admission.leave()
            try:
                self._dispatch.hand_on()
            except ProtocolError as exc:
                self._protocol_violation(exc)  # the device fails; everyone is woken
        if error is not None:
            raise error

    def _receive_failed(self, slot: Slot, exc: Exception) -> Exception:
        """What a failure of the dispatcher's receive means for the device, and the
        exception the request raises for it."""
        if isinstance(exc, TransportError):
            self._channel_failed(slot.session, exc)
            return _TransportFailure(str(exc))
        if isinstance(exc, ProtocolError):
            return self._protocol_violation(exc)
        if self._fatal is not None:  # ReplyLost: the device is dead, or the connection
            return self._quit_error()
        return _TransportFailure("connection lost while waiting for the reply")

    async def _finish_cancelled(self, slot: Slot) -> None:
        """A cancelled request reads the rest of its own reply (discarding it), so the
        stream stays in step; at most ``cancel_timeout`` after the cancellation arrived
        (finishing its send counts too), else the connection is declared broken."""
        slot.buffer = None
        with trio.CancelScope(shield=True) as shield:
            shield.deadline = (slot.cancelled_at or trio.current_time()) + self.cancel_timeout
            try:
                await self._dispatch.receive(slot)
            except (TransportError, ProtocolError, ReplyLost) as exc:
                self._receive_failed(slot, exc)
        if shield.cancelled_caught:  # (this also lets go of the current reply, if ours)
            self._channel_failed(slot.session, "the reply of a cancelled request did not "
                                               "arrive in time")

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
        """Read ``count`` bytes at ``offset``.

        Raises: as :meth:`BlockNode.pread`.
        """
        self._pieces(Command.READ, offset, count)  # check before allocating
        return await super().pread(count, offset)

    def _one_piece(self, key: tuple[Command, int], offset: int, count: int) -> bool:
        """True if a request (command and flags ``key``) at ``offset`` of ``count``
        bytes is allowed and fits in one piece, as far as the cheap checks tell: the
        pair was allowed before, and the range is in bounds and aligned.  False means
        "let :meth:`_pieces` decide" (split, check or raise)."""
        limit = self._limits.get(key)
        info = self._info
        if limit is None or info is None or count > limit or offset < 0:
            return False
        align = info.min_block
        return offset + count <= info.size and not offset % align and not count % align

    async def _do_pread_into(self, buf: memoryview, offset: int,
                             holes: list[tuple[int, int]] | None = None) -> None:
        if self._one_piece(_READ_KEY, offset, len(buf)):  # the common case
            slot = await self._request(_READ, offset, len(buf), buffer=buf)
            if holes is not None and slot.holes:
                holes += slot.holes
            return
        pos = 0
        for at, n in self._pieces(_READ, offset, len(buf)):
            slot = await self._request(_READ, at, n, buffer=buf[pos:pos + n])
            if holes is not None and slot.holes:
                holes += slot.holes
            pos += n

    async def _do_pwrite(self, buf: memoryview, offset: int, *, fua: bool = False) -> None:
        if not fua and self._one_piece(_WRITE_KEY, offset, len(buf)):  # the common case
            await self._request(_WRITE, offset, len(buf), payload=buf)
            self._stats["bytes_written"] += len(buf)
            return
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

    async def _do_block_status(self, count: int, offset: int) -> BlockStatus:
        """Every negotiated context's extents over ``offset .. offset+count``.

        One request per window of at most :data:`~blockdrv.node.BLOCK_STATUS_WINDOW`
        bytes.  A server may describe less than it was asked, and each context a
        different length: the contexts are cut to what all of them describe and the
        next request starts there, until the whole range is described.
        """
        names = list(self.info.contexts)
        if not names:
            raise UnsupportedError("no metadata context was negotiated: the server does "
                                   "not offer block status")
        self._pieces(Command.BLOCK_STATUS, offset, count)
        align = self.info.min_block
        window = min(self._limits[(Command.BLOCK_STATUS, 0)], BLOCK_STATUS_WINDOW)
        window -= window % align
        end = offset + count
        result: BlockStatus = {name: [] for name in names}
        pos = offset
        while pos < end:
            n = min(window, end - pos)
            self._pieces(Command.BLOCK_STATUS, pos, n)  # one piece: only checks the range
            slot = await self._request(Command.BLOCK_STATUS, pos, n)
            ids = slot.session.wire.contexts
            replies = [slot.extents[ids[name]] for name in names]
            described = min(n, *(sum(length for length, _ in extents)
                                 for extents in replies))
            if described % align and pos + described < end:  # keep requests aligned
                described -= described % align
            if described <= 0:
                raise ProtocolError(f"server described nothing of BLOCK_STATUS {pos}+{n}")
            for name, extents in zip(names, replies, strict=True):
                _append_extents(result[name], pos, described, extents)
            pos += described
        return result


def _append_extents(out: list[Extent], offset: int, length: int,
                    extents: list[tuple[int, int]]) -> None:
    """(length, flags) pairs from ``offset``, cut at ``length``, added to ``out`` with
    adjacent equal flags merged."""
    pos, end = offset, offset + length
    for size, flags in extents:
        size = min(size, end - pos)
        if out and out[-1].flags == flags and out[-1].offset + out[-1].length == pos:
            last = out[-1]
            out[-1] = Extent(last.offset, last.length + size, flags)
        else:
            out.append(Extent(pos, size, flags))
        pos += size
        if pos >= end:
            break


def _check_unchanged(payload: memoryview, digest: bytes) -> None:
    """guard_writes: the payload about to be sent must be what the caller handed over."""
    if hashlib.blake2b(payload, digest_size=16).digest() != digest:
        raise InvalidArgumentError("the write buffer changed while the write was in flight; "
                                   "refusing to send different bytes")


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
