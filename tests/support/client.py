"""A small NBD test client built only from the sans-IO protocol layer.

It exists to test :mod:`blockdrv.protocol` and the embedded server without the trio
driver.  The client's logic is written once, as generators that yield I/O steps
(``("send", bytes)`` or ``("recv", None)``) and receive the bytes read; two front-ends
drive them:

- :class:`BlockingClient` over a plain socket (from a thread, or outside trio);
- :class:`AsyncClient` over any trio stream, e.g. ``trio.testing`` memory streams, so
  tests that use the autojump clock never wait for real I/O.
"""

from __future__ import annotations

import inspect
import socket
import ssl
from typing import Any, Callable, Generator, Sequence

import trio

from blockdrv.protocol import (
    NEED_DATA,
    BlockStatus,
    ClientNegotiator,
    Command,
    ExportInfo,
    Goal,
    ReadData,
    ReadHole,
    ReplyCursor,
    ReplyDone,
    ReplyReader,
    StartTLS,
    TLSMode,
)
from blockdrv.protocol.export import check_request
from blockdrv.protocol.wire import encode_request

Step = Generator[tuple[str, Any], Any, Any]


class ClientCore:
    """Client state; every operation is a generator of I/O steps."""

    def __init__(self) -> None:
        self.info: ExportInfo | None = None
        self.reader: ReplyReader | None = None
        self.check_requests = True  # False lets a test send what the spec forbids
        self.completed: list[int] = []  # cookies in the order their replies finished
        self.upgrade: Callable[[], None] | None = None  # set by front-ends for TLS
        self._next_cookie = 1
        self._events: dict[int, list[object]] = {}

    # --- handshake -----------------------------------------------------------------

    def negotiate(self, export: str = "", *, goal: Goal = Goal.GO, structured: bool = True,
                  extended: bool = True,
                  meta_contexts: Sequence[str] = ("base:allocation",),
                  tls: TLSMode = TLSMode.OFF) -> Step:
        neg = ClientNegotiator(export, goal=goal, structured=structured, extended=extended,
                               meta_contexts=meta_contexts, tls=tls)
        while True:
            event = neg.next_event()
            out = neg.data_to_send()
            if out:
                yield ("send", out)
            if event is NEED_DATA:
                neg.receive_data((yield ("recv", None)))
            elif isinstance(event, StartTLS):
                yield ("starttls", None)
                neg.tls_started()
            else:
                if goal is Goal.GO:
                    self.info = event.info  # type: ignore[attr-defined]
                    self.reader = ReplyReader(structured=self.info.structured,
                                              extended=self.info.extended)
                    self.reader.receive_data(neg.leftover())
                return event

    # --- transmission ----------------------------------------------------------------

    def send(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> Step:
        """Send one request without waiting; returns its cookie."""
        assert self.info is not None and self.reader is not None
        if self.check_requests:
            check_request(self.info, command, offset, length, flags)
        cookie = self._next_cookie
        self._next_cookie += 1
        state = ReplyCursor(command, offset, length, flags, structured=self.info.structured,
                            extended=self.info.extended,
                            context_ids=frozenset(self.info.contexts.values()))
        self.reader.expect(cookie, state)
        yield ("send", encode_request(command, flags, cookie, offset, length,
                                      extended=self.info.extended) + payload)
        return cookie

    def wait(self, cookie: int) -> Step:
        """Every event of one request's reply (ending in ReplyDone); others are kept."""
        assert self.reader is not None
        while True:
            mine = self._events.get(cookie, [])
            if mine and isinstance(mine[-1], ReplyDone):
                return self._events.pop(cookie)
            event = self.reader.next_event()
            if event is NEED_DATA:
                self.reader.receive_data((yield ("recv", None)))
                continue
            if isinstance(event, ReplyDone):
                self.completed.append(event.cookie)
            self._events.setdefault(event.cookie, []).append(event)  # type: ignore[union-attr]

    def request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"") -> Step:
        """Send one request and collect every event of its reply."""
        cookie = yield from self.send(command, offset, length, flags, payload)
        return (yield from self.wait(cookie))

    def checked(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"") -> Step:
        """Like request(), but raises the reply's RequestError."""
        events = yield from self.request(command, offset, length, flags, payload)
        done = events[-1]
        if done.error is not None:
            raise done.error
        return events

    def pread(self, count: int, offset: int, flags: int = 0) -> Step:
        events = yield from self.checked(Command.READ, offset, count, flags)
        buf = bytearray(count)
        for event in events:
            if isinstance(event, ReadData):
                pos = event.offset - offset
                buf[pos:pos + len(event.data)] = event.data
            elif isinstance(event, ReadHole):
                pos = event.offset - offset
                buf[pos:pos + event.length] = bytes(event.length)
        return bytes(buf)

    def pwrite(self, data: bytes, offset: int, flags: int = 0) -> Step:
        yield from self.checked(Command.WRITE, offset, len(data), flags, payload=data)

    def flush(self) -> Step:
        yield from self.checked(Command.FLUSH)

    def zero(self, count: int, offset: int, flags: int = 0) -> Step:
        yield from self.checked(Command.WRITE_ZEROES, offset, count, flags)

    def trim(self, count: int, offset: int) -> Step:
        yield from self.checked(Command.TRIM, offset, count)

    def block_status(self, count: int, offset: int, flags: int = 0) -> Step:
        events = yield from self.checked(Command.BLOCK_STATUS, offset, count, flags)
        return {e.context_id: e.extents for e in events if isinstance(e, BlockStatus)}

    def disconnect(self) -> Step:
        """NBD_CMD_DISC, then close the connection."""
        assert self.info is not None
        yield ("send", encode_request(Command.DISC, 0, 0, 0, 0, extended=self.info.extended))
        yield ("close", None)


