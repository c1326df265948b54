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

A hostile peer, made out of any well-behaved server:

- :meth:`duplicate`: at the next boundary, send the last reply message that finished a
  reply (a simple reply, or a chunk flagged DONE) again: a late repeat whose cookie no
  request owns any more (captured only when ``capture`` is on, messages up to 64 KiB);
- :meth:`tiny_chunks`: hold the next READ data chunk whole and send it as up to 64
  smaller data chunks, in random order, the last one sent carrying its DONE flag;
- :meth:`slowloris` ``(nbytes, piece, delay)``: trickle the next ``nbytes`` to the
  client ``piece`` bytes at a time, ``delay`` seconds apart;
- :meth:`flood` ``(where)``: instead of the server's next reply (``"reply"``: error
  chunks for a request in flight) or the next connection's answer to its goal option
  (``"handshake"``: NBD_REP_INFO, NBD_REP_SERVER or NBD_REP_META_CONTEXT replies), an
  endless stream, written by a child process so the client always has data to read
  (see :mod:`blockdrv.fuzz.flood`), until the client goes away or ``flood_bytes`` went
  out; then the connection is closed;
- :meth:`unrequested_context`: the next connection's SET_META_CONTEXT answer gains a
  context nobody asked for, just before its acknowledgement.

:attr:`FaultProxy.injected` counts what was actually done, by kind.
"""

from __future__ import annotations

import random
import socket as _stdlib_socket
import struct
from collections import Counter
from pathlib import Path

import trio
from trio_util import AsyncValue

from ..io.transport import open_stream, open_unix_listener, remove_socket_file
from ..protocol.constants import STRUCTURED_REPLY_MAGIC, ChunkType, Option, OptionReply
from ..protocol.errors import ProtocolError
from ..protocol.options import (
    encode_option_reply,
    encode_rep_meta_context,
)
from ..protocol.uri import NBDAddress
from ..protocol.wire import (
    EXTENDED_REPLY_SIZE,
    STRUCTURED_REPLY_SIZE,
    decode_offset,
    decode_reply_header,
    encode_chunk_header,
    encode_data_chunk_header,
    encode_simple_reply,
)
from ..server.faults import MALFORMED_KINDS as MALFORMED_KINDS  # also offered from here
from .availability import Availability
from .flood import HANDSHAKE_FLOODS, FloodSpec, pour
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
        # Hostile-peer faults (see the module docstring); the others are armed on the
        # proxy (``FaultProxy.armed``) and fire once, on whichever link comes first.
        self.slow_left = 0
        self.slow_piece = 1
        self.slow_delay = 0.0
        self._message = bytearray()  # the message being captured (for duplicate)
        self._message_too_big = False
        self._capturing = False
        self._last_reply: bytes | None = None
        self._held: bytearray | None = None  # a message held whole (for tiny-chunks)
        self._flooding = trio.CancelScope()  # the flood's child process runs inside

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
        observer = self.observer
        pending = next(iter(observer.in_flight), None)  # a request still unanswered here
        ends = observer.server_data(data)
        if observer.lost:
            await self._send_to_client(data)
            return
        if not observer.transmission or observer.option_replies:
            rest = await self._handshake_faults(data)
            if rest is not data:  # something was slipped in, or the link is flooding
                self._at_boundary_before = observer.at_boundary
                if rest:
                    await self._send_to_client(rest)
                return
        if self.proxy.capture and observer.transmission:
            # Captured after the injections below: a repeat is of an *earlier* reply.
            captured = data, ends, observer.ends_done
        else:
            captured = None
        points = ([0] if self._at_boundary_before else []) + ends
        armed = self.proxy.armed
        if self._held is not None or ("tiny-chunks" in armed and points):
            data = await self._hold_for_tiny_chunks(data, points, ends)
            points = [0] if self._held is None and data else []
        if points and points[0] == 0 and "flood-reply" in armed and pending is not None \
                and observer.structured:
            armed.discard("flood-reply")
            await self._flood(FloodSpec("error-chunks", pending, self.observer.extended))
            return
        if points and "duplicate" in armed and self._last_reply is not None:
            cut = points[0]
            await self._send_to_client(data[:cut])
            armed.discard("duplicate")
            self.proxy.injected["duplicate"] += 1
            await self._send_to_client(self._last_reply)
            data = data[cut:]
            points = [0]
        if self.malformed is not None and points:
            cut = points[0]
            await self._send_to_client(data[:cut])
            header = self._malformed_header()
            self.malformed = None
            self.proxy.injected["malformed"] += 1  # counted before the client sees it
            await self.client.send_all(header)
            data = data[cut:]
        self._at_boundary_before = observer.at_boundary
        if data:
            await self._send_to_client(data)
        if captured is not None:
            self._capture(*captured)

    async def _send_to_client(self, data: bytes) -> None:
        """Forward, trickling the first ``slow_left`` bytes if slowloris is armed."""
        while self.slow_left and data:
            n = min(self.slow_piece, self.slow_left, len(data))
            await self._forward(self.client, TO_CLIENT, data[:n])
            data = data[n:]
            self.slow_left -= n
            await trio.sleep(self.slow_delay)
        if data:
            await self._forward(self.client, TO_CLIENT, data)

    def _capture(self, data: bytes, ends: list[int], done: list[bool]) -> None:
        """Keep the last message that finished a reply (at most 64 KiB).  Capturing
        starts at the first message end seen in transmission (what came before may be
        the handshake's)."""
        start = 0
        for end, finished in zip(ends, done, strict=True):
            if self._capturing and not self._message_too_big:
                self._message += data[start:end]
                if finished and len(self._message) <= 1 << 16:
                    self._last_reply = bytes(self._message)
            self._message.clear()
            self._message_too_big = False
            self._capturing = True
            start = end
        if self._capturing and not self._message_too_big:
            self._message += data[start:]
            if len(self._message) > 1 << 16:
                self._message_too_big = True
                self._message.clear()

    async def _hold_for_tiny_chunks(self, data: bytes, points: list[int],
                                    ends: list[int]) -> bytes:
        """Hold the next message whole; a READ data chunk goes out in tiny pieces.
        Returns what is left of ``data`` after the held message (if it ended)."""
        if self._held is None:
            cut = points[0]
            await self._send_to_client(data[:cut])
            self._held = bytearray()
            data, ends = data[cut:], [e - cut for e in ends if e > cut]
        if not ends:
            self._held += data
            return b""
        message = bytes(self._held + data[:ends[0]])
        self._held = None
        pieces = split_data_chunk(message, extended=self.observer.extended,
                                  rng=self.proxy.rng)
        if pieces is None:
            await self._send_to_client(message)  # not READ data: try the next one
        else:
            self.proxy.armed.discard("tiny-chunks")
            self.proxy.injected["tiny-chunks"] += 1
            await self._send_to_client(pieces)
        return data[ends[0]:]

    async def _handshake_faults(self, data: bytes) -> bytes:
        """unrequested-context and handshake floods; returns what is left to send."""
        armed = self.proxy.armed
        for at, option, reply in self.observer.option_replies:
            if at < 0:
                continue  # the header began in an earlier chunk: too late for it
            if "unrequested-context" in armed and option == Option.SET_META_CONTEXT \
                    and reply == OptionReply.ACK:
                armed.discard("unrequested-context")
                self.proxy.injected["unrequested-context"] += 1
                await self._send_to_client(data[:at])
                await self._send_to_client(encode_option_reply(
                    option, OptionReply.META_CONTEXT,
                    encode_rep_meta_context(0x7FFF_FFF0, "qemu:unrequested")))
                return data[at:]
            if "flood-handshake" in armed and option in HANDSHAKE_FLOODS:
                armed.discard("flood-handshake")
                await self._send_to_client(data[:at])
                await self._flood(HANDSHAKE_FLOODS[option](option))
                return b""
        return data

    async def _flood(self, spec: FloodSpec) -> None:
        """An endless stream from a child process until the client goes away or the
        proxy's ``flood_bytes`` went out; then the link closes."""
        self.proxy.injected["flood"] += 1
        try:
            with self._flooding:
                await pour(self.client.socket.fileno(), spec, self.proxy.flood_bytes)
        finally:
            self.scope.cancel()
            if self.proxy.availability is not None:  # the flooded client was kept away
                self.proxy.availability.broken()

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
        self._flooding.cancel()
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
        self.capture = False  # keep finished replies, for duplicate()
        self.flood_bytes = 64 << 20
        self.rng = random.Random(0)
        self.armed: set[str] = set()  # hostile faults waiting for their moment
        self.availability: Availability | None = None  # told when a flood ends

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

    def duplicate(self) -> None:
        """Repeat a finished reply at the next boundary (needs ``capture``)."""
        self.armed.add("duplicate")

    def tiny_chunks(self) -> None:
        """Send the next READ data chunk as many small chunks in random order."""
        self.armed.add("tiny-chunks")

    def slowloris(self, nbytes: int, piece: int, delay: float) -> None:
        """Trickle the next ``nbytes`` to the client, ``piece`` bytes every ``delay`` s."""
        for link in self.links:
            link.slow_left, link.slow_piece, link.slow_delay = nbytes, piece, delay
        if self.links:
            self.injected["slowloris"] += 1

    def flood(self, where: str) -> None:
        """An endless stream instead of the next reply (``"reply"``) or the next
        connection's answer to its goal option (``"handshake"``)."""
        if where not in ("reply", "handshake"):
            raise ValueError("where must be 'reply' or 'handshake'")
        self.armed.add("flood-" + where)

    def unrequested_context(self) -> None:
        """The next connection is offered a meta context it did not ask for."""
        self.armed.add("unrequested-context")

    def clear(self) -> None:
        """Disarm every fault (armed cuts and malformed replies, stalls, delays, the
        hostile-peer kinds)."""
        self._stall_until = self._delay = self._delay_until = 0.0
        self._next_cut = None
        self.armed.clear()
        for link in self.links:
            link.cut_after.clear()
            link.malformed = None
            link.slow_left = 0

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        self._scope.cancel()
        for link in list(self.links):
            link.scope.cancel()


def split_data_chunk(message: bytes, *, extended: bool, rng: random.Random) -> bytes | None:
    """An OFFSET_DATA chunk (header and payload) as up to 64 data chunks in random order
    (the last one sent keeps its DONE flag); None if ``message`` is something else."""
    size = EXTENDED_REPLY_SIZE if extended else STRUCTURED_REPLY_SIZE
    if len(message) < size + 10:
        return None
    try:
        header = decode_reply_header(message[:size])
    except ProtocolError:
        return None
    if header.simple or header.type != ChunkType.OFFSET_DATA:
        return None
    offset = decode_offset(message[size:size + 8])
    data = message[size + 8:]
    cuts = sorted(rng.sample(range(1, len(data)), min(63, len(data) - 1, rng.randint(1, 63))))
    pieces = list(zip([0, *cuts], [*cuts, len(data)], strict=True))
    rng.shuffle(pieces)
    out = bytearray()
    for i, (a, b) in enumerate(pieces):
        out += encode_data_chunk_header(header.cookie, offset + a, b - a,
                                        done=header.done and i == len(pieces) - 1,
                                        extended=extended)
        out += data[a:b]
    return bytes(out)
