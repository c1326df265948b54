"""One request: split at the server's maximum, checked before it is sent, errors
returned (never retried), write buffers guarded."""

from __future__ import annotations

import errno
import os

import pytest
import trio
import trio.testing
from support.inprocess import (
    disk,
    open_in_process,
)

from blockdrv import (
    InvalidArgumentError,
    RequestError,
    State,
    UnsupportedError,
)
from blockdrv.util.units import MiB


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
