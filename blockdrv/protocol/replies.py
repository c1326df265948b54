"""The rules a reply must obey to be accepted for its request, and a byte-fed reply reader.

Theory of operation
-------------------
Every in-flight request has a :class:`ReplyState`.  Whoever reads the stream (the
driver's request tasks, or :class:`ReplyReader` here) decodes a header with
:mod:`~blockdrv.protocol.wire`, looks up the state by cookie, and reports each part of
the reply to it *before* trusting it:

- ``simple(error)`` for a simple reply;
- ``chunk(header)`` for a chunk header, before its payload is read: the chunk type must
  suit the command and the header style, and the payload length must be within the
  caps, so a hostile length never causes an allocation;
- ``data(offset, size)`` / ``hole(offset, size)`` for content chunks: inside the
  request, not overlapping an earlier content chunk, at most one with DF; returns where
  the bytes land in the caller's buffer;
- ``block_status(context, extents)`` / ``error_chunk(...)`` for the other chunk kinds;
  ``chunk_payload(header, payload)`` decodes a hole, block status or error chunk's
  payload and makes the matching call above (both readers use it).

When the DONE chunk (or the simple reply) has been handled, ``finish()`` checks the
reply is complete (a successful READ covered every byte, a successful BLOCK_STATUS
answered every context) and returns the request's error, if any.  Any violation raises
:class:`~blockdrv.protocol.errors.ProtocolError`: the stream is no longer trustworthy.

:class:`ReplyReader` runs those rules over a byte stream, h11 style: ``expect()`` the
requests you sent, ``receive_data()`` what you read, pull events with ``next_event()``.
It never buffers more than one small payload; READ data leaves as it arrives.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable

from .constants import (
    MAX_BLOCK_STATUS_CHUNK,
    MAX_SMALL_CHUNK,
    ChunkType,
    Command,
    CommandFlag,
    errno_from_wire,
    is_error_chunk,
)
from .errors import ProtocolError, RequestError, describe_errno
from .events import NEED_DATA, BlockStatus, ReadData, ReadHole, ReplyDone, _NeedData
from .wire import (
    ReplyHeader,
    decode_block_status,
    decode_error,
    decode_hole,
    decode_offset,
    decode_reply_header,
    reply_header_size,
)

_CONTENT = (ChunkType.OFFSET_DATA, ChunkType.OFFSET_HOLE)
# Plain ints: ``int & IntFlag`` goes through the enum's reflected operator (slow).
_DF = int(CommandFlag.DF)
_REQ_ONE = int(CommandFlag.REQ_ONE)
# Likewise: an enum member lookup costs more than the check it is used in.
_READ, _CMD_BLOCK_STATUS = int(Command.READ), int(Command.BLOCK_STATUS)
_T_NONE, _T_OFFSET_DATA, _T_OFFSET_HOLE = (int(ChunkType.NONE), int(ChunkType.OFFSET_DATA),
                                           int(ChunkType.OFFSET_HOLE))
_T_BLOCK_STATUS, _T_BLOCK_STATUS_EXT = (int(ChunkType.BLOCK_STATUS),
                                        int(ChunkType.BLOCK_STATUS_EXT))


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


class ReplyState:
    """What one in-flight request has received so far, and the checks on the rest."""

    __slots__ = ("command", "offset", "length", "flags", "structured", "extended",
                 "context_ids", "_ranges", "covered", "_content_chunks", "_status_seen",
                 "error", "done")

    def __init__(self, command: int, offset: int, length: int, flags: int = 0, *,
                 structured: bool = False, extended: bool = False,
                 context_ids: frozenset[int] | set[int] = frozenset()) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.flags = flags
        self.structured = structured
        self.extended = extended
        self.context_ids = context_ids
        self._ranges: list[tuple[int, int]] = []
        self.covered = 0
        self._content_chunks = 0
        self._status_seen: set[int] = set()
        self.error: RequestError | None = None
        self.done = False

    def __repr__(self) -> str:
        return (f"<ReplyState {_command_name(self.command)} {self.offset}+{self.length} "
                f"covered={self.covered} done={self.done}>")

    def _violation(self, what: str) -> ProtocolError:
        return ProtocolError(f"server reply to {_command_name(self.command)} "
                             f"{self.offset}+{self.length}: {what}")

    # --- simple replies -------------------------------------------------------------

    def simple(self, wire_error: int) -> bool:
        """A simple reply arrived; True if READ data of ``length`` bytes follows it."""
        if self.done or self._ranges or self._status_seen or self.error is not None:
            raise self._violation("simple reply after other reply messages")
        if self.command == _READ and self.structured and wire_error == 0:
            raise self._violation("successful simple reply to READ after structured "
                                  "replies were negotiated")
        if self.command == _CMD_BLOCK_STATUS and wire_error == 0:
            raise self._violation("successful simple reply to BLOCK_STATUS")
        self.done = True
        if wire_error:
            self._set_error(wire_error, "", None)
            return False
        if self.command == _READ:
            self.covered = self.length
            return self.length > 0
        return False

    # --- structured chunks ----------------------------------------------------------

    def chunk(self, header: ReplyHeader) -> None:
        """Check a chunk header before its payload is read."""
        if self.done:
            raise self._violation("chunk after the final (DONE) chunk")
        if not self.structured:
            raise self._violation("structured chunk without structured replies")
        type_, length = header.type, header.length
        if type_ == _T_NONE:
            if length:
                raise self._violation(f"NONE chunk with a {length}-byte payload")
            if not header.done:
                raise self._violation("NONE chunk without the DONE flag")
        elif type_ == _T_OFFSET_DATA or type_ == _T_OFFSET_HOLE:
            if self.command != _READ:
                raise self._violation(f"{ChunkType(type_).name} chunk for a non-READ request")
            if self._content_chunks and self.flags & _DF:
                raise self._violation("second content chunk despite DF (don't fragment)")
            if type_ == _T_OFFSET_HOLE:
                if length != 12:
                    raise self._violation(f"OFFSET_HOLE chunk of {length} bytes")
            elif length < 9 or length - 8 > self.length:
                raise self._violation(f"OFFSET_DATA chunk of {length} bytes for a "
                                      f"{self.length}-byte read")
            self._content_chunks += 1
        elif type_ == _T_BLOCK_STATUS or type_ == _T_BLOCK_STATUS_EXT:
            if self.command != _CMD_BLOCK_STATUS:
                raise self._violation("block status chunk for a non-BLOCK_STATUS request")
            if (type_ == _T_BLOCK_STATUS_EXT) != self.extended:
                raise self._violation(f"{ChunkType(type_).name} chunk does not match the "
                                      "negotiated header style")
            if length > MAX_BLOCK_STATUS_CHUNK:
                raise self._violation(f"block status chunk of {length} bytes is too large")
        elif is_error_chunk(type_):
            if length > MAX_SMALL_CHUNK:
                raise self._violation(f"error chunk of {length} bytes is too large")
        else:
            raise self._violation(f"unknown chunk type {type_}")
        if header.done:
            self.done = True

    def _place(self, offset: int, size: int, what: str) -> int:
        start, end = offset, offset + size
        if start < self.offset or end > self.offset + self.length:
            raise self._violation(f"{what} {offset}+{size} outside the request")
        ranges = self._ranges
        if not ranges:  # the first (usually the only) chunk
            ranges.append((start, end))
            self.covered += size
            return start - self.offset
        i = bisect_right(ranges, (start, end))
        if (i and ranges[i - 1][1] > start) or (i < len(ranges) and ranges[i][0] < end):
            raise self._violation(f"{what} {offset}+{size} overlaps an earlier chunk")
        ranges.insert(i, (start, end))
        self.covered += size
        return start - self.offset

    def data(self, offset: int, size: int) -> int:
        """An OFFSET_DATA chunk's range; returns its position in the request buffer."""
        return self._place(offset, size, "data chunk")

    def hole(self, offset: int, size: int) -> int:
        """An OFFSET_HOLE chunk's range; returns its position in the request buffer."""
        return self._place(offset, size, "hole chunk")

    def block_status(self, context_id: int, extents: list[tuple[int, int]]) -> None:
        """A block status chunk's extents for one context."""
        if context_id not in self.context_ids:
            raise self._violation(f"block status for unknown context id {context_id}")
        if context_id in self._status_seen:
            raise self._violation(f"second block status chunk for context id {context_id}")
        self._status_seen.add(context_id)
        if not extents:
            raise self._violation("block status chunk without extents")
        if any(length == 0 for length, _ in extents):
            raise self._violation("block status extent of length 0")
        if self.flags & _REQ_ONE:
            if len(extents) != 1 or extents[0][0] > self.length:
                raise self._violation("more than one extent, or a longer one, despite "
                                      "REQ_ONE")
        elif sum(length for length, _ in extents[:-1]) >= self.length:
            raise self._violation("block status extents continue past the request")

    def chunk_payload(self, header: ReplyHeader,
                      payload: bytes | bytearray) -> ReadHole | BlockStatus | None:
        """A hole, block status or error chunk's payload (its header passed ``chunk()``):
        decoded and checked by ``hole()``, ``block_status()`` or ``error_chunk()``;
        returns the event it makes (None for an error chunk)."""
        type_ = header.type
        if type_ == _T_OFFSET_HOLE:
            offset, size = decode_hole(payload)
            self.hole(offset, size)
            return ReadHole(header.cookie, offset, size)
        if type_ == _T_BLOCK_STATUS or type_ == _T_BLOCK_STATUS_EXT:
            context_id, extents = decode_block_status(payload, extended=self.extended)
            self.block_status(context_id, extents)
            return BlockStatus(header.cookie, context_id, extents)
        if is_error_chunk(type_):
            self.error_chunk(*decode_error(payload, type_))
        return None

    def error_chunk(self, wire_error: int, message: str, offset: int | None) -> None:
        """An error chunk: the request fails (the first error is kept)."""
        if offset is not None and not (
                self.offset <= offset < self.offset + max(self.length, 1)):
            raise self._violation(f"error offset {offset} outside the request")
        if self.error is None:
            self._set_error(wire_error, message, offset)

    def _set_error(self, wire_error: int, message: str, offset: int | None) -> None:
        code = errno_from_wire(wire_error)
        text = f"{_command_name(self.command)} {self.offset}+{self.length} failed: " \
               f"{describe_errno(code)}"
        if offset is not None:
            text += f" at offset {offset}"
        if message:
            text += f": {message}"
        self.error = RequestError(text, errno=code, server_message=message, offset=offset)

    def finish(self) -> RequestError | None:
        """The reply is complete: check it is whole and return the request's error."""
        if not self.done:
            raise self._violation("reply finished without a DONE chunk")
        if self.error is None:
            if self.command == _READ and self.covered != self.length:
                raise self._violation(f"successful reply covers {self.covered} of "
                                      f"{self.length} bytes")
            if self.command == _CMD_BLOCK_STATUS and self.structured \
                    and self._status_seen != set(self.context_ids):
                raise self._violation("successful reply lacks a block status chunk for "
                                      "some context")
        return self.error


