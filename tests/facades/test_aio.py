"""The asyncio API, blockdrv.aio.open_nbd, under plain asyncio.run (issue 15).

Each test is a plain function that calls ``asyncio.run`` with an overall
``asyncio.timeout``; the ``deadline`` fixture makes a hang fail fast as well
(faulthandler dumps every thread and exits).  Requests are held on the server with
nbdkit's pause filter, and a wrapped stream tells the test when a request has gone out,
so "mid-request" is a fact, not a guess.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import trio
from support.cli import blockdrv as command
from support.deadline import deadline_fixture
from support.peers import Nbdkit, QemuNbd, sparse_image
from support.streams import WrappedStream

import blockdrv
from blockdrv import ConnectError, ConnectionLostError, InvalidArgumentError, aio
from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop

BLOCK = 65536


deadline = deadline_fixture(90)


def run(main: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await main()

    return asyncio.run(bounded())


class Paused:
    """nbdkit's pause filter: requests that arrive while paused wait for resume()."""

    def __init__(self, directory: Path) -> None:
        self.control = str(directory / "pause.ctl")
        self.server = Nbdkit(directory, "--filter=pause", "memory", "64M",
                             f"pause-control={self.control}")

    async def _say(self, command: bytes) -> None:
        reader, writer = await asyncio.open_unix_connection(self.control)
        writer.write(command)
        assert await reader.readexactly(1) == command.upper()
        writer.close()

    async def pause(self) -> None:
        await self._say(b"p")

    async def resume(self) -> None:
        await self._say(b"r")


