"""blockdrv: an NBD client block driver for trio that does not lose a request.

See README.md for the overview and DESIGN.md (in the project's shared folder) for the
architecture.  The public names are re-exported here.
"""

# isort: off
from .util import core  # noqa: F401  (first: it picks the core, BLOCKDRV_PURE_PYTHON)

# isort: on
from .block.node import BlockRange
from .io.tls import TLSMode
from .nbd import (
    Device,
    DeviceStatistics,
    Extent,
    MultiConnDevice,
    NBDDevice,
    State,
    open_nbd,
)
from .protocol.constants import StateFlag
from .protocol.errors import (
    ConnectError,
    ConnectionLostError,
    DeadlockError,
    InvalidArgumentError,
    NBDError,
    OptionError,
    ProtocolError,
    RequestError,
    TLSError,
    UnsupportedError,
)
from .protocol.export import ExportEntry, ExportInfo
from .protocol.uri import NBDAddress, parse_uri

__version__ = "0.1.0"

__all__ = [
    "ConnectError",
    "ConnectionLostError",
    "DeadlockError",
    "Device",
    "DeviceStatistics",
    "Extent",
    "MultiConnDevice",
    "NBDDevice",
    "State",
    "StateFlag",
    "BlockRange",
    "open_nbd",
    "ExportEntry",
    "ExportInfo",
    "InvalidArgumentError",
    "NBDAddress",
    "NBDError",
    "OptionError",
    "ProtocolError",
    "RequestError",
    "TLSError",
    "TLSMode",
    "UnsupportedError",
    "parse_uri",
    "__version__",
]
