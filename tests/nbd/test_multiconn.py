"""Multi-conn: open_nbd(connections=N) spreads requests over N connections (issue 8)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from support.inprocess import URI, open_in_process, serving
from support.peers import SERVER_KINDS, file_server, sparse_image
from support.workload import workload
from trio_util import AsyncValue

from blockdrv import MultiConnDevice, NBDDevice, State, open_nbd
from blockdrv.block import TraceFilter, insert_filter
from blockdrv.protocol.errors import InvalidArgumentError
from blockdrv.server import Export, MemoryBackend
from blockdrv.util.units import MiB

BLOCK = 4096


def multi_device(connections: int, *, export: Export | None = None, **options):
    """A device over ``connections`` in-process connections; yields (device, server)."""
    return open_in_process(export or Export("", MemoryBackend(MiB)),
                           connections=connections, **options)


async def test_requests_are_spread_over_every_connection(autojump_clock):
    with trio.fail_after(60):
        async with multi_device(4) as (dev, srv):
            assert isinstance(dev, MultiConnDevice)
            assert dev.connections == 4 and srv.connections == 4
            assert dev.connections_note == ""
            assert dev.size == MiB and dev.info.can_multi_conn
            shadow = bytearray(MiB)
            await workload(dev, shadow, tasks=32, ops=40, seed=1)
            await dev.flush()
            per_member = [m.statistics().requests for m in dev.members]
            assert all(n > 0 for n in per_member), per_member
            stats = dev.statistics()
            assert stats.requests == sum(per_member) >= 32 * 40
            assert stats.in_flight == 0


async def test_without_multi_conn_one_connection_is_used_and_the_note_says_why():
    with trio.fail_after(10):
        export = Export("", MemoryBackend(MiB), multi_conn=False)
        async with multi_device(4, export=export) as (dev, srv):
            assert dev.connections == 1 and srv.connections == 1
            assert "does not advertise multi-conn" in dev.connections_note
            await dev.pwrite(b"x" * 512, 0)
            assert await dev.pread(512, 0) == b"x" * 512


async def test_one_connection_is_a_plain_device():
    with trio.fail_after(10):
        async with serving(Export("", MemoryBackend(MiB))) as srv:
            async with open_nbd(URI, stream_factory=srv.connect) as dev:
                assert isinstance(dev, NBDDevice) and dev.connections == 1
            with pytest.raises(InvalidArgumentError, match="connections"):
                async with open_nbd(URI, stream_factory=srv.connect, connections=0):
                    pass


async def test_the_state_is_the_worst_of_the_connections(autojump_clock):
    with trio.fail_after(60):
        async with multi_device(2, reconnect_delay=30, retry_initial=0.5) as (dev, srv):
            assert dev.state is State.CONNECTED
            srv.kill()
            async with trio.open_nursery() as io:
                io.start_soon(dev.members[0].pread, 512, 0)  # notices, then waits
                assert await dev.wait_state(State.CONNECTING_WAIT) is \
                    State.CONNECTING_WAIT
                assert dev.members[1].state is State.CONNECTED  # nothing noticed yet
                srv.restart()
                assert await dev.wait_state(State.CONNECTED) is State.CONNECTED


async def test_flush_is_sent_only_after_the_writes_in_flight_were_replied_to(
        autojump_clock):
    with trio.fail_after(60):
        export = Export("", MemoryBackend(MiB))
        async with multi_device(3, export=export) as (dev, srv):
            traces = [TraceFilter() for _ in dev.members]
            for member, trace in zip(dev.members, traces, strict=True):
                await insert_filter(member, trace)
            export.faults.delay("write", 2.0)
            writes_started = trio.Event()

            async def writes() -> None:
                async with trio.open_nursery() as inner:
                    for i in range(6):
                        inner.start_soon(dev.pwrite, b"w" * BLOCK, i * BLOCK)
                    await trio.testing.wait_all_tasks_blocked()
                    writes_started.set()

            async with trio.open_nursery() as io:
                io.start_soon(writes)
                await writes_started.wait()
                await dev.flush()
                flushed_at = trio.current_time()
            records = [r for t in traces for r in t.records]
            write_ends = [r.start + r.latency for r in records if r.kind == "write"]
            flush = [r for r in records if r.kind == "flush"]
            assert len(write_ends) == 6 and len(flush) == 1
            assert flush[0].start >= max(write_ends)
            assert flushed_at >= max(write_ends)


async def test_drained_sections_and_a_server_restart_lose_nothing(autojump_clock):
    with trio.fail_after(120):
        async with multi_device(3, reconnect_delay=30, retry_initial=0.5) as (dev, srv):
            shadow = bytearray(MiB)
            progress = AsyncValue(0)
            drains = []

            async def chaos() -> None:
                for round in range(6):
                    goal = 150 * (round + 1)
                    await progress.wait_value(lambda n, goal=goal: n >= goal)
                    if round % 2:
                        async with dev.drained():
                            drains.append([m.in_flight.value for m in dev.members])
                    else:
                        srv.kill()
                        await srv.restart_after(1.0)  # a (virtual) second's outage

            async with trio.open_nursery() as inner:
                inner.start_soon(chaos)
                await workload(dev, shadow, tasks=24, ops=60, seed=7, progress=progress)
            assert drains == [[0, 0, 0]] * 3
            # Three restarts: each member came back after each of them.
            assert [m.statistics().reconnects for m in dev.members] == [3, 3, 3]
            assert dev.statistics().reconnects == 9
            for at in range(0, MiB, 64 * 1024):
                assert await dev.pread(64 * 1024, at) == shadow[at:at + 64 * 1024]


@pytest.mark.interop
@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_multi_conn_against_real_servers(kind, tmp_path):
    image = sparse_image(tmp_path / "disk.img", 16 * MiB)
    with file_server(kind, tmp_path, image) as peer, trio.fail_after(60):
        async with open_nbd(peer.uri(), connections=3) as dev:
            if dev.info.can_multi_conn:
                assert dev.connections == 3
            else:  # qemu-nbd 7.2 offers multi-conn only for read-only exports
                assert dev.connections == 1 and dev.connections_note
            shadow = bytearray(16 * MiB)
            await workload(dev, shadow, tasks=24, ops=30, seed=3, block=65536)
            await dev.flush()
        with open(image, "rb") as f:
            assert f.read() == shadow  # flushed and visible in the file