class Announcer:
    """A stream_factory whose connections tell the asyncio loop of every send."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loop = asyncio.get_running_loop()
        self.sent = asyncio.Event()

    async def __call__(self) -> trio.abc.Stream:
        announcer = self

        class Announcing(WrappedStream):
            async def send_all(self, data) -> None:  # type: ignore[no-untyped-def]
                await self.inner.send_all(data)
                announcer.loop.call_soon_threadsafe(announcer.sent.set)

        return Announcing(await trio.open_unix_socket(self.path))

    async def next_send(self) -> None:
        self.sent.clear()
        await self.sent.wait()


@asynccontextmanager
async def paused_device(directory: Path) -> AsyncIterator[tuple[Paused, Announcer, Any]]:
    """A device on nbdkit behind the pause filter, whose sends are announced."""
    paused = Paused(directory)
    with paused.server as peer:
        announcer = Announcer(peer.endpoint.path)
        async with aio.open_nbd(peer.uri(), stream_factory=announcer) as dev:
            yield paused, announcer, dev


def test_64_concurrent_requests(tmp_path):
    async def main() -> None:
        with Nbdkit(tmp_path, "memory", "64M") as peer:
            async with aio.open_nbd(peer.uri(), max_in_flight=16) as dev:
                assert dev.size == 64 * MiB
                blocks = {i: os.urandom(BLOCK) for i in range(64)}
                await asyncio.gather(*(dev.pwrite(data, i * BLOCK)
                                       for i, data in blocks.items()))
                reads = await asyncio.gather(*(dev.pread(BLOCK, i * BLOCK)
                                               for i in blocks))
                assert reads == list(blocks.values())
                await dev.flush()
                stats = dev.statistics()
                assert stats.requests == 129 and stats.in_flight == 0
    run(main)


def test_server_restart_within_reconnect_delay(tmp_path):
    image = sparse_image(tmp_path / "disk.img", 16 * MiB)

    async def main() -> None:
        with QemuNbd(tmp_path, image) as peer:
            async with aio.open_nbd(peer.uri(), reconnect_delay=30,
                                    retry_initial=0.05, retry_max=0.2) as dev:
                data = os.urandom(BLOCK)
                await dev.pwrite(data, BLOCK)
                await dev.flush()
                peer.kill()
                pending = asyncio.create_task(dev.pread(BLOCK, BLOCK))
                peer.start()
                assert await pending == data
                await dev.wait_connected()
                assert dev.state is blockdrv.State.CONNECTED
                assert dev.statistics().reconnects == 1
    run(main)


def test_cancelled_task_mid_request_keeps_the_stream_in_step(tmp_path):
    async def main() -> None:
        async with paused_device(tmp_path) as (paused, announcer, dev):
            first, second = os.urandom(BLOCK), os.urandom(BLOCK)
            await dev.pwrite(first, 0)
            await dev.pwrite(second, BLOCK)
            await paused.pause()
            buf = bytearray(BLOCK)
            task = asyncio.create_task(dev.pread_into(buf, 0))
            await announcer.next_send()  # the READ is on the wire, held by nbdkit
            task.cancel()
            await asyncio.sleep(0)  # the task sees its cancellation, passes it on
            await dev.wait_connected()  # a round trip through the loop: it has
            assert not task.done()  # and the task waits for its reply to be read
            await paused.resume()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The cancelled read's reply was read and discarded: the next reply
            # is the next request's, and the buffer was left alone.
            assert await dev.pread(BLOCK, BLOCK) == second
            assert buf == bytearray(BLOCK)
            stats = dev.statistics()
            assert stats.reconnects == 0 and stats.state is blockdrv.State.CONNECTED
    run(main)


def test_asyncio_timeout_mid_request_keeps_the_stream_in_step(tmp_path):
    async def main() -> None:
        async with paused_device(tmp_path) as (paused, announcer, dev):
            data = os.urandom(BLOCK)
            await dev.pwrite(data, 2 * BLOCK)
            await paused.pause()
            loop = asyncio.get_running_loop()

            async def expire_then_resume(timeout: asyncio.Timeout) -> None:
                await announcer.next_send()
                timeout.reschedule(loop.time())  # expires now, mid-request
                while not timeout.expired():
                    await asyncio.sleep(0)
                await asyncio.sleep(0)  # the request sees it, passes it on
                await dev.wait_connected()  # a round trip through the loop
                await paused.resume()

            buf = bytearray(BLOCK)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(None) as timeout:
                    helper = asyncio.create_task(expire_then_resume(timeout))
                    await dev.pread_into(buf, 2 * BLOCK)
            # The TimeoutError came once the trio side was done with the request (its
            # reply read and discarded, not written into buf).
            assert dev.statistics().in_flight == 0 and buf == bytearray(BLOCK)
            await helper
            assert await dev.pread(BLOCK, 2 * BLOCK) == data
            assert dev.statistics().reconnects == 0
    run(main)


def test_two_devices_at_once(tmp_path):
    async def main() -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with Nbdkit(tmp_path / "a", "memory", "16M") as a, \
                Nbdkit(tmp_path / "b", "memory", "32M") as b:
            async with aio.open_nbd(a.uri()) as dev_a, aio.open_nbd(b.uri()) as dev_b:
                assert (dev_a.size, dev_b.size) == (16 * MiB, 32 * MiB)

                async def fill(dev: aio.AioDevice, byte: int) -> None:
                    await asyncio.gather(*(dev.pwrite(bytes([byte]) * BLOCK, i * BLOCK)
                                           for i in range(32)))

                await asyncio.gather(fill(dev_a, 0xAA), fill(dev_b, 0xBB))
                got = await asyncio.gather(dev_a.pread(32 * BLOCK, 0),
                                           dev_b.pread(32 * BLOCK, 0))
                assert got == [b"\xaa" * 32 * BLOCK, b"\xbb" * 32 * BLOCK]
    run(main)


def test_closing_with_requests_in_flight(tmp_path):
    async def main() -> None:
        async with paused_device(tmp_path) as (paused, announcer, dev):
            data = os.urandom(BLOCK)
            await dev.pwrite(data, 0)
            await paused.pause()
            reads = [asyncio.create_task(dev.pread(BLOCK, 0)) for _ in range(8)]
            await announcer.next_send()
            closing = asyncio.create_task(dev.aclose())
            await paused.resume()
            await closing
            results = await asyncio.gather(*reads, return_exceptions=True)
        # Closing waited for every request in flight; none was lost or left hanging.
        assert all(r == data or isinstance(r, ConnectionLostError) for r in results)
        assert results[0] == data
        ran: list[str] = []

        async def mark() -> None:
            ran.append("ran")

        other = asyncio.create_task(mark())
        with pytest.raises(ConnectionLostError) as closed:
            await dev.pread(BLOCK, 0)
        assert closed.value.errno == errno.EBADF
        assert ran == ["ran"]  # even failing at once, the call was a checkpoint
        await other
    run(main)


def test_drained_section_and_extents(tmp_path):
    async def main() -> None:
        with Nbdkit(tmp_path, "memory", "8M") as peer:
            async with aio.open_nbd(peer.uri()) as dev:
                await dev.pwrite(b"x" * BLOCK, BLOCK)
                async with dev.drained() as io:
                    assert dev.draining
                    assert await io.pread(BLOCK, BLOCK) == b"x" * BLOCK
                    await io.pwrite(b"y" * BLOCK, 0)
                    outsider = asyncio.create_task(dev.pread(BLOCK, 0))
                    await asyncio.sleep(0)
                    assert not outsider.done()  # waits at the gate
                assert not dev.draining
                assert await outsider == b"y" * BLOCK
                ranges = [r async for r in dev.extents()]
                assert ranges[0].offset == 0 and not ranges[0].hole
                assert sum(r.length for r in ranges) == dev.size
                assert list(await dev.block_status_all(dev.size, 0)) == ["base:allocation"]
    run(main)


def test_errors_are_the_trio_apis(tmp_path):
    async def main() -> None:
        with pytest.raises(ConnectError):
            async with aio.open_nbd(f"nbd+unix:///?socket={tmp_path}/missing.sock"):
                pass
        with pytest.raises(InvalidArgumentError, match="max_in_flight"):
            async with aio.open_nbd("nbd://localhost", max_in_flight=0):
                pass
    run(main)


def test_trio_open_nbd_from_asyncio_points_to_aio():
    async def main() -> None:
        with pytest.raises(RuntimeError) as failure:
            async with blockdrv.open_nbd("nbd://localhost"):
                pass
        message = str(failure.value)
        assert "\n" not in message and "blockdrv.aio.open_nbd" in message
        assert "asyncio" in message
    run(main)


def test_bench_api_asyncio_does_the_same_requests(tmp_path):
    with Nbdkit(tmp_path, "memory", "8M") as peer:
        for api in ("trio", "asyncio"):
            out = command("bench", peer.uri(), "--api", api, "--pattern", "mixed",
                          "--size", "64K", "--depth", "4", "--count", "200", "--json")
            figures = json.loads(out.stdout)
            assert (figures["ops"], figures["bytes"]) == (200, 200 * BLOCK)
        refused = command("bench", peer.uri(), "--api", "asyncio", "--drains", "1",
                          check=False)
        assert refused.returncode == 2 and "--drains" in refused.stderr