Event = ReadData | ReadHole | BlockStatus | ReplyDone


class ReplyReader:
    """Byte-fed reader of the transmission-phase replies (client side).

    ``expect(cookie, state)`` registers each request as it is sent; ``receive_data()``
    takes bytes from the server; ``next_event()`` returns :data:`NEED_DATA` or one of
    :class:`ReadData`, :class:`ReadHole`, :class:`BlockStatus`, :class:`ReplyDone`.
    After a :class:`ProtocolError` the reader is dead and raises it again.
    """

    def __init__(self, *, structured: bool = False, extended: bool = False) -> None:
        self.structured = structured
        self.extended = extended
        self.in_flight: dict[int, ReplyState] = {}
        self._buffer = bytearray()
        self._header: ReplyHeader | None = None
        self._state: ReplyState | None = None
        self._data_at = 0  # next export offset of streamed READ data
        self._data_left = 0  # READ data bytes still to stream for the current message
        self._dead: ProtocolError | None = None
        # What to do next, by phase; each returns an event or NEED_DATA.
        self._phases: dict[str, Callable[[], Event | _NeedData]] = {
            "header": self._read_header,
            "payload": self._read_payload,
            "data-offset": self._read_data_offset,
            "data": self._stream_data,
            "finish": self._finish,
        }
        self._phase = "header"

    def expect(self, cookie: int, state: ReplyState) -> None:
        """Register a request that was sent and awaits its reply."""
        if cookie in self.in_flight:
            raise ValueError(f"cookie {cookie} is already in flight")
        self.in_flight[cookie] = state

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the connection."""
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return len(self._buffer)

    def next_event(self) -> Event | _NeedData:
        """The next reply event, or NEED_DATA."""
        if self._dead is not None:
            raise self._dead
        try:
            return self._phases[self._phase]()
        except ProtocolError as exc:
            self._dead = exc
            raise

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def _read_header(self) -> Event | _NeedData:
        if len(self._buffer) < 4:  # the magic alone tells the size, or a violation
            return NEED_DATA
        size = reply_header_size(self._buffer, structured=self.structured,
                                 extended=self.extended)
        if len(self._buffer) < size:
            return NEED_DATA
        header = decode_reply_header(self._take(size))
        state = self.in_flight.get(header.cookie)
        if state is None:
            raise ProtocolError(f"reply for unknown cookie {header.cookie}")
        self._header, self._state = header, state
        if header.simple:
            if state.simple(header.error):
                self._data_at, self._data_left = state.offset, state.length
                self._phase = "data"
                return self._stream_data()
            return self._finish()
        state.chunk(header)
        self._phase = "data-offset" if header.type == ChunkType.OFFSET_DATA else "payload"
        return self._phases[self._phase]()

    def _read_payload(self) -> Event | _NeedData:
        header, state = self._header, self._state
        assert header is not None and state is not None
        if len(self._buffer) < header.length:
            return NEED_DATA
        return self._after_chunk(state.chunk_payload(header, self._take(header.length)))

    def _read_data_offset(self) -> Event | _NeedData:
        header, state = self._header, self._state
        assert header is not None and state is not None
        if len(self._buffer) < 8:
            return NEED_DATA
        offset = decode_offset(self._take(8))
        size = header.length - 8
        state.data(offset, size)
        self._data_at, self._data_left = offset, size
        self._phase = "data"
        return self._stream_data()

    def _stream_data(self) -> Event | _NeedData:
        header = self._header
        assert header is not None
        if self._data_left == 0:
            return self._after_chunk(None)
        n = min(len(self._buffer), self._data_left)
        if n == 0:
            return NEED_DATA
        event = ReadData(header.cookie, self._data_at, self._take(n))
        self._data_at += n
        self._data_left -= n
        return event

    def _after_chunk(self, event: Event | None) -> Event | _NeedData:
        state = self._state
        assert state is not None
        if state.done:
            if event is not None:
                self._phase = "finish"
                return event
            return self._finish()
        self._phase = "header"
        self._header = self._state = None
        if event is not None:
            return event
        return self._read_header()

    def _finish(self) -> Event:
        header, state = self._header, self._state
        assert header is not None and state is not None
        del self.in_flight[header.cookie]
        self._header = self._state = None
        self._phase = "header"
        return ReplyDone(header.cookie, state.finish())
