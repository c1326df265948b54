"""Transmission-phase messages: request headers, reply headers and chunk payloads.

Pure functions from fields to bytes and back, for both sides of the connection.  Nothing
here keeps state or knows which requests are in flight; the rules that tie a reply to
its request live in :mod:`blockdrv.protocol.replies`.

Layout (all big-endian):

=====================  =====  ==========================================================
message                bytes  fields
=====================  =====  ==========================================================
compact request        28     magic u32, flags u16, type u16, cookie u64, offset u64,
                              length u32 (+ WRITE payload, sent separately, never copied)
extended request       32     as compact, but length u64
simple reply           16     magic u32, error u32, cookie u64 (+ READ data)
structured chunk       20     magic u32, flags u16, type u16, cookie u64, length u32
extended chunk         32     magic u32, flags u16, type u16, cookie u64, offset u64,
                              length u64
=====================  =====  ==========================================================

Decoders never trust a length: they check it against the payload they were handed and
against the caps in :mod:`blockdrv.protocol.constants` and raise
:class:`~blockdrv.protocol.errors.ProtocolError` on any inconsistency.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Sequence

from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_STRING,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ReplyFlag,
)
from .errors import InvalidArgumentError, ProtocolError

_REQUEST = struct.Struct(">IHHQQI")
_EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_REPLY = struct.Struct(">IHHQI")
_EXTENDED_REPLY = struct.Struct(">IHHQQQ")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")
_STATUS_EXT_HEAD = struct.Struct(">II")
_STRUCTURED_DATA_HEAD = struct.Struct(">IHHQIQ")  # chunk header + data offset
_EXTENDED_DATA_HEAD = struct.Struct(">IHHQQQQ")
_OFFSET_DATA = int(ChunkType.OFFSET_DATA)

REQUEST_SIZE = _REQUEST.size
EXTENDED_REQUEST_SIZE = _EXTENDED_REQUEST.size
SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size
STRUCTURED_REPLY_SIZE = _STRUCTURED_REPLY.size
EXTENDED_REPLY_SIZE = _EXTENDED_REPLY.size

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF


# --- requests --------------------------------------------------------------------------


class Request(NamedTuple):
    """A decoded request header (the WRITE payload, if any, follows it on the wire)."""

    flags: int
    command: int
    cookie: int
    offset: int
    length: int


def request_size(extended: bool) -> int:
    """Size of a request header in the negotiated header style."""
    return EXTENDED_REQUEST_SIZE if extended else REQUEST_SIZE


def encode_request(command: int, flags: int, cookie: int, offset: int, length: int,
                   *, extended: bool = False) -> bytes:
    """Header of one request. The WRITE payload is not part of it: send it after."""
    if extended:
        return _EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, command, cookie,
                                      offset, length)
    if length > U32_MAX:
        raise InvalidArgumentError(f"length {length} does not fit a compact request header")
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


def decode_request(data: bytes | bytearray | memoryview, *, extended: bool = False) -> Request:
    """Parse a request header of the negotiated style (server side)."""
    if extended:
        magic, flags, command, cookie, offset, length = _EXTENDED_REQUEST.unpack(data)
        if magic != EXTENDED_REQUEST_MAGIC:
            raise ProtocolError(f"bad extended request magic 0x{magic:08x}")
    else:
        magic, flags, command, cookie, offset, length = _REQUEST.unpack(data)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic 0x{magic:08x}")
    return Request(flags, command, cookie, offset, length)


# --- reply headers ---------------------------------------------------------------------


class ReplyHeader(NamedTuple):
    """A decoded simple reply or structured/extended chunk header.

    For a simple reply ``type`` is -1, ``flags`` is DONE, ``error`` is the wire error
    and ``length`` is 0 (a READ's data follows, its length known only to the client).
    For chunks ``error`` is 0 and ``length`` is the payload length that follows.
    ``offset`` is only sent in extended headers (and is informational).
    """

    magic: int
    cookie: int
    flags: int
    type: int
    length: int
    error: int = 0
    offset: int = 0

    @property
    def simple(self) -> bool:
        return self.magic == SIMPLE_REPLY_MAGIC

    @property
    def done(self) -> bool:
        return bool(self.flags & _DONE)  # a plain int: IntFlag.__and__ costs a call


_DONE = int(ReplyFlag.DONE)


SIMPLE_TYPE = -1
"""``ReplyHeader.type`` of a simple reply."""


def first_reply_read(extended: bool) -> int:
    """How many bytes to read before a reply header's size is known.

    Extended style: all 32.  Compact style: 16, the size of a simple reply; a
    structured chunk needs :data:`STRUCTURED_REPLY_SIZE` - 16 more.
    """
    return EXTENDED_REPLY_SIZE if extended else SIMPLE_REPLY_SIZE


def reply_header_size(data: bytes | bytearray | memoryview, *, structured: bool,
                      extended: bool) -> int:
    """Full header size given at least its first 4 bytes; ProtocolError on bad magic.

    The magic must match what was negotiated: extended headers allow only extended
    chunks; otherwise simple replies, plus structured chunks once negotiated.
    """
    (magic,) = _U32.unpack_from(data)
    if extended:
        if magic == EXTENDED_REPLY_MAGIC:
            return EXTENDED_REPLY_SIZE
    elif magic == SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY_SIZE
    elif magic == STRUCTURED_REPLY_MAGIC and structured:
        return STRUCTURED_REPLY_SIZE
    if magic in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, EXTENDED_REPLY_MAGIC):
        raise ProtocolError(f"reply magic 0x{magic:08x} not allowed with the negotiated "
                            f"{'extended' if extended else 'compact'} headers")
    raise ProtocolError(f"bad reply magic 0x{magic:08x}")


class ReplyHeaderSizes(dict[int, int]):
    """magic -> reply header size, for the magics the negotiated style allows.

    Looking up any other magic raises the ProtocolError :func:`reply_header_size`
    raises (``__missing__``), so a lookup is the whole check.  Share, don't mutate:
    :func:`reply_header_sizes` hands out one per header style.
    """

    def __init__(self, *, structured: bool, extended: bool) -> None:
        super().__init__()
        self.structured = structured
        self.extended = extended
        if extended:
            self[EXTENDED_REPLY_MAGIC] = EXTENDED_REPLY_SIZE
        else:
            self[SIMPLE_REPLY_MAGIC] = SIMPLE_REPLY_SIZE
            if structured:
                self[STRUCTURED_REPLY_MAGIC] = STRUCTURED_REPLY_SIZE

    def __missing__(self, magic: int) -> int:
        return reply_header_size(_U32.pack(magic), structured=self.structured,
                                 extended=self.extended)  # raises


_HEADER_SIZES = {(structured, extended): ReplyHeaderSizes(structured=structured,
                                                          extended=extended)
                 for structured in (False, True) for extended in (False, True)}


def reply_header_sizes(*, structured: bool, extended: bool) -> ReplyHeaderSizes:
    """The (shared) :class:`ReplyHeaderSizes` of a header style."""
    return _HEADER_SIZES[(structured, extended)]


_new_header = tuple.__new__
"""Builds a ReplyHeader from all seven fields without NamedTuple's Python-level
``__new__`` (decode_reply_header runs once per reply)."""


def decode_reply_header(data: bytes | bytearray | memoryview) -> ReplyHeader:
    """Parse a whole reply header (size from :func:`reply_header_size`)."""
    n = len(data)
    if n == SIMPLE_REPLY_SIZE:
        magic, error, cookie = _SIMPLE_REPLY.unpack(data)
        if magic == SIMPLE_REPLY_MAGIC:
            return _new_header(ReplyHeader, (magic, cookie, _DONE, SIMPLE_TYPE, 0, error, 0))
    elif n == STRUCTURED_REPLY_SIZE:
        magic, flags, type_, cookie, length = _STRUCTURED_REPLY.unpack(data)
        if magic == STRUCTURED_REPLY_MAGIC:
            return _new_header(ReplyHeader, (magic, cookie, flags, type_, length, 0, 0))
    elif n == EXTENDED_REPLY_SIZE:
        magic, flags, type_, cookie, offset, length = _EXTENDED_REPLY.unpack(data)
        if magic == EXTENDED_REPLY_MAGIC:
            return _new_header(ReplyHeader, (magic, cookie, flags, type_, length, 0, offset))
    else:
        raise ProtocolError(f"reply header of {n} bytes")
    raise ProtocolError(f"bad reply magic 0x{_U32.unpack_from(data)[0]:08x}")


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header (server side); READ data follows it when error is 0."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk_header(cookie: int, type_: int, length: int, *, done: bool,
                        extended: bool = False, offset: int = 0) -> bytes:
    """A structured or extended chunk header (server side)."""
    flags = _DONE if done else 0
    if extended:
        return _EXTENDED_REPLY.pack(EXTENDED_REPLY_MAGIC, flags, type_, cookie, offset, length)
    return _STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length)


# --- chunk payloads: encoders (server side) ---------------------------------------------


def encode_none_chunk(cookie: int, *, extended: bool = False, offset: int = 0) -> bytes:
    """The final, empty NONE chunk."""
    return encode_chunk_header(cookie, ChunkType.NONE, 0, done=True, extended=extended,
                               offset=offset)


def encode_data_chunk_header(cookie: int, offset: int, data_length: int, *, done: bool,
                             extended: bool = False) -> bytes:
    """Header plus offset of an OFFSET_DATA chunk; the caller sends the data after it."""
    flags = _DONE if done else 0  # one pack: the server's hottest encoder
    if extended:
        return _EXTENDED_DATA_HEAD.pack(EXTENDED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie,
                                        offset, 8 + data_length, offset)
    return _STRUCTURED_DATA_HEAD.pack(STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie,
                                      8 + data_length, offset)


def encode_hole_chunk(cookie: int, offset: int, size: int, *, done: bool,
                      extended: bool = False) -> bytes:
    """A whole OFFSET_HOLE chunk."""
    return encode_chunk_header(cookie, ChunkType.OFFSET_HOLE, _HOLE.size, done=done,
                               extended=extended, offset=offset) + _HOLE.pack(offset, size)


def encode_block_status_payload(context_id: int, extents: Sequence[tuple[int, int]],
                                *, extended: bool = False) -> bytes:
    """Payload of BLOCK_STATUS (compact) or BLOCK_STATUS_EXT (extended)."""
    if extended:
        parts = [_STATUS_EXT_HEAD.pack(context_id, len(extents))]
        parts += [struct.pack(">QQ", length, flags) for length, flags in extents]
    else:
        parts = [_U32.pack(context_id)]
        parts += [struct.pack(">II", length, flags) for length, flags in extents]
    return b"".join(parts)


def encode_block_status_chunk(cookie: int, context_id: int,
                              extents: Sequence[tuple[int, int]], *, done: bool,
                              extended: bool = False, offset: int = 0) -> bytes:
    """A whole block status chunk in the type matching the header style."""
    payload = encode_block_status_payload(context_id, extents, extended=extended)
    type_ = ChunkType.BLOCK_STATUS_EXT if extended else ChunkType.BLOCK_STATUS
    return encode_chunk_header(cookie, type_, len(payload), done=done, extended=extended,
                               offset=offset) + payload


def encode_error_payload(error: int, message: str = "", offset: int | None = None) -> bytes:
    """Payload of ERROR (offset None) or ERROR_OFFSET."""
    text = message.encode("utf-8")[:MAX_STRING]
    payload = _ERROR.pack(error, len(text)) + text
    if offset is not None:
        payload += _U64.pack(offset)
    return payload


def encode_error_chunk(cookie: int, error: int, message: str = "", *,
                       offset: int | None = None, done: bool = True,
                       extended: bool = False, header_offset: int = 0) -> bytes:
    """A whole ERROR or ERROR_OFFSET chunk carrying a wire error value."""
    payload = encode_error_payload(error, message, offset)
    type_ = ChunkType.ERROR if offset is None else ChunkType.ERROR_OFFSET
    return encode_chunk_header(cookie, type_, len(payload), done=done, extended=extended,
                               offset=header_offset) + payload


# --- chunk payloads: decoders (client side) ---------------------------------------------


def decode_offset(payload: bytes | bytearray | memoryview) -> int:
    """The leading 64-bit offset of an OFFSET_DATA payload."""
    return int(_U64.unpack_from(payload)[0])


def decode_hole(payload: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(offset, size) of an OFFSET_HOLE payload."""
    if len(payload) != _HOLE.size:
        raise ProtocolError(f"OFFSET_HOLE chunk of {len(payload)} bytes, expected 12")
    offset, size = _HOLE.unpack(payload)
    if size == 0:
        raise ProtocolError("OFFSET_HOLE chunk with a hole size of 0")
    return offset, size


def decode_block_status(payload: bytes | bytearray | memoryview, *,
                        extended: bool) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, flags), ...]) of a BLOCK_STATUS(_EXT) payload."""
    n = len(payload)
    if extended:
        if n < 8:
            raise ProtocolError(f"BLOCK_STATUS_EXT chunk of {n} bytes")
        context_id, count = _STATUS_EXT_HEAD.unpack_from(payload)
        if count == 0 or n != 8 + 16 * count:
            raise ProtocolError(f"BLOCK_STATUS_EXT chunk of {n} bytes claims {count} extents")
        values = struct.unpack_from(f">{2 * count}Q", payload, 8)
    else:
        if n < 12 or (n - 4) % 8:
            raise ProtocolError(f"BLOCK_STATUS chunk of {n} bytes is not 4 + a multiple of 8")
        (context_id,) = _U32.unpack_from(payload)
        count = (n - 4) // 8
        values = struct.unpack_from(f">{2 * count}I", payload, 4)
    extents = list(zip(values[0::2], values[1::2], strict=True))
    return context_id, extents


def decode_error(payload: bytes | bytearray | memoryview,
                 type_: int) -> tuple[int, str, int | None]:
    """(wire error, message, offset or None) of any error chunk (bit 15 set).

    ERROR_OFFSET carries an offset after the message; other (unknown) error types are
    read for their common error and message fields only.
    """
    n = len(payload)
    if n < _ERROR.size:
        raise ProtocolError(f"error chunk of {n} bytes is shorter than 6")
    error, message_length = _ERROR.unpack_from(payload)
    if error == 0:
        raise ProtocolError("error chunk with an error value of 0")
    if message_length > MAX_STRING:
        raise ProtocolError(f"error message of {message_length} bytes is over {MAX_STRING}")
    end = _ERROR.size + message_length
    offset: int | None = None
    if type_ == ChunkType.ERROR_OFFSET:
        if n != end + 8:
            raise ProtocolError(f"ERROR_OFFSET chunk of {n} bytes with a "
                                f"{message_length}-byte message")
        (offset,) = _U64.unpack_from(payload, end)
    elif type_ == ChunkType.ERROR and n != end:
        raise ProtocolError(f"ERROR chunk of {n} bytes with a {message_length}-byte message")
    elif n < end:
        raise ProtocolError(f"error chunk of {n} bytes with a {message_length}-byte message")
    message = bytes(payload[_ERROR.size:end]).decode("utf-8", "replace")
    return error, message, offset
