"""ConnectionStates: the NBD device's connections, states, reconnects and admission.

The lowest of the three layers of :class:`~blockdrv.nbd.NBDDevice` (see
:mod:`blockdrv.nbd.device` for the theory of operation): it owns the settings, the
connection worker, the state machine (:mod:`~blockdrv.nbd.states`) with the
reconnect-delay timer, installing a (re)connection and checking that a new export is
compatible, and the admission rule.  :class:`~blockdrv.nbd.requests.RequestEngine` sends
and receives requests on top of it; :class:`~blockdrv.nbd.NBDDevice` adds opening,
closing and the public properties.
"""

from __future__ import annotations

import errno
import logging

import trio
from trio_util import AsyncValue

from ..block.node import BlockNode
from ..io.transport import Channel, TransportError
from ..protocol.constants import Command
from ..protocol.errors import (
    ConnectionLostError,
    NBDError,
    ProtocolError,
)
from ..protocol.export import ExportInfo, incompatibility
from ..protocol.uri import NBDAddress
from ..protocol.wire import encode_request
from .admission import Admission, AdmissionMonitor
from .connection import ClientConnection
from .dispatch import Dispatcher, Session
from .handshake import HandshakeOptions, connect_export
from .locks import FifoMutex
from .settings import ConnectionSettings
from .states import Event, State, next_state

log = logging.getLogger("blockdrv.nbd")


class _TransportFailure(Exception):
    """Internal: this attempt of a request failed with the connection."""



class ConnectionStates(BlockNode):
    """Connections, states and admission of an NBD device (see the module docstring)."""

    def __init__(self, address: NBDAddress, options: HandshakeOptions,
                 nursery: trio.Nursery, settings: ConnectionSettings) -> None:
        super().__init__()
        self.address = address
        self.options = options
        self.settings = settings
        # Copies of the (frozen) settings the request path reads on every request.
        self.reconnect_delay = settings.reconnect_delay
        self.max_in_flight = settings.max_in_flight
        self.guard_writes = settings.guard_writes
        self.cancel_timeout = settings.cancel_timeout
        self._nursery = nursery

        self.send_mutex = FifoMutex()
        self._dispatch = Dispatcher(settings.max_in_flight)
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
            on_ready=self._adopt, retry_initial=settings.retry_initial,
            retry_max=settings.retry_max, attempt_timeout=settings.connect_timeout)

    @property
    def state(self) -> State:
        """The connection state (DESIGN.md section 3)."""
        return self._state.value  # type: ignore[no-any-return]

    @property
    def state_value(self) -> AsyncValue:
        """The state as a trio_util ``AsyncValue``, to wait on or compose with others
        (multi-conn composes its members'); read it, never set it."""
        return self._state

    async def wait_state(self, *states: State) -> State:
        """Wait until the device is in one of ``states``; returns it.

        Raises: nothing (cancellation only).
        """
        return await self._state.wait_value(lambda s: s in states)  # type: ignore[no-any-return]

    async def _connect(self) -> tuple[Channel, ExportInfo]:
        return await connect_export(self.address, self.options,
                                    stream_factory=self.settings.stream_factory,
                                    socket_buffer_size=self.settings.socket_buffer_size)

    @staticmethod
    async def _close_connection(result: tuple[Channel, ExportInfo]) -> None:
        await result[0].aclose()


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
        return incompatibility(self.info, new)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
