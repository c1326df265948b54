"""The proxy inside the test's trio run: a server export backed by the driver's device on
an in-process upstream, reached by our own client.  What is mirrored, holes, errnos,
FLUSH upstream, and clients riding through an upstream restart (autojump clock)."""

from __future__ import annotations

import errno
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio
from support.inprocess import URI, InProcessServer, disk, open_in_process, serving

from blockdrv import RequestError, State, open_nbd
from blockdrv.server import Export, MemoryBackend
from blockdrv.server.node_backend import node_export, segments
from blockdrv.util.units import MiB


@asynccontextmanager
async def chain(upstream_export: Export, *, reconnect_delay: float = 30.0,
                **client: Any) -> AsyncIterator[tuple[Any, Any, InProcessServer]]:
    """Upstream server -> device -> proxy server -> client; yields (client, the
    proxy's device on the upstream, the upstream server)."""
    async with open_in_process(upstream_export, reconnect_delay=reconnect_delay,
                               retry_initial=0.1, retry_max=0.1) as (device, upstream):
        async with serving(node_export("", device)) as proxy, \
                open_nbd(URI, stream_factory=proxy.connect, **client) as dev:
            yield dev, device, upstream


@pytest.mark.parametrize("read_only", [False, True])
async def test_the_export_mirrors_the_upstream(read_only):
    upstream = Export("", MemoryBackend(8 * MiB), read_only=read_only, min_block=512,
                      preferred_block=8192, max_payload=MiB, multi_conn=False)
    with trio.fail_after(10):
        async with chain(upstream) as (dev, device, _):
            seen, original = dev.info, device.info
            assert seen.size == original.size == 8 * MiB
            assert seen.flags == original.flags  # read-only, flush, FUA, trim, zero...
            assert seen.is_read_only is read_only and not seen.can_multi_conn
            assert (seen.block_size_minimum, seen.block_size_preferred,
                    seen.block_size_maximum) == (512, 8192, MiB)
            assert list(seen.contexts) == ["base:allocation"]


async def test_multi_conn_and_fast_zero_follow_the_upstream():
    async with chain(disk()) as (dev, _, _):
        assert dev.info.can_multi_conn and dev.info.can_fast_zero


async def test_reads_keep_the_upstreams_holes():
    """Data where the upstream has data, OFFSET_HOLE chunks where it sent holes."""
    with trio.fail_after(10):
        async with chain(disk()) as (dev, device, _):
            await dev.pwrite(b"x" * 65536, MiB)
            holes: list[tuple[int, int]] = []
            buf = bytearray(4 * MiB)
            await dev.pread_into(buf, 0, holes=holes)
            assert sorted(holes) == [(0, MiB), (MiB + 65536, 3 * MiB - 65536)]
            assert buf[MiB:MiB + 65536] == b"x" * 65536 and buf.count(0) == len(buf) - 65536
            assert device.statistics().hole_bytes_read == 4 * MiB - 65536
            extents = await dev.block_status(4 * MiB, 0)
            assert [(e.offset, e.length, e.hole) for e in extents] == [
                (0, MiB, True), (MiB, 65536, False), (MiB + 65536, 3 * MiB - 65536, True)]


def test_segments_from_holes_in_any_order():
    data = memoryview(bytes(range(100)))
    out = segments(data, 1000, [(1060, 10), (1000, 10), (1010, 5), (1090, 30)])
    assert [(at, n, None if v is None else bytes(v[0])) for at, n, v in out] == [
        (1000, 15, None), (1015, 45, bytes(range(15, 60))), (1060, 10, None),
        (1070, 20, bytes(range(70, 90))), (1090, 10, None)]


@pytest.mark.parametrize("kind, code, call", [
    ("write", errno.ENOSPC, lambda d: d.pwrite(b"a" * 4096, 0)),
    ("read", errno.EPERM, lambda d: d.pread(4096, 0)),
    ("zero", errno.ENOTSUP, lambda d: d.zero(4096, 0)),
    ("flush", errno.EOVERFLOW, lambda d: d.flush()),
])
async def test_an_upstream_error_reaches_the_client_with_its_errno(kind, code, call):
    """Also shows that FLUSH (and the rest) reach the upstream as themselves."""
    upstream = disk()
    upstream.faults.fail(kind, errno=code)
    with trio.fail_after(10):
        async with chain(upstream) as (dev, _, _):
            with pytest.raises(RequestError) as caught:
                await call(dev)
            assert caught.value.errno == code


async def test_a_client_rides_through_an_upstream_restart(autojump_clock):
    """The upstream dies; the client's write and read wait in the proxy and complete
    once it is back, within reconnect_delay: the client sees no error."""
    async with chain(disk(), reconnect_delay=30) as (dev, device, upstream):
        await dev.pwrite(b"a" * MiB, 0)
        upstream.kill()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dev.pwrite, b"b" * MiB, MiB)
            await device.wait_state(State.CONNECTING_WAIT)
            await trio.sleep(5)  # the outage lasts (virtual time)
            upstream.restart()
        assert await dev.pread(2 * MiB, 0) == b"a" * MiB + b"b" * MiB
        assert device.statistics().reconnects == 1


async def test_past_reconnect_delay_the_client_gets_eio(autojump_clock):
    async with chain(disk(), reconnect_delay=2) as (dev, _, upstream):
        upstream.kill()
        with pytest.raises(RequestError) as caught:
            await dev.pread(4096, 0)
        assert caught.value.errno == errno.EIO


async def test_an_upstream_back_with_another_size_is_not_used(autojump_clock):
    """The export was fixed when the proxy opened it: a smaller upstream is refused by
    the driver and the client gets EIO, not a silently shrunken disk."""
    async with chain(disk(8 * MiB)) as (dev, device, upstream):
        upstream.kill()
        upstream.exports = [disk(4 * MiB)]
        upstream.restart()
        with pytest.raises(RequestError) as caught:
            await dev.pread(4096, 0)
        assert caught.value.errno == errno.EIO and device.state is State.QUIT
