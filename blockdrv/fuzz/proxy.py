"""A fault-injecting NBD proxy (trio): between the driver and any server.

Theory of operation
-------------------
:class:`FaultProxy` listens on its own Unix socket or loopback port and, for every
client connection, opens one to the upstream server and forwards both directions, one
task each.  When either side ends or fails, both sides are closed, so the client sees
exactly what it would see if the server had hung up.  Faults are armed by method calls
while traffic flows, and apply to the connections open at that moment:

- :meth:`cut` ``(direction, after)``: forward ``after`` more bytes in that direction
  (``"to_server"`` or ``"to_client"``), then close both sides: a cut in the middle of a
  header or a payload, wherever the count falls;
- :meth:`reset`: close with a TCP RST (``SO_LINGER`` 0) at once;
- :meth:`stall` ``(seconds)``: forward nothing either way for that long;
- :meth:`delay` ``(latency, duration)``: hold each forwarded chunk ``latency`` seconds,
  for ``duration`` seconds;
- :meth:`malformed` ``(kind)``: at the next boundary between two server messages (found
  by a passive :class:`~blockdrv.fuzz.observer.StreamObserver`), send the client a
  reply header with a bad magic, an unknown cookie, or an oversized length.

:attr:`FaultProxy.injected` counts what was actually done, by kind.
"""

from __future__ import annotations

import socket as _stdlib_socket
import struct
from collections import Counter
from pathlib import Path

import trio
from trio_util import AsyncValue

from ..protocol.constants import STRUCTURED_REPLY_MAGIC, ChunkType
from ..protocol.uri import NBDAddress
from ..protocol.wire import encode_chunk_header, encode_simple_reply
from ..server.faults import MALFORMED_KINDS as MALFORMED_KINDS  # also offered from here
from ..transport import open_stream, open_unix_listener, remove_socket_file
from .observer import StreamObserver

TO_SERVER = "to_server"
TO_CLIENT = "to_client"


class _Link:
    """One proxied connection."""

    def __init__(self, proxy: FaultProxy, client: trio.SocketStream,
                 server: trio.SocketStream) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.observer = StreamObserver()
        self.cut_after: dict[str, int] = {}
        self.malformed: str | None = None
        self._at_boundary_before = False  # the last chunk sent ended a message
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, self.client, self.server, TO_SERVER)
                nursery.start_soon(self._pump, self.server, self.client, TO_CLIENT)
        await self._close()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream,
                    direction: str) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if not data:
                    break
                await self.proxy._hold()
                if direction == TO_SERVER:
                    self.observer.client_data(data)
                    await self._forward(sink, direction, data)
                else:
                    await self._to_client(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        self.scope.cancel()  # one side is gone: end both

    async def _forward(self, sink: trio.SocketStream, direction: str, data: bytes) -> None:
        limit = self.cut_after.get(direction)
        if limit is not None and limit <= len(data):
            self.proxy.injected["cut-" + direction.replace("to_", "to-")] += 1
            if limit:
                await sink.send_all(data[:limit])
            self.scope.cancel()
            raise trio.BrokenResourceError("cut by the proxy")
        if limit is not None:
            self.cut_after[direction] = limit - len(data)
        await sink.send_all(data)

    async def _to_client(self, data: bytes) -> None:
        ends = self.observer.server_data(data)
        if self.malformed is not None and not self.observer.lost:
            points = ([0] if self._at_boundary_before else []) + ends
            if points:
                cut = points[0]
                await self._forward(self.client, TO_CLIENT, data[:cut])
                header = self._malformed_header()
                self.malformed = None
                self.proxy.injected["malformed"] += 1  # counted before the client sees it
                await self.client.send_all(header)
                data = data[cut:]
        self._at_boundary_before = self.observer.at_boundary
        if data:
            await self._forward(self.client, TO_CLIENT, data)

    def _malformed_header(self) -> bytes:
        kind, observer = self.malformed, self.observer
        cookie = next(iter(observer.in_flight), 1)
        if kind == "bad-magic":
            return struct.pack(">IIQ", 0xDEADBEEF, 0, cookie)
        if kind == "unknown-cookie":
            return (encode_chunk_header(0xFFFF_FFFF_0000, ChunkType.NONE, 0, done=True,
                                        extended=observer.extended)
                    if observer.structured else encode_simple_reply(0xFFFF_FFFF_0000))
        if observer.structured:
            return encode_chunk_header(cookie, ChunkType.OFFSET_DATA, 0xFFFF_FFF0,
                                       done=True, extended=observer.extended)
        # A simple reply's layout with the structured magic (not negotiated): bad.
        return struct.pack(">IIQ", STRUCTURED_REPLY_MAGIC, 0xFFFFFFF0, cookie)

    def arm_malformed(self, kind: str) -> None:
        self.malformed = kind
        self._at_boundary_before = self.observer.at_boundary

    def reset(self) -> None:
        for stream in (self.client, self.server):
            try:
                stream.socket.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.scope.cancel()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            for stream in (self.client, self.server):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, OSError):
                    pass


