"""Follow an NBD connection passively, to know where server messages begin.

The fault proxy forwards bytes without changing them; to inject a malformed reply
header *between* two replies (never inside a payload, which would be undetectable data
corruption rather than a protocol violation) it must know where each server message
ends.  :class:`StreamObserver` parses both directions with the protocol layer's codecs:

- handshake: the greeting, the client flags, each option and its replies (which tell
  whether structured replies or extended headers were agreed), the export reply;
- transmission: request headers (cookie, command, length, WRITE payload to skip) and
  reply headers (simple, structured or extended; READ data of simple replies).

It never buffers a payload: payload bytes are only counted.  If TLS starts, or the peer
sends something it cannot parse, it stops following (``lost``) and the proxy stops
injecting on that connection.

Besides the message ends :meth:`StreamObserver.server_data` returns, each call leaves
``ends_done`` (for each end: did that message finish its reply, i.e. a simple reply or a
chunk flagged DONE) and ``option_replies`` (where option reply headers start in the
data, with their option and type), so the proxy can repeat a finished reply or slip a
message in front of an option's acknowledgement.
"""

from __future__ import annotations

from ..protocol.constants import (
    ClientFlag,
    Command,
    HandshakeFlag,
    Option,
    OptionReply,
    is_option_error,
)
from ..protocol.errors import ProtocolError
from ..protocol.options import (
    EXPORT_NAME_REPLY_SIZE,
    EXPORT_NAME_ZEROES,
    GREETING_SIZE,
    OPTION_HEADER_SIZE,
    OPTION_REPLY_HEADER_SIZE,
    decode_client_flags,
    decode_greeting,
    decode_option_header,
    decode_option_reply_header,
)
from ..protocol.wire import (
    decode_reply_header,
    decode_request,
    reply_header_size,
    request_size,
)


class _Side:
    """One direction: a small buffer for headers and a count of payload bytes to skip."""

    __slots__ = ("buffer", "skip")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.skip = 0

    def feed(self, data: bytes) -> int:
        """Take ``data``; returns how many of its bytes were payload to skip."""
        skipped = min(self.skip, len(data))
        self.skip -= skipped
        self.buffer += data[skipped:]
        return skipped

    def take(self, n: int) -> bytes | None:
        if len(self.buffer) < n:
            return None
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def skip_next(self, n: int) -> None:
        """Skip ``n`` payload bytes, some of which may already be buffered."""
        have = min(n, len(self.buffer))
        del self.buffer[:have]
        self.skip += n - have


