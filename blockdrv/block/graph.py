"""Changing the graph while I/O flows: insert_filter, remove_filter, replace_node.

Every change runs inside a drained section of the node whose port it changes: requests
already in flight finish through the old path; requests that arrive meanwhile wait at
the port and then take the new path.  Nothing fails or is lost because of a graph
change.  (Seed 003, the GEOM proxy RFC: the race-free window for editing the port's
proxy pointers is the drained section.)
"""

from __future__ import annotations

from ..protocol.errors import InvalidArgumentError
from .filter import FilterNode
from .node import BlockNode


async def insert_filter(node: BlockNode, filter: FilterNode) -> None:
    """Put ``filter`` above ``node``: I/O on ``node`` goes through it from now on.

    Several filters stack: the last inserted is the first a request meets.
    """
    if filter.inserted_on is not None or filter.child is not None:
        raise InvalidArgumentError(f"{filter!r} is already part of a graph")
    if filter is node:
        raise InvalidArgumentError("a filter cannot be inserted on itself")
    async with node.drained():
        filter.child = node.push_proxy(filter)
        filter.inserted_on = node


async def remove_filter(filter: FilterNode) -> None:
    """Take an inserted ``filter`` out again; its pending requests finish first."""
    node = filter.inserted_on
    if node is None:
        raise InvalidArgumentError(f"{filter!r} is not inserted on a node")
    async with node.drained(), filter.drained():
        above = node.pull_proxy(filter)
        if above is not None:
            above.child = filter.child  # type: ignore[attr-defined]
        filter.child = None
        filter.inserted_on = None


async def replace_node(old: BlockNode, new: BlockNode) -> None:
    """Send everything addressed to ``old`` (below its filters) to ``new`` instead.

    ``replace_node(old, old)`` undoes a replacement.
    """
    target = None if new is old else new
    hop: BlockNode | None = target
    while hop is not None:  # refuse a loop old -> new -> ... -> old
        if hop is old:
            raise InvalidArgumentError(f"replacing {old!r} by {new!r} would make a loop")
        hop = hop.replacement
    async with old.drained():
        if target is not None:
            async with target.drained():
                old.redirect(target)
        else:
            old.redirect(None)
