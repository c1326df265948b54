"""Cancellation and checkpoints: a cancelled request never costs anyone else anything,
and every request is a checkpoint however fast the server answers.

A request cancelled while its payload is on the way finishes sending it under a shield
bounded by ``cancel_timeout`` and then reads and discards its reply: the connection
stays up.  Only when that bound passes is the connection given up.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.inprocess import (
    disk,
    open_in_process,
)
from support.peers import Nbdkit

from blockdrv import (
    NBDError,
    State,
    open_nbd,
)
from blockdrv.server import Export, MemoryBackend
from blockdrv.util.units import MiB


@pytest.mark.parametrize("stall, reconnects", [(3, 0), (10, 1)],
                         ids=["finishes-in-time", "bound-passes"])
async def test_a_write_cancelled_mid_payload_finishes_sending(stall, reconnects,
                                                             autojump_clock):
    """Socket pairs, so the write really stops part-way (the kernel buffer is full
    while the server does not read).  Cancelled at 1 s; the server reads again at
    ``stall`` s: within cancel_timeout (5 s) the write is finished and the connection
    stays; past it, the connection is given up (and a request of another task is
    retried on the new one, never failed)."""
    export = Export("", MemoryBackend(16 * MiB))
    with trio.fail_after(600):
        async with open_in_process(export, sockets=True, reconnect_delay=60,
                                   cancel_timeout=5) as (dev, srv):
            await dev.pwrite(b"a" * 4096, 0)
            export.faults.stall(stall)
            other: list[bytes] = []

            async def reader() -> None:
                other.append(await dev.pread(4096, 0))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                with trio.move_on_after(1) as scope:
                    await dev.pwrite(b"w" * (4 * MiB), 8 * MiB)
            assert scope.cancelled_caught
            assert other == [b"a" * 4096]
            assert dev.statistics().reconnects == reconnects
            assert await dev.pread(4096, 4096) == bytes(4096)  # still in step


@pytest.mark.interop
async def test_200_cancelled_writes_cost_nobody_else_anything(tmp_path: Path):
    """The issue's reproducer against nbdkit, reconnect_delay=0: large writes cancelled
    at random moments, while other tasks read and write.  No request that was not
    cancelled fails and the connection is never dropped."""
    rng = random.Random(5)
    payload = b"p" * MiB
    failures: list[BaseException] = []
    cancelled = 0
    with Nbdkit(tmp_path, "memory", "256M") as server, trio.fail_after(120):
        async with open_nbd(server.uri(), reconnect_delay=0) as dev:

            async def victim(i: int) -> None:
                nonlocal cancelled
                with trio.move_on_after(rng.uniform(0, 0.004)) as scope:
                    await dev.pwrite(payload, (i % 200) * MiB)
                cancelled += scope.cancelled_caught

            async def bystander(i: int) -> None:
                try:
                    await dev.pwrite(b"b" * 65536, 240 * MiB + (i % 64) * 65536)
                    await dev.pread(65536, 240 * MiB + (i % 64) * 65536)
                except NBDError as exc:
                    failures.append(exc)

            i = 0
            while cancelled < 200 and i < 4000:
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(victim, i)
                        nursery.start_soon(bystander, i)
                        i += 1
            stats = dev.statistics()
    assert failures == []
    assert cancelled >= 200, cancelled
    assert stats.reconnects == 0


@pytest.mark.parametrize("method", ["pread", "pread_into", "pwrite", "zero", "trim",
                                    "flush", "cache", "block_status"])
async def test_every_request_is_a_checkpoint(method, autojump_clock):
    """trio's rule for async operations: a cancel point and a schedule point, even when
    the reply is already there (socket pairs: nothing waits while the kernel has
    data), so a fast server cannot starve the program's other tasks."""
    with trio.fail_after(60):
        async with open_in_process(sockets=True) as (dev, _):
            args = {
                "pread": (4096, 0), "pread_into": (bytearray(4096), 0),
                "pwrite": (b"x" * 4096, 0), "zero": (4096, 0), "trim": (4096, 0),
                "flush": (), "cache": (4096, 0), "block_status": (4096, 0),
            }[method]
            for _ in range(20):
                with trio.testing.assert_checkpoints():
                    await getattr(dev, method)(*args)


async def test_a_request_cancelled_before_it_starts_sends_nothing(autojump_clock):
    with trio.fail_after(60):
        async with open_in_process(sockets=True) as (dev, srv):
            before = dev.statistics().requests
            with trio.CancelScope() as scope:
                scope.cancel()
                await dev.pwrite(b"x" * 4096, 0)
            assert dev.statistics().requests == before
            assert await dev.pread(4096, 0) == bytes(4096)


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