class StreamObserver:
    """Parse both directions of one connection; see the module docstring."""

    def __init__(self) -> None:
        self.transmission = False
        self.lost = False  # TLS or unparseable: stop following
        self.structured = False
        self.extended = False
        self.in_flight: dict[int, tuple[int, int]] = {}  # cookie -> (command, length)
        self._client, self._server = _Side(), _Side()
        self._no_zeroes_offered = False
        self._no_zeroes = False
        self._client_flags_seen = False
        self._greeted = False
        self._options: list[int] = []  # sent by the client, awaiting their final reply
        self._server_pos = 0  # bytes of the server stream seen so far
        self._message_done = False  # the message being skipped finishes its reply
        self.ends_done: list[bool] = []  # per end of the last server_data call
        self.option_replies: list[tuple[int, int, int]] = []  # (offset, option, type)

    # --- client -> server -------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self.lost:
            return
        self._client.feed(data)
        try:
            self._parse_client()
        except (ProtocolError, ValueError):
            self.lost = True

    def _parse_client(self) -> None:
        side = self._client
        while True:
            if not self._client_flags_seen:
                raw = side.take(4)
                if raw is None:
                    return
                self._no_zeroes = bool(decode_client_flags(raw) & ClientFlag.NO_ZEROES)
                self._client_flags_seen = True
            elif not self.transmission:
                if self._options and self._options[-1] in (Option.GO, Option.EXPORT_NAME):
                    return  # requests wait until the server has answered
                if len(side.buffer) < OPTION_HEADER_SIZE:
                    return
                option, length = decode_option_header(side.buffer)
                side.take(OPTION_HEADER_SIZE)
                side.skip_next(length)
                self._options.append(option)
            else:
                raw = side.take(request_size(self.extended))
                if raw is None:
                    return
                request = decode_request(raw, extended=self.extended)
                if request.command == Command.WRITE:
                    side.skip_next(request.length)
                if request.command != Command.DISC:
                    self.in_flight[request.cookie] = (request.command, request.length)

    # --- server -> client -------------------------------------------------------------

    def server_data(self, data: bytes) -> list[int]:
        """Take server bytes; returns the offsets in ``data`` where a transmission
        message ends (injection points)."""
        if self.lost:
            return []
        start = self._server_pos
        self._server_pos += len(data)
        side = self._server
        pending = side.skip
        skipped = side.feed(data)
        ends: list[int] = []
        self.ends_done = []
        self.option_replies = []
        if self.transmission and pending and not side.skip:
            ends.append(skipped)  # a reply's payload ended inside this chunk
            self.ends_done.append(self._message_done)
        try:
            self._parse_server(ends, start)
        except (ProtocolError, ValueError):
            self.lost = True
            return []
        return ends

    def _parse_server(self, ends: list[int], start: int) -> None:
        side = self._server
        while not self.lost:
            if side.skip:
                return  # still inside a payload
            if not self._greeted:
                raw = side.take(GREETING_SIZE)
                if raw is None:
                    return
                flags = decode_greeting(raw)
                self._no_zeroes_offered = bool(flags & HandshakeFlag.NO_ZEROES)
                self._greeted = True
            elif not self.transmission:
                if not self._options:
                    return
                if self._options[0] == Option.EXPORT_NAME:
                    zeroes = self._no_zeroes and self._no_zeroes_offered
                    raw = side.take(EXPORT_NAME_REPLY_SIZE + (0 if zeroes
                                                              else EXPORT_NAME_ZEROES))
                    if raw is None:
                        return
                    self._enter_transmission()
                    continue
                at = self._server_pos - len(side.buffer) - start  # where the header starts
                raw = side.take(OPTION_REPLY_HEADER_SIZE)
                if raw is None:
                    return
                option, reply, length = decode_option_reply_header(raw)
                self.option_replies.append((at, option, reply))
                side.skip_next(length)
                if reply == OptionReply.ACK or is_option_error(reply):
                    self._options.pop(0)
                    if reply == OptionReply.ACK:
                        self._acknowledged(option)
            else:
                if len(side.buffer) < 4:
                    return
                size = reply_header_size(side.buffer, structured=self.structured,
                                         extended=self.extended)
                raw = side.take(size)
                if raw is None:
                    return
                header = decode_reply_header(raw)
                payload = header.length
                if header.simple:
                    command, length = self.in_flight.get(header.cookie, (-1, 0))
                    if command == Command.READ and not header.error and not self.structured:
                        payload = length
                if header.done:
                    self.in_flight.pop(header.cookie, None)
                self._message_done = header.done
                side.skip_next(payload)
                if not side.skip:
                    ends.append(self._server_pos - start - len(side.buffer))
                    self.ends_done.append(header.done)

    def _acknowledged(self, option: int) -> None:
        if option == Option.STARTTLS:
            self.lost = True  # everything after this is encrypted
        elif option == Option.STRUCTURED_REPLY:
            self.structured = True
        elif option == Option.EXTENDED_HEADERS:
            self.structured = self.extended = True
        elif option == Option.GO:
            self._enter_transmission()

    def _enter_transmission(self) -> None:
        self.transmission = True
        self._options.clear()
        self._parse_client()  # requests that arrived with the handshake's last bytes

    @property
    def at_boundary(self) -> bool:
        """Between two server messages in the transmission phase."""
        side = self._server
        return (self.transmission and not self.lost and not side.skip
                and not side.buffer)
