"""What the ``blockdrv`` command does, as a library: extent maps and copying."""

from .copy import CopyResult, copy
from .endpoints import Endpoint, FileEndpoint, NBDEndpoint, NullEndpoint, open_endpoint
from .extents import describe_flags, map_extents

__all__ = ["CopyResult", "Endpoint", "FileEndpoint", "NBDEndpoint", "NullEndpoint",
           "copy", "describe_flags", "map_extents", "open_endpoint"]
