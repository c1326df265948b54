"""Extent maps of a whole export (``blockdrv map``), described as nbdinfo does."""

from __future__ import annotations

from typing import AsyncIterator

from ..node import BlockNode, Extent
from ..protocol.constants import BASE_ALLOCATION

WINDOW = 1 << 30  # bytes asked about per BLOCK_STATUS round (the driver splits further)


async def map_extents(node: BlockNode, *, context: str = BASE_ALLOCATION,
                      offset: int = 0, length: int | None = None,
                      window: int = WINDOW) -> AsyncIterator[Extent]:
    """Runs of equal flags from ``offset`` over ``length`` bytes (default: to the end),
    adjacent runs with the same flags merged, in order."""
    end = node.size if length is None else min(node.size, offset + length)
    pending: Extent | None = None
    pos = offset
    while pos < end:
        for extent in await node.block_status(min(window, end - pos), pos, context=context):
            if pending is not None and pending.flags == extent.flags:
                pending = Extent(pending.offset, pending.length + extent.length,
                                 extent.flags)
                continue
            if pending is not None:
                yield pending
            pending = extent
        assert pending is not None
        pos = pending.offset + pending.length
    if pending is not None:
        yield pending


def describe_flags(context: str, flags: int) -> str:
    """The words ``nbdinfo --map`` prints for ``flags`` of ``context``."""
    if context == BASE_ALLOCATION:
        return {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}.get(
            flags, f"hole,zero,{flags & ~3:#x}" if flags & 3 == 3 else f"{flags:#x}")
    if context.startswith("qemu:dirty-bitmap:"):
        return {0: "clean", 1: "dirty"}.get(flags, f"{flags:#x}")
    if context == "qemu:allocation-depth":
        return {0: "absent", 1: "local"}.get(flags, f"backing depth {flags}")
    return str(flags)
