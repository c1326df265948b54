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
        filter.child = node._proxies[-1] if node._proxies else node.bypass()
        filter.inserted_on = node
        node._proxies.append(filter)


async def remove_filter(filter: FilterNode) -> None:
    """Take an inserted ``filter`` out again; its pending requests finish first."""
    node = filter.inserted_on
    if node is None:
        raise InvalidArgumentError(f"{filter!r} is not inserted on a node")
    async with node.drained(), filter.drained():
        stack = node._proxies
        index = stack.index(filter)
        if index + 1 < len(stack):
            stack[index + 1].child = filter.child  # type: ignore[attr-defined]
        del stack[index]
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
        hop = hop._replacement
    async with old.drained():
        if target is not None:
            async with target.drained():
                old._replacement = target
        else:
            old._replacement = None
