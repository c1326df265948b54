"""Byte transport for NBD over trio: connect, tune sockets, read exactly, send scatter-gather.

Theory of operation
-------------------
:class:`Channel` wraps one trio stream and gives the NBD layers the three operations
they need, with as few copies and checkpoints as trio allows:

- ``receive_exactly(n)`` for small headers: served from a read-ahead buffer, refilled
  with one ``recv_into`` of up to ``read_ahead`` bytes, so a header, a chunk offset and a
  small payload usually cost one system call;
- ``receive_into(view)`` for payloads: drains the read-ahead buffer first, then reads
  straight into the caller's buffer (``recv_into``), so a large READ lands in place;
- ``send(*buffers)``: header and payload in one scatter-gather ``sendmsg`` (the payload
  is never copied into a bigger buffer).

Over a plain socket stream (TCP or Unix) the channel uses the trio socket directly; over
any other stream (TLS, test memory streams) it falls back to ``receive_some`` and
``send_all``.  Callers serialize readers and writers themselves (the driver's
``receive_mutex`` and ``send_mutex``); a channel allows one reader and one writer at a
time, concurrently.

Failures of the byte stream (EOF, reset, a closed or shut-down socket) all surface as
:class:`TransportError`.  Reads are resumable (peeks consume nothing until they are
whole; payload reads report what they got), so a cancelled read loses nothing.  A send
that was cancelled after its first byte went out finishes under a bounded shield
(``finish_within``); only when that fails is the stream out of step, and the channel
marks itself ``broken``.

On a plain socket the channel does not checkpoint while the kernel has data or room:
that is what makes it fast, and it is why its users must checkpoint themselves in any
loop over what a peer sends.  ``waits`` counts the reads and sends that had to wait
(each such wait is a checkpoint), so a caller can tell whether an operation yielded.
``shutdown()`` is synchronous and makes every blocked read or write fail at once, which
is how the driver stops all I/O on a connection it has given up on.
"""

from __future__ import annotations

import errno
import os
import socket as _stdlib_socket
import struct
from typing import Mapping

import trio

from ..protocol.uri import NBDAddress

DEFAULT_READ_AHEAD = 64 * 1024

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class TransportError(ConnectionError):
    """The byte stream failed: EOF, reset, shut down or closed."""


def tune_socket(sock: trio.socket.SocketType | _stdlib_socket.socket, *,
                buffer_size: int | None = None, keepalive: bool = True) -> None:
    """TCP_NODELAY (TCP), SO_KEEPALIVE and optional SO_SNDBUF/SO_RCVBUF on a socket."""
    if sock.family in (_stdlib_socket.AF_INET, _stdlib_socket.AF_INET6):
        sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_KEEPALIVE, 1)
    if buffer_size:
        sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_SNDBUF, buffer_size)
        sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_RCVBUF, buffer_size)


async def open_stream(address: NBDAddress, *,
                      socket_buffer_size: int | None = None) -> trio.SocketStream:
    """Connect to an NBD address (TCP or Unix) and tune the socket.

    Raises OSError with the address in its message when the connection fails.
    """
    try:
        if address.transport == "unix":
            assert address.socket is not None
            stream = await trio.open_unix_socket(address.socket)
        else:
            assert address.host is not None and address.port is not None
            stream = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        cause = exc
        # trio's "all attempts to connect failed" carries the attempts' errors in a group
        while cause.errno is None and isinstance(cause.__cause__, BaseExceptionGroup):
            leaf = cause.__cause__.exceptions[0]
            if not isinstance(leaf, OSError):
                break
            cause = leaf
        reason = cause.strerror or str(cause)
        code = cause.errno if cause.errno is not None else errno.ECONNREFUSED
        raise OSError(code, f"cannot connect to {address.display}: {reason}") from exc
    tune_socket(stream.socket, buffer_size=socket_buffer_size)
    return stream


async def open_unix_listener(path: str) -> trio.SocketListener:
    """Listen on a Unix socket at ``path``, replacing a stale socket file there.

    Raises OSError with the path in its message when it cannot listen.  Whoever closes
    the listener removes the file (:func:`remove_socket_file`).
    """
    remove_socket_file(path)
    sock = trio.socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
    return trio.SocketListener(sock)


