"""A small blocking-socket NBD client built only from the sans-IO protocol layer.

It exists to test :mod:`blockdrv.protocol` against real servers without the trio driver:
the negotiator and the reply reader are driven by plain ``socket.recv``/``sendall``.
"""

from __future__ import annotations

import socket
import ssl
from typing import Callable, Sequence

from blockdrv.protocol import (
    NEED_DATA,
    BlockStatus,
    ClientNegotiator,
    Command,
    ExportInfo,
    Goal,
    ReadData,
    ReadHole,
    ReplyDone,
    ReplyReader,
    ReplyState,
    StartTLS,
    TLSMode,
)
from blockdrv.protocol.export import check_request
from blockdrv.protocol.wire import encode_request


class BlockingClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.info: ExportInfo | None = None
        self.reader: ReplyReader | None = None
        self._next_cookie = 1
        self.check_requests = True  # False lets a test send what the spec forbids

    # --- handshake -----------------------------------------------------------------

    def negotiate(self, export: str = "", *, goal: Goal = Goal.GO, structured: bool = True,
                  extended: bool = True, meta_contexts: Sequence[str] = ("base:allocation",),
                  tls: TLSMode = TLSMode.OFF,
                  wrap: Callable[[socket.socket], ssl.SSLSocket] | None = None) -> object:
        neg = ClientNegotiator(export, goal=goal, structured=structured, extended=extended,
                               meta_contexts=meta_contexts, tls=tls)
        while True:
            event = neg.next_event()
            out = neg.data_to_send()
            if out:
                self.sock.sendall(out)
            if event is NEED_DATA:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("server closed the connection during the handshake")
                neg.receive_data(data)
            elif isinstance(event, StartTLS):
                assert wrap is not None
                self.sock = wrap(self.sock)  # type: ignore[arg-type]
                neg.tls_started()
            else:
                if goal is Goal.GO:
                    self.info = event.info  # type: ignore[attr-defined]
                    self.reader = ReplyReader(structured=self.info.structured,
                                              extended=self.info.extended)
                    self.reader.receive_data(neg.leftover())
                return event

    # --- transmission ----------------------------------------------------------------

    def request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"") -> list[object]:
        """Send one request and collect every event of its reply (ending in ReplyDone)."""
        assert self.info is not None and self.reader is not None
        if self.check_requests:
            check_request(self.info, command, offset, length, flags)
        cookie = self._next_cookie
        self._next_cookie += 1
        state = ReplyState(command, offset, length, flags, structured=self.info.structured,
                           extended=self.info.extended,
                           context_ids=frozenset(self.info.contexts.values()))
        self.reader.expect(cookie, state)
        self.sock.sendall(encode_request(command, flags, cookie, offset, length,
                                         extended=self.info.extended))
        if payload:
            self.sock.sendall(payload)
        events: list[object] = []
        while True:
            event = self.reader.next_event()
            if event is NEED_DATA:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise EOFError("server closed the connection")
                self.reader.receive_data(data)
                continue
            events.append(event)
            if isinstance(event, ReplyDone) and event.cookie == cookie:
                return events

    def _check(self, events: list[object]) -> None:
        done = events[-1]
        assert isinstance(done, ReplyDone)
        if done.error is not None:
            raise done.error

    def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        events = self.request(Command.READ, offset, count, flags)
        self._check(events)
        buf = bytearray(count)
        for event in events:
            if isinstance(event, ReadData):
                pos = event.offset - offset
                buf[pos:pos + len(event.data)] = event.data
            elif isinstance(event, ReadHole):
                pos = event.offset - offset
                buf[pos:pos + event.length] = bytes(event.length)
        return bytes(buf)

    def pwrite(self, data: bytes, offset: int, flags: int = 0) -> None:
        self._check(self.request(Command.WRITE, offset, len(data), flags, payload=data))

    def flush(self) -> None:
        self._check(self.request(Command.FLUSH))

    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        self._check(self.request(Command.WRITE_ZEROES, offset, count, flags))

    def trim(self, count: int, offset: int) -> None:
        self._check(self.request(Command.TRIM, offset, count))

    def block_status(self, count: int, offset: int, flags: int = 0) -> dict[int, list]:
        events = self.request(Command.BLOCK_STATUS, offset, count, flags)
        self._check(events)
        return {e.context_id: e.extents for e in events if isinstance(e, BlockStatus)}

    def disconnect(self) -> None:
        assert self.info is not None
        self.sock.sendall(encode_request(Command.DISC, 0, 0, 0, 0, extended=self.info.extended))
        self.close()

    def close(self) -> None:
        self.sock.close()
