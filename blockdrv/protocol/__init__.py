"""Sans-IO NBD protocol: constants, wire codecs, handshake and reply state machines, URIs.

Nothing in this package does I/O or imports trio; it is fed bytes and returns bytes and
events, so it can be driven by a blocking socket, the trio driver, the embedded server,
or a fuzzer.
"""

from .constants import (
    BASE_ALLOCATION,
    ChunkType,
    Command,
    CommandFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    StateFlag,
    TransmissionFlag,
    WireErrno,
)
from .errors import (
    ConnectionLostError,
    InvalidArgumentError,
    NBDError,
    OptionError,
    ProtocolError,
    RequestError,
    UnsupportedError,
)
from .events import (
    NEED_DATA,
    BlockStatus,
    ExportDescribed,
    ExportsListed,
    MetaContextsListed,
    Negotiated,
    ReadData,
    ReadHole,
    ReplyDone,
    StartTLS,
)
from .export import ExportEntry, ExportInfo, check_request
from .negotiate import ClientNegotiator, Goal, TLSMode
from .replies import ReplyCursor, ReplyReader, ReplyState
from .uri import NBDAddress, parse_uri

__all__ = [
    "BASE_ALLOCATION", "ChunkType", "Command", "CommandFlag", "HandshakeFlag", "Info",
    "Option", "OptionReply", "ReplyFlag", "StateFlag", "TransmissionFlag", "WireErrno",
    "ConnectionLostError", "InvalidArgumentError", "NBDError", "OptionError",
    "ProtocolError", "RequestError", "UnsupportedError",
    "NEED_DATA", "BlockStatus", "ExportDescribed", "ExportsListed", "MetaContextsListed",
    "Negotiated", "ReadData", "ReadHole", "ReplyDone", "StartTLS",
    "ExportEntry", "ExportInfo", "check_request",
    "ClientNegotiator", "Goal", "TLSMode",
    "ReplyCursor", "ReplyReader", "ReplyState",
    "NBDAddress", "parse_uri",
]
