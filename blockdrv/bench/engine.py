"""A fio-like load for any BlockNode: sequential requests at a fixed queue depth.

Request ``i`` goes to offset ``(start + i * request_size) mod span`` (as ``qemu-img bench``
does), so every client of a side-by-side comparison does the same work.  ``depth`` tasks
keep that many requests in flight; the *mixed* pattern alternates reads and writes, so
half of the requests in flight are each (the full-duplex case).  Reads land in
preallocated buffers (``pread_into``), writes send a preallocated random buffer.

The result carries IOPS, MiB/s, CPU seconds per GiB moved (this process's CPU time over
the run), latency percentiles and the peak resident memory.

With ``drains=N`` a further task enters N drained sections during the run, each once
the workers have completed ``2 * depth`` requests since the previous one (so the queue
is full again), and records the time each took to quiesce: from asking for the drained
section to being inside it, i.e. until every request in flight has been answered.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field, fields
from itertools import count as counter
from typing import Any, Callable, Iterator, Protocol

import trio

from ..block.node import BlockNode
from ..util.taskgroups import first_failure
from .latency import quantile, quantiles

PATTERNS = ("read", "write", "mixed")
GiB = 1 << 30


@dataclass
class BenchResult:
    pattern: str
    request_size: int
    depth: int
    ops: int
    bytes: int
    seconds: float
    cpu_seconds: float
    peak_rss: int  # bytes
    latencies: list[float] = field(default_factory=list, repr=False)
    drain_seconds: list[float] = field(default_factory=list, repr=False)

    @property
    def iops(self) -> float:
        """Requests per second."""
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def mib_s(self) -> float:
        """MiB moved per second."""
        return self.bytes / self.seconds / (1 << 20) if self.seconds else 0.0

    @property
    def cpu_s_per_gib(self) -> float:
        """CPU seconds this process spent per GiB moved."""
        return self.cpu_seconds / (self.bytes / GiB) if self.bytes else 0.0

    def percentile(self, q: float) -> float:
        """Latency (seconds) at quantile ``q`` (0..1)."""
        return quantile(self.latencies, q)

    def summary(self) -> dict[str, Any]:
        """Every figure as a JSON-friendly dict (latency percentiles in seconds)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("latencies", "drain_seconds")}
        if self.drain_seconds:
            out.update(drains=len(self.drain_seconds),
                       drain_p50=quantile(self.drain_seconds, 0.5),
                       drain_max=max(self.drain_seconds))
        # (no drain keys when no drained section happened: too short a run)
        p50, p90, p99, p999 = quantiles(self.latencies, (0.5, 0.9, 0.99, 0.999))
        out.update(iops=self.iops, mib_s=self.mib_s, cpu_s_per_gib=self.cpu_s_per_gib,
                   p50=p50, p90=p90, p99=p99, p999=p999,
                   max=max(self.latencies, default=0.0))
        return out


def check_bench(size: int, *, pattern: str, request_size: int, depth: int,
                count: int | None, duration: float | None, span: int | None) -> int:
    """ValueError for a run that cannot be made on an export of ``size`` bytes; the
    span the requests cycle over (whole requests)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}")
    if request_size <= 0 or depth <= 0:
        raise ValueError("request size and depth must be positive")
    if count is None and duration is None:
        raise ValueError("give a count or a duration")
    if duration is not None and duration <= 0:
        raise ValueError("the duration must be positive")
    if span is not None and span > size:
        raise ValueError(f"span {span} is larger than the export ({size} bytes)")
    span = span or size
    span -= span % request_size
    if span < request_size:
        raise ValueError(f"the export ({size} bytes) is smaller than one request")
    return span


def is_read(pattern: str, i: int) -> bool:
    """Whether request ``i`` of ``pattern`` is a read (mixed: every other one)."""
    return pattern == "read" or (pattern == "mixed" and i % 2 == 0)


def result_of(pattern: str, request_size: int, depth: int, latencies: list[float],
              wall: float, cpu: float, drain_seconds: list[float] | None = None
              ) -> BenchResult:
    """The figures of a finished run."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ops = len(latencies)
    return BenchResult(pattern, request_size, depth, ops, ops * request_size, wall, cpu, rss,
                       latencies, drain_seconds or [])


class Target(Protocol):
    """What a load needs of a device (a trio BlockNode, or an asyncio AioDevice)."""

    async def pread_into(self, buf: bytearray, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``."""

    async def pwrite(self, buf: bytes, offset: int) -> None:
        """Write ``buf`` at ``offset``."""


@dataclass
class Load:
    """The requests of one run, shared by its ``depth`` workers: request ``i`` is the
    next number, its offset and kind follow from it (see the module doc)."""

    node: Target
    pattern: str
    request_size: int
    span: int
    start: int
    count: int | None
    deadline: float | None
    clock: Callable[[], float]
    payload: bytes
    numbers: Iterator[int] = field(default_factory=counter)
    latencies: list[float] = field(default_factory=list)

    async def worker(self, completed: Callable[[], None] | None = None) -> None:
        """Take requests one after the other until the count or the deadline."""
        buf = bytearray(self.request_size)
        clock, count, deadline = self.clock, self.count, self.deadline
        for i in self.numbers:
            if (count is not None and i >= count) or (deadline is not None
                                                      and clock() >= deadline):
                return
            offset = (self.start + i * self.request_size) % self.span
            began = time.perf_counter()  # latencies: a C call where trio's clock is three
            if is_read(self.pattern, i):
                await self.node.pread_into(buf, offset)
            else:
                await self.node.pwrite(self.payload, offset)
            self.latencies.append(time.perf_counter() - began)
            if completed is not None:
                completed()


async def run_bench(node: BlockNode, *, pattern: str = "read", request_size: int = 4096,
                    depth: int = 1, count: int | None = None,
                    duration: float | None = None, span: int | None = None,
                    start: int = 0, drains: int = 0) -> BenchResult:
    """Run ``count`` requests (or for ``duration`` seconds) and measure them."""
    span = check_bench(node.size, pattern=pattern, request_size=request_size, depth=depth,
                       count=count, duration=duration, span=span)
    deadline = None if duration is None else trio.current_time() + duration
    drain_seconds: list[float] = []
    refilled = trio.Event()  # set once 2 * depth requests completed since the last drain
    since_drain = 0

    load = Load(node, pattern, request_size, span, start, count, deadline,
                trio.current_time, os.urandom(request_size))

    def completed() -> None:
        nonlocal since_drain
        since_drain += 1
        if since_drain >= 2 * depth:
            refilled.set()

    async def worker() -> None:
        await load.worker(completed)

    async def drainer() -> None:
        nonlocal refilled, since_drain
        for _ in range(drains):
            await refilled.wait()
            asked = time.perf_counter()
            async with node.drained():
                drain_seconds.append(time.perf_counter() - asked)
            refilled, since_drain = trio.Event(), 0

    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        async with trio.open_nursery() as outer:
            if drains:
                outer.start_soon(drainer)
            async with trio.open_nursery() as nursery:
                for _ in range(depth):
                    nursery.start_soon(worker)
            outer.cancel_scope.cancel()  # the workers are done: no more drains to wait for
    except BaseExceptionGroup as group:
        raise first_failure(group) from None  # a failed request, as itself
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return result_of(pattern, request_size, depth, load.latencies, wall, cpu, drain_seconds)
