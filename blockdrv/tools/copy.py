"""Copy one endpoint to another, sparse-aware (``blockdrv copy``).

Theory of operation
-------------------
A *planner* task walks the source's allocation (base:allocation block status for an
NBD source, SEEK_DATA/SEEK_HOLE for a file) and sends pieces down a memory channel:
data pieces of at most ``request_size`` bytes, zero pieces (ranges that read as zeroes)
of at most ``ZERO_PIECE`` bytes.  Zero ranges of a destination that already reads as
zeroes (a fresh file, ``null:``, ``destination_is_zero``) cost nothing: the planner
only counts them as done.  ``requests`` worker tasks take pieces from the channel,
each with its own buffer, so at most ``requests`` pieces are in flight and memory stays
at ``requests * request_size``.  A data piece is read from the source and written to
the destination, unless it turns out to be all zeroes: then it is handled as a zero
piece.  A zero piece becomes WRITE_ZEROES (with trim allowed), or zero bytes written
when the destination cannot (nothing at all when the destination reads as zeroes).
So nothing is written for holes, and the destination stays as sparse as the source.

The first failure stops the copy and is raised as itself (never an ExceptionGroup).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import trio

from ..protocol.constants import StateFlag
from ..taskgroups import first_failure
from .endpoints import Endpoint
from .extents import WINDOW

KiB = 1024
ZERO_PIECE = 64 << 20


@dataclass
class CopyResult:
    """What a copy did."""

    size: int
    data_bytes: int  # read and written
    zero_bytes: int  # zero on the source: zeroed on, or skipped for, the destination
    seconds: float

    @property
    def mib_s(self) -> float:
        """Source bytes per second, in MiB."""
        return self.size / self.seconds / (1 << 20) if self.seconds else 0.0


async def copy(source: Endpoint, destination: Endpoint, *, requests: int = 16,
               request_size: int = 256 * KiB, flush: bool = False,
               destination_is_zero: bool = False,
               progress: Callable[[int], None] | None = None) -> CopyResult:
    """Copy all of ``source`` to the start of ``destination``; see the module docstring.

    ``progress`` is called with each piece's byte count as it completes.
    """
    if requests < 1 or request_size < 1:
        raise ValueError("requests and request size must be positive")
    size = source.size
    if destination.size < size:
        raise ValueError(f"{destination.name} ({destination.size} bytes) is smaller than "
                         f"{source.name} ({size} bytes)")
    known_zero = destination.known_zero or destination_is_zero
    send, receive = trio.open_memory_channel[tuple[bool, int, int]](requests)
    data_bytes = 0  # every other byte of the source reads as zeroes
    zeroes = memoryview(bytes(request_size))  # sliced for free, compared with memcmp
    report = progress or (lambda n: None)

    async def planner() -> None:
        async with send:
            pos = 0
            while pos < size:
                for extent in await source.block_status(min(WINDOW, size - pos), pos):
                    is_zero = bool(extent.flags & StateFlag.ZERO)
                    pos = extent.offset + extent.length
                    if is_zero and known_zero:
                        report(extent.length)  # already zeroes there: nothing to do
                        continue
                    piece = ZERO_PIECE if is_zero else request_size
                    for at in range(extent.offset, pos, piece):
                        await send.send((is_zero, at, min(piece, pos - at)))

    async def worker(receive: trio.MemoryReceiveChannel[tuple[bool, int, int]]) -> None:
        nonlocal data_bytes
        raw = bytearray(request_size)
        buf = memoryview(raw)
        async with receive:
            async for is_zero, offset, count in receive:
                if is_zero:
                    await destination.zero(count, offset)
                else:
                    view = buf[:count]
                    await source.read(view, offset)
                    # bytearray.startswith compares with memcmp; memoryview == goes
                    # element by element (80 times slower for 256 KiB)
                    if not raw.startswith(zeroes[:count]):
                        await destination.write(view, offset)
                        data_bytes += count
                    elif not known_zero:
                        await destination.zero(count, offset)
                report(count)

    started = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(planner)
            async with receive:
                for _ in range(requests):
                    nursery.start_soon(worker, receive.clone())
        if flush:
            await destination.flush()
    except BaseExceptionGroup as group:
        raise first_failure(group) from None
    return CopyResult(size, data_bytes, size - data_bytes, time.perf_counter() - started)
