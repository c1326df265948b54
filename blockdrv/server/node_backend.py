"""A server export backed by a block node: an NBDDevice, a multi-conn device, a filter.

Theory of operation
-------------------
:class:`NodeBackend` turns the server's backend calls into the node's I/O methods, so
whatever stands behind the node (a reconnecting NBD driver above all: ``blockdrv serve
--upstream``) is what clients of the export see:

- READ is one ``pread_into`` with ``holes=``: the ranges the node delivered as holes
  (an upstream OFFSET_HOLE chunk) leave as hole segments, the rest as data, so a
  structured READ reply keeps the holes where the upstream reported them.
- WRITE, WRITE_ZEROES (NO_HOLE, FAST_ZERO), TRIM and their FUA, FLUSH and CACHE are the
  node's calls with the same flags; the node splits what is longer than its own limits.
- BLOCK_STATUS asks the node for every context it negotiated at once
  (``block_status_all``), over at most :data:`STATUS_WINDOW` bytes, and hands each
  context's runs to the server, which picks the ones the client selected (at most
  :data:`~blockdrv.server.backends.MAX_EXTENTS` each).
- A failure keeps its errno: the driver's RequestError carries the upstream's error,
  ConnectionLostError is EIO (the reconnect window closed), and the server answers the
  client with that errno.

:func:`node_export` builds the export that mirrors the node's: size, read-only flag,
block sizes, the optional commands (flush, FUA, trim, zero, fast zero, cache),
rotational, multi-conn and the metadata contexts.

A FLUSH reaches the node as one ``flush()``: one NBDDevice carries every client's
writes over one connection, so a flush there covers every write replied to; a
multi-conn device first waits for the writes in flight when the flush arrived.  Either
way CAN_MULTI_CONN means on the proxy what it means upstream.
"""

from __future__ import annotations

from typing import Sequence

from ..block.node import BLOCK_STATUS_WINDOW, BlockNode
from ..protocol.constants import BASE_ALLOCATION, TransmissionFlag
from .backends import MAX_EXTENTS, Backend, Extents, Segment
from .export import Export

STATUS_WINDOW = BLOCK_STATUS_WINDOW // 4
"""Bytes one client BLOCK_STATUS asks the node about (256 MiB): a reply may describe
less than asked, and what a fragmented upstream returns for the window is held until
the reply has left."""

_FEATURES = (TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
             | TransmissionFlag.SEND_CACHE | TransmissionFlag.SEND_TRIM
             | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.ROTATIONAL)


class NodeBackend(Backend):
    """Server storage that is a :class:`~blockdrv.node.BlockNode` (see the module
    docstring).  The node stays the caller's: :meth:`close` leaves it open."""

    immediate = False  # every call waits for the node

    def __init__(self, node: BlockNode) -> None:
        self.node = node
        info = node.info
        self.size = info.size
        self.fast_zero = info.can_fast_zero
        self.features = info.flags & _FEATURES
        self.contexts: Sequence[str] = tuple(info.contexts)

    def __repr__(self) -> str:
        return f"<NodeBackend {self.node!r}>"

    async def read(self, offset: int, length: int) -> list[Segment]:
        buf = bytearray(length)
        holes: list[tuple[int, int]] = []
        await self.node.pread_into(buf, offset, holes=holes)
        return segments(memoryview(buf), offset, holes)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False) -> None:
        await self.node.pwrite(data, offset, fua=fua)

    async def zero(self, offset: int, length: int, *, may_trim: bool = True,
                   fast: bool = False, fua: bool = False) -> None:
        await self.node.zero(length, offset, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.node.trim(length, offset, fua=fua)

    async def flush(self) -> None:
        await self.node.flush()

    async def cache(self, offset: int, length: int) -> None:
        await self.node.cache(length, offset)

    async def context_status(self, offset: int, length: int) -> dict[str, Extents]:
        length = min(length, STATUS_WINDOW)
        status = await self.node.block_status_all(length, offset)
        return {name: [(e.length, e.flags) for e in extents[:MAX_EXTENTS]]
                for name, extents in status.items()}

    async def block_status(self, offset: int, length: int) -> Extents:
        status = await self.context_status(offset, length)
        return status.get(BASE_ALLOCATION) or [(min(length, STATUS_WINDOW), 0)]

    def close(self) -> None:
        """Nothing to release here: the node is closed by whoever opened it."""


def segments(data: memoryview, offset: int, holes: list[tuple[int, int]]) -> list[Segment]:
    """``data`` read at ``offset`` as data and hole segments, ``holes`` being the
    (offset, length) ranges that came as holes (in any order, possibly touching)."""
    out: list[Segment] = []
    pos, end = offset, offset + len(data)
    for at, n in sorted(holes):
        at, stop = max(at, pos), min(at + n, end)
        if stop <= at:
            continue
        if at > pos:
            out.append((pos, at - pos, [data[pos - offset:at - offset]]))
        if out and out[-1][2] is None and out[-1][0] + out[-1][1] == at:
            out[-1] = (out[-1][0], stop - out[-1][0], None)
        else:
            out.append((at, stop - at, None))
        pos = stop
    if pos < end:
        out.append((pos, end - pos, [data[pos - offset:]]))
    return out


def node_export(name: str, node: BlockNode, *, description: str = "",
                read_only: bool = False, multi_conn: bool = True) -> Export:
    """An export of ``node`` mirroring what the node presents (see the module
    docstring); ``read_only`` and ``multi_conn=False`` can only take away."""
    info = node.info
    minimum = info.min_block
    preferred = max(info.block_size_preferred or 4096, minimum, 512)
    return Export(name, NodeBackend(node), read_only=read_only or info.is_read_only,
                  description=description or info.description or "", min_block=minimum,
                  preferred_block=1 << (preferred - 1).bit_length(),
                  max_payload=info.max_payload,
                  multi_conn=multi_conn and info.can_multi_conn)
