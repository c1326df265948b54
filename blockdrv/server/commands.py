"""CommandHandlers: what one connection of the embedded server does for each command.

Part of :class:`~blockdrv.server.connection.ServerConnection` (its theory of operation
is in :mod:`blockdrv.server.connection`): the seven commands, each returning the reply's
chunks (or None for a plain success), the hostile modes a fault rule can put a request
in, and the ways a reply goes out (whole, trickled, flooded, cut).  The connection's
reader admits and checks a request, then calls the handler for its command.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from typing import Iterable, Iterator

import trio

from ..io.transport import Channel
from ..protocol.constants import (
    BASE_ALLOCATION,
    Command,
    CommandFlag,
    errno_to_wire,
)
from ..protocol.wire import (
    Request,
    encode_block_status_chunk,
    encode_data_chunk_header,
    encode_error_chunk,
    encode_hole_chunk,
    encode_none_chunk,
    encode_simple_reply,
)
from .config import ServerConfig
from .export import Export
from .faults import (
    Faults,
    R,
    SlowlorisRule,
    TinyChunksRule,
)
from .hostile import malform, trickle
from .segments import coarsen, cut_into_pieces, flatten, split_at_random
from .writer import MAX_SEND_BUFFERS, Buffers, ReplyWriter

log = logging.getLogger("blockdrv.server")

Chunk = Buffers  # the buffers of one chunk (or simple reply), sent together
Hooks = tuple[Faults, ...]  # the fault hooks active for a request (usually none)

FLOOD_BATCH = 64  # flood replies per send (and per checkpoint)
_DF, _FUA = int(CommandFlag.DF), int(CommandFlag.FUA)


class _Dropped(Exception):
    """Internal: a fault hook cut the connection."""


class CommandHandlers:
    """The command handlers and reply senders of a server connection."""

    config: ServerConfig
    channel: Channel
    faults: Faults
    export: Export | None
    structured: bool
    extended: bool
    contexts: dict[int, str]
    writer: ReplyWriter
    _rng: random.Random
    _handshake_deadline: trio.CancelScope

    def _request_mode(self, kind: type[R], request: Request) -> R | None:
        """The rule of a hostile mode that fires for this request, if one does."""
        assert self.export is not None
        for faults in (self.export.faults, self.faults):
            if faults.active:
                rule = faults.mode_for_request(kind, Command(request.command),
                                               request.offset, request.length)
                if rule is not None:
                    return rule
        return None

    async def _wait_stall(self) -> None:
        assert self.export is not None
        for faults in (self.export.faults, self.faults):
            if faults.active:
                await faults.wait_stall()

    def _hooks(self) -> Hooks:
        """The fault hooks active now (of the export and of this connection)."""
        assert self.export is not None
        if not (self.export.faults.active or self.faults.active):
            return ()
        return tuple(f for f in (self.export.faults, self.faults) if f.active)


    # --- commands (each returns the reply's chunks, or None for a plain success) -----------

    async def _read(self, request: Request, payload: bytearray | None,
                    hooks: Hooks) -> list[Chunk]:
        assert self.export is not None
        segments = await self.export.backend.read(request.offset, request.length)
        cookie, extended = request.cookie, self.extended
        for faults in hooks:
            if faults.serve_stale():
                flat = bytearray().join(flatten(segments))
                if faults.overlay_stale(request.offset, flat):
                    segments = [(request.offset, len(flat), [memoryview(flat)])]
        if not self.structured or request.flags & _DF:
            data = flatten(segments)
            if not self.structured:
                return [[encode_simple_reply(cookie), *data]]
            n = sum(len(b) for b in data)
            if not n:
                return [[encode_none_chunk(cookie, extended=extended)]]
            return [[encode_data_chunk_header(cookie, request.offset, n, done=True,
                                              extended=extended), *data]]
        tiny = self._request_mode(TinyChunksRule, request) if hooks else None
        if tiny is not None:
            segments = cut_into_pieces(segments, functools.partial(tiny.piece_size,
                                                                   self._rng))
            self._rng.shuffle(segments)
        elif self.config.shuffle_replies:
            segments = split_at_random(segments, self._rng)
            self._rng.shuffle(segments)
        if not segments:
            return [[encode_none_chunk(cookie, extended=extended)]]
        last = len(segments) - 1  # DONE rides on the last chunk: no NONE chunk after it
        chunks: list[Chunk] = []
        for i, (at, n, views) in enumerate(segments):
            if views is None:
                chunks.append([encode_hole_chunk(cookie, at, n, done=i == last,
                                                 extended=extended)])
            else:
                chunks.append([encode_data_chunk_header(cookie, at, n, done=i == last,
                                                        extended=extended), *views])
        return chunks

    async def _write(self, request: Request, payload: bytearray | None,
                     hooks: Hooks) -> None:
        assert self.export is not None and payload is not None
        old: bytes | None = None  # read once, even when both hooks want it
        for faults in hooks:
            if faults.stale_rate:
                if old is None:
                    segments = await self.export.backend.read(request.offset, request.length)
                    old = b"".join(flatten(segments))
                faults.remember(request.offset, old)
        await self.export.backend.write(request.offset, payload,
                                        fua=bool(request.flags & _FUA))

    async def _flush(self, request: Request, payload: bytearray | None,
                     hooks: Hooks) -> None:
        assert self.export is not None
        await self.export.backend.flush()

    async def _trim(self, request: Request, payload: bytearray | None,
                    hooks: Hooks) -> None:
        assert self.export is not None
        await self.export.backend.trim(request.offset, request.length,
                                       fua=bool(request.flags & _FUA))

    async def _cache(self, request: Request, payload: bytearray | None,
                     hooks: Hooks) -> None:
        assert self.export is not None
        await self.export.backend.cache(request.offset, request.length)

    async def _zero(self, request: Request, payload: bytearray | None,
                    hooks: Hooks) -> None:
        assert self.export is not None
        flags = request.flags
        await self.export.backend.zero(request.offset, request.length,
                                       may_trim=not flags & CommandFlag.NO_HOLE,
                                       fast=bool(flags & CommandFlag.FAST_ZERO),
                                       fua=bool(flags & CommandFlag.FUA))

    async def _block_status(self, request: Request, payload: bytearray | None,
                            hooks: Hooks) -> list[Chunk]:
        assert self.export is not None
        export = self.export
        runs = await export.backend.context_status(request.offset, request.length)
        chunks: list[Chunk] = []
        last = len(self.contexts)
        for i, (context_id, name) in enumerate(self.contexts.items(), start=1):
            status = runs.get(name) or [(request.length, 0)]
            if name == BASE_ALLOCATION and export.min_block > 1:
                status = coarsen(status, export.min_block)  # a block with data is data
            if request.flags & CommandFlag.REQ_ONE:
                status = status[:1]
            chunks.append([encode_block_status_chunk(request.cookie, context_id, status,
                                                     done=i == last,
                                                     extended=self.extended)])
        return chunks

    # --- replies --------------------------------------------------------------------

    def _ok_chunk(self, request: Request) -> Chunk:
        if self.extended:
            return [encode_none_chunk(request.cookie, extended=True)]
        return [encode_simple_reply(request.cookie)]

    def _error_chunk(self, request: Request, code: int, message: str) -> Chunk:
        wire = errno_to_wire(code)
        if self.structured:
            return [encode_error_chunk(request.cookie, wire, message,
                                       extended=self.extended)]
        return [encode_simple_reply(request.cookie, wire)]

    async def _queue_with_hooks(self, request: Request, chunks: list[Chunk],
                                hooks: Hooks, cost: int) -> None:
        """Queue a reply chunk by chunk, as shuffling and the fault hooks say."""
        shuffle = self.config.shuffle_replies
        if shuffle:
            for _ in range(self._rng.randrange(8)):
                await trio.lowlevel.checkpoint()
        for faults in hooks:
            kind = faults.malform()
            if kind is not None:
                chunks = malform(chunks, kind, request.cookie, self.extended)
            cut = faults.reply_cut()
            if cut is not None:
                self.writer.run_exclusive(functools.partial(self._send_cut, chunks, cut),
                                          cost)
                return
        slow = self._request_mode(SlowlorisRule, request) if hooks else None
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            if shuffle and i:  # let other replies' chunks in between
                for _ in range(self._rng.randrange(3)):
                    await trio.lowlevel.checkpoint()
            self.writer.run_exclusive(functools.partial(self._send_chunk, chunk, slow),
                                      cost if i == last else None)

    async def _send_chunk(self, chunk: Chunk, slow: SlowlorisRule | None) -> None:
        """One chunk, after any stall, trickled if slowloris says so (a writer action)."""
        await self._wait_stall()
        if slow is not None:
            await self._send_trickled(chunk, slow)
        else:
            for i in range(0, len(chunk), MAX_SEND_BUFFERS):
                await self.channel.send(*chunk[i:i + MAX_SEND_BUFFERS])

    async def _send_trickled(self, buffers: Iterable[bytes | bytearray | memoryview],
                             rule: SlowlorisRule) -> None:
        """Send ``buffers`` a few bytes at a time, ``rule.delay`` apart (slowloris)."""
        for piece in trickle(buffers, rule.max_piece, self._rng):
            await self.channel.send(piece)
            await trio.sleep(rule.delay)
            if self.export is None:  # our own delays do not count against the client
                self._handshake_deadline.deadline += rule.delay

    async def _flood(self, prefix: Buffers, replies: Iterator[bytes]) -> None:
        """Send ``prefix``, then ``replies`` until the client goes away (TransportError);
        made as they go, a batch at a time, with a checkpoint after each batch."""
        await self.channel.send(*prefix)
        while True:
            await self.channel.send(b"".join(itertools.islice(replies, FLOOD_BATCH)))
            await trio.lowlevel.checkpoint()

    async def _send_cut(self, chunks: list[Chunk], cut: int) -> None:
        data = b"".join(b for chunk in chunks for b in chunk)
        await self.channel.send(data[:cut])
        self.channel.shutdown()
        raise _Dropped(f"fault hook: reply cut after {cut} bytes")



def _first(rules: Iterable[R | None]) -> R | None:
    """The first rule that is not None (the iterable is consumed only so far)."""
    return next((rule for rule in rules if rule is not None), None)

