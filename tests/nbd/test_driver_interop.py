"""The driver against real NBD servers on private sockets: I/O, errors, reconnects."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio
from support.peers import ALL_KINDS, Nbdkit, NbdServer, QemuNbd, make_server

from blockdrv import InvalidArgumentError, RequestError, State, open_nbd
from blockdrv.protocol import StateFlag
from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop



ALL = ALL_KINDS
FILE_BACKED = ["nbdkit", "nbdkit-tcp", "qemu-nbd", "nbd-server", "embedded"]


@pytest.mark.parametrize("kind", ALL)
async def test_io_against_real_servers(kind, tmp_path, image):
    rng = random.Random(kind)
    with make_server(kind, tmp_path, image) as server, trio.fail_after(60):
        async with open_nbd(server.uri(), max_in_flight=8) as dev:
            assert dev.size == 64 * MiB
            blocks = {i: rng.randbytes(65536) for i in range(0, 256, 3)}
            async with trio.open_nursery() as nursery:
                for i, data in blocks.items():
                    nursery.start_soon(dev.pwrite, data, i * 65536)
            for i, data in blocks.items():
                assert await dev.pread(65536, i * 65536) == data
            big = rng.randbytes(40 * MiB)  # more than one request's worth
            await dev.pwrite(big, 20 * MiB)
            assert await dev.pread(40 * MiB, 20 * MiB) == big
            info = dev.info
            if info.can_zero:
                await dev.zero(MiB, 20 * MiB)
                assert await dev.pread(MiB, 20 * MiB) == bytes(MiB)
            if info.can_trim:
                await dev.trim(MiB, 30 * MiB)
            if info.can_cache:
                await dev.cache(MiB, 0)
            if info.can_flush:
                await dev.flush()
            if info.can_block_status:
                extents = await dev.block_status(64 * MiB, 0)
                assert extents[0].offset == 0
                assert sum(e.length for e in extents) == 64 * MiB
            stats = dev.statistics()
            assert stats.bytes_written == 40 * MiB + 65536 * len(blocks)
            assert stats.reconnects == 0


@pytest.mark.parametrize("kind", FILE_BACKED)
async def test_reconnect_across_a_killed_and_restarted_server(kind, tmp_path, image):
    """qemu iotest 264 against real servers: kill -9, restart on the same file and
    address; every request of the stream completes and the data is right."""
    rng = random.Random(kind)
    shadow = bytearray(4 * MiB)
    with make_server(kind, tmp_path, image) as server, trio.fail_after(120):
        async with open_nbd(server.uri(), reconnect_delay=30, retry_initial=0.05,
                            retry_max=0.2) as dev:

            async def worker(lane):
                for n in range(60):
                    block = lane + 8 * rng.randrange(64)
                    offset = block * 8192
                    if n % 2:
                        data = rng.randbytes(8192)
                        await dev.pwrite(data, offset)
                        shadow[offset:offset + 8192] = data
                    else:
                        assert await dev.pread(8192, offset) == shadow[offset:offset + 8192]

            async def outage():
                server.kill()
                await dev.wait_state(State.CONNECTING_WAIT)
                server.start()

            async with trio.open_nursery() as nursery:
                for lane in range(8):
                    nursery.start_soon(worker, lane)
                await dev.in_flight.wait_value(lambda n: n >= 4)
                nursery.start_soon(outage)
            assert await dev.pread(4 * MiB, 0) == shadow
            stats = dev.statistics()
            assert stats.reconnects >= 1 and stats.state is State.CONNECTED


async def test_nbdkit_error_filter_errors_are_returned(tmp_path):
    trigger = tmp_path / "inject"
    with Nbdkit(tmp_path, "--filter=error", "memory", "64M", "error=ENOSPC",
                "error-pwrite-rate=1", f"error-pwrite-file={trigger}") as server, \
            trio.fail_after(60):
        async with open_nbd(server.uri(), reconnect_delay=10) as dev:
            await dev.pwrite(b"x" * 4096, 0)
            trigger.write_text("")
            with pytest.raises(RequestError) as excinfo:
                await dev.pwrite(b"y" * 4096, 0)
            assert excinfo.value.errno == errno.ENOSPC
            assert dev.statistics().retried == 0
            trigger.unlink()
            assert await dev.pread(4096, 0) == b"x" * 4096


async def test_qemu_allocation_depth_context(tmp_path, image):
    with QemuNbd(tmp_path, image, "-A") as server, trio.fail_after(60):
        async with open_nbd(server.uri(), meta_contexts=["qemu:allocation-depth"]) as dev:
            assert "qemu:allocation-depth" in dev.info.contexts
            await dev.pwrite(os.urandom(MiB), 2 * MiB)
            depth = await dev.block_status(8 * MiB, 0, context="qemu:allocation-depth")
            allocation = await dev.block_status(8 * MiB, 0, context="base:allocation")
            with pytest.raises(InvalidArgumentError, match="several metadata contexts"):
                await dev.block_status(8 * MiB, 0)  # which one? never a silent pick
            both = await dev.block_status_all(8 * MiB, 0)
            assert both == {"base:allocation": allocation, "qemu:allocation-depth": depth}
            assert sum(e.length for e in depth) == 8 * MiB
            data = [e for e in allocation if not e.flags & StateFlag.HOLE]
            assert data and data[0].offset <= 2 * MiB < data[0].offset + data[0].length


async def test_nbd_server_without_structured_replies(tmp_path, image):
    with NbdServer(tmp_path, image) as server, trio.fail_after(60):
        async with open_nbd(server.uri()) as dev:
            assert not dev.info.structured and not dev.info.can_block_status
            await dev.pwrite(b"n" * 4096, 4096)
            assert await dev.pread(8192, 0) == bytes(4096) + b"n" * 4096
