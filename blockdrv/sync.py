"""A blocking API for tooling that is not async: ``blockdrv.sync.open_nbd``.

Theory of operation
-------------------
:func:`open_nbd` starts one background thread that runs a trio loop; inside it the
ordinary async :func:`blockdrv.open_nbd` opens the device, and the loop then waits for
:meth:`SyncDevice.close`.  Each blocking method hands its coroutine to that loop with
``trio.from_thread.run`` and waits for the result, so calls from several threads at
once become concurrent requests on the one device (each thread waits for its own), and
exceptions arrive as the same classes the async API raises.  ``drained()`` holds an
async drained section open in a task of the loop while the ``with`` body runs.

After :meth:`close` (or if the loop has ended) every call raises
:class:`~blockdrv.ConnectionLostError` with EBADF.
"""

from __future__ import annotations

import errno
import threading
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import trio

from . import nbd
from .node import Extent
from .protocol.constants import BASE_ALLOCATION
from .protocol.errors import ConnectionLostError
from .protocol.export import ExportInfo
from .protocol.uri import NBDAddress
from .taskgroups import first_failure

__all__ = ["SyncDevice", "open_nbd"]

T = TypeVar("T")


def open_nbd(target: str | NBDAddress, **options: Any) -> SyncDevice:
    """Open an NBD export as a blocking :class:`SyncDevice`.

    Takes the arguments of the async :func:`blockdrv.open_nbd` (``export``,
    ``reconnect_delay``, ``connections``, ...) and raises what it raises.  Use it in a
    ``with`` statement or call :meth:`SyncDevice.close`.
    """
    device = SyncDevice()
    device._start(target, options)
    return device


class SyncDevice:
    """A device whose methods block; safe to use from several threads at once."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._device: nbd.Device | None = None
        self._nursery: trio.Nursery | None = None
        self._close: trio.Event | None = None
        self._opened = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # --- the loop thread ------------------------------------------------------------

    def _start(self, target: str | NBDAddress, options: dict[str, Any]) -> None:
        self._thread = threading.Thread(target=trio.run, args=(self._main, target, options),
                                        name="blockdrv-sync", daemon=True)
        self._thread.start()
        self._opened.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error

    async def _main(self, target: str | NBDAddress, options: dict[str, Any]) -> None:
        try:
            async with nbd.open_nbd(target, **options) as device:
                async with trio.open_nursery() as nursery:
                    self._token = trio.lowlevel.current_trio_token()
                    self._device, self._nursery = device, nursery
                    self._close = trio.Event()
                    self._opened.set()
                    await self._close.wait()
                    nursery.cancel_scope.cancel()  # drained sections still held open
        except Exception as exc:  # a task of ours failed: keep the failure itself
            self._error = first_failure(exc) if isinstance(exc, ExceptionGroup) else exc
        finally:
            self._device = None
            self._opened.set()

    def _run(self, afn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``afn`` in the loop and wait for its result."""
        async def call() -> T:
            return await afn(*args, **kwargs)

        return self._in_loop(lambda token: trio.from_thread.run(call, trio_token=token))

    def _run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn`` in the loop thread (no await) and return its result."""
        return self._in_loop(lambda token: trio.from_thread.run_sync(fn, *args,
                                                                     trio_token=token))

    def _in_loop(self, call: Callable[[trio.lowlevel.TrioToken], T]) -> T:
        token = self._token
        if token is None or self._device is None:
            raise ConnectionLostError("the device is closed", errno=errno.EBADF)
        try:
            return call(token)
        except (trio.RunFinishedError, trio.Cancelled):  # closed before or while it ran
            raise ConnectionLostError("the device is closed", errno=errno.EBADF) from None

    @property
    def device(self) -> nbd.Device:
        """The async device inside the loop (only to be used from that loop)."""
        if self._device is None:
            raise ConnectionLostError("the device is closed", errno=errno.EBADF)
        return self._device

    def close(self) -> None:
        """Wait for the requests in flight, close the connection(s), stop the thread."""
        if self._thread is None:
            return
        thread, self._thread = self._thread, None
        if self._token is not None and self._close is not None:
            try:
                trio.from_thread.run_sync(self._close.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        thread.join()
        self._token = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> SyncDevice:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncDevice {self._device!r}>"

    # --- what the async device offers -----------------------------------------------

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

    def statistics(self) -> nbd.DeviceStatistics:
        """A snapshot of the device's figures."""
        return self._run_sync(self.device.statistics)

    def pread(self, count: int, offset: int) -> bytes:
        """Read ``count`` bytes at ``offset``."""
        return self._run(self.device.pread, count, offset)

    def pread_into(self, buf: bytearray | memoryview, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``."""
        self._run(self.device.pread_into, buf, offset)

    def pwrite(self, buf: bytes | bytearray | memoryview, offset: int, *,
               fua: bool = False) -> None:
        """Write ``buf`` at ``offset`` (``fua``: durable when this returns)."""
        self._run(self.device.pwrite, buf, offset, fua=fua)

    def zero(self, count: int, offset: int, *, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        """Write zeroes (WRITE_ZEROES)."""
        self._run(self.device.zero, count, offset, may_trim=may_trim, fast=fast, fua=fua)

    def trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        """Discard a range (TRIM)."""
        self._run(self.device.trim, count, offset, fua=fua)

    def flush(self) -> None:
        """Make every completed write durable (FLUSH)."""
        self._run(self.device.flush)

    def cache(self, count: int, offset: int) -> None:
        """Ask the server to prefetch a range (CACHE)."""
        self._run(self.device.cache, count, offset)

    def block_status(self, count: int, offset: int, *,
                     context: str = BASE_ALLOCATION) -> list[Extent]:
        """Extents of ``context`` from ``offset`` (at least one, at most ``count`` bytes)."""
        return self._run(self.device.block_status, count, offset, context=context)

    def cancel_in_flight(self) -> None:
        """Fail requests waiting for a reconnect now."""
        self._run_sync(self.device.cancel_in_flight)

    def wait_connected(self) -> None:
        """Block until the device is connected again."""
        self._run(self.device.wait_connected)

    @contextmanager
    def drained(self) -> Iterator[None]:
        """A drained section: requests in flight finish, new ones wait until it ends."""
        release = self._run(self._enter_drained)
        try:
            yield
        finally:
            try:
                self._run_sync(release.set)
            except ConnectionLostError:
                pass  # closed meanwhile: the section ended with the loop

    async def _enter_drained(self) -> trio.Event:
        assert self._nursery is not None
        return await self._nursery.start(self._hold_drained)  # type: ignore[no-any-return]

    async def _hold_drained(self, task_status: trio.TaskStatus[trio.Event]) -> None:
        release = trio.Event()
        async with self.device.drained():
            task_status.started(release)
            await release.wait()
