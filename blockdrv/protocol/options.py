"""Handshake messages: greeting, client flags, option requests and option replies.

Pure encoders and decoders for both sides.  Decoders check every length against the
bytes they were given and the caps (strings at most 4096 bytes, UTF-8, no NUL) and raise
:class:`~blockdrv.protocol.errors.ProtocolError` otherwise.

Layout (all big-endian):

- greeting (server, 18 bytes): ``NBDMAGIC`` u64, ``IHAVEOPT`` u64, handshake flags u16
- client flags (4 bytes): u32
- option request (16 + n): ``IHAVEOPT`` u64, option u32, length u32, data
- option reply (20 + n): magic u64, option u32, reply type u32, length u32, data
- EXPORT_NAME reply (10 or 134): size u64, transmission flags u16, [124 zero bytes]
"""

from __future__ import annotations

import struct
from typing import Iterable, Sequence

from .constants import (
    CLISERV_MAGIC,
    IHAVEOPT,
    MAX_EXPORT_SIZE,
    MAX_OPTION_REPLY,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    Info,
)
from .errors import InvalidArgumentError, ProtocolError

_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")

GREETING_SIZE = _GREETING.size  # 18
CLIENT_FLAGS_SIZE = 4
OPTION_HEADER_SIZE = _OPTION.size  # 16
OPTION_REPLY_HEADER_SIZE = _OPTION_REPLY.size  # 20
EXPORT_NAME_REPLY_SIZE = _EXPORT_NAME_REPLY.size  # 10
EXPORT_NAME_ZEROES = 124

Bytes = bytes | bytearray | memoryview


# --- strings -------------------------------------------------------------------------


def encode_string(text: str, what: str = "string") -> bytes:
    """UTF-8 bytes of a protocol string; ValueError if it breaks the spec's limits."""
    data = text.encode("utf-8")
    if len(data) > MAX_STRING:
        raise InvalidArgumentError(f"{what} is {len(data)} bytes, over the limit of {MAX_STRING}")
    if b"\0" in data:
        raise InvalidArgumentError(f"{what} contains a NUL character")
    return data


def decode_string(data: Bytes, what: str = "string") -> str:
    """A protocol string from the peer; ProtocolError if too long, not UTF-8, or has NUL."""
    if len(data) > MAX_STRING:
        raise ProtocolError(f"{what} of {len(data)} bytes is over the limit of {MAX_STRING}")
    raw = bytes(data)
    if b"\0" in raw:
        raise ProtocolError(f"{what} contains a NUL character")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8") from None


def _sized_string(data: Bytes, pos: int, what: str) -> tuple[str, int]:
    """A u32-length-prefixed string at ``pos``; returns it and the position after it."""
    if len(data) < pos + 4:
        raise ProtocolError(f"{what}: truncated length")
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if n > MAX_STRING or pos + n > len(data):
        raise ProtocolError(f"{what}: length {n} does not fit the message")
    return decode_string(data[pos:pos + n], what), pos + n


# --- greeting and flags ----------------------------------------------------------------


def encode_greeting(handshake_flags: int) -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def decode_greeting(data: Bytes) -> int:
    """Handshake flags of a fixed-newstyle greeting; ProtocolError for anything else."""
    magic, second, flags = _GREETING.unpack_from(data)
    if magic != NBDMAGIC:
        raise ProtocolError(f"not an NBD server (greeting magic 0x{magic:016x})")
    if second == CLISERV_MAGIC:
        raise ProtocolError("server uses oldstyle negotiation, which is not supported "
                            "(only fixed newstyle is)")
    if second != IHAVEOPT:
        raise ProtocolError(f"bad newstyle magic 0x{second:016x}")
    return int(flags)


def encode_client_flags(flags: int) -> bytes:
    return _U32.pack(flags)


def decode_client_flags(data: Bytes) -> int:
    return int(_U32.unpack_from(data)[0])


# --- option requests (client -> server) --------------------------------------------------


def encode_option(option: int, data: Bytes = b"") -> bytes:
    return _OPTION.pack(IHAVEOPT, option, len(data)) + bytes(data)


