"""The fio-like load of :mod:`blockdrv.benchmark`, driven from asyncio through
:mod:`blockdrv.aio` (``blockdrv bench --api asyncio``): the same requests, offsets and
figures, so the two APIs compare side by side.  No drained sections here."""

from __future__ import annotations

import asyncio
import os
import time

from ..aio import AioDevice
from ..util.taskgroups import first_failure
from .engine import BenchResult, Load, check_bench, result_of


async def run_bench_aio(dev: AioDevice, *, pattern: str = "read", request_size: int = 4096,
                        depth: int = 1, count: int | None = None,
                        duration: float | None = None, span: int | None = None,
                        start: int = 0) -> BenchResult:
    """Run ``count`` requests (or for ``duration`` seconds) with ``depth`` asyncio
    tasks, and measure them."""
    span = check_bench(dev.size, pattern=pattern, request_size=request_size, depth=depth,
                       count=count, duration=duration, span=span)
    clock = asyncio.get_running_loop().time
    deadline = None if duration is None else clock() + duration
    load = Load(dev, pattern, request_size, span, start, count, deadline, clock,
                os.urandom(request_size))

    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        async with asyncio.TaskGroup() as group:  # a failed request cancels the others
            for _ in range(depth):
                group.create_task(load.worker())
    except BaseExceptionGroup as group:
        raise first_failure(group) from None  # a failed request, as itself
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return result_of(pattern, request_size, depth, load.latencies, wall, cpu)
