"""RequestEngine: one NBD request from admission to its reply, and the node's own I/O.

The middle layer of :class:`~blockdrv.nbd.NBDDevice` (theory of operation in
:mod:`blockdrv.nbd.device`): a request is admitted, takes a slot, sends under
``send_mutex``, takes its turn receiving under ``receive_mutex`` (the dispatcher hands
each reply to its owner), and loops ``send; receive`` while the state is CONNECTING_WAIT
(the retry rule).  Above that: splitting reads, writes and zeroes at the server's
limits, and assembling block status from every negotiated context.
"""

from __future__ import annotations

import errno
import hashlib
import logging

import trio

from ..block.node import BLOCK_STATUS_WINDOW, BlockStatus, Extent
from ..io.transport import TransportError
from ..protocol.constants import Command, CommandFlag
from ..protocol.errors import (
    ConnectionLostError,
    InvalidArgumentError,
    ProtocolError,
    UnsupportedError,
)
from ..protocol.export import check_request
from ..protocol.replies import ReplyCursor
from ..protocol.wire import encode_request
from .connection_states import ConnectionStates, _describe, _TransportFailure
from .dispatch import ReplyLost, Slot
from .states import State

log = logging.getLogger("blockdrv.nbd")

# Hot-path constants: looking up an enum member costs more than the check it is used in.
_READ, _WRITE = Command.READ, Command.WRITE
_READ_KEY, _WRITE_KEY = (_READ, 0), (_WRITE, 0)  # (command, flags) keys of _limits


