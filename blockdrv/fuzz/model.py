"""What the disk must contain: a shadow copy with "unknown" ranges, and range locks.

The model follows every operation the fuzzer completes: a successful write or zero
makes its range *known* with those bytes; a write, zero or trim that failed, was
cancelled, or whose outcome cannot be known (a trim leaves contents unspecified) makes
its range *unknown* until it is written again.  Reads are checked against the known
blocks only.  Block granularity is :attr:`Model.block` bytes; operations are aligned to
it.

:class:`RangeLocks` keeps two overlapping operations from being in flight at once, so
the model never has to guess which of two racing writes won.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import trio

from ..protocol.constants import StateFlag


@dataclass(frozen=True)
class Mismatch:
    """A block whose content differs from the model."""

    offset: int
    expected: bytes
    found: bytes


class Model:
    """Shadow copy of the disk plus a known/unknown bit per block."""

    def __init__(self, size: int, block: int = 4096) -> None:
        if size % block:
            raise ValueError("size must be a multiple of the block size")
        self.size = size
        self.block = block
        self.data = bytearray(size)  # a fresh sparse image reads as zeroes
        self.known = bytearray([1]) * (size // block)

    def _blocks(self, offset: int, length: int) -> range:
        return range(offset // self.block, (offset + length + self.block - 1) // self.block)

    def written(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.data[offset:offset + len(data)] = data
        for b in self._blocks(offset, len(data)):
            self.known[b] = 1

    def zeroed(self, offset: int, length: int) -> None:
        self.written(offset, bytes(length))

    def unknown(self, offset: int, length: int) -> None:
        """The range may hold anything (a failed or cancelled write, a trim)."""
        for b in self._blocks(offset, length):
            self.known[b] = 0

    def check_read(self, offset: int, data: bytes) -> Mismatch | None:
        """The first known block where ``data`` (read at ``offset``) differs."""
        block = self.block
        for b in self._blocks(offset, len(data)):
            if not self.known[b]:
                continue
            start = b * block
            pos = start - offset
            if data[pos:pos + block] != self.data[start:start + block]:
                return Mismatch(start, bytes(self.data[start:start + block]),
                                bytes(data[pos:pos + block]))
        return None

    def check_extents(self, offset: int, length: int,
                      extents: Sequence[tuple[int, int, int]]) -> str | None:
        """Extents must tile the range; a ZERO extent must hold no known non-zero data."""
        pos = offset
        for at, n, flags in extents:
            if at != pos or n <= 0:
                return f"extents do not tile the range at {pos} (got {at}+{n})"
            if flags & StateFlag.ZERO:
                for b in self._blocks(at, n):
                    start = b * self.block
                    if self.known[b] and any(self.data[start:start + self.block]):
                        return f"extent {at}+{n} claims zeroes but block {start} holds data"
            pos += n
        if pos != offset + length:
            return f"extents end at {pos}, not at {offset + length}"
        return None


class RangeLocks:
    """At most one operation in flight per byte range."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int]] = []
        self._changed = trio.lowlevel.ParkingLot()

    def _free(self, start: int, end: int) -> bool:
        return all(end <= s or e <= start for s, e in self._held)

    async def acquire(self, offset: int, length: int) -> tuple[int, int]:
        span = (offset, offset + max(length, 1))
        while not self._free(*span):
            await self._changed.park()
        self._held.append(span)
        return span

    def release(self, span: tuple[int, int]) -> None:
        self._held.remove(span)
        self._changed.unpark_all()
