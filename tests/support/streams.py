"""Test streams: count reads, cut a connection at a byte offset, gate a direction,
deliver bytes late.

All are trio.abc.Stream wrappers or pairs built on trio.testing memory streams, so they
work with the autojump clock.
"""

from __future__ import annotations

import trio
import trio.testing


class WrappedStream(trio.abc.Stream):
    """A stream around ``inner``: passes everything through; subclasses change a part."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data) -> None:  # type: ignore[no-untyped-def]
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes=None) -> bytes:  # type: ignore[no-untyped-def]
        return await self.inner.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def close(self) -> None:
        for part in (self.inner, getattr(self.inner, "send_stream", None),
                     getattr(self.inner, "receive_stream", None)):
            close = getattr(part, "close", None)
            if close is not None:
                close()


class CountingStream(WrappedStream):
    """Counts receive_some calls, to prove nobody reads an idle connection."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.receives = 0
        self.waiting = 0  # receive_some calls in progress right now

    async def receive_some(self, max_bytes=None) -> bytes:  # type: ignore[no-untyped-def]
        self.receives += 1
        self.waiting += 1
        try:
            return await self.inner.receive_some(max_bytes)
        finally:
            self.waiting -= 1


class CuttingStream(WrappedStream):
    """Passes bytes through until ``send_limit`` / ``receive_limit`` bytes moved in that
    direction, then breaks the connection (as if the peer died mid-message)."""

    def __init__(self, inner: trio.abc.Stream, *, send_limit: int | None = None,
                 receive_limit: int | None = None) -> None:
        super().__init__(inner)
        self.send_limit = send_limit
        self.receive_limit = receive_limit
        self.sent = 0
        self.received = 0
        self.cut = False

    def _break(self) -> None:
        self.cut = True
        self.close()

    async def send_all(self, data) -> None:  # type: ignore[no-untyped-def]
        data = bytes(data)
        if self.cut:
            raise trio.BrokenResourceError("connection cut")
        if self.send_limit is not None and self.sent + len(data) >= self.send_limit:
            part = data[:self.send_limit - self.sent]
            if part:
                await self.inner.send_all(part)
            self.sent += len(part)
            self._break()
            raise trio.BrokenResourceError("connection cut")
        await self.inner.send_all(data)
        self.sent += len(data)

    async def receive_some(self, max_bytes=None) -> bytes:  # type: ignore[no-untyped-def]
        if self.cut:
            return b""
        if self.receive_limit is not None:
            left = self.receive_limit - self.received
            if left <= 0:
                self._break()
                return b""
            max_bytes = min(max_bytes or left, left)
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data


class Gate:
    """Open by default; while closed, a GatedReceiveStream does not read."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        self._open.set()

    async def wait_open(self) -> None:
        await self._open.wait()


class GatedReceiveStream(trio.abc.ReceiveStream):
    def __init__(self, inner: trio.abc.ReceiveStream, gate: Gate) -> None:
        self.inner = inner
        self.gate = gate

    async def receive_some(self, max_bytes=None) -> bytes:  # type: ignore[no-untyped-def]
        await self.gate.wait_open()
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]


def unbuffered_pair(gate: Gate) -> tuple[trio.StapledStream, trio.StapledStream]:
    """(client, server) streams where client->server has no buffering at all (a
    lockstep stream: send_all blocks until the server has read everything) and the
    server's reading can be stopped with ``gate``; server->client is a plain memory
    stream."""
    c2s_send, c2s_receive = trio.testing.lockstep_stream_one_way_pair()
    s2c_send, s2c_receive = trio.testing.memory_stream_one_way_pair()
    client = trio.StapledStream(c2s_send, s2c_receive)
    server = trio.StapledStream(s2c_send, GatedReceiveStream(c2s_receive, gate))
    return client, server


class LateStream(WrappedStream):
    """Bytes that were already on their way when the connection failed.

    :meth:`hold_next_receive`: the next receive gets its data, then returns it only when
    ``released`` is set, whatever happened meanwhile (a real socket keeps what arrived
    before a shutdown, and trio yields after every successful receive).
    :meth:`stall_next_send`: the next send_all sends ``n`` bytes, then waits forever (a
    full socket buffer), so cancelling it leaves a message sent in part.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.released: trio.Event | None = None
        self.holding = False  # a receive has its data and waits for ``released``
        self.stall_after: int | None = None

    def hold_next_receive(self) -> trio.Event:
        self.released = trio.Event()
        return self.released

    def stall_next_send(self, n: int) -> None:
        self.stall_after = n

    async def send_all(self, data) -> None:  # type: ignore[no-untyped-def]
        if self.stall_after is not None:
            n, self.stall_after = self.stall_after, None
            await self.inner.send_all(bytes(data)[:n])
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes=None) -> bytes:  # type: ignore[no-untyped-def]
        released, self.released = self.released, None
        data = await self.inner.receive_some(max_bytes)
        if released is not None:
            self.holding = True
            await released.wait()
            self.holding = False
        return data