def remove_socket_file(path: str) -> None:
    """Remove a Unix socket's file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _raw_socket(stream: trio.abc.Stream) -> _stdlib_socket.socket | None:
    """The stdlib (non-blocking) socket under a trio SocketStream, or None.

    trio's socket methods each add a scheduler trip; the channel calls the non-blocking
    socket directly and waits with :func:`trio.lowlevel.wait_readable` /
    :func:`~trio.lowlevel.wait_writable` only when the kernel says it would block, which
    is how trio's own socket layer works underneath.
    """
    if not isinstance(stream, trio.SocketStream):
        return None
    raw = getattr(stream.socket, "_sock", None)  # what trio wraps (from_stdlib_socket)
    return raw if isinstance(raw, _stdlib_socket.socket) else None


class Channel:
    """One connection's stream with buffered header reads and zero-copy payloads."""

    __slots__ = ("stream", "_sock", "_buffer", "_view", "_start", "_end", "broken", "_failure",
                 "waits")

    def __init__(self, stream: trio.abc.Stream, *,
                 read_ahead: int = DEFAULT_READ_AHEAD) -> None:
        self.stream = stream
        self._sock = _raw_socket(stream)
        self._buffer = bytearray(read_ahead)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self.broken = False
        self._failure: OSError | None = None  # met by peek_nowait, raised by the next read
        self.waits = 0  # times a read or a send had to wait (each wait is a checkpoint)

    def __repr__(self) -> str:
        state = "broken" if self.broken else "ok"
        return f"<Channel {state} buffered={self.buffered}>"

    @property
    def buffered(self) -> int:
        """Bytes read ahead and not yet consumed."""
        return self._end - self._start

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the read-ahead buffer (read by someone else)."""
        if not data:
            return
        pending = bytes(self._view[self._start:self._end])
        whole = data + pending
        if len(whole) > len(self._buffer):
            self._buffer = bytearray(len(whole))
            self._view = memoryview(self._buffer)
        self._view[:len(whole)] = whole
        self._start, self._end = 0, len(whole)

    def replace_stream(self, stream: trio.abc.Stream) -> None:
        """Go on over ``stream`` (the same connection, e.g. wrapped in TLS)."""
        if self.buffered:
            raise RuntimeError("bytes are buffered from the old stream")
        self.stream = stream
        self._sock = _raw_socket(stream)

    def take_buffered(self) -> bytes:
        """Remove and return the read-ahead bytes (e.g. before a TLS upgrade)."""
        data = bytes(self._view[self._start:self._end])
        self._start = self._end = 0
        return data

    # --- receiving ------------------------------------------------------------------

    async def _recv_into(self, view: memoryview) -> int:
        """One read into ``view``; returns the count, raises TransportError on EOF."""
        sock = self._sock
        try:
            if self._failure is not None:
                raise self._failure
            if sock is not None:
                while True:
                    try:
                        n = sock.recv_into(view)
                        break
                    except BlockingIOError:
                        self.waits += 1
                        await trio.lowlevel.wait_readable(sock)
            else:
                self.waits += 1
                data = await self.stream.receive_some(len(view))
                n = len(data)
                view[:n] = data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.broken = True
            raise TransportError(f"connection failed: {exc}") from exc
        if n == 0:
            self.broken = True
            raise TransportError("connection closed by the peer")
        return n

    async def receive_some(self, max_bytes: int = DEFAULT_READ_AHEAD) -> bytes:
        """Whatever is buffered, or one read of up to ``max_bytes`` (handshake use)."""
        if self.buffered:
            n = min(self.buffered, max_bytes)
            data = bytes(self._view[self._start:self._start + n])
            self._start += n
            return data
        size = min(max_bytes, len(self._buffer))
        n = await self._recv_into(self._view[:size])
        return bytes(self._view[:n])

    async def receive_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes (n at most the read-ahead size); for headers."""
        view = await self.peek(n)
        data = bytes(view)
        self._start += n
        return data

    async def peek(self, n: int) -> memoryview:
        """The next ``n`` bytes, buffered but not consumed (see :meth:`consume`).

        Cancellation-safe: bytes already read stay in the buffer, so a cancelled peek
        loses nothing.  The view is valid until the next read from this channel.
        """
        if self._end - self._start < n:
            await self._fill(n)
        return self._view[self._start:self._start + n]

    def peek_nowait(self, n: int) -> memoryview | None:
        """The next ``n`` bytes if they are here without waiting, else None.

        Reads the socket once, non-blocking, when fewer are buffered.  Never raises: a
        failure is kept and raised by the next read, which the caller will make.
        """
        if self._end - self._start < n:
            sock = self._sock
            if sock is None or self._failure is not None:
                return None
            self._make_room(n)
            try:
                got = sock.recv_into(self._view[self._end:])
            except BlockingIOError:
                return None
            except OSError as exc:
                self._failure = exc
                return None
            if not got:
                return None  # EOF: the next read sees it again
            self._end += got
            if self._end - self._start < n:
                return None
        return self._view[self._start:self._start + n]

    async def peek_framed(self, sizes: Mapping[int, int]) -> memoryview:
        """The next message, buffered but not consumed, whose size ``sizes[magic]`` is
        known from its first four bytes (a big-endian u32, the magic).

        Whatever ``sizes`` raises for an unknown magic (``__missing__``) propagates.
        Cancellation-safe like :meth:`peek`; one call where a header would otherwise
        take two peeks.
        """
        if self._end - self._start < 4:
            await self._fill(4)
        size = sizes[_U32.unpack_from(self._view, self._start)[0]]
        if self._end - self._start < size:
            await self._fill(size)
        start = self._start
        return self._view[start:start + size]

    def peek_framed_nowait(self, sizes: Mapping[int, int]) -> memoryview | None:
        """:meth:`peek_framed` if the whole message is here without waiting, else None
        (reading the socket once, non-blocking, as :meth:`peek_nowait` does)."""
        start = self._start
        if self._end - start >= 4:
            size = sizes[_U32.unpack_from(self._view, start)[0]]
            if self._end - start >= size:
                return self._view[start:start + size]
            return self.peek_nowait(size)
        head = self.peek_nowait(4)
        if head is None:
            return None
        size = sizes[_U32.unpack_from(head)[0]]
        start = self._start
        if self._end - start >= size:  # the read brought the whole header (usually)
            return self._view[start:start + size]
        return self.peek_nowait(size)

    async def receive_u64(self) -> int:
        """The next 8 bytes as a big-endian u64 (cancellation-safe like :meth:`peek`)."""
        if self._end - self._start < 8:
            await self._fill(8)
        (value,) = _U64.unpack_from(self._view, self._start)
        self._start += 8
        return int(value)

    def take_u64_nowait(self) -> int | None:
        """:meth:`receive_u64` if the 8 bytes are buffered already, else None (the
        common case costs no coroutine)."""
        start = self._start
        if self._end - start < 8:
            return None
        self._start = start + 8
        return int(_U64.unpack_from(self._view, start)[0])

    def take_buffered_into(self, view: memoryview) -> int:
        """Copy buffered bytes into ``view`` (as many as fit); returns the count (0 if
        nothing is buffered)."""
        start = self._start
        n = self._end - start
        if n > len(view):
            n = len(view)
        if n:
            view[:n] = self._view[start:start + n]
            self._start = start + n
        return n

    def consume(self, n: int) -> None:
        """Drop ``n`` peeked bytes."""
        assert n <= self._end - self._start
        self._start += n

    def _make_room(self, n: int) -> None:
        if n > len(self._buffer):
            raise ValueError(f"cannot buffer {n} bytes")
        if len(self._buffer) - self._start < n:  # move the partial message to the front
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start:self._end]
            self._start, self._end = 0, pending

    async def _fill(self, n: int) -> None:
        self._make_room(n)
        while self._end - self._start < n:
            self._end += await self._recv_into(self._view[self._end:])

    async def receive_some_into(self, view: memoryview) -> int:
        """Fill some of ``view``: buffered bytes first, else one read; returns the count.

        Looping over this keeps the position with the caller, so a cancelled payload
        read can be resumed without losing bytes.
        """
        have = self._end - self._start
        if have:
            n = min(have, len(view))
            view[:n] = self._view[self._start:self._start + n]
            self._start += n
            return n
        return await self._recv_into(view)

    async def receive_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: buffered bytes first, then straight from the stream."""
        total = len(view)
        have = min(self._end - self._start, total)
        if have:
            view[:have] = self._view[self._start:self._start + have]
            self._start += have
        pos = have
        try:
            while pos < total:
                pos += await self._recv_into(view[pos:])
        except BaseException:
            self.broken = True  # a payload was read in part: the stream is out of step
            raise

    # --- sending --------------------------------------------------------------------

    async def send(self, *buffers: bytes | bytearray | memoryview,
                   finish_within: float | None = None) -> float | None:
        """Send every buffer, in order, as one scatter-gather write where possible.

        A message is atomic with respect to cancellation once it has started: if the
        caller is cancelled before any byte went out, nothing was sent and Cancelled
        propagates; once a byte is out, the rest is sent under a shield for at most
        ``finish_within`` seconds more (``None``: not at all), and the send returns
        normally, leaving the cancellation to the caller's next checkpoint; it then
        returns the (trio) time the cancellation arrived, so the caller can hold
        whatever it does next for the cancelled request to the same bound (otherwise
        it returns None).  Only when
        that bound passes (or without one) is the stream left out of step: ``broken``,
        and Cancelled propagates.  Over a stream that is not a plain socket (TLS, test
        streams) trio cannot finish a cancelled ``send_all``, so there a cancellation
        during the send always leaves the stream ``broken``.
        """
        sock = self._sock
        try:
            if sock is None:
                await self._send_stream(buffers)
                return None
            if len(buffers) == 1 and type(buffers[0]) is bytes:
                # One header on its own (most requests): a plain send, usually the
                # only call.
                data = buffers[0]
                try:
                    n = sock.send(data)
                except BlockingIOError:
                    n = 0
                if n == len(data):
                    return None
                views: list[memoryview] = [memoryview(data)[n:]]
                sent_any = n > 0
            else:
                views = [memoryview(b).cast("B") for b in buffers if len(b)]
                sent_any = False
            while views:
                try:
                    n = sock.sendmsg(views)
                except BlockingIOError:
                    self.waits += 1
                    try:
                        await trio.lowlevel.wait_writable(sock)
                    except trio.Cancelled:
                        if not sent_any:
                            raise  # nothing went out: the message was not sent
                        cancelled_at = trio.current_time()
                        if finish_within is not None \
                                and await self._finish_send(sock, views, finish_within):
                            # Sent whole: the cancellation stays pending (trio's is
                            # level-triggered) and reaches the caller at its next
                            # checkpoint, once the request counts as sent.
                            return cancelled_at
                        self.broken = True  # part of a message went out
                        raise
                    continue
                sent_any = True
                views = _advance(views, n)
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.broken = True
            raise TransportError(f"connection failed: {exc}") from exc

    async def _finish_send(self, sock: _stdlib_socket.socket, views: list[memoryview],
                           within: float) -> bool:
        """The rest of a cancelled message, shielded, for at most ``within`` seconds;
        True if it all went out."""
        with trio.CancelScope(shield=True) as shield:
            shield.deadline = trio.current_time() + within
            while views:
                try:
                    views = _advance(views, sock.sendmsg(views))
                except BlockingIOError:
                    self.waits += 1
                    await trio.lowlevel.wait_writable(sock)
            return True
        return False

    async def _send_stream(self, buffers: tuple[bytes | bytearray | memoryview, ...]) -> None:
        """send() over a trio stream (TLS, test streams)."""
        self.waits += 1
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled already: nothing sent
        try:
            for b in buffers:
                if len(b):
                    await self.stream.send_all(b)
        except trio.Cancelled:
            self.broken = True  # a cancelled send_all may have sent some of its data
            raise

    # --- ending ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Make every blocked and future read or write fail now (synchronous)."""
        self.broken = True
        sock = self._sock
        if sock is None:
            inner = getattr(self.stream, "transport_stream", None)
            sock = _raw_socket(inner) if inner is not None else None
        if sock is not None:
            try:
                sock.shutdown(_stdlib_socket.SHUT_RDWR)  # blocked waiters see EOF/EPIPE
            except OSError:
                pass
            return
        # Test streams (trio.testing memory/lockstep streams) close synchronously.
        for part in (self.stream, getattr(self.stream, "send_stream", None),
                     getattr(self.stream, "receive_stream", None)):
            close = getattr(part, "close", None)
            if close is not None:
                close()

    async def aclose(self) -> None:
        """Close the stream; a TLS goodbye (close_notify) gets at most a second."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1.0) as polite:
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            if polite.cancelled_caught:  # a peer that stopped reading: just close
                await trio.aclose_forcefully(self.stream)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop ``n`` sent bytes from the front of a list of views."""
    while n:
        first = views[0]
        if n >= len(first):
            n -= len(first)
            views.pop(0)
        else:
            views[0] = first[n:]
            n = 0
    return views
