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

Per-reply bookkeeping is bounded whatever the chunk order: covered ranges that touch
are joined (so in-order or reverse-order chunks cost one range), at most
:data:`~.constants.MAX_REPLY_FRAGMENTS` separate ranges are kept, and a reply may have
at most :data:`~.constants.MAX_REPLY_CHUNKS` chunks plus one per
:data:`~.constants.REPLY_BYTES_PER_CHUNK` bytes asked for.

:class:`ReplyCursor` adds *where the reader is* to those rules: after ``begin(header)``
its ``step`` says what to read next (an offset, READ data into the request's buffer, a
whole small payload, or nothing), and the reader reports each read back.  It is the one
reply parser: the driver drives it with its peeks and ``recv_into`` calls (resumable
after a cancellation, because ``step``/``at``/``left`` live in the cursor), and
:class:`ReplyReader` drives it over a byte buffer, h11 style: ``expect()`` the requests
you sent, ``receive_data()`` what you read, pull events with ``next_event()``.  The
hypothesis fuzzers run against ReplyReader, so they test the driver's parser.
"""

from __future__ import annotations

from bisect import bisect_right

from .constants import (
    MAX_BLOCK_STATUS_CHUNK,
    MAX_REPLY_CHUNKS,
    MAX_REPLY_FRAGMENTS,
    MAX_SMALL_CHUNK,
    REPLY_BYTES_PER_CHUNK,
    SIMPLE_REPLY_MAGIC,
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


# What a ReplyCursor needs read next (plain ints: compared on every chunk).
CHUNK_DONE = 0
"""Nothing: the chunk is consumed (read the next header unless the reply is ``done``)."""
READ_OFFSET = 1
"""The 8-byte offset that opens an OFFSET_DATA payload: pass it to ``data_offset()``."""
READ_DATA = 2
"""``left`` bytes of READ data, landing at ``at`` in the request's buffer:
report each read with ``data_read(n)``."""
READ_PAYLOAD = 3
"""The whole ``left``-byte payload of a hole, block status or error chunk: pass it to
``payload()``."""


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


class ReplyState:
    """What one in-flight request has received so far, and the checks on the rest."""

    __slots__ = ("command", "offset", "length", "flags", "structured", "extended",
                 "context_ids", "_ranges", "covered", "_content_chunks", "_status_seen",
                 "error", "done", "step", "at", "left", "header", "chunks", "max_chunks")

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
        # Where a reader is (the ReplyCursor methods; set here: one __init__ call).
        self.step = CHUNK_DONE
        self.at = 0  # READ_DATA: where the next byte goes in the request's buffer
        self.left = 0  # READ_DATA / READ_PAYLOAD: bytes still to read
        self.header: ReplyHeader | None = None  # the chunk being consumed
        self.chunks = 0
        self.max_chunks = MAX_REPLY_CHUNKS + length // REPLY_BYTES_PER_CHUNK

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
        """Record a content chunk's range; returns its position in the request buffer.

        ``_ranges`` holds the covered ranges, sorted, disjoint and never adjacent: a
        chunk that touches a neighbour joins it.  So chunks in order (or in reverse)
        keep a single range whatever their number, and a reply cut into scattered
        pieces is refused past :data:`MAX_REPLY_FRAGMENTS` ranges: memory stays small
        and an insertion costs at most that many moves.
        """
        start, end = offset, offset + size
        if start < self.offset or end > self.offset + self.length:
            raise self._violation(f"{what} {offset}+{size} outside the request")
        ranges = self._ranges
        if not ranges:  # the first (usually the only) chunk
            ranges.append((start, end))
        elif start >= ranges[-1][1]:  # after everything so far: chunks in order
            if start == ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], end)
            else:
                self._add_range(len(ranges), start, end)
        else:
            i = bisect_right(ranges, (start, end))
            if (i and ranges[i - 1][1] > start) or (i < len(ranges) and ranges[i][0] < end):
                raise self._violation(f"{what} {offset}+{size} overlaps an earlier chunk")
            joins_left = i > 0 and ranges[i - 1][1] == start
            joins_right = i < len(ranges) and ranges[i][0] == end
            if joins_left and joins_right:
                ranges[i - 1] = (ranges[i - 1][0], ranges.pop(i)[1])
            elif joins_left:
                ranges[i - 1] = (ranges[i - 1][0], end)
            elif joins_right:
                ranges[i] = (start, ranges[i][1])
            else:
                self._add_range(i, start, end)
        self.covered += size
        return start - self.offset

    def _add_range(self, index: int, start: int, end: int) -> None:
        if len(self._ranges) >= MAX_REPLY_FRAGMENTS:
            raise self._violation(f"content chunks scattered over more than "
                                  f"{MAX_REPLY_FRAGMENTS} separate ranges "
                                  "(MAX_REPLY_FRAGMENTS)")
        self._ranges.insert(index, (start, end))

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


class ReplyCursor(ReplyState):
    """Where a reader is in one request's reply: the one reply parser.

    Resumable and sans-IO: the reader (the driver's request task, or
    :class:`ReplyReader`) reads the next reply header itself, hands it to ``begin()``,
    and then reads what :attr:`step` asks for, reporting it back; ``step``, ``at`` and
    ``left`` always say what comes next, so a reader interrupted between two reads
    picks up exactly there.  Every chunk is checked by the :class:`ReplyState` rules
    before anything is read for it, and a reply longer than :data:`MAX_REPLY_CHUNKS`
    plus one chunk per :data:`REPLY_BYTES_PER_CHUNK` bytes asked for is refused.
    :attr:`chunks` counts the chunks so far (readers checkpoint every few of them).
    """

    __slots__ = ()

    @property
    def finished(self) -> bool:
        """The whole reply has been read (``finish()`` tells how it ended)."""
        return self.done and self.step == CHUNK_DONE

    def begin(self, header: ReplyHeader) -> int:
        """Start on a header of this reply (a simple reply or a chunk); returns
        :attr:`step`.  ProtocolError if the header breaks a rule."""
        self.chunks += 1
        if self.chunks > self.max_chunks:
            raise self._violation(f"more than {self.max_chunks} chunks (MAX_REPLY_CHUNKS "
                                  f"+ one per {REPLY_BYTES_PER_CHUNK} bytes asked for)")
        self.header = header
        if header.magic == SIMPLE_REPLY_MAGIC:
            if self.simple(header.error):  # READ data follows
                self.at, self.left, self.step = 0, self.length, READ_DATA
            else:
                self.step = CHUNK_DONE
            return self.step
        self.chunk(header)
        type_ = header.type
        if type_ == _T_OFFSET_DATA:
            self.step = READ_OFFSET
        elif type_ == _T_NONE:
            self.step = CHUNK_DONE
        else:
            self.left, self.step = header.length, READ_PAYLOAD
        return self.step

    def data_offset(self, offset: int) -> None:
        """The offset of the OFFSET_DATA chunk begun: its data comes next (READ_DATA)."""
        assert self.step == READ_OFFSET and self.header is not None
        size = self.header.length - 8
        self.at, self.left, self.step = self._place(offset, size, "data chunk"), size, READ_DATA

    def data_read(self, n: int) -> None:
        """``n`` more bytes of READ data arrived (at ``at``)."""
        self.at += n
        self.left -= n
        if not self.left:
            self.step = CHUNK_DONE

    def payload(self, data: bytes | bytearray) -> ReadHole | BlockStatus | None:
        """The payload of the chunk begun (READ_PAYLOAD): checked, and its event
        (a hole, a context's extents, or None for an error chunk)."""
        assert self.step == READ_PAYLOAD and self.header is not None
        event = self.chunk_payload(self.header, data)
        self.left, self.step = 0, CHUNK_DONE
        return event


Event = ReadData | ReadHole | BlockStatus | ReplyDone


class ReplyReader:
    """Byte-fed reader of the transmission-phase replies (client side), h11 style.

    A thin loop around :class:`ReplyCursor`: ``expect(cookie, cursor)`` registers each
    request as it is sent; ``receive_data()`` takes bytes from the server;
    ``next_event()`` returns :data:`NEED_DATA` or one of :class:`ReadData`,
    :class:`ReadHole`, :class:`BlockStatus`, :class:`ReplyDone`.  It buffers at most one
    header or one small payload; READ data leaves as it arrives.  After a
    :class:`ProtocolError` the reader is dead and raises it again.
    """

    def __init__(self, *, structured: bool = False, extended: bool = False) -> None:
        self.structured = structured
        self.extended = extended
        self.in_flight: dict[int, ReplyCursor] = {}
        self._buffer = bytearray()
        self._cursor: ReplyCursor | None = None  # the reply whose chunk is being read
        self._dead: ProtocolError | None = None

    def expect(self, cookie: int, cursor: ReplyCursor) -> None:
        """Register a request that was sent and awaits its reply."""
        if cookie in self.in_flight:
            raise ValueError(f"cookie {cookie} is already in flight")
        self.in_flight[cookie] = cursor

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
            return self._next_event()
        except ProtocolError as exc:
            self._dead = exc
            raise

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def _next_event(self) -> Event | _NeedData:
        buffer = self._buffer
        while True:
            cursor = self._cursor
            if cursor is None:  # a header comes next
                if len(buffer) < 4:  # the magic alone tells the size, or a violation
                    return NEED_DATA
                size = reply_header_size(buffer, structured=self.structured,
                                         extended=self.extended)
                if len(buffer) < size:
                    return NEED_DATA
                header = decode_reply_header(self._take(size))
                cursor = self.in_flight.get(header.cookie)
                if cursor is None:
                    raise ProtocolError(f"reply for unknown cookie {header.cookie}")
                cursor.begin(header)
                self._cursor = cursor
            assert cursor.header is not None
            cookie, step = cursor.header.cookie, cursor.step
            if step == READ_OFFSET:
                if len(buffer) < 8:
                    return NEED_DATA
                cursor.data_offset(decode_offset(self._take(8)))
            elif step == READ_DATA:
                n = min(len(buffer), cursor.left)
                if n == 0:
                    return NEED_DATA
                at = cursor.offset + cursor.at
                cursor.data_read(n)
                return ReadData(cookie, at, self._take(n))
            elif step == READ_PAYLOAD:
                if len(buffer) < cursor.left:
                    return NEED_DATA
                event = cursor.payload(self._take(cursor.left))
                if event is not None:
                    return event
            else:  # CHUNK_DONE
                self._cursor = None
                if cursor.done:
                    del self.in_flight[cookie]
                    return ReplyDone(cookie, cursor.finish())
