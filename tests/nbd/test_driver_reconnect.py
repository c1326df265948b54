"""Reconnecting: requests wait out an outage and are sent again (writes included), fail
fast without reconnect_delay while the worker retries on its schedule anyway, the
delay's timer, cancel_in_flight(), a server that comes back changed, ESHUTDOWN, and a
cut at every byte of the handshake and of a request."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.testing
from support.inprocess import (
    URI,
    disk,
    open_in_process,
    serving,
    wait_until_waiting,
)
from support.outcomes import outcome
from support.peers import QemuNbd, sparse_image
from support.streams import CuttingStream
from support.workload import workload

from blockdrv import (
    ConnectError,
    ConnectionLostError,
    State,
    open_nbd,
)
from blockdrv.util.units import MiB


async def test_no_reconnect_delay_reconnects_in_the_background(autojump_clock):
    """reconnect_delay=0: the request that finds the server gone fails at once, and the
    worker goes on reconnecting by itself (1, 2, 4 ... s); once it has, the device is
    connected again without any request having to pick the connection up."""
    with trio.fail_after(600):
        async with open_in_process(reconnect_delay=0, retry_initial=1,
                                   retry_max=4) as (dev, srv):
            await dev.pwrite(b"z" * 4096, 0)
            srv.kill()
            with pytest.raises(ConnectionLostError):
                await dev.pread(4096, 0)
            assert dev.state is State.CONNECTING_NOWAIT
            await trio.sleep(2.5)  # attempts at 0, 1 and 3 s: the server is back at 2.5
            assert dev.statistics().connect_attempts >= 3  # 1 (open) + 2 retries
            srv.restart()
            with trio.fail_after(5):  # the retry due at 3 s (7 s at the latest)
                await dev.wait_state(State.CONNECTED)
            assert dev.statistics().reconnects == 1
            assert await dev.pread(4096, 0) == b"z" * 4096


@pytest.mark.interop
async def test_no_reconnect_delay_reconnects_to_qemu_nbd(tmp_path: Path):
    """The issue's reproducer: qemu-nbd killed while the device is idle, back 1 s later."""
    image = sparse_image(tmp_path / "disk.img", 8 * MiB)
    with QemuNbd(tmp_path, image) as server, trio.fail_after(60):
        async with open_nbd(server.uri(), reconnect_delay=0) as dev:
            await dev.pwrite(b"q" * 4096, 0)
            server.kill()
            with pytest.raises(ConnectionLostError):
                await dev.pread(4096, 0)
            await trio.sleep(1)
            server.start()
            with trio.fail_after(10):  # the worker retries at 1, 3, 7 s after the loss
                await dev.wait_state(State.CONNECTED)
            assert await dev.pread(4096, 0) == b"q" * 4096


async def test_server_restart_within_reconnect_delay_loses_nothing(autojump_clock):
    """qemu iotest 264: requests keep flowing across a server restart."""
    shadow = bytearray(1 * MiB)
    with trio.fail_after(600):
        async with open_in_process(disk(1 * MiB), reconnect_delay=10,
                                   retry_initial=0.5) as (dev, srv):

            async def outage():
                await trio.sleep(0.5)
                srv.kill()
                await srv.restart_after(3)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(outage)
                done = await workload(dev, shadow, tasks=8, ops=200, seed=1)
            assert done == 1600
            assert await dev.pread(len(shadow), 0) == shadow
            stats = dev.statistics()
            assert stats.reconnects == 1 and stats.retried >= 1
            assert stats.state is State.CONNECTED