def decode_option_header(data: Bytes) -> tuple[int, int]:
    """(option, data length) of an option request header (server side)."""
    magic, option, length = _OPTION.unpack_from(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic 0x{magic:016x}")
    return option, length


def encode_info_request(name: str, infos: Sequence[int] = ()) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO: export name and information requests."""
    raw = encode_string(name, "export name")
    return (_U32.pack(len(raw)) + raw + _U16.pack(len(infos))
            + b"".join(_U16.pack(i) for i in infos))


def decode_info_request(data: Bytes) -> tuple[str, list[int]]:
    """(export name, information requests) of NBD_OPT_INFO / NBD_OPT_GO data."""
    name, pos = _sized_string(data, 0, "export name")
    if len(data) < pos + 2:
        raise ProtocolError("information request count missing")
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    if len(data) != pos + 2 * count:
        raise ProtocolError(f"{count} information requests do not fit the option data")
    infos = list(struct.unpack_from(f">{count}H", data, pos))
    return name, infos


def encode_meta_context_request(name: str, queries: Iterable[str]) -> bytes:
    """Data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT."""
    raw = encode_string(name, "export name")
    parts = [_U32.pack(len(raw)), raw]
    encoded = [encode_string(q, "meta context") for q in queries]
    parts.append(_U32.pack(len(encoded)))
    for q in encoded:
        parts += [_U32.pack(len(q)), q]
    return b"".join(parts)


def decode_meta_context_request(data: Bytes) -> tuple[str, list[str]]:
    """(export name, queries) of a meta context option."""
    name, pos = _sized_string(data, 0, "export name")
    if len(data) < pos + 4:
        raise ProtocolError("meta context query count missing")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > (len(data) - pos) // 4:
        raise ProtocolError(f"{count} meta context queries do not fit the option data")
    queries = []
    for _ in range(count):
        query, pos = _sized_string(data, pos, "meta context query")
        queries.append(query)
    if pos != len(data):
        raise ProtocolError("trailing bytes after the meta context queries")
    return name, queries


# --- option replies (server -> client) ---------------------------------------------------


def encode_option_reply(option: int, reply_type: int, data: Bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + bytes(data)


def decode_option_reply_header(data: Bytes) -> tuple[int, int, int]:
    """(option, reply type, data length) of an option reply header (client side).

    The length is capped before anything is read: no legitimate reply is longer than
    a REP_SERVER with a full name and description.
    """
    magic, option, reply_type, length = _OPTION_REPLY.unpack_from(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic 0x{magic:016x}")
    if length > MAX_OPTION_REPLY:
        raise ProtocolError(f"option reply of {length} bytes is over the limit of "
                            f"{MAX_OPTION_REPLY}")
    return option, reply_type, length


def encode_rep_server(name: str, description: str = "") -> bytes:
    """Data of NBD_REP_SERVER (a LIST entry)."""
    raw = encode_string(name, "export name")
    return _U32.pack(len(raw)) + raw + encode_string(description, "description")


def decode_rep_server(data: Bytes) -> tuple[str, str]:
    """(name, description) of NBD_REP_SERVER."""
    name, pos = _sized_string(data, 0, "export name")
    return name, decode_string(data[pos:], "export description")


def encode_rep_meta_context(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + encode_string(name, "meta context")


def decode_rep_meta_context(data: Bytes) -> tuple[int, str]:
    """(context id, name) of NBD_REP_META_CONTEXT."""
    if len(data) < 4:
        raise ProtocolError("meta context reply shorter than 4 bytes")
    (context_id,) = _U32.unpack_from(data)
    return context_id, decode_string(data[4:], "meta context name")


def encode_info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_string(info: int, text: str) -> bytes:
    """NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    return _U16.pack(info) + encode_string(text, Info(info).name.lower())


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def decode_info(data: Bytes) -> tuple[int, object]:
    """(info type, value) of NBD_REP_INFO data.

    EXPORT → (size, flags); NAME, DESCRIPTION → str; BLOCK_SIZE → (min, preferred, max);
    unknown types → None (the caller ignores them).
    """
    if len(data) < 2:
        raise ProtocolError("information reply shorter than 2 bytes")
    (info,) = _U16.unpack_from(data)
    if info == Info.EXPORT:
        if len(data) != _INFO_EXPORT.size:
            raise ProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes, expected 12")
        _, size, flags = _INFO_EXPORT.unpack(data)
        if size > MAX_EXPORT_SIZE:
            raise ProtocolError(f"export size {size} is not below 2**63")
        return info, (size, flags)
    if info in (Info.NAME, Info.DESCRIPTION):
        return info, decode_string(data[2:], Info(info).name.lower())
    if info == Info.BLOCK_SIZE:
        if len(data) != _INFO_BLOCK_SIZE.size:
            raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, expected 14")
        _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(data)
        return info, (minimum, preferred, maximum)
    return info, None


def encode_export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    reply = _EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(EXPORT_NAME_ZEROES)


def decode_export_name_reply(data: Bytes) -> tuple[int, int]:
    """(size, flags) of the reply to NBD_OPT_EXPORT_NAME (first 10 bytes)."""
    size, flags = _EXPORT_NAME_REPLY.unpack_from(data)
    if size > MAX_EXPORT_SIZE:
        raise ProtocolError(f"export size {size} is not below 2**63")
    return size, flags
