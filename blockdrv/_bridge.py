"""DeviceLoop: one open device in a trio loop on a thread of its own.

Theory of operation
-------------------
The blocking API (:mod:`blockdrv.sync`) and the asyncio one (:mod:`blockdrv.aio`) both
keep the trio device where it is at home: a thread runs ``trio.run``, and in it the
ordinary :func:`blockdrv.open_nbd` opens the device and holds it open until
:meth:`DeviceLoop.request_close`.  Callers on other threads reach it in two ways:

- blocking: ``trio.from_thread.run`` with :attr:`DeviceLoop.token` (what ``sync`` does);
- without blocking: :meth:`DeviceLoop.spawn` starts a task in the loop's ``calls``
  nursery (``TrioToken.run_sync_soon``, which never blocks the caller), and the task
  reports back however its owner likes (``aio`` completes an asyncio future).

Closing ends the drained sections held for other threads, then closes the device,
which waits (bounded by ``reconnect_delay`` + ``cancel_timeout``) for the requests in
flight and fails those still waiting; whatever is left in ``calls`` after that (a
``wait_connected()``) is cancelled.  ``on_opened`` is called (in the loop thread) once
the open succeeded or failed, ``on_ended`` once the loop is about to end.

``parameters_of`` gives ``blockdrv.sync.open_nbd`` and ``blockdrv.aio.open_nbd`` exactly the
parameters of :func:`blockdrv.open_nbd` (a ``ParamSpec`` for type checkers, the model's
signature for ``help()``), so the twenty parameters are written once.
"""

from __future__ import annotations

import errno
import inspect
import threading
from typing import Any, Awaitable, Callable, ParamSpec, TypeVar

import trio

from . import nbd
from .protocol.errors import ConnectionLostError
from .protocol.export import ExportInfo
from .protocol.uri import NBDAddress
from .util.taskgroups import first_failure

P = ParamSpec("P")
R = TypeVar("R")


def closed_error() -> ConnectionLostError:
    """What every call on a closed device raises."""
    return ConnectionLostError("the device is closed", errno=errno.EBADF)


class DeviceLoop:
    """A trio loop on its own thread, holding one device open (see the module doc)."""

    def __init__(self, target: str | NBDAddress, options: dict[str, Any], *,
                 on_opened: Callable[[], None], on_ended: Callable[[], None],
                 name: str) -> None:
        self.token: trio.lowlevel.TrioToken | None = None
        self.device: nbd.Device | None = None
        self.sections: trio.Nursery | None = None  # drained sections held for callers
        self.error: BaseException | None = None  # why the open (or the loop) failed
        self._calls: trio.Nursery | None = None
        self._close = trio.Event()
        self._opening = trio.CancelScope()  # request_close while opening cancels it
        self._on_opened, self._on_ended = on_opened, on_ended
        self._thread = threading.Thread(target=trio.run, args=(self._main, target, options),
                                        name=name, daemon=True)

    def start(self) -> None:
        """Start the thread; ``on_opened`` tells when the device is open (or failed)."""
        self._thread.start()

    def join(self) -> None:
        """Wait for the thread to end (after :meth:`request_close`, or a failed open)."""
        self._thread.join()

    async def _main(self, target: str | NBDAddress, options: dict[str, Any]) -> None:
        self.token = trio.lowlevel.current_trio_token()
        try:
            with self._opening:
                async with nbd.open_nbd(target, **options) as device:
                    async with trio.open_nursery() as calls:
                        async with trio.open_nursery() as sections:
                            self.device, self.sections = device, sections
                            self._calls = calls
                            self._on_opened()
                            await self._close.wait()
                            sections.cancel_scope.cancel()
                        self._calls = None  # refuse new calls from here on
                        await device.aclose()  # waits (bounded) for requests in flight
                        calls.cancel_scope.cancel()
        except Exception as exc:  # the open failed, or a task of ours: keep the failure
            self.error = first_failure(exc) if isinstance(exc, ExceptionGroup) else exc
        finally:
            self._finished()

    def _finished(self) -> None:
        self.device = self.sections = self._calls = None
        self._on_opened()  # a failed open (harmless when it already opened)
        self._on_ended()

    def spawn(self, task: Callable[[], Awaitable[None]],
              refused: Callable[[BaseException], None]) -> None:
        """Start ``task`` in the loop, from any thread, without blocking; if the device
        closes before it starts, ``refused`` is called (in the loop) with the error."""
        def start() -> None:
            if self._calls is None:
                refused(closed_error())
            else:
                self._calls.start_soon(task)

        self.run_sync_soon(start)

    def run_sync_soon(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` in the loop, from any thread, without waiting for it."""
        token = self.token
        if token is None:
            raise closed_error()
        try:
            token.run_sync_soon(fn)
        except trio.RunFinishedError:
            raise closed_error() from None

    def request_close(self) -> None:
        """Ask the loop to close the device and end (from any thread; does not wait);
        an open still under way is abandoned."""
        def close() -> None:
            if self.device is None:
                self._opening.cancel()  # still opening: give up
            self._close.set()

        try:
            self.run_sync_soon(close)
        except ConnectionLostError:
            pass  # the loop has ended already


class LoopDeviceView:
    """The device's properties, for a front end (sync, aio) holding a DeviceLoop in
    ``_device_loop`` (None once closed)."""

    _device_loop: DeviceLoop | None

    @property
    def device(self) -> nbd.Device:
        """The trio device inside the loop (only to be used from that loop)."""
        device = None if self._device_loop is None else self._device_loop.device
        if device is None:
            raise closed_error()
        return device

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self.device.size

    @property
    def info(self) -> ExportInfo:
        """The export as negotiated."""
        return self.device.info

    @property
    def connections(self) -> int:
        """How many connections requests are spread over."""
        return self.device.connections

    @property
    def state(self) -> nbd.State:
        """The connection state (see :class:`blockdrv.State`)."""
        return self.device.state

    @property
    def connections_note(self) -> str:
        """Why fewer connections are used than were asked for ("" when not)."""
        return self.device.connections_note

    @property
    def draining(self) -> bool:
        """A drained section of the device is active (new requests wait)."""
        return self.device.draining

    def __repr__(self) -> str:
        device = None if self._device_loop is None else self._device_loop.device
        return f"<{type(self).__name__} {device!r}>"

def parameters_of(model: Callable[P, Any]) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """Declare that the decorated function takes exactly ``model``'s parameters."""
    def apply(function: Callable[..., R]) -> Callable[P, R]:
        returns = inspect.signature(function).return_annotation
        function.__signature__ = inspect.signature(model).replace(  # type: ignore[attr-defined]
            return_annotation=returns)
        return function

    return apply
