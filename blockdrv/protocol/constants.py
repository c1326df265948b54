"""Numbers of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md), as enums.

Every magic number, option, reply type, command, flag and error value the wire uses is
here and nowhere else.  The names follow the specification without the ``NBD_`` prefix
(``Option.GO`` is ``NBD_OPT_GO``, ``TransmissionFlag.SEND_FUA`` is
``NBD_FLAG_SEND_FUA``), so the spec can be searched for any of them.
"""

from __future__ import annotations

import enum
import errno

# --- magic numbers -------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC": first 8 bytes the server sends
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and option requests
CLISERV_MAGIC = 0x00420281861253  # oldstyle greeting (refused)
OPTION_REPLY_MAGIC = 0x3E889045565A9

REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

NBD_DEFAULT_PORT = 10809

# --- caps: checked before anything is allocated from a length the peer sent -----------

MAX_STRING = 4096
"""Longest string (export name, description, error message, context name) accepted."""

MAX_EXPORT_SIZE = (1 << 63) - 1
"""Export sizes must stay below 2**63."""

MAX_OPTION_REPLY = 4 + 2 * MAX_STRING
"""Largest option reply payload: REP_SERVER with a full name and a full description."""

MAX_OPTION_REQUEST = 64 * 1024
"""Largest option request payload the server side buffers (larger ones get ERR_TOO_BIG)."""

MAX_SMALL_CHUNK = 6 + MAX_STRING + 8
"""Largest payload of a non-data, non-status chunk: an ERROR_OFFSET with a full message."""

MAX_BLOCK_STATUS_CHUNK = 1 << 20
"""Largest BLOCK_STATUS(_EXT) chunk payload (tens of thousands of extents)."""

MAX_REPLY_CHUNKS = 1024
"""Chunks one reply may have, besides one per :data:`REPLY_BYTES_PER_CHUNK` bytes asked
for: a longer reply is a ProtocolError (a server fragmenting a 32 MiB READ into 512-byte
pieces stays well inside; an endless stream of error chunks does not)."""

REPLY_BYTES_PER_CHUNK = 512

MAX_REPLY_FRAGMENTS = 4096
"""Separate (not adjacent) pieces a READ reply's chunks may cover before they join up;
adjacent chunks merge, so chunks sent in order or in reverse count as one piece."""

MAX_INFO_REPLIES = 1024
"""NBD_REP_INFO replies accepted for one NBD_OPT_GO or NBD_OPT_INFO."""

MAX_LIST_ENTRIES = 65536
"""Entries (NBD_REP_SERVER or NBD_REP_META_CONTEXT) accepted for one list option."""

MAX_LIST_BYTES = 16 * 1024 * 1024
"""Reply bytes accepted for one list option (NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT)."""

DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
"""READ/WRITE size limit when the server does not advertise one (spec: 2**25)."""

MAX_BLOCK_SIZE_MINIMUM = 64 * 1024
"""An advertised minimum block size may not exceed 2**16."""


class HandshakeFlag(enum.IntFlag):
    """16-bit flags the server sends in its greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """32-bit flags the client answers the greeting with."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """16-bit export flags (NBD_FLAG_*). Unknown bits are kept and ignored."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Option(enum.IntEnum):
    """Option haggling requests (NBD_OPT_*)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class OptionReply(enum.IntEnum):
    """Option reply types (NBD_REP_*). Error types have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10


def is_option_error(reply_type: int) -> bool:
    """True for every option reply type with bit 31 set, known or not."""
    return bool(reply_type & _REP_ERR)


class Info(enum.IntEnum):
    """Information types of NBD_REP_INFO (NBD_INFO_*)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Transmission request types (NBD_CMD_*)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    """Request flags (NBD_CMD_FLAG_*)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


ALLOWED_COMMAND_FLAGS: dict[Command, CommandFlag] = {
    Command.READ: CommandFlag.FUA | CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.CACHE: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
    Command.DISC: CommandFlag(0),
}
"""Request flags each command may carry at all (spec, "Command flags")."""

WRITING_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
"""Commands a read-only export refuses."""


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


_CHUNK_ERR = 1 << 15


class ChunkType(enum.IntEnum):
    """Structured reply chunk types (NBD_REPLY_TYPE_*). Error types have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = _CHUNK_ERR | 1
    ERROR_OFFSET = _CHUNK_ERR | 2


def is_error_chunk(chunk_type: int) -> bool:
    """True for every chunk type with bit 15 set, known or not."""
    return bool(chunk_type & _CHUNK_ERR)


class StateFlag(enum.IntFlag):
    """Flags of the base:allocation metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"


class WireErrno(enum.IntEnum):
    """Error values on the wire (NBD_E*). Not the host's errno numbering."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_WIRE_TO_HOST: dict[int, int] = {
    WireErrno.EPERM: errno.EPERM,
    WireErrno.EIO: errno.EIO,
    WireErrno.ENOMEM: errno.ENOMEM,
    WireErrno.EINVAL: errno.EINVAL,
    WireErrno.ENOSPC: errno.ENOSPC,
    WireErrno.EOVERFLOW: errno.EOVERFLOW,
    WireErrno.ENOTSUP: errno.ENOTSUP,
    WireErrno.ESHUTDOWN: errno.ESHUTDOWN,
}
_HOST_TO_WIRE: dict[int, WireErrno] = {host: WireErrno(wire)
                                        for wire, host in _WIRE_TO_HOST.items()}
_HOST_TO_WIRE.update({errno.EDQUOT: WireErrno.ENOSPC, errno.EFBIG: WireErrno.ENOSPC,
                      errno.EROFS: WireErrno.EPERM, errno.EACCES: WireErrno.EPERM,
                      errno.EOPNOTSUPP: WireErrno.ENOTSUP})


def errno_from_wire(value: int) -> int:
    """Host errno for a wire error value; unknown values count as EINVAL (spec)."""
    return _WIRE_TO_HOST.get(value, errno.EINVAL)


def errno_to_wire(value: int) -> WireErrno:
    """Wire error value for a host errno; anything unlisted is sent as EIO."""
    return _HOST_TO_WIRE.get(value, WireErrno.EIO)
