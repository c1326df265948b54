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

import threading
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import trio

from . import nbd
from ._bridge import DeviceLoop, LoopDeviceView, closed_error, parameters_of
from .block.node import BlockStatus, Extent
from .protocol.errors import ConnectionLostError
from .protocol.uri import NBDAddress

__all__ = ["SyncDevice", "open_nbd"]

T = TypeVar("T")


@parameters_of(nbd.open_nbd)
def open_nbd(target: str | NBDAddress, **options: Any) -> SyncDevice:
    """Open an NBD export as a blocking :class:`SyncDevice`.

    Takes exactly the arguments of the async :func:`blockdrv.open_nbd` (``export``,
    ``reconnect_delay``, ``connections``, ...; type checkers see them) and raises what
    it raises.  Use it in a ``with`` statement or call :meth:`SyncDevice.close`.

    Raises:
        InvalidArgumentError, ConnectError, OptionError, ProtocolError, TLSError: as
            :func:`blockdrv.open_nbd` does, for the same reasons.
    """
    device = SyncDevice()
    device._start(target, options)
    return device


class SyncDevice(LoopDeviceView):
    """A device whose methods block; safe to use from several threads at once."""

    def __init__(self) -> None:
        self._device_loop: DeviceLoop | None = None
        self._opened = threading.Event()
        self._ended = False

    # --- the loop thread ------------------------------------------------------------

    def _start(self, target: str | NBDAddress, options: dict[str, Any]) -> None:
        self._device_loop = loop = DeviceLoop(target, options, on_opened=self._opened.set,
                                       on_ended=lambda: None, name="blockdrv-sync")
        loop.start()
        self._opened.wait()
        if loop.error is not None:
            loop.join()
            self._device_loop = None
            raise loop.error

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
        loop = self._device_loop
        if loop is None or loop.token is None or loop.device is None:
            raise closed_error()
        try:
            return call(loop.token)
        except (trio.RunFinishedError, trio.Cancelled):  # closed before or while it ran
            raise closed_error() from None

    def close(self) -> None:
        """Wait for the requests in flight, close the connection(s), stop the thread."""
        loop, self._device_loop = self._device_loop, None
        if loop is None:
            return
        loop.request_close()
        loop.join()
        if loop.error is not None:
            raise loop.error

    def __enter__(self) -> SyncDevice:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # --- what the async device offers -----------------------------------------------

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
                     context: str | None = None) -> list[Extent]:
        """Extents of one ``context`` covering the range (None: the only one negotiated;
        see :meth:`blockdrv.NBDDevice.block_status`)."""
        return self._run(self.device.block_status, count, offset, context=context)

    def block_status_all(self, count: int, offset: int) -> BlockStatus:
        """Every negotiated context's extents over the range, by context name."""
        return self._run(self.device.block_status_all, count, offset)

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
        sections = None if self._device_loop is None else self._device_loop.sections
        assert sections is not None
        return await sections.start(self._hold_drained)  # type: ignore[no-any-return]

    async def _hold_drained(self, task_status: trio.TaskStatus[trio.Event]) -> None:
        release = trio.Event()
        async with self.device.drained():
            task_status.started(release)
            await release.wait()
