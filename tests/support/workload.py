"""A concurrent random read/write workload checked against a shadow copy of the disk."""

from __future__ import annotations

import random

import trio
from trio_util import AsyncValue


async def workload(dev, shadow: bytearray, *, tasks: int, ops: int, seed: int,
                   block: int = 4096, progress: AsyncValue | None = None) -> int:
    """Concurrent random reads and writes, each task on its own blocks, checked against
    the shadow copy; returns how many operations completed (all of them, or it raises)."""
    rng = random.Random(seed)
    nblocks = len(shadow) // block
    done = 0

    async def task(lane: int) -> None:
        nonlocal done
        mine = list(range(lane, nblocks, tasks))
        for _ in range(ops):
            b = rng.choice(mine)
            at = b * block
            if rng.random() < 0.5:
                data = rng.randbytes(block)
                await dev.pwrite(data, at)
                shadow[at:at + block] = data
            else:
                assert await dev.pread(block, at) == shadow[at:at + block]
            done += 1
            if progress is not None:
                progress.value = done

    async with trio.open_nursery() as nursery:
        for lane in range(tasks):
            nursery.start_soon(task, lane)
    return done
