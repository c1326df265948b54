"""Library features over any block device: sparse-aware copy and extent walks.

``copy`` moves an export (or a file, a stream, ``null:``) to another, skipping holes and
zeroes; ``map_extents`` walks an export's extents in bounded windows.  The ``blockdrv
copy`` and ``blockdrv map`` commands are thin layers over these.
"""

from .copier import CopyResult, copy
from .endpoints import (
    Endpoint,
    FileEndpoint,
    NBDEndpoint,
    NullEndpoint,
    StreamEndpoint,
    open_endpoint,
)
from .extents import Total, describe_flags, map_extents, totals

__all__ = ["CopyResult", "Endpoint", "FileEndpoint", "NBDEndpoint", "NullEndpoint",
           "StreamEndpoint", "Total", "copy", "describe_flags", "map_extents",
           "open_endpoint", "totals"]