async def test_write_resent_after_drop_right_after_its_data(autojump_clock):
    """qemu iotest 277: the connection drops right after the server received a 3 MiB
    write; a new server comes up; the write is sent again and succeeds."""
    export = disk(8 * MiB)
    data = os.urandom(3 * MiB)
    with trio.fail_after(60):
        async with open_in_process(export, reconnect_delay=10,
                                   retry_initial=0.5) as (dev, srv):
            (connection,) = srv.server.connections
            connection.faults.drop_after(1)

            async def new_server():
                await dev.wait_state(State.CONNECTING_WAIT)
                srv.kill()
                await srv.restart_after(2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(new_server)
                await dev.pwrite(data, MiB)
            assert dev.statistics().retried == 1
            assert await dev.pread(3 * MiB, MiB) == data
            assert bytes(export.backend.pages[16][:1024]) == data[:1024]


async def test_no_reconnect_delay_fails_fast_and_recovers(autojump_clock):
    with trio.fail_after(120):
        async with open_in_process(reconnect_delay=0, retry_initial=1,
                                   retry_max=4) as (dev, srv):
            await dev.pwrite(b"a" * 512, 0)
            srv.kill()
            start = trio.current_time()
            for _ in range(3):
                with pytest.raises(ConnectionLostError) as excinfo:
                    await dev.pread(512, 0)
                assert excinfo.value.errno == errno.EIO
            assert trio.current_time() - start < 0.1  # promptly, not after a delay
            assert dev.state is State.CONNECTING_NOWAIT
            attempts = dev.statistics().connect_attempts
            await trio.sleep(30)
            assert dev.statistics().connect_attempts > attempts  # the worker keeps trying
            srv.restart()
            await srv.accepted.wait()  # the worker reached the new server
            await trio.testing.wait_all_tasks_blocked()
            assert await dev.pread(512, 0) == b"a" * 512
            assert dev.state is State.CONNECTED


async def test_cancel_in_flight_fails_waiting_requests_at_once(autojump_clock):
    with trio.fail_after(60):
        async with open_in_process(reconnect_delay=100) as (dev, srv):
            srv.kill()
            outcomes = []

            async def request(i):
                try:
                    await dev.pread(512, i * 512)
                    outcomes.append("ok")
                except ConnectionLostError as exc:
                    outcomes.append(exc.errno)

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(request, i)
                await wait_until_waiting(dev, 5)
                assert dev.state is State.CONNECTING_WAIT
                start = trio.current_time()
                dev.cancel_in_flight()
            assert outcomes == [errno.EIO] * 5
            assert trio.current_time() - start < 1  # not after reconnect_delay


async def _byte_counts(direction: str) -> tuple[int, int]:
    """Bytes in ``direction`` that the open takes, and the open plus one 4096-byte read."""
    async with open_in_process(wrap=CuttingStream) as (dev, srv):
        first = srv.streams[0]
        opened = first.sent if direction == "send" else first.received
        await dev.pread(4096, 0)
        total = first.sent if direction == "send" else first.received
        return opened, total  # (before the closing DISC)


@pytest.mark.parametrize("direction", ["send", "receive"])
async def test_disconnect_at_every_byte_never_hangs(direction, autojump_clock):
    """qemu iotest 083: cut the connection at every byte offset of the handshake and of
    a request.  A cut during the open ends it with a clean ConnectError (there is no
    connection to retry on yet); a cut in the request is an error without
    reconnect_delay and a successful retry with it; never a hang, never wrong data."""
    with trio.fail_after(30):
        opened, total = await _byte_counts(direction)
    for reconnect_delay in (0, 5):
        for cut in range(0, total + 1):
            with trio.fail_after(30):
                async with serving(disk()) as srv:
                    first = True

                    async def cutting(srv=srv, cut=cut):
                        nonlocal first
                        stream = await srv.connect()
                        if first:
                            first = False
                            key = "send_limit" if direction == "send" else "receive_limit"
                            return CuttingStream(stream, **{key: cut})
                        return stream

                    result = "ok"
                    try:
                        async with open_nbd(URI, stream_factory=cutting,
                                            reconnect_delay=reconnect_delay,
                                            retry_initial=0.1) as dev:
                            result = "open"
                            assert await dev.pread(4096, 0) == bytes(4096)
                            result = "ok"
                    except ConnectError:
                        assert result == "ok"
                        result = "open failed"
                    except ConnectionLostError:
                        result = "read failed"
            # A send that reaches the limit breaks the stream at once (its bytes went
            # out, the sender is told it failed); a receive breaks on the next read.
            last_byte = 1 if direction == "send" else 0
            if cut < opened + last_byte:
                expected = "open failed"
            elif cut < total + last_byte:
                expected = "ok" if reconnect_delay else "read failed"
            else:
                expected = "ok"  # the read's reply was in before the cut
            assert result == expected, (direction, reconnect_delay, cut, opened, total)


@pytest.mark.parametrize("comes_back", [False, True])
async def test_more_requests_than_max_in_flight_when_the_server_dies(comes_back,
                                                                     autojump_clock):
    export = disk()
    export.faults.delay("read", 1)
    with trio.fail_after(120):
        async with open_in_process(export, max_in_flight=4, reconnect_delay=5,
                                   retry_initial=0.5) as (dev, srv):
            outcomes = []

            async def request(i):
                await outcome(outcomes, dev.pread, 512, i * 512)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(request, i)
                await wait_until_waiting(dev, 20)
                srv.kill()
                if comes_back:
                    await srv.restart_after(2)
            assert len(outcomes) == 20
            assert set(outcomes) == ({"ok"} if comes_back else {"failed"})
            assert dev.statistics().in_flight == 0


async def test_reconnect_delay_timer_is_removed_when_connected_again(autojump_clock):
    with trio.fail_after(120):
        async with open_in_process(reconnect_delay=10, retry_initial=0.5) as (dev, srv):
            srv.kill()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(srv.restart_after, 1)
                await dev.pread(512, 0)
            stats = dev.statistics()
            assert stats.reconnects == 1 and not stats.reconnect_timer_armed
            await trio.sleep(60)
            stats = dev.statistics()
            assert stats.reconnect_delay_expired == 0 and stats.state is State.CONNECTED


async def test_reconnect_delay_timer_does_not_fire_after_close(autojump_clock):
    with trio.fail_after(120):
        async with serving(disk()) as srv:
            async with open_nbd(URI, stream_factory=srv.connect, reconnect_delay=10) as dev:
                srv.kill()
                with trio.move_on_after(1):
                    await dev.pread(512, 0)
                assert dev.statistics().reconnect_timer_armed
            assert not dev.statistics().reconnect_timer_armed
            await trio.sleep(60)
            assert dev.statistics().reconnect_delay_expired == 0
            assert dev.state is State.QUIT


async def test_server_back_with_a_different_size_is_refused(autojump_clock):
    with trio.fail_after(60):
        async with open_in_process(reconnect_delay=10, retry_initial=0.5) as (dev, srv):
            await dev.pwrite(b"o" * 512, 0)
            srv.kill()
            other = disk(16 * MiB)
            srv.exports = [other]
            srv.restart()
            with pytest.raises(ConnectionLostError, match="size changed from 8388608 to "
                                                          "16777216"):
                await dev.pwrite(b"n" * 512, 0)
            assert dev.state is State.QUIT
            assert other.backend.pages == {}  # nothing reached the wrong disk
            with pytest.raises(ConnectionLostError):
                await dev.pread(512, 0)


async def test_eshutdown_reply_is_a_soft_disconnect_then_a_retry(autojump_clock):
    export = disk()
    export.faults.fail("read", errno=errno.ESHUTDOWN, times=1)
    with trio.fail_after(60):
        async with open_in_process(export, reconnect_delay=10,
                                   retry_initial=0.5) as (dev, srv):
            await dev.pwrite(b"s" * 512, 0)
            assert await dev.pread(512, 0) == b"s" * 512
            assert dev.statistics().reconnects == 1


async def test_wait_connected_waits_for_the_worker_in_nowait(autojump_clock):
    with trio.fail_after(120):
        async with open_in_process(reconnect_delay=0, retry_initial=1,
                                   retry_max=2) as (dev, srv):
            srv.kill()
            with pytest.raises(ConnectionLostError):
                await dev.pread(512, 0)
            assert dev.state is State.CONNECTING_NOWAIT
            async with trio.open_nursery() as nursery:
                nursery.start_soon(srv.restart_after, 5)
                await dev.wait_connected()
                assert dev.state is State.CONNECTED and trio.current_time() >= 5
            assert await dev.pread(512, 0) == bytes(512)
