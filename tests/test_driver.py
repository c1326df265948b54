"""The driver's behaviour (issue 4), against the embedded server in the same trio run.

The server is reached through trio.testing memory streams, so timing tests run on the
autojump clock and nothing here waits for real time.  Real servers are in
test_driver_interop.py.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio
import trio.testing
from support.inprocess import URI, InProcessServer, open_in_process, serving
from support.outcomes import outcome
from support.streams import CountingStream, CuttingStream, Gate, LateStream, unbuffered_pair
from support.workload import workload

from blockdrv import (
    ConnectError,
    ConnectionLostError,
    InvalidArgumentError,
    ProtocolError,
    RequestError,
    State,
    UnsupportedError,
    open_nbd,
)
from blockdrv.server import Export, MemoryBackend

MiB = 1024 * 1024


def disk(size=8 * MiB, **kw) -> Export:
    return Export("", MemoryBackend(size), **kw)


async def wait_until_waiting(dev, count: int) -> None:
    """Until ``count`` requests are in flight and everything has settled."""
    await dev.in_flight.wait_value(lambda n: n >= count)
    await trio.testing.wait_all_tasks_blocked()


# 1 -------------------------------------------------------------------------------------


async def test_no_task_reads_an_idle_connection(autojump_clock):
    with trio.fail_after(5000):
        async with open_in_process(wrap=CountingStream, reconnect_delay=5) as (dev, srv):
            await dev.pwrite(b"x" * 4096, 0)
            (first,) = srv.streams
            await trio.testing.wait_all_tasks_blocked()
            reads = first.receives
            await trio.sleep(3600)  # an hour of idleness: nobody touches the socket
            assert first.receives == reads and first.waiting == 0
            # The server dies and comes back while the device is idle: nothing
            # notices until the next request, which then reconnects.
            srv.kill()
            srv.restart()
            await trio.sleep(60)
            assert dev.state is State.CONNECTED and dev.statistics().reconnects == 0
            assert await dev.pread(4096, 0) == b"x" * 4096
            assert dev.statistics().reconnects == 1


# 2 -------------------------------------------------------------------------------------


async def test_replies_in_any_order_reach_their_owners():
    with trio.fail_after(60):
        async with open_in_process(server_options={"shuffle_replies": True, "seed": 5},
                                   max_in_flight=16) as (dev, srv):
            blocks = {i: os.urandom(16384) for i in range(64)}
            async with trio.open_nursery() as nursery:
                for i, data in blocks.items():
                    nursery.start_soon(dev.pwrite, data, i * 16384)
            results = {}

            async def read(i):
                results[i] = await dev.pread(16384, i * 16384)

            async with trio.open_nursery() as nursery:
                for i in blocks:
                    nursery.start_soon(read, i)
            assert results == blocks


async def test_read_payload_lands_in_the_callers_buffer(monkeypatch):
    """Over a real socket the data of a READ is received straight into the caller's
    buffer: every recv for the payload targets a slice of that buffer."""
    import socket as stdlib_socket

    from blockdrv.transport import Channel

    targets = []
    original = Channel._recv_into

    async def spy(self, view):
        targets.append((view.obj, len(view)))
        return await original(self, view)

    with trio.fail_after(60):
        async with serving(disk(32 * MiB)) as srv:

            async def socket_pair():
                a, b = stdlib_socket.socketpair()
                srv.nursery.start_soon(srv.server.handle_stream,
                                       trio.SocketStream(trio.socket.from_stdlib_socket(b)))
                return trio.SocketStream(trio.socket.from_stdlib_socket(a))

            async with open_nbd(URI, stream_factory=socket_pair) as dev:
                data = os.urandom(16 * MiB)
                await dev.pwrite(data, 0)
                buf = bytearray(16 * MiB)
                monkeypatch.setattr(Channel, "_recv_into", spy)
                await dev.pread_into(buf, 0)
                monkeypatch.undo()
                assert buf == data
                into_caller = sum(n for obj, n in targets if obj is buf)
                assert into_caller >= 16 * MiB - 128 * 1024  # all but the read-ahead


async def test_full_duplex_write_does_not_block_a_read_reply(autojump_clock):
    """While one task streams a 32 MiB WRITE (and the server is not reading it), another
    task receives its READ reply: sending and receiving never block each other."""
    gate = Gate()
    export = disk(64 * MiB)
    export.faults.delay("read", 1)
    with trio.fail_after(60):
        async with serving(export) as srv:

            async def gated():
                client, server_side = unbuffered_pair(gate)
                srv.nursery.start_soon(srv.server.handle_stream, server_side)
                return client

            async with open_nbd(URI, stream_factory=gated) as dev:
                read_done, write_done = trio.Event(), trio.Event()

                async def read():
                    await dev.pread(4096, 0)
                    read_done.set()

                async def write():
                    await dev.pwrite(bytes(32 * MiB), 32 * MiB)
                    write_done.set()

                async with trio.open_nursery() as tasks:
                    tasks.start_soon(read)
                    await srv.server.requests_in_progress.wait_value(1)
                    gate.close()  # the server stops reading the client
                    tasks.start_soon(write)
                    await read_done.wait()
                    assert not write_done.is_set()  # the write is still being sent
                    gate.open()
                    await write_done.wait()


# 3 -------------------------------------------------------------------------------------


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


# 4 -------------------------------------------------------------------------------------


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


# 5 -------------------------------------------------------------------------------------


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


# 6 -------------------------------------------------------------------------------------


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


# 7 -------------------------------------------------------------------------------------


async def test_open_timeout_uses_a_server_that_appears_later(autojump_clock):
    with trio.fail_after(60):
        async with serving(disk()) as srv:
            srv.up = False

            async def appear():
                await trio.sleep(1)
                srv.up = True

            srv.nursery.start_soon(appear)
            start = trio.current_time()
            async with open_nbd(URI, stream_factory=srv.connect, open_timeout=5,
                                retry_initial=0.25, retry_max=0.25) as dev:
                assert 1 <= trio.current_time() - start <= 1.5
                assert dev.size == 8 * MiB


@pytest.mark.parametrize("open_timeout", [0, 1])
async def test_open_without_a_server_fails_with_the_real_error(open_timeout, autojump_clock):
    with trio.fail_after(60):
        async with serving(disk()) as srv:
            srv.up = False
            start = trio.current_time()
            with pytest.raises(ConnectError) as excinfo:
                async with open_nbd(URI, stream_factory=srv.connect,
                                    open_timeout=open_timeout, retry_initial=0.25):
                    pass
            elapsed = trio.current_time() - start
            assert "Connection refused" in str(excinfo.value)
            assert excinfo.value.errno == errno.ECONNREFUSED
            if open_timeout:
                assert 1 <= elapsed <= 1.1 and "within 1s" in str(excinfo.value)
            else:
                assert elapsed < 0.01


async def test_open_a_missing_unix_socket_names_the_path(tmp_path):
    path = tmp_path / "nobody-home.sock"
    with trio.fail_after(10):
        with pytest.raises(ConnectError) as excinfo:
            async with open_nbd(f"nbd+unix:///?socket={path}"):
                pass
    assert str(path) in str(excinfo.value)
    assert "No such file or directory" in str(excinfo.value)


# 8 -------------------------------------------------------------------------------------


async def _handshake_bytes() -> tuple[int, int]:
    """How many bytes each way a full open + one 4096-byte read takes."""
    async with open_in_process(wrap=CuttingStream) as (dev, srv):
        await dev.pread(4096, 0)
        first = srv.streams[0]
        return first.sent, first.received  # (before the closing DISC)


@pytest.mark.parametrize("direction", ["send", "receive"])
async def test_disconnect_at_every_byte_never_hangs(direction, autojump_clock):
    """qemu iotest 083: cut the connection at every byte offset of the handshake and of
    a request; the result is a clean error (or a successful retry), never a hang."""
    with trio.fail_after(30):
        sent, received = await _handshake_bytes()
    total = sent if direction == "send" else received
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

                    try:
                        async with open_nbd(URI, stream_factory=cutting,
                                            reconnect_delay=reconnect_delay,
                                            retry_initial=0.1) as dev:
                            assert await dev.pread(4096, 0) == bytes(4096)
                        result = "ok"
                    except (ConnectError, ConnectionLostError):
                        result = "error"
                    # Cut during the open: a clean error.  Cut later: an error without
                    # reconnect_delay, a successful retry with it.
                    if result == "ok":
                        assert reconnect_delay or cut >= total


# 9 -------------------------------------------------------------------------------------


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


# 10 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("comes_back_after", [None, 3])
async def test_drain_during_an_outage(comes_back_after, autojump_clock):
    export = disk()
    export.faults.delay("write", 1)
    with trio.fail_after(120):
        async with open_in_process(export, reconnect_delay=10,
                                   retry_initial=0.5) as (dev, srv):
            outcomes = []

            async def write(i):
                await outcome(outcomes, dev.pwrite, b"w" * 512, i * 512)

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(write, i)
                await wait_until_waiting(dev, 4)
                srv.kill()
                if comes_back_after:
                    nursery.start_soon(srv.restart_after, comes_back_after)
                start = trio.current_time()
                late = trio.Event()

                async def late_request():
                    await dev.pread(512, 0)
                    late.set()

                async with dev.drained():
                    elapsed = trio.current_time() - start
                    assert dev.in_flight.value == 0
                    nursery.start_soon(late_request)
                    await trio.testing.wait_all_tasks_blocked()
                    assert not late.is_set()  # new requests wait during the section
                    if comes_back_after is None:
                        # The drain waited for the requests, which the reconnect delay
                        # (not the drain) ended.
                        assert 10 <= elapsed <= 10.5
                        srv.restart()
                        await srv.accepted.wait()  # the worker is back on the server
                        await trio.testing.wait_all_tasks_blocked()
                    else:
                        assert comes_back_after <= elapsed < 10
            assert outcomes == (["failed"] * 4 if comes_back_after is None else ["ok"] * 4)
            assert late.is_set()


async def test_drains_nest_and_never_cancel(autojump_clock):
    export = disk()
    export.faults.delay("read", 5)
    with trio.fail_after(60):
        async with open_in_process(export) as (dev, srv):
            results = []

            async def read():
                results.append(await dev.pread(512, 0))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await wait_until_waiting(dev, 1)
                start = trio.current_time()
                async with dev.drained():
                    async with dev.drained():
                        assert results == [bytes(512)]  # finished, not cancelled
                        assert trio.current_time() - start >= 5
                    nursery.start_soon(read)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(results) == 1  # outer drain still holds new requests
            assert len(results) == 2


# 11 ------------------------------------------------------------------------------------


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


# 12 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bad-magic", "unknown-cookie", "oversized-length"])
async def test_malformed_replies_end_in_protocol_error_for_everyone(kind, autojump_clock):
    export = disk()
    export.faults.delay("read", 1)
    with trio.fail_after(60):
        async with open_in_process(export, reconnect_delay=10) as (dev, srv):
            errors = []

            async def read(i):
                try:
                    await dev.pread(512, i * 512)
                    errors.append(None)
                except ProtocolError as exc:
                    errors.append(exc)

            (connection,) = srv.server.connections
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(read, i)
                await wait_until_waiting(dev, 6)
                connection.faults.malformed_reply(kind)
            assert len(errors) == 6 and all(isinstance(e, ProtocolError) for e in errors)
            assert dev.state is State.QUIT
            with pytest.raises(ProtocolError, match="protocol violation"):
                await dev.pread(512, 0)


@pytest.mark.parametrize("mode", ["duplicate", "outside"])
async def test_duplicate_reply_and_chunk_outside_the_request(mode, autojump_clock):
    """A scripted server that answers one request twice, or sends data outside it."""
    from blockdrv.protocol import NEED_DATA, wire
    from blockdrv.protocol.events import ExportChosen
    from blockdrv.protocol.server_negotiate import ExportOffer, ServerNegotiator

    async def evil_server(stream):
        neg = ServerNegotiator({"": ExportOffer("", MiB, 1 | 4)}, extended=False)
        while True:
            event = neg.next_event()
            await stream.send_all(neg.data_to_send())
            if event is NEED_DATA:
                neg.receive_data(await stream.receive_some())
            elif isinstance(event, ExportChosen):
                break
        data = neg.leftover()
        while len(data) < 28:
            data += await stream.receive_some()
        request = wire.decode_request(data[:28])
        if mode == "duplicate":
            reply = wire.encode_data_chunk_header(request.cookie, 0, 512, done=True) + bytes(
                512)
            await stream.send_all(reply + reply)
        else:
            await stream.send_all(wire.encode_data_chunk_header(
                request.cookie, MiB - 256, 512, done=True) + bytes(512))
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def factory():
                client, server = trio.testing.memory_stream_pair()
                nursery.start_soon(evil_server, server)
                return client

            async with open_nbd(URI, stream_factory=factory, reconnect_delay=5) as dev:
                if mode == "duplicate":
                    assert await dev.pread(512, 0) == bytes(512)
                    with pytest.raises(ProtocolError, match="unknown cookie"):
                        await dev.pread(512, 0)
                else:
                    with pytest.raises(ProtocolError, match="outside the request"):
                        await dev.pread(512, 0)
                assert dev.state is State.QUIT
            nursery.cancel_scope.cancel()


# 13 ------------------------------------------------------------------------------------


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


# 14 ------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cancel_after=st.integers(0, 60), victim=st.sampled_from(["read", "write", "zero"]),
       size=st.sampled_from([512, 65536, MiB]), seed=st.integers(0, 1000))
def test_cancelling_at_any_checkpoint_keeps_the_stream_in_step(cancel_after, victim, size,
                                                               seed):
    """Cancel a request after a hypothesis-chosen number of scheduler checkpoints, while
    other traffic runs: the others succeed with the right data, a following read is
    right, and the victim's range holds either its old or its new contents.

    Layout: the victim writes in [0, 1M) and reads or zeroes in [1M, 2M) (filled with
    0x01 first); the other traffic stays in [3M, 4M)."""

    async def scenario():
        shadow = bytearray(4 * MiB)
        with trio.fail_after(120):
            async with open_in_process(disk(4 * MiB), reconnect_delay=5, retry_initial=0.1,
                                       server_options={"shuffle_replies": True,
                                                       "seed": seed}) as (dev, srv):
                await dev.pwrite(b"\x01" * MiB, MiB)
                scope = trio.CancelScope()

                async def victim_task():
                    with scope:
                        if victim == "read":
                            await dev.pread(size, MiB)
                        elif victim == "write":
                            await dev.pwrite(b"\x02" * size, 0)
                        else:
                            await dev.zero(size, MiB)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(victim_task)
                    nursery.start_soon(_checked_traffic, dev, shadow, seed)
                    for _ in range(cancel_after):
                        await trio.lowlevel.checkpoint()
                    scope.cancel()
                assert await dev.pread(MiB, 3 * MiB) == shadow[3 * MiB:]
                if victim == "write":
                    assert await dev.pread(size, 0) in (bytes(size), b"\x02" * size)
                else:
                    assert await dev.pread(size, MiB) in (bytes(size), b"\x01" * size)
                assert dev.state is State.CONNECTED

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


async def _checked_traffic(dev, shadow, seed):
    """Reads and writes in [3M, 4M), which the victim never touches."""
    rng = random.Random(seed)
    for _ in range(20):
        offset = 3 * MiB + rng.randrange(0, MiB // 4096) * 4096
        if rng.random() < 0.5:
            data = rng.randbytes(4096)
            await dev.pwrite(data, offset)
            shadow[offset:offset + 4096] = data
        else:
            assert await dev.pread(4096, offset) == shadow[offset:offset + 4096]


# 15 ------------------------------------------------------------------------------------


async def test_large_requests_are_split_at_the_servers_maximum():
    export = disk(16 * MiB, max_payload=MiB)
    with trio.fail_after(60):
        async with open_in_process(export) as (dev, srv):
            assert dev.info.max_payload == MiB
            data = os.urandom(5 * MiB)
            before = srv.server.requests_served
            await dev.pwrite(data, 0)
            assert srv.server.requests_served - before == 5
            assert await dev.pread(5 * MiB, 0) == data
            await dev.zero(5 * MiB, 0, may_trim=False)
            assert await dev.pread(5 * MiB, 0) == bytes(5 * MiB)


@pytest.mark.parametrize("call, error, code", [
    (lambda d: d.pread(100, 0), InvalidArgumentError, errno.EINVAL),
    (lambda d: d.pread(512, 100), InvalidArgumentError, errno.EINVAL),
    (lambda d: d.pread(512, 8 * MiB), InvalidArgumentError, errno.EINVAL),
    (lambda d: d.cache(1024, 8 * MiB - 512), InvalidArgumentError, errno.EINVAL),
    (lambda d: d.pwrite(b"x" * 512, 0), UnsupportedError, errno.EPERM),
    (lambda d: d.trim(512, 0), UnsupportedError, errno.EPERM),
    (lambda d: d.block_status(512, 0, context="qemu:dirty-bitmap:x"), InvalidArgumentError,
     errno.EINVAL),
    (lambda d: d.pread(-1, 0), InvalidArgumentError, errno.EINVAL),
])
async def test_bad_requests_fail_before_anything_is_sent(call, error, code):
    export = disk(min_block=512, read_only=True)
    with trio.fail_after(60):
        async with open_in_process(export) as (dev, srv):
            before = srv.server.requests_served
            with pytest.raises(error) as excinfo:
                await call(dev)
            assert excinfo.value.errno == code
            assert srv.server.requests_served == before
            assert dev.statistics().requests == 0


async def test_server_errors_are_returned_not_retried(autojump_clock):
    export = disk()
    export.faults.fail("write", errno=errno.ENOSPC, times=1)
    with trio.fail_after(60):
        async with open_in_process(export, reconnect_delay=10) as (dev, srv):
            with pytest.raises(RequestError) as excinfo:
                await dev.pwrite(b"x" * 512, 0)
            assert excinfo.value.errno == errno.ENOSPC
            assert dev.statistics().retried == 0
            await dev.pwrite(b"x" * 512, 0)  # the connection is fine


async def test_eshutdown_reply_is_a_soft_disconnect_then_a_retry(autojump_clock):
    export = disk()
    export.faults.fail("read", errno=errno.ESHUTDOWN, times=1)
    with trio.fail_after(60):
        async with open_in_process(export, reconnect_delay=10,
                                   retry_initial=0.5) as (dev, srv):
            await dev.pwrite(b"s" * 512, 0)
            assert await dev.pread(512, 0) == b"s" * 512
            assert dev.statistics().reconnects == 1


async def test_a_reply_header_that_arrives_after_the_connection_failed(autojump_clock):
    """A task waiting for the next header when another task's send is cancelled part-way
    (the connection is then dead) may still receive bytes that were on their way: the
    reply of a request that has already given up on that connection and left.  That is
    a lost connection (retry), not a server replying with an unknown cookie."""
    export = disk()
    export.faults.delay("read", 1000)  # the read's own reply comes much later
    results: dict[str, object] = {}
    with trio.fail_after(60_000):
        async with open_in_process(export, wrap=LateStream, reconnect_delay=600) as (dev, srv):
            await dev.pwrite(b"r" * 4096, 0)
            first = srv.streams[0]
            assert isinstance(first, LateStream)
            released = first.hold_next_receive()
            writer = trio.CancelScope()

            async def read():
                results["read"] = await dev.pread(4096, 0)

            async def flush():
                await dev.flush()
                results["flush"] = True

            async def write():
                with writer:
                    await dev.pwrite(b"w" * 4096, 8192)

            async with trio.open_nursery() as tasks:
                tasks.start_soon(read)  # waits for the next header, on `first`
                await trio.testing.wait_all_tasks_blocked()
                tasks.start_soon(flush)  # its reply is what `first` now holds back
                await trio.testing.wait_all_tasks_blocked()
                assert first.holding
                first.stall_next_send(10)
                tasks.start_soon(write)
                await trio.testing.wait_all_tasks_blocked()
                writer.cancel()  # the write header went out in part: connection dead
                await trio.testing.wait_all_tasks_blocked()
                released.set()  # the reader now gets the flush's (stale) header
            assert writer.cancelled_caught
            assert results == {"read": b"r" * 4096, "flush": True}
            assert dev.state is State.CONNECTED and dev.statistics().reconnects == 1


# 16 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("guard", [True, False])
async def test_guard_writes_detects_a_buffer_changed_in_flight(guard, autojump_clock):
    export = disk()
    with trio.fail_after(60):
        async with open_in_process(export, reconnect_delay=10, retry_initial=0.5,
                                   guard_writes=guard) as (dev, srv):
            buf = bytearray(b"A" * 65536)
            (connection,) = srv.server.connections
            connection.faults.drop_after(1)  # the write arrives, then the connection drops
            srv.up = False  # ... and no new connection is accepted for now

            async def mutate_then_allow():
                await dev.wait_state(State.CONNECTING_WAIT)
                buf[:] = b"B" * 65536  # the caller breaks the contract
                srv.up = True

            async with trio.open_nursery() as nursery:
                nursery.start_soon(mutate_then_allow)
                if guard:
                    with pytest.raises(InvalidArgumentError, match="changed while the write"):
                        await dev.pwrite(buf, 0)
                else:
                    await dev.pwrite(buf, 0)
            stored = bytes(export.backend.pages.get(0, bytes(65536))[:65536])
            # With the guard nothing different was sent; without it the new bytes were.
            assert stored == (bytes(65536) if guard else b"B" * 65536)


async def test_no_exception_group_escapes_open_nbd():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            srv = InProcessServer(nursery, disk())
            with pytest.raises(KeyError):  # not an ExceptionGroup around it
                async with open_nbd(URI, stream_factory=srv.connect):
                    raise KeyError("from the body")
            srv.kill()
            with pytest.raises(ConnectError):
                async with open_nbd(URI, stream_factory=srv.connect):
                    pass
            nursery.cancel_scope.cancel()


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
