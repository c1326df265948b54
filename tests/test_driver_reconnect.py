"""Reconnecting: the worker retries on its schedule whether or not a request waits."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.inprocess import open_in_process
from support.peers import QemuNbd, sparse_image

from blockdrv import ConnectionLostError, State, open_nbd

MiB = 1024 * 1024


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
