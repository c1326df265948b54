"""Extent maps of a whole export (``blockdrv map``), described as nbdinfo does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Iterable

from ..block.node import BlockNode, Extent
from ..protocol.constants import BASE_ALLOCATION

WINDOW = 1 << 30  # bytes asked about per BLOCK_STATUS round (the driver splits further)


async def map_extents(node: BlockNode, *, context: str = BASE_ALLOCATION,
                      offset: int = 0, length: int | None = None,
                      window: int = WINDOW) -> AsyncIterator[Extent]:
    """Runs of equal flags of ``context`` from ``offset`` over ``length`` bytes (default:
    to the end), adjacent runs with the same flags merged, in order."""
    end = node.size if length is None else min(node.size, offset + length)
    async for block in node.extents(offset, end - offset, contexts=[context],
                                    window=window):
        yield Extent(block.offset, block.length, block.flags[context])


def describe_flags(context: str, flags: int) -> str | None:
    """The words ``nbdinfo --map`` prints for ``flags`` of ``context`` (None where it
    prints none)."""
    if context == BASE_ALLOCATION:
        return {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}.get(flags)
    if context.startswith("qemu:dirty-bitmap:"):
        return {0: "clean", 1: "dirty"}.get(flags)
    if context == "qemu:allocation-depth":
        return {0: "absent", 1: "local"}.get(flags, f"backing depth {flags}")
    return None


@dataclass(frozen=True)
class Total:
    """All bytes of one extent type (``nbdinfo --map --totals``)."""

    size: int
    percent: float  # of the export's size
    type: int


def totals(extents: Iterable[Extent], size: int) -> list[Total]:
    """Bytes per extent type, by type, as ``nbdinfo --map --totals`` sums them."""
    sums: dict[int, int] = {}
    for extent in extents:
        sums[extent.flags] = sums.get(extent.flags, 0) + extent.length
    return [Total(n, 100.0 * n / size if size else 0.0, flags)
            for flags, n in sorted(sums.items()) if n]