class RequestEngine(ConnectionStates):
    """The request path and the ``_do_*`` I/O of an NBD device (see the module docstring)."""

    # --- one request ------------------------------------------------------------------

    async def _request(self, command: Command, offset: int, length: int, flags: int = 0,
                       *, payload: memoryview | None = None,
                       buffer: memoryview | None = None) -> Slot:
        """Run one request to completion with the retry rule; returns its slot."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closing or self._fatal is not None:
            raise self._quit_error()
        self._stats["requests"] += 1
        digest = None
        if payload is not None and self.guard_writes:
            digest = hashlib.blake2b(payload, digest_size=16).digest()
        while True:
            session = self._session
            try:
                slot = await self._send_request(command, offset, length, flags, payload,
                                                buffer, digest)
                session = slot.session
                await self._receive_reply(slot)
            except _TransportFailure as failure:
                if self.state is State.CONNECTING_WAIT or (
                        self._connected() and self._session is not session):
                    self._stats["retried"] += 1  # reconnecting, or already reconnected
                    continue
                if self._fatal is not None:
                    raise self._quit_error() from None
                raise ConnectionLostError(
                    f"{command.name} {offset}+{length} failed: lost the connection to "
                    f"{self.address.display} ({failure})") from None
            if not slot.yielded and slot.session.channel.waits == slot.waits:
                # Served without waiting for anything: still a schedule point, as every
                # trio operation is, so a fast server cannot starve the other tasks.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return slot

    async def _send_request(self, command: Command, offset: int, length: int, flags: int,
                            payload: memoryview | None, buffer: memoryview | None,
                            digest: bytes | None) -> Slot:
        """Admission, a slot, and the request on the wire; returns the slot."""
        admission = self._admission
        waited = False if admission.try_enter() else await admission.enter()
        slot = None
        try:
            if self._fatal is not None:
                raise self._quit_error()
            if self._dispatch.live is None:
                waited = True
                await self._reconnect_attempt()
                if not self._connected():
                    raise _TransportFailure(_describe(self._worker.error)
                                            if self._worker.error else "no connection")
            session = self._dispatch.live
            assert session is not None
            wire, channel = session.wire, session.channel
            cursor = ReplyCursor(command, offset, length, flags, structured=wire.structured,
                                 extended=wire.extended, context_ids=session.context_ids)
            slot = self._dispatch.open_slot(session, cursor, buffer)
            slot.yielded = waited
            header = encode_request(command, flags, slot.cookie, offset, length,
                                    extended=wire.extended)
            send_mutex = self.send_mutex
            if send_mutex.held:
                slot.yielded = True
                await send_mutex.acquire()
            else:
                send_mutex.held = True  # free: the common case, no scheduler trip
            try:
                if session is not self._dispatch.live or channel.broken:
                    raise _TransportFailure("connection lost before sending")
                if digest is not None and payload is not None:
                    _check_unchanged(payload, digest)
                try:
                    if payload is None:
                        slot.cancelled_at = await channel.send(
                            header, finish_within=self.cancel_timeout)
                    else:
                        slot.cancelled_at = await channel.send(
                            header, payload, finish_within=self.cancel_timeout)
                    if slot.cancelled_at is not None:
                        self._stats["sends_finished_cancelled"] += 1
                except TransportError as exc:
                    self._channel_failed(session, exc)
                    raise _TransportFailure(str(exc)) from None
                except BaseException:
                    if channel.broken:  # cancelled part-way, and it could not be finished
                        self._channel_failed(session, "a cancelled send could not be "
                                                      "finished in time")
                    raise
            finally:
                send_mutex.release()
            return slot
        except BaseException:
            if slot is not None:
                self._dispatch.close_slot(slot)
            admission.leave()
            raise

    # --- receiving --------------------------------------------------------------------

    async def _receive_reply(self, slot: Slot) -> None:
        """Receive the whole reply of ``slot``; the slot is freed whatever happens."""
        try:
            try:
                await self._dispatch.receive(slot)
            except trio.Cancelled:
                await self._finish_cancelled(slot)
                raise
            except (TransportError, ProtocolError, ReplyLost) as exc:
                raise self._receive_failed(slot, exc) from None
            try:
                error = slot.cursor.finish()
            except ProtocolError as exc:
                raise self._protocol_violation(exc) from None
            if error is not None and error.errno == errno.ESHUTDOWN:
                self._channel_failed(slot.session, "the server is shutting down (ESHUTDOWN)",
                                     soft=True)
                raise _TransportFailure("the server is shutting down")
        finally:
            self._dispatch.close_slot(slot)
            self._admission.leave()
            try:
                self._dispatch.hand_on()
            except ProtocolError as exc:
                self._protocol_violation(exc)  # the device fails; everyone is woken
        if error is not None:
            raise error

    def _receive_failed(self, slot: Slot, exc: Exception) -> Exception:
        """What a failure of the dispatcher's receive means for the device, and the
        exception the request raises for it."""
        if isinstance(exc, TransportError):
            self._channel_failed(slot.session, exc)
            return _TransportFailure(str(exc))
        if isinstance(exc, ProtocolError):
            return self._protocol_violation(exc)
        if self._fatal is not None:  # ReplyLost: the device is dead, or the connection
            return self._quit_error()
        return _TransportFailure("connection lost while waiting for the reply")

    async def _finish_cancelled(self, slot: Slot) -> None:
        """A cancelled request reads the rest of its own reply (discarding it), so the
        stream stays in step; at most ``cancel_timeout`` after the cancellation arrived
        (finishing its send counts too), else the connection is declared broken."""
        slot.buffer = None
        with trio.CancelScope(shield=True) as shield:
            shield.deadline = (slot.cancelled_at or trio.current_time()) + self.cancel_timeout
            try:
                await self._dispatch.receive(slot)
            except (TransportError, ProtocolError, ReplyLost) as exc:
                self._receive_failed(slot, exc)
        if shield.cancelled_caught:  # (this also lets go of the current reply, if ours)
            self._channel_failed(slot.session, "the reply of a cancelled request did not "
                                               "arrive in time")

    # --- the node's own I/O (behind the BlockNode port) --------------------------------

    def _pieces(self, command: Command, offset: int, count: int,
                flags: int = 0) -> list[tuple[int, int]]:
        """(offset, length) pieces of a request, checked, each within the server's limit.

        Whether the export allows a (command, flags) pair is checked once and cached;
        after that only the range and alignment are checked, with plain integers.
        """
        limit = self._limits.get((command, flags))
        if limit is None:
            check_request(self.info, command, 0, 0, flags)  # raises if never allowed
            limit = self._limits[(command, flags)] = self.info.max_length(command, flags)
        info = self.info
        align = info.min_block
        if offset < 0 or count < 0 or offset + count > info.size or offset % align \
                or count % align:
            check_request(info, command, offset, count if count <= limit else limit, flags)
            raise InvalidArgumentError(f"{command.name}: bad range {offset}+{count}")
        if count <= limit:
            return [(offset, count)]
        return [(offset + pos, min(limit, count - pos)) for pos in range(0, count, limit)]

    async def pread(self, count: int, offset: int) -> bytes:
        """Read ``count`` bytes at ``offset``.

        Raises: as :meth:`BlockNode.pread`.
        """
        self._pieces(Command.READ, offset, count)  # check before allocating
        return await super().pread(count, offset)

    def _one_piece(self, key: tuple[Command, int], offset: int, count: int) -> bool:
        """True if a request (command and flags ``key``) at ``offset`` of ``count``
        bytes is allowed and fits in one piece, as far as the cheap checks tell: the
        pair was allowed before, and the range is in bounds and aligned.  False means
        "let :meth:`_pieces` decide" (split, check or raise)."""
        limit = self._limits.get(key)
        info = self._info
        if limit is None or info is None or count > limit or offset < 0:
            return False
        align = info.min_block
        return offset + count <= info.size and not offset % align and not count % align

    async def _do_pread_into(self, buf: memoryview, offset: int,
                             holes: list[tuple[int, int]] | None = None) -> None:
        if self._one_piece(_READ_KEY, offset, len(buf)):  # the common case
            slot = await self._request(_READ, offset, len(buf), buffer=buf)
            if holes is not None and slot.holes:
                holes += slot.holes
            return
        pos = 0
        for at, n in self._pieces(_READ, offset, len(buf)):
            slot = await self._request(_READ, at, n, buffer=buf[pos:pos + n])
            if holes is not None and slot.holes:
                holes += slot.holes
            pos += n

    async def _do_pwrite(self, buf: memoryview, offset: int, *, fua: bool = False) -> None:
        if not fua and self._one_piece(_WRITE_KEY, offset, len(buf)):  # the common case
            await self._request(_WRITE, offset, len(buf), payload=buf)
            self._stats["bytes_written"] += len(buf)
            return
        flags = CommandFlag.FUA if fua else 0
        pos = 0
        for at, n in self._pieces(_WRITE, offset, len(buf), flags):
            await self._request(_WRITE, at, n, flags, payload=buf[pos:pos + n])
            self._stats["bytes_written"] += n
            pos += n

    async def _do_zero(self, count: int, offset: int, *, may_trim: bool = True,
                       fast: bool = False, fua: bool = False) -> None:
        flags = ((0 if may_trim else CommandFlag.NO_HOLE)
                 | (CommandFlag.FAST_ZERO if fast else 0) | (CommandFlag.FUA if fua else 0))
        for at, n in self._pieces(Command.WRITE_ZEROES, offset, count, flags):
            await self._request(Command.WRITE_ZEROES, at, n, flags)

    async def _do_trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        flags = CommandFlag.FUA if fua else 0
        for at, n in self._pieces(Command.TRIM, offset, count, flags):
            await self._request(Command.TRIM, at, n, flags)

    async def _do_flush(self) -> None:
        self._pieces(Command.FLUSH, 0, 0)
        await self._request(Command.FLUSH, 0, 0)

    async def _do_cache(self, count: int, offset: int) -> None:
        for at, n in self._pieces(Command.CACHE, offset, count):
            await self._request(Command.CACHE, at, n)

    async def _do_block_status(self, count: int, offset: int) -> BlockStatus:
        """Every negotiated context's extents over ``offset .. offset+count``.

        One request per window of at most :data:`~blockdrv.node.BLOCK_STATUS_WINDOW`
        bytes.  A server may describe less than it was asked, and each context a
        different length: the contexts are cut to what all of them describe and the
        next request starts there, until the whole range is described.
        """
        names = list(self.info.contexts)
        if not names:
            raise UnsupportedError("no metadata context was negotiated: the server does "
                                   "not offer block status")
        self._pieces(Command.BLOCK_STATUS, offset, count)
        align = self.info.min_block
        window = min(self._limits[(Command.BLOCK_STATUS, 0)], BLOCK_STATUS_WINDOW)
        window -= window % align
        end = offset + count
        result: BlockStatus = {name: [] for name in names}
        pos = offset
        while pos < end:
            n = min(window, end - pos)
            self._pieces(Command.BLOCK_STATUS, pos, n)  # one piece: only checks the range
            slot = await self._request(Command.BLOCK_STATUS, pos, n)
            ids = slot.session.wire.contexts
            replies = [slot.extents[ids[name]] for name in names]
            described = min(n, *(sum(length for length, _ in extents)
                                 for extents in replies))
            if described % align and pos + described < end:  # keep requests aligned
                described -= described % align
            if described <= 0:
                raise ProtocolError(f"server described nothing of BLOCK_STATUS {pos}+{n}")
            for name, extents in zip(names, replies, strict=True):
                _append_extents(result[name], pos, described, extents)
            pos += described
        return result



def _append_extents(out: list[Extent], offset: int, length: int,
                    extents: list[tuple[int, int]]) -> None:
    """(length, flags) pairs from ``offset``, cut at ``length``, added to ``out`` with
    adjacent equal flags merged."""
    pos, end = offset, offset + length
    for size, flags in extents:
        size = min(size, end - pos)
        if out and out[-1].flags == flags and out[-1].offset + out[-1].length == pos:
            last = out[-1]
            out[-1] = Extent(last.offset, last.length + size, flags)
        else:
            out.append(Extent(pos, size, flags))
        pos += size
        if pos >= end:
            break


def _check_unchanged(payload: memoryview, digest: bytes) -> None:
    """guard_writes: the payload about to be sent must be what the caller handed over."""
    if hashlib.blake2b(payload, digest_size=16).digest() != digest:
        raise InvalidArgumentError("the write buffer changed while the write was in flight; "
                                   "refusing to send different bytes")