class _FrontEnd:
    """Delegates to a ClientCore, running its generator operations with ``_drive``."""

    _own = frozenset({"core", "sock", "stream"})

    def __init__(self) -> None:
        object.__setattr__(self, "core", ClientCore())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.core, name)
        if inspect.isgeneratorfunction(getattr(type(self.core), name, None)):
            return lambda *a, **k: self._drive(attr(*a, **k))
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.core, name, value)

    def _drive(self, steps: Step) -> Any:
        raise NotImplementedError


class BlockingClient(_FrontEnd):
    """The test client over a blocking socket."""

    def __init__(self, sock: socket.socket,
                 wrap: Callable[[socket.socket], ssl.SSLSocket] | None = None) -> None:
        super().__init__()
        self.sock = sock
        object.__setattr__(self, "_wrap", wrap)

    def _drive(self, steps: Step) -> Any:
        value = None
        try:
            while True:
                kind, data = steps.send(value)
                value = None
                if kind == "send":
                    self.sock.sendall(data)
                elif kind == "starttls":
                    self.sock = self._wrap(self.sock)  # type: ignore[attr-defined]
                elif kind == "close":
                    self.sock.close()
                else:
                    value = self.sock.recv(1 << 20)
                    if not value:
                        raise EOFError("server closed the connection")
        except StopIteration as stop:
            return stop.value
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise EOFError(f"connection closed: {exc}") from exc

    def close(self) -> None:
        self.sock.close()


class AsyncClient(_FrontEnd):
    """The test client over a trio stream (memory streams work with autojump_clock)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__()
        self.stream = stream

    async def _drive(self, steps: Step) -> Any:  # type: ignore[override]
        value = None
        try:
            while True:
                kind, data = steps.send(value)
                value = None
                if kind == "send":
                    await self.stream.send_all(data)
                elif kind == "starttls":
                    raise NotImplementedError("TLS over the async test client")
                elif kind == "close":
                    await self.stream.aclose()
                else:
                    value = await self.stream.receive_some(1 << 20)
                    if not value:
                        raise EOFError("server closed the connection")
        except StopIteration as stop:
            return stop.value
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise EOFError(f"connection closed: {exc}") from exc

    async def aclose(self) -> None:
        await self.stream.aclose()
