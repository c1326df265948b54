"""Receiving: replies reach their owners, payloads land in place, and a reply that
breaks the rules ends the device, never another request."""

from __future__ import annotations

import os

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
from support.streams import CountingStream, Gate, LateStream, unbuffered_pair

from blockdrv import (
    ProtocolError,
    State,
    open_nbd,
)
from blockdrv.util.units import MiB


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

    from blockdrv.io.transport import Channel

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
