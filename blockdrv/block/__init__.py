"""The block graph: BlockNode, filters, drained sections, live insertion and removal.

VM tooling stacks nodes (throttling, tracing, fault injection) on a device and changes
the stack while I/O flows.  Every node, the NBD device included, is a
:class:`~blockdrv.node.BlockNode`; :func:`insert_filter` puts a filter on a live node's
port, :func:`remove_filter` takes it off, :func:`replace_node` redirects a node, each
inside a drained section so nothing fails and nothing is lost.
"""

from .fault import FaultFilter, FaultRule
from .filter import FilterNode
from .graph import insert_filter, remove_filter, replace_node
from .node import BlockNode, Bypass, Extent
from .throttle import ThrottleFilter
from .trace import TraceFilter, TraceRecord

__all__ = ["BlockNode", "Bypass", "Extent", "FaultFilter", "FaultRule", "FilterNode",
           "ThrottleFilter", "TraceFilter", "TraceRecord", "insert_filter", "remove_filter",
           "replace_node"]
