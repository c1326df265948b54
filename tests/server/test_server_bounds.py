"""What hostile clients can make the embedded server hold or wait for, and its bounds.

Each test has a client misbehave in one way (reads no replies, never finishes its
handshake, trickles bytes, floods options, opens too many connections, ...), checks the
bound, and then checks that a fresh client is still served.
"""

from __future__ import annotations

import errno
import logging
import struct
import tracemalloc

import pytest
import trio
import trio.testing
from support.client import AsyncClient
from support.inprocess import disk, serving
from support.stores import STORE_KINDS, open_store, read_reply

from blockdrv.protocol import NEED_DATA, Command
from blockdrv.protocol.constants import IHAVEOPT, ClientFlag, Option, OptionReply
from blockdrv.protocol.options import (
    OPTION_REPLY_HEADER_SIZE,
    decode_option_reply_header,
    encode_client_flags,
    encode_option,
)
from blockdrv.protocol.server_negotiate import MAX_OPTIONS, OptionAnswered, ServerNegotiator
from blockdrv.server import Export, NBDServer
from blockdrv.util.units import MiB

CLIENT_FLAGS = encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)



@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path):
    with open_store(request.param, tmp_path) as backend:
        yield backend


async def until_closed(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends until it closes the connection."""
    got = bytearray()
    try:
        while data := await stream.receive_some(1 << 16):
            got += data
    except trio.BrokenResourceError:
        pass
    return bytes(got)


def option_replies(said: bytes) -> list[tuple[int, int]]:
    """(option, reply type) of each option reply in ``said`` (which starts with them)."""
    out, pos = [], 0
    while pos < len(said):
        option, reply, length = decode_option_reply_header(
            said[pos:pos + OPTION_REPLY_HEADER_SIZE])
        out.append((option, reply))
        pos += OPTION_REPLY_HEADER_SIZE + length
    return out


async def fresh_client_is_served(rig) -> None:
    client = await rig.client()
    at = client.info.size - 4096  # where the tests keep no data
    await client.pwrite(b"f" * 4096, at)
    assert await client.pread(4096, at) == b"f" * 4096
    await client.disconnect()


# --- replies nobody reads -------------------------------------------------------------


async def test_a_client_that_reads_no_replies_holds_at_most_the_budget(store):
    budget = 4 * MiB
    server = NBDServer(Export("", store, max_payload=MiB), buffer_budget=budget)
    with trio.fail_after(60):
        async with serving(server) as rig:
            writer = await rig.client()
            for i in range(7):
                await writer.pwrite(bytes([i + 1]) * MiB, i * MiB)
            hostile = await rig.client(lockstep=True)  # no buffer: nothing read, no room
            connection = rig.connection_of[id(hostile)]
            cookies: list[int] = []

            async def send_reads() -> None:
                for i in range(64):
                    cookies.append(await hostile.send(Command.READ, i % 7 * MiB, MiB))

            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                rig.nursery.start_soon(send_reads)
                await trio.testing.wait_all_tasks_blocked()  # intake paused
                # Request intake paused: the client cannot even send the rest.
                assert budget - MiB < connection.held <= budget
                assert connection.requests <= budget // MiB
                assert len(cookies) < 64
                await fresh_client_is_served(rig)
                for n in range(64):  # now the client reads, and gets everything right
                    while len(cookies) <= n:
                        await trio.testing.wait_all_tasks_blocked()
                    data = await read_reply(hostile, cookies[n], n % 7 * MiB, MiB)
                    assert data == bytes([n % 7 + 1]) * MiB
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            assert peak < 24 * MiB  # 64 MiB and more unbounded: the reads waited their turn
            await trio.testing.wait_all_tasks_blocked()
            assert connection.held == connection.running == 0


async def test_a_request_larger_than_the_budget_is_served_alone(autojump_clock):
    server = NBDServer(disk(4 * MiB, max_payload=2 * MiB), buffer_budget=MiB)
    with trio.fail_after(30):
        async with serving(server) as rig:
            client = await rig.client()
            await client.pwrite(b"b" * 2 * MiB, 0)
            reads = [await client.send(Command.READ, 0, 2 * MiB) for _ in range(3)]
            for cookie in reads:
                assert await read_reply(client, cookie, 0, 2 * MiB) == b"b" * 2 * MiB


# --- handshakes that never end ----------------------------------------------------------


async def test_handshake_deadline_closes_idle_and_trickling_clients(autojump_clock):
    server = NBDServer(disk(4 * MiB), handshake_timeout=10)
    with trio.fail_after(60):
        async with serving(server) as rig:
            idle = await rig.client(negotiate=False)
            trickler = await rig.client(negotiate=False)
            huge = await rig.client(negotiate=False)
            start = trio.current_time()

            async def trickle(stream: trio.abc.Stream, data: bytes) -> None:
                try:
                    for i in range(len(data)):
                        await stream.send_all(data[i:i + 1])
                        await trio.sleep(1)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            info = encode_option(Option.INFO, bytes(6))
            rig.nursery.start_soon(trickle, trickler.stream, CLIENT_FLAGS + info * 10)
            # An option that claims 4 GiB of data, sent a byte a second.
            rig.nursery.start_soon(trickle, huge.stream, CLIENT_FLAGS + struct.pack(
                ">QII", IHAVEOPT, Option.INFO, 0xFFFFFFFF) + bytes(100))
            for client in (idle, trickler, huge):
                await until_closed(client.stream)
                assert 10 <= trio.current_time() - start < 11
            assert server.statistics().connections == 0
            await fresh_client_is_served(rig)


async def test_option_flood_ends_after_max_options():
    server = NBDServer(disk(4 * MiB))
    with trio.fail_after(60):
        async with serving(server) as rig:
            client = await rig.client(negotiate=False)
            await client.stream.send_all(
                CLIENT_FLAGS + encode_option(Option.LIST) * (MAX_OPTIONS + 100))
            said = await until_closed(client.stream)
            replies = option_replies(said[18:])  # after the greeting
            assert replies.count((Option.LIST, OptionReply.ACK)) == MAX_OPTIONS
            await fresh_client_is_served(rig)


def test_negotiator_answers_one_option_per_step():
    neg = ServerNegotiator({"": disk(4 * MiB).offer()}, step_options=True)
    neg.receive_data(CLIENT_FLAGS + encode_option(Option.LIST) * 3)
    neg.data_to_send()  # the greeting
    for _ in range(3):
        assert neg.next_event() == OptionAnswered(Option.LIST)
        assert option_replies(neg.data_to_send()) == [(Option.LIST, OptionReply.SERVER),
                                                      (Option.LIST, OptionReply.ACK)]
    assert neg.next_event() is NEED_DATA


# --- many connections -------------------------------------------------------------------


async def test_connections_over_the_limit_are_closed_at_once(caplog):
    server = NBDServer(disk(4 * MiB), max_connections=2)
    with trio.fail_after(30), caplog.at_level(logging.WARNING, "blockdrv.server"):
        async with serving(server) as rig:
            first = await rig.client()
            await rig.client(negotiate=False)  # still in its handshake: counts too
            for _ in range(3):
                extra = await rig.client(negotiate=False)
                assert await until_closed(extra.stream) == b""  # not even a greeting
            assert server.statistics().connections_refused == 3
            limit_logs = [r for r in caplog.records if "connection limit" in r.getMessage()]
            assert len(limit_logs) == 1
            await first.disconnect()
            await server.open_connections.wait_value(1)
            await fresh_client_is_served(rig)


class FakeListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands out the streams put in ``incoming``; accept fails ``failures`` times first."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.send, self.incoming = trio.open_memory_channel[trio.abc.Stream](10)

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        try:
            return await self.incoming.receive()
        except trio.EndOfChannel:
            raise trio.ClosedResourceError from None

    async def aclose(self) -> None:
        await self.send.aclose()

    async def connect(self) -> AsyncClient:
        client, server_side = trio.testing.memory_stream_pair()
        await self.send.send(server_side)
        return AsyncClient(client)


async def test_accept_out_of_file_descriptors_backs_off_and_logs_once(autojump_clock,
                                                                       caplog):
    server = NBDServer(disk(4 * MiB))
    listener = FakeListener(failures=30)
    with trio.fail_after(3600), caplog.at_level(logging.WARNING, "blockdrv.server"):
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            await nursery.start(server.serve, [listener])
            client = await listener.connect()
            await client.negotiate()
            assert await client.pread(512, 0) == bytes(512)
            assert listener.failures == 0
            # 30 failures took a while (backing off), not 30 x 0.1 s of spinning ...
            assert trio.current_time() - start > 30 * 0.1 * 10
            # ... and were reported once (a minute), not 30 times.
            accept_logs = [r for r in caplog.records if "accept" in r.getMessage()]
            assert len(accept_logs) == 1, [r.getMessage() for r in accept_logs]
            server.shutdown()


# --- shutdown ----------------------------------------------------------------------------


async def test_shutdown_gives_up_on_a_client_that_reads_no_replies(autojump_clock):
    server = NBDServer(disk(4 * MiB, max_payload=MiB), shutdown_timeout=3)
    listener = FakeListener()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            served = trio.Event()

            async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
                await server.serve([listener], task_status=task_status)
                served.set()

            await nursery.start(serve)
            client_side, server_side = trio.testing.lockstep_stream_pair()
            await listener.send.send(server_side)
            client = AsyncClient(client_side)
            await client.negotiate()
            await client.pwrite(b"d" * MiB, 0)
            await client.send(Command.READ, 0, MiB)  # its reply is never read
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().bytes_held == MiB  # the reply, waiting to leave
            start = trio.current_time()
            server.shutdown()
            await served.wait()
            assert 3 <= trio.current_time() - start < 5
