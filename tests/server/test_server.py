"""The embedded server in-process: concurrency, validation, fault hooks, shutdown."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio
import trio.testing
from support.client import BlockingClient
from support.inprocess import disk, serving
from support.stores import STORE_KINDS, open_store

from blockdrv.protocol import (
    Command,
    CommandFlag,
    Goal,
    ProtocolError,
    RequestError,
    StateFlag,
)
from blockdrv.server import Export, MemoryBackend, NBDServer
from blockdrv.util.units import MiB


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path):
    with open_store(request.param, tmp_path) as backend:
        yield backend


# --- concurrency and ordering --------------------------------------------------------


async def test_requests_run_concurrently_and_replies_leave_out_of_order(autojump_clock):
    export = disk(4 * MiB)
    export.faults.delay("write", 5)
    with trio.fail_after(30):
        async with serving(NBDServer(export)) as srv:
            client = await srv.client()
            w = await client.send(Command.WRITE, 0, 512, payload=b"w" * 512)
            r = await client.send(Command.READ, 4096, 512)
            await client.wait(w)
            assert client.completed == [r, w]


async def test_shuffled_replies_still_carry_the_right_data():
    with trio.fail_after(30):
        async with serving(NBDServer(disk(4 * MiB), shuffle_replies=True, seed=3)) as srv:
            client = await srv.client()
            blocks = {i: os.urandom(8192) for i in range(40)}
            for i, data in blocks.items():
                await client.pwrite(data, i * 8192)
            cookies = {await client.send(Command.READ, i * 8192, 8192): i
                       for i in blocks}
            for cookie, i in cookies.items():
                events = await client.wait(cookie)
                buf = bytearray(8192)
                for e in events[:-1]:
                    buf[e.offset - i * 8192:e.offset - i * 8192 + len(e.data)] = e.data
                assert bytes(buf) == blocks[i]
            assert client.completed[-40:] != sorted(client.completed[-40:])


# --- validation -----------------------------------------------------------------------

C = Command
F = CommandFlag


@pytest.mark.parametrize("command, flags, offset, length, code", [
    (42, 0, 0, 512, errno.EINVAL),  # unknown command
    (C.READ, F.NO_HOLE, 0, 512, errno.EINVAL),  # flag not valid for READ
    (C.READ, 0, 100, 512, errno.EINVAL),  # unaligned offset
    (C.READ, 0, 0, 100, errno.EINVAL),  # unaligned length
    (C.READ, 0, 4 * MiB, 512, errno.EINVAL),  # beyond the end
    (C.WRITE, 0, 4 * MiB - 512, 1024, errno.ENOSPC),  # write beyond the end
    (C.WRITE_ZEROES, 0, 4 * MiB, 512, errno.ENOSPC),
    (C.TRIM, 0, 4 * MiB, 512, errno.EINVAL),
    (C.READ, 0, 0, 2 * MiB, errno.EINVAL),  # longer than the maximum block size
    (C.CACHE, 0, 0, 2 * MiB, errno.EINVAL),
    (C.RESIZE, 0, 0, 0, errno.EINVAL),
])
async def test_bad_requests_get_the_spec_errors(command, flags, offset, length, code):
    export = disk(4 * MiB, min_block=512, max_payload=MiB)
    with trio.fail_after(30):
        async with serving(NBDServer(export)) as srv:
            client = await srv.client()
            client.check_requests = False
            payload = bytes(length) if command == C.WRITE else b""
            with pytest.raises(RequestError) as excinfo:
                await client.checked(command, offset, length, flags, payload)
            assert excinfo.value.errno == code
            # The connection stays usable.
            assert await client.pread(512, 0) == bytes(512)


async def test_zero_and_trim_of_any_length_inside_the_export(store):
    # They carry no payload: accepted beyond the maximum block size, as qemu-nbd does.
    export = Export("", store, max_payload=MiB)
    with trio.fail_after(30):
        async with serving(NBDServer(export)) as srv:
            client = await srv.client()
            client.check_requests = False
            await client.pwrite(b"d" * MiB, 2 * MiB)
            await client.pwrite(b"e" * MiB, 5 * MiB)
            await client.zero(4 * MiB, 512)  # 4 x the maximum, unaligned ends
            await client.trim(3 * MiB, 4 * MiB + 1024)
            await client.zero(8 * MiB, 0, CommandFlag.NO_HOLE)
            assert await client.pread(MiB, 2 * MiB) == bytes(MiB)
            assert await client.pread(MiB, 5 * MiB) == bytes(MiB)
            with pytest.raises(RequestError, match="ENOSPC"):
                await client.zero(8 * MiB + 512, 0)  # still not beyond the end


async def test_huge_zero_and_block_status_on_a_huge_memory_export_are_cheap():
    # 1 TiB of sparse memory: one zero over all of it and one block status must not
    # walk 16 million pages (the fail_after would fire first).
    export = Export("", MemoryBackend(1 << 40))
    with trio.fail_after(10):
        async with serving(NBDServer(export)) as srv:
            client = await srv.client()
            client.check_requests = False
            await client.pwrite(b"x" * 4096, 1 << 39)
            await client.zero(1 << 40, 0)
            assert not export.backend.pages
            (extents,) = (await client.block_status((1 << 40) - 512, 512)).values()
            assert sum(length for length, _ in extents) <= 1 << 30


async def test_read_only_export_refuses_writes_with_eperm():
    with trio.fail_after(30):
        async with serving(NBDServer(disk(4 * MiB, read_only=True))) as srv:
            client = await srv.client()
            client.check_requests = False
            for command in (C.WRITE, C.TRIM, C.WRITE_ZEROES):
                payload = bytes(512) if command == C.WRITE else b""
                with pytest.raises(RequestError) as excinfo:
                    await client.checked(command, 0, 512, 0, payload)
                assert excinfo.value.errno == errno.EPERM


async def test_block_status_without_context_and_df_without_structured():
    with trio.fail_after(30):
        async with serving(NBDServer(disk(4 * MiB))) as srv:
            client = await srv.client(meta_contexts=())
            client.check_requests = False
            with pytest.raises(RequestError, match="EINVAL"):
                await client.block_status(4096, 0)
            simple = await srv.client(structured=False, extended=False)
            simple.check_requests = False
            with pytest.raises(RequestError, match="EINVAL"):
                await simple.pread(512, 0, CommandFlag.DF)


async def test_simple_replies_when_structured_replies_are_refused():
    with trio.fail_after(30):
        async with serving(NBDServer(disk(4 * MiB))) as srv:
            client = await srv.client(structured=False, extended=False)
            assert not client.info.structured
            await client.pwrite(b"x" * 4096, 8192)
            assert await client.pread(12288, 4096) == bytes(4096) + b"x" * 4096 + bytes(
                4096)
            client.check_requests = False
            with pytest.raises(RequestError, match="EINVAL"):
                await client.pread(512, 4 * MiB)


async def test_extended_headers_and_commands(store):
    with trio.fail_after(30):
        async with serving(NBDServer(Export("", store))) as srv:
            client = await srv.client()
            assert client.info.extended and client.info.structured
            await client.pwrite(b"a" * MiB, MiB, CommandFlag.FUA)
            await client.zero(64 * 1024, MiB, CommandFlag.NO_HOLE)
            await client.trim(128 * 1024, MiB + 512 * 1024)
            data = await client.pread(MiB, MiB)
            assert data[:65536] == bytes(65536)
            assert data[65536:512 * 1024] == b"a" * (512 * 1024 - 65536)
            assert data[512 * 1024:640 * 1024] == bytes(128 * 1024)
            (extents,) = (await client.block_status(4 * MiB, 0)).values()
            assert extents[0][1] == StateFlag.HOLE | StateFlag.ZERO
            # Whatever the filesystem makes of the zeroed range, written data is data.
            at = 0
            for length, flags in extents:
                if at <= MiB + 65536 < at + length:
                    assert not flags & StateFlag.HOLE
                at += length
            (one,) = (await client.block_status(4 * MiB, 0, CommandFlag.REQ_ONE)).values()
            assert len(one) == 1
            await client.request(Command.CACHE, 0, MiB)
            await client.flush()
            await client.zero(MiB, 2 * MiB, CommandFlag.FAST_ZERO)
            assert await client.pread(4096, 2 * MiB) == bytes(4096)


async def test_oversized_write_payload_is_a_disconnect_without_allocation():
    import tracemalloc

    with trio.fail_after(30):
        async with serving(NBDServer(disk(4 * MiB))) as srv:
            client = await srv.client()
            client.check_requests = False
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                cookie = await client.send(Command.WRITE, 0, 1 << 40)
                with pytest.raises(EOFError):
                    await client.wait(cookie)
                assert tracemalloc.get_traced_memory()[1] - base < 16 * MiB
            finally:
                tracemalloc.stop()


async def test_write_over_max_payload_is_consumed_and_refused():
    with trio.fail_after(30):
        async with serving(NBDServer(disk(4 * MiB, max_payload=MiB))) as srv:
            client = await srv.client()
            client.check_requests = False
            with pytest.raises(RequestError, match="EINVAL"):
                await client.pwrite(b"z" * (2 * MiB), 0)
            assert await client.pread(512, 0) == bytes(512)


async def test_several_exports_and_list():
    server = NBDServer([disk(MiB, name="a"), disk(2 * MiB, name="b",
                                                                description="bee")])
    with trio.fail_after(30):
        async with serving(server) as srv:
            listed = await (await srv.client(negotiate=False)).negotiate(goal=Goal.LIST)
            assert [(e.name, e.description) for e in listed.exports] == [("a", ""),
                                                                         ("b", "bee")]
            a = await srv.client(export="a")
            b = await srv.client(export="b")
            assert (a.info.size, b.info.size) == (MiB, 2 * MiB)
            default = await srv.client(export="")
            assert default.info.name == "a"


# --- fault hooks -----------------------------------------------------------------------


async def test_faults_are_off_until_set():
    export = disk(4 * MiB)
    assert not export.faults.active
    export.faults.delay("read", 1)
    assert export.faults.active
    export.faults.clear()
    assert not export.faults.active


async def test_fail_every_nth_with_a_chosen_errno():
    export = disk(4 * MiB)
    export.faults.fail("write", errno=errno.ENOSPC, every=2)
    with trio.fail_after(30):
        async with serving(NBDServer(export)) as srv:
            client = await srv.client()
            results = []
            for i in range(6):
                try:
                    await client.pwrite(b"x" * 512, i * 512)
                    results.append("ok")
                except RequestError as exc:
                    results.append(errno.errorcode[exc.errno])
            assert results == ["ok", "ENOSPC"] * 3
            assert export.faults.injected["error"] == 3


async def test_fail_by_byte_range_and_rate():
    export = disk(4 * MiB)
    export.faults.fail(["read"], errno=errno.EIO, byte_range=(MiB, 4096))
    export.faults.fail(["flush"], rate=0.5)
    with trio.fail_after(30):
        async with serving(NBDServer(export)) as srv:
            client = await srv.client()
            await client.pread(4096, 0)
            with pytest.raises(RequestError, match="EIO"):
                await client.pread(8192, MiB - 4096)
            failures = 0
            for _ in range(40):
                try:
                    await client.flush()
                except RequestError:
                    failures += 1
            assert 5 < failures < 35


async def test_drop_after_requests():
    with trio.fail_after(30):
        server = NBDServer(disk(4 * MiB))
        async with serving(server) as srv:
            client = await srv.client()
            (connection,) = server.connections
            connection.faults.drop_after(3)
            await client.pread(512, 0)
            await client.pread(512, 0)
            with pytest.raises(EOFError):
                await client.pwrite(b"x" * 3 * MiB, 0)


@pytest.mark.parametrize("cut", [0, 5, 19, 30])
async def test_drop_part_way_through_a_reply(cut):
    with trio.fail_after(30):
        server = NBDServer(disk(4 * MiB))
        async with serving(server) as srv:
            client = await srv.client()
            (connection,) = server.connections
            connection.faults.drop_in_reply(cut)
            with pytest.raises(EOFError):
                await client.pread(4096, 0)


async def test_stall_stops_reading_and_writing(autojump_clock):
    with trio.fail_after(60):
        server = NBDServer(disk(4 * MiB))
        async with serving(server) as srv:
            client = await srv.client()
            (connection,) = server.connections
            start = trio.current_time()
            connection.faults.stall(10)
            await client.pread(512, 0)
            assert trio.current_time() - start >= 10


@pytest.mark.parametrize("kind, message", [
    ("bad-magic", "bad reply magic"),
    ("unknown-cookie", "unknown cookie"),
    ("oversized-length", "OFFSET_DATA chunk of 4294967280 bytes"),
])
async def test_malformed_replies(kind, message):
    with trio.fail_after(30):
        server = NBDServer(disk(4 * MiB))
        async with serving(server) as srv:
            client = await srv.client()
            (connection,) = server.connections
            connection.faults.malformed_reply(kind)
            with pytest.raises(ProtocolError, match=message):
                await client.pread(4096, 0)
            assert connection.faults.injected["malformed"] == 1


async def test_lose_writes_silently():
    export = disk(4 * MiB)
    with trio.fail_after(30):
        async with serving(NBDServer(export)) as srv:
            client = await srv.client()
            await client.pwrite(b"1" * 512, 0)
            export.faults.lose_writes()
            await client.pwrite(b"2" * 512, 0)  # acknowledged ...
            assert await client.pread(512, 0) == b"1" * 512  # ... but not stored
            assert export.faults.injected["lost-write"] == 1


async def test_connection_faults_touch_only_that_connection():
    with trio.fail_after(30):
        server = NBDServer(disk(4 * MiB))
        async with serving(server) as srv:
            bad = await srv.client()
            good = await srv.client()
            conn = next(c for c in server.connections if c.requests == 0)
            conn.faults.fail(None, errno=errno.EIO)
            outcomes = []
            for client in (bad, good):
                try:
                    await client.pread(512, 0)
                    outcomes.append("ok")
                except RequestError:
                    outcomes.append("failed")
            assert sorted(outcomes) == ["failed", "ok"]


# --- shutdown --------------------------------------------------------------------------


async def test_graceful_shutdown_finishes_requests_in_progress(autojump_clock):
    export = disk(4 * MiB)
    export.faults.delay("write", 5)
    server = NBDServer(export, shutdown_timeout=30)
    with trio.fail_after(60):
        async with serving(server) as srv:
            client = await srv.client()
            idle = await srv.client(negotiate=False)  # still in the handshake
            cookie = await client.send(Command.WRITE, 0, 512, payload=b"s" * 512)
            await server.requests_in_progress.wait_value(1)
            server.shutdown()
            events = await client.wait(cookie)
            assert events[-1].error is None  # answered, not dropped
            assert export.backend.pages[0][:512] == b"s" * 512
            with pytest.raises(EOFError):  # ... and then the connection is closed
                await client.pread(512, 0)
            with pytest.raises(EOFError):
                await idle.negotiate()


async def test_serve_unix_returns_after_shutdown_and_removes_its_socket(tmp_path):
    server = NBDServer(disk(4 * MiB))
    path = str(tmp_path / "s.sock")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_unix, path)
            assert str(server.addresses[0]) == f"nbd+unix:///?socket={path}"
            client = BlockingClient(socket.socket(socket.AF_UNIX))
            client.sock.settimeout(10)
            await trio.to_thread.run_sync(client.sock.connect, path)
            await trio.to_thread.run_sync(client.negotiate)
            server.shutdown()
        assert not os.path.exists(path)
        with pytest.raises(EOFError):
            await trio.to_thread.run_sync(client.pread, 512, 0)


async def test_kill_drops_everything_at_once():
    export = disk(4 * MiB)
    export.faults.delay("read", 1000)
    server = NBDServer(export)
    with trio.fail_after(30):
        async with serving(server) as srv:
            client = await srv.client()
            cookie = await client.send(Command.READ, 0, 512)
            await server.requests_in_progress.wait_value(1)
            server.kill()
            with pytest.raises(EOFError):
                await client.wait(cookie)
