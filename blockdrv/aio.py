"""An asyncio API: ``async with blockdrv.aio.open_nbd(URI) as dev: await dev.pread(...)``.

Theory of operation
-------------------
The device runs in a trio loop on a thread of its own (:class:`~blockdrv.loopthread.
DeviceLoop`, shared with :mod:`blockdrv.sync`); README.md says why not trio's guest mode.
Every request is a :class:`_Call`: the asyncio side creates a future and asks the loop,
without blocking (``TrioToken.run_sync_soon``), to start a trio task that runs the
request in a cancel scope of its own; the task completes the future through
``loop.call_soon_threadsafe``.  Exceptions are the same classes the trio API raises.

*Cancellation.*  When the asyncio task waiting for a call is cancelled (``task.cancel()``,
``asyncio.timeout``), it cancels the call's trio scope and then waits for the trio task
to end before it lets the CancelledError go on.  The trio side does what a cancelled
trio request does (a request already sent reads and discards its own reply, bounded by
``cancel_timeout``), so the stream stays in step, and a buffer handed to ``pread_into``
is never written after the call has returned.  Further cancels during that wait are
absorbed; the wait is bounded by the device's ``cancel_timeout``, and by the loop's end.

*Drained sections.*  A trio drained section belongs to the task that entered it.  So
``async with dev.drained() as io`` starts a task in the loop that enters the section
and then runs the calls made through ``io``, one after another, as the section's owner;
leaving the ``async with`` ends that task, and returns once the section is over.

*Closing* (leaving ``open_nbd``'s block, or :meth:`AioDevice.aclose`) waits, bounded,
for the requests in flight, as the trio device does; calls still waiting then (and any
made later) raise :class:`~blockdrv.ConnectionLostError` with EBADF.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, Sequence, TypeVar

import outcome
import trio

from . import nbd
from ._bridge import DeviceLoop, LoopDeviceView, closed_error, parameters_of
from .block.node import BLOCK_STATUS_WINDOW, BlockRange, BlockStatus, Extent
from .protocol.errors import ConnectionLostError
from .protocol.uri import NBDAddress

__all__ = ["AioDevice", "AioDrainedSection", "open_nbd"]

T = TypeVar("T")


@parameters_of(nbd.open_nbd)
def open_nbd(target: str | NBDAddress, **options: Any
             ) -> AbstractAsyncContextManager[AioDevice]:
    """Open an NBD export for asyncio: ``async with open_nbd(URI, ...) as dev``.

    Takes exactly the arguments of :func:`blockdrv.open_nbd` (type checkers see them)
    and yields an :class:`AioDevice` with the trio device's methods.

    Raises:
        InvalidArgumentError, ConnectError, OptionError, ProtocolError, TLSError: as
            :func:`blockdrv.open_nbd` does, for the same reasons.
    """
    return _opened(target, options)


@asynccontextmanager
async def _opened(target: str | NBDAddress, options: dict[str, Any]
                  ) -> AsyncIterator[AioDevice]:
    device = AioDevice()
    await device._open(target, options)
    try:
        yield device
    finally:
        await device.aclose()


class _Call(Generic[T]):
    """One request from asyncio, run by a trio task (see the module doc)."""

    __slots__ = ("_loop", "_fn", "future", "_scope", "_cancelled")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 fn: Callable[[Any], Awaitable[T]] | None) -> None:
        self._loop = loop
        self._fn = fn  # None: the end of a drained section
        self.future: asyncio.Future[outcome.Outcome[T]] = loop.create_future()
        self._scope: trio.CancelScope | None = None
        self._cancelled = False

    async def run(self, target: Any) -> None:
        """(trio) Run the request on ``target`` and report how it went."""
        assert self._fn is not None
        with trio.CancelScope() as scope:
            self._scope = scope
            if self._cancelled:
                scope.cancel()
            result = await outcome.acapture(self._fn, target)
        self.report(result)

    def cancel(self) -> None:
        """(trio) The asyncio caller was cancelled: cancel the request."""
        self._cancelled = True
        if self._scope is not None:
            self._scope.cancel()

    def report(self, result: outcome.Outcome[T]) -> None:
        """(any thread) Complete the future in the asyncio loop."""
        try:
            self._loop.call_soon_threadsafe(self.settle, result)
        except RuntimeError:
            pass  # the asyncio loop is closed: nobody waits any more

    def report_error(self, exc: BaseException) -> None:
        """(any thread) Fail the call with ``exc``."""
        self.report(outcome.Error(exc))

    def settle(self, result: outcome.Outcome[T]) -> None:
        """(asyncio) Complete the future, unless it is already."""
        if not self.future.done():
            self.future.set_result(result)

    async def result(self, abandon: Callable[[], None]) -> T:
        """(asyncio) Wait for the outcome; on cancellation call ``abandon`` (which
        cancels the trio side), wait for the trio side to end, then raise."""
        try:
            result = await self.future  # (no shield: it costs a future per request)
        except asyncio.CancelledError:
            if not self.future.cancelled():
                raise  # settled meanwhile: nothing runs in trio any more
            self.future = self.future.get_loop().create_future()  # settle() uses this one
            try:
                abandon()
            except ConnectionLostError:
                pass  # the loop has ended: it settled (or will settle) every call
            await outlast_cancellation(self.future)
            raise
        if isinstance(result, outcome.Error) and isinstance(result.error, trio.Cancelled):
            raise closed_error() from None  # the device closed under the request
        return result.unwrap()


async def outlast_cancellation(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, whatever cancels the waiting task meanwhile."""
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue


class _AioCalls:
    """The I/O methods, each one :meth:`_call` of the trio node's (or section's)."""

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def pread(self, count: int, offset: int) -> bytes:
        """Read ``count`` bytes at ``offset``.

        Raises: as :meth:`blockdrv.NBDDevice.pread`.
        """
        return await self._call(lambda node: node.pread(count, offset))

    async def pread_into(self, buf: bytearray | memoryview, offset: int, *,
                         holes: list[tuple[int, int]] | None = None) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (written only until this
        returns, cancelled or not); ``holes`` as in :meth:`blockdrv.NBDDevice.pread_into`.

        Raises: as :meth:`blockdrv.NBDDevice.pread`.
        """
        await self._call(lambda node: node.pread_into(buf, offset, holes=holes))

    async def pwrite(self, buf: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        """Write ``buf`` at ``offset``; ``buf`` must not change until this returns.

        Raises: as :meth:`blockdrv.NBDDevice.pread`.
        """
        await self._call(lambda node: node.pwrite(buf, offset, fua=fua))

    async def zero(self, count: int, offset: int, *, may_trim: bool = True,
                   fast: bool = False, fua: bool = False) -> None:
        """Write zeroes (WRITE_ZEROES).

        Raises: as :meth:`blockdrv.NBDDevice.pread`.
        """
        await self._call(lambda node: node.zero(count, offset, may_trim=may_trim,
                                                fast=fast, fua=fua))

    async def trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        """Discard a range (TRIM).

        Raises: as :meth:`blockdrv.NBDDevice.pread`.
        """
        await self._call(lambda node: node.trim(count, offset, fua=fua))

    async def flush(self) -> None:
        """Make every completed write durable (FLUSH).

        Raises: as :meth:`blockdrv.NBDDevice.pread`.
        """
        await self._call(lambda node: node.flush())

    async def cache(self, count: int, offset: int) -> None:
        """Ask the server to prefetch a range (CACHE).

        Raises: as :meth:`blockdrv.NBDDevice.pread`.
        """
        await self._call(lambda node: node.cache(count, offset))

    async def block_status_all(self, count: int, offset: int) -> BlockStatus:
        """Every negotiated context's extents over the range, by context name (see
        :meth:`blockdrv.NBDDevice.block_status_all`).

        Raises: as :meth:`blockdrv.NBDDevice.block_status_all`.
        """
        return await self._call(lambda node: node.block_status_all(count, offset))

    async def block_status(self, count: int, offset: int, *,
                           context: str | None = None) -> list[Extent]:
        """Extents of one ``context`` (None: the only one negotiated); see
        :meth:`blockdrv.NBDDevice.block_status`.

        Raises: as :meth:`blockdrv.NBDDevice.block_status`.
        """
        return await self._call(lambda node: node.block_status(count, offset,
                                                               context=context))


class AioDevice(_AioCalls, LoopDeviceView):
    """A device for asyncio code; create it with :func:`open_nbd`.

    Offers the trio device's methods as coroutines (``pread``, ``pread_into``,
    ``pwrite``, ``zero``, ``trim``, ``flush``, ``cache``, ``block_status``,
    ``block_status_all``, ``extents``, ``wait_connected``, ``aclose``), the same
    properties and ``statistics()``, and ``drained()``.  Every method raises what the
    trio one raises; after closing, :class:`~blockdrv.ConnectionLostError` (EBADF).
    """

    def __init__(self) -> None:
        self._device_loop: DeviceLoop | None = None
        self._ended: asyncio.Future[None] | None = None
        self._pending: set[_Call[Any]] = set()

    # --- opening and closing ---------------------------------------------------------

    async def _open(self, target: str | NBDAddress, options: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._ended = ended = loop.create_future()

        def settle(future: asyncio.Future[None]) -> Callable[[], None]:
            def later() -> None:
                if not future.done():
                    future.set_result(None)

            def now() -> None:
                try:
                    loop.call_soon_threadsafe(later)
                except RuntimeError:
                    pass  # the asyncio loop is closed
            return now

        self._device_loop = runner = DeviceLoop(target, options, on_opened=settle(opened),
                                           on_ended=settle(ended), name="blockdrv-aio")
        ended.add_done_callback(lambda _: self._fail_pending())
        runner.start()
        try:
            await asyncio.shield(opened)
        except asyncio.CancelledError:
            runner.request_close()
            await outlast_cancellation(ended)
            runner.join()
            self._device_loop = None
            raise
        if runner.device is None:
            runner.join()
            self._device_loop = None
            raise runner.error or closed_error()

    async def aclose(self) -> None:
        """Wait (bounded) for the requests in flight, close, stop the loop's thread.

        Raises what a background failure of the loop left, if anything."""
        runner, self._device_loop = self._device_loop, None
        if runner is None:
            return
        runner.request_close()
        assert self._ended is not None
        await outlast_cancellation(self._ended)
        runner.join()  # the loop has ended: only trio's last clean-up is left
        if runner.error is not None:
            raise runner.error

    def _fail_pending(self) -> None:
        """(asyncio) The loop has ended: no call still waiting will be answered."""
        for call in list(self._pending):
            call.settle(outcome.Error(closed_error()))

    def _live(self) -> DeviceLoop:
        runner = self._device_loop
        if runner is None or runner.device is None:
            raise closed_error()
        return runner

    async def _submit(self, fn: Callable[[Any], Awaitable[T]] | None,
                      send: Callable[[DeviceLoop, _Call[T]], None]) -> T:
        """Hand ``fn`` to the loop with ``send`` and wait for its outcome (always a
        checkpoint: a call on a closed device yields once before it raises)."""
        try:
            runner = self._live()
        except ConnectionLostError:
            await asyncio.sleep(0)
            raise
        call: _Call[T] = _Call(asyncio.get_running_loop(), fn)
        self._pending.add(call)
        try:
            send(runner, call)
            return await call.result(lambda: runner.run_sync_soon(call.cancel))
        finally:
            self._pending.discard(call)

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        def send(runner: DeviceLoop, call: _Call[T]) -> None:
            device = runner.device
            runner.spawn(lambda: call.run(device), call.report_error)

        return await self._submit(fn, send)

    # --- what the trio device offers ----------------------------------------------------

    def statistics(self) -> nbd.DeviceStatistics:
        """A snapshot of the device's figures (read without waiting for the loop)."""
        return self.device.statistics()

    def cancel_in_flight(self) -> None:
        """Fail requests waiting for a reconnect (done in the loop, soon)."""
        self._live().run_sync_soon(self.device.cancel_in_flight)

    async def wait_connected(self) -> None:
        """Wait until the device is connected again.

        Raises: as :meth:`blockdrv.NBDDevice.wait_connected`.
        """
        await self._call(lambda node: node.wait_connected())

    async def extents(self, offset: int = 0, length: int | None = None, *,
                      contexts: Sequence[str] | None = None,
                      window: int = BLOCK_STATUS_WINDOW) -> AsyncIterator[BlockRange]:
        """Ranges with every context's flags (see :meth:`blockdrv.NBDDevice.extents`).

        Raises: as :meth:`block_status`.
        """
        ranges = self.device.extents(offset, length, contexts=contexts, window=window)
        try:
            while True:
                try:
                    block = await self._call(lambda _: ranges.__anext__())
                except StopAsyncIteration:
                    return
                yield block
        finally:
            try:
                await self._call(lambda _: ranges.aclose())  # type: ignore[attr-defined]
            except ConnectionLostError:
                pass  # the loop has ended: nothing left to close

    @asynccontextmanager
    async def drained(self) -> AsyncIterator[AioDrainedSection]:
        """A drained section: requests in flight finish, new ones wait until it ends.

        Yields an :class:`AioDrainedSection`: this task's own I/O goes through it.
        """
        requests = await self._call(lambda _: self._enter_drained())
        section = AioDrainedSection(self, requests)
        try:
            yield section
        finally:
            try:
                await section._end()
            except ConnectionLostError:
                pass  # closed meanwhile: the section ended with the loop

    async def _enter_drained(self) -> trio.MemorySendChannel[_Call[Any]]:
        """(trio) Start the task that holds the section and runs its calls."""
        sections = self._live().sections
        if sections is None:
            raise closed_error()
        return await sections.start(self._hold_drained)  # type: ignore[no-any-return]

    async def _hold_drained(self, task_status: trio.TaskStatus[Any]) -> None:
        send, receive = trio.open_memory_channel[_Call[Any]](float("inf"))
        end: _Call[Any] | None = None
        try:
            async with self.device.drained() as io:
                task_status.started(send)
                async for call in receive:
                    if call._fn is None:
                        end = call
                        break
                    await call.run(io)
        finally:
            send.close()
            while True:  # calls that came too late
                try:
                    receive.receive_nowait().report_error(closed_error())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if end is not None:
                end.report(outcome.Value(None))


class AioDrainedSection(_AioCalls):
    """The owner's way in while an asyncio drained section is active: the device's I/O
    methods, run by the task in the loop that holds the section (one at a time)."""

    def __init__(self, device: AioDevice, requests: trio.MemorySendChannel[_Call[Any]]
                 ) -> None:
        self._device = device
        self._requests = requests

    def __repr__(self) -> str:
        return f"<AioDrainedSection of {self._device!r}>"

    def _send(self, runner: DeviceLoop, call: _Call[Any]) -> None:
        def send() -> None:
            try:
                self._requests.send_nowait(call)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                call.report_error(closed_error())

        runner.run_sync_soon(send)

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        return await self._device._submit(fn, self._send)

    async def _end(self) -> None:
        await self._device._submit(None, self._send)
