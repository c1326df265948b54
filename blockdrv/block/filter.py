"""FilterNode: a node that forwards everything to its child.

A filter only overrides what it changes.  Every request passes through
:meth:`FilterNode._forward` with its command kind, offset and length and a callable that
sends it on to the child, so a filter that acts on all requests alike (trace, throttle,
fault injection) overrides that one method.

A filter is used either standalone, stacked on a node (``ThrottleFilter(child=dev)``, and
you do I/O on the filter), or inserted on a live node with
:func:`blockdrv.block.insert_filter`, after which I/O on the node itself goes through the
filter and the filter's child is the node's own implementation.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from ..protocol.constants import Command
from .node import BlockNode, BlockStatus

if TYPE_CHECKING:
    from ..protocol.export import ExportInfo


class FilterNode(BlockNode):
    """Forwards every request to ``child`` (see the module docstring)."""

    def __init__(self, child: BlockNode | None = None) -> None:
        super().__init__()
        self.child: Any = child  # a BlockNode, or a Bypass while inserted on a node
        self.inserted_on: BlockNode | None = None

    def __repr__(self) -> str:
        where = f"on {self.inserted_on!r}" if self.inserted_on is not None else \
            f"over {self.child!r}"
        return f"<{type(self).__name__} {where} in_flight={self.in_flight.value}>"

    def _below_me(self) -> Any:
        if self.child is None:
            raise RuntimeError(f"{type(self).__name__} has no child: give it one, or "
                               "insert it on a node")
        return self.child

    @property
    def size(self) -> int:
        """The child's size."""
        return int(self._below_me().size)

    @property
    def info(self) -> ExportInfo:
        """The child's export info (a filter changes requests, not the export)."""
        return self._below_me().info  # type: ignore[no-any-return]

    def children(self) -> Sequence[Any]:
        return [self.child] if self.child is not None else []

    async def _forward(self, command: Command, offset: int, length: int,
                       call: Callable[[], Awaitable[Any]]) -> Any:
        """Send one request on to the child; filters override this."""
        return await call()

    async def _do_pread_into(self, buf: memoryview, offset: int,
                             holes: list[tuple[int, int]] | None = None) -> None:
        await self._forward(Command.READ, offset, len(buf),
                            partial(self._below_me().pread_into, buf, offset, holes=holes))

    async def _do_pwrite(self, buf: memoryview, offset: int, *, fua: bool = False) -> None:
        await self._forward(Command.WRITE, offset, len(buf),
                            partial(self._below_me().pwrite, buf, offset, fua=fua))

    async def _do_zero(self, count: int, offset: int, *, may_trim: bool = True,
                       fast: bool = False, fua: bool = False) -> None:
        await self._forward(Command.WRITE_ZEROES, offset, count,
                            partial(self._below_me().zero, count, offset, may_trim=may_trim,
                                    fast=fast, fua=fua))

    async def _do_trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        await self._forward(Command.TRIM, offset, count,
                            partial(self._below_me().trim, count, offset, fua=fua))

    async def _do_flush(self) -> None:
        await self._forward(Command.FLUSH, 0, 0, self._below_me().flush)

    async def _do_cache(self, count: int, offset: int) -> None:
        await self._forward(Command.CACHE, offset, count,
                            partial(self._below_me().cache, count, offset))

    async def _do_block_status(self, count: int, offset: int) -> BlockStatus:
        return await self._forward(  # type: ignore[no-any-return]
            Command.BLOCK_STATUS, offset, count,
            partial(self._below_me().block_status_all, count, offset))