class FaultProxy:
    """Forward NBD connections to ``upstream``, injecting faults on command."""

    def __init__(self, upstream: NBDAddress, directory: Path | str) -> None:
        self.upstream = upstream
        self.path = str(Path(directory) / "proxy.sock")
        self.links: set[_Link] = set()
        self.injected: Counter[str] = Counter()
        self.connections = AsyncValue(0)  # client connections accepted so far
        self._next_cut: tuple[str, int] | None = None
        self._stall_until = 0.0
        self._delay = 0.0
        self._delay_until = 0.0
        self._listener: trio.SocketListener | None = None
        self._scope = trio.CancelScope()

    @property
    def address(self) -> NBDAddress:
        """Where clients connect (the upstream's export name)."""
        return NBDAddress(transport="unix", socket=self.path, export=self.upstream.export,
                          tls=self.upstream.tls, tls_hostname=self.upstream.tls_hostname)

    async def serve(self, *, task_status: trio.TaskStatus[NBDAddress]
                    = trio.TASK_STATUS_IGNORED) -> None:
        self._listener = await open_unix_listener(self.path)
        with self._scope:
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                while True:
                    client = await self._listener.accept()
                    nursery.start_soon(self._connect, client)
        await self._listener.aclose()
        remove_socket_file(self.path)

    async def _connect(self, client: trio.SocketStream) -> None:
        self.connections.value += 1
        try:
            server = await open_stream(self.upstream)
        except OSError:
            await client.aclose()  # the server is down: so is the proxy, for this client
            return
        link = _Link(self, client, server)
        if self._next_cut is not None:
            direction, after = self._next_cut
            link.cut_after[direction] = after
            self._next_cut = None
        self.links.add(link)
        try:
            await link.run()
        finally:
            self.links.discard(link)

    async def _hold(self) -> None:
        now = trio.current_time()
        if now < self._stall_until:
            await trio.sleep_until(self._stall_until)
        if self._delay and trio.current_time() < self._delay_until:
            await trio.sleep(self._delay)

    # --- faults -------------------------------------------------------------------------

    def cut(self, direction: str, after: int, *, next_connection: bool = False) -> None:
        """Close the connections after ``after`` more bytes in ``direction``
        (``next_connection``: the next connection to open, from its first byte)."""
        if direction not in (TO_SERVER, TO_CLIENT):
            raise ValueError(f"direction must be {TO_SERVER!r} or {TO_CLIENT!r}")
        if next_connection:
            self._next_cut = (direction, after)
            return
        for link in self.links:
            link.cut_after[direction] = after

    def reset(self) -> None:
        """Abort every connection with a TCP reset now."""
        if self.links:
            self.injected["reset"] += 1
        for link in list(self.links):
            link.reset()

    def stall(self, seconds: float) -> None:
        """Forward nothing, either way, for ``seconds``."""
        self._stall_until = trio.current_time() + seconds
        self.injected["stall"] += 1

    def delay(self, latency: float, duration: float) -> None:
        """Hold every forwarded chunk ``latency`` seconds for the next ``duration``."""
        self._delay, self._delay_until = latency, trio.current_time() + duration
        self.injected["delay"] += 1

    def malformed(self, kind: str) -> None:
        """Send a malformed reply header at the next reply boundary."""
        if kind not in MALFORMED_KINDS:
            raise ValueError(f"kind must be one of {MALFORMED_KINDS}")
        for link in self.links:
            link.arm_malformed(kind)

    def clear(self) -> None:
        """Disarm every fault (armed cuts and malformed replies, stalls, delays)."""
        self._stall_until = self._delay = self._delay_until = 0.0
        self._next_cut = None
        for link in self.links:
            link.cut_after.clear()
            link.malformed = None

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        self._scope.cancel()
        for link in list(self.links):
            link.scope.cancel()
