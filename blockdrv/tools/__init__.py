"""What the ``blockdrv`` command does, as a library: extent maps and copying."""

from .copy import CopyResult, copy
from .endpoints import (
    Endpoint,
    FileEndpoint,
    NBDEndpoint,
    NullEndpoint,
    StreamEndpoint,
    open_endpoint,
)
from .extents import Total, describe_flags, map_extents, totals
from .opening import ClientOptions, ask, open_device

__all__ = ["ClientOptions", "CopyResult", "Endpoint", "FileEndpoint", "NBDEndpoint",
           "NullEndpoint", "StreamEndpoint", "Total", "ask", "copy", "describe_flags",
           "map_extents", "open_device", "open_endpoint", "totals"]
