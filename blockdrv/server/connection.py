"""One client connection of the embedded server.

Theory of operation
-------------------
The handshake runs through the sans-IO :class:`ServerNegotiator`, one option at a time
(each answer is sent before the next option is looked at), under a deadline
(``handshake_timeout``) that covers a TLS upgrade too.  Then a reader loop takes
requests off the stream one at a time (the header, then a WRITE's payload).  A request
on a backend that never waits (memory) is executed right there, when no fault hook is
active; any other gets a task of its own in the connection's nursery, so requests of a
connection are processed concurrently.  Either way the reply is queued with the
connection's :class:`~blockdrv.server.writer.ReplyWriter`, the one task that writes
replies: they leave in the order they were finished, many in one ``sendmsg`` under
load, and nobody waits for anybody else's send.

Two limits keep a fast or hostile client from making the server hold without end: a
count of requests in progress (``max_requests``) and a budget of bytes held
(``buffer_budget``).  Every request is charged what it may make us hold (a WRITE its
payload, a READ its data, a block status its extents, anything else a small overhead)
as soon as its header is read, before its payload is read or it is executed, and
released when its reply has left the writer.  When either limit is full the reader stops
reading (it waits on an event the writer sets) and TCP flow control pushes back on the
client, so a client that sends READs and never reads the replies holds at most the
budget.  The reader checkpoints every few requests, since reading from a full
read-ahead buffer does not.

A structured READ reply is its data and hole chunks, the last flagged DONE (no NONE
chunk after it).  Chunks of different replies may interleave, as the spec allows, but
never mix.  With ``shuffle_replies`` each reply first waits a random number of scheduler
turns, READ replies are cut into several chunks sent in random order, and each chunk is
queued on its own so chunks of different replies interleave: clients' reply hand-off and
reassembly get exercised.

Every request is checked the way the spec's "Error values" section asks (unknown command
or flag, unaligned, out of range, too long, read-only, no meta context) and answered with
the matching error.  Payloads larger than the spec's denial-of-service bound are a hard
disconnect; nothing is ever allocated from an unchecked length.

Fault hooks (:mod:`blockdrv.server.faults`) of the export and of the connection are
consulted only when active.  ``stop()`` (graceful shutdown) stops reading requests and
lets the ones in progress finish, for at most ``shutdown_timeout`` seconds (a client that
does not read its replies cannot hold the server up); ``kill()`` shuts the socket down at
once, as a crash would.

The connection gets the server's settings and counters (:mod:`blockdrv.server.config`),
never the server itself.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
from typing import Awaitable, Callable, Iterator

import trio

from ..io.files import FastZeroUnsupported
from ..io.tls import upgrade
from ..io.transport import Channel, TransportError
from ..protocol.constants import (
    ALLOWED_COMMAND_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    WRITING_COMMANDS,
    Command,
    CommandFlag,
    Option,
    OptionReply,
)
from ..protocol.errors import ProtocolError, TLSError
from ..protocol.events import NEED_DATA, ClientAborted, ExportChosen, StartTLS
from ..protocol.options import encode_option_reply, encode_rep_meta_context
from ..protocol.server_negotiate import OptionAnswered, ServerNegotiator
from ..protocol.wire import (
    Request,
    decode_request,
    request_size,
)
from .backends import MAX_EXTENTS
from .commands import Chunk, CommandHandlers, Hooks, _Dropped, _first
from .config import ServerConfig, ServerCounters
from .export import Export
from .faults import (
    FLOOD_COMMANDS,
    FLOOD_OPTIONS,
    Faults,
    FloodRule,
    SlowlorisRule,
    UnrequestedContextRule,
)
from .hostile import flood_chunks, flood_option_replies
from .writer import ReplyWriter

log = logging.getLogger("blockdrv.server")

REPLY_OVERHEAD = 8192
"""What a request without data is charged: headers, an error message."""
BLOCK_STATUS_COST = MAX_EXTENTS * 16 + 64
"""What a block status reply may take per meta context (extended descriptors)."""
CHECKPOINT_EVERY = 64  # requests read between two checkpoints of the reader (at most)
_RANGELESS = (Command.FLUSH, Command.DISC)
_COMMANDS = {int(command): command for command in ALLOWED_COMMAND_FLAGS}  # served ones
_NOT_ALLOWED = {command: ~int(flags) for command, flags in ALLOWED_COMMAND_FLAGS.items()}
_DF, _FUA = int(CommandFlag.DF), int(CommandFlag.FUA)
_WRITE, _DISC = int(Command.WRITE), int(Command.DISC)
_LENGTH_LIMITED = (Command.READ, Command.WRITE, Command.CACHE)
_ANSWERS = (OptionAnswered, ExportChosen, ClientAborted, StartTLS)  # an option answered


class _Flood(Exception):
    """Internal: the handshake ends in a flood (sent outside the handshake deadline)."""

    def __init__(self, prefix: bytes, replies: Iterator[bytes]) -> None:
        super().__init__("flood")
        self.prefix = prefix
        self.replies = replies


class _Failure(Exception):
    """Internal: answer the current request with this host errno."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ServerConnection(CommandHandlers):
    """The server side of one client connection (see the module docstring)."""

    def __init__(self, config: ServerConfig, counters: ServerCounters,
                 stream: trio.abc.Stream, peer: str = "", *, seed: int | None = None) -> None:
        self.config = config
        self.counters = counters
        self.channel = Channel(stream)
        self.peer = peer
        rng = random.Random(seed)
        self.faults = Faults(seed=rng.randrange(1 << 32))
        self.export: Export | None = None
        self.structured = self.extended = False
        self.contexts: dict[int, str] = {}
        self.requests = 0
        self.held = 0  # bytes charged to the requests in progress (the budget)
        self.running = 0  # requests in progress
        self._room: trio.Event | None = None  # set when a request ends, if intake waits
        self.writer = ReplyWriter(self.channel, self._sent)  # every reply (transmission)
        self._rng = random.Random(rng.randrange(1 << 32))
        self._scope = trio.CancelScope()  # the whole connection
        self._reading = trio.CancelScope()  # the request reader only
        self._handshake_deadline = trio.CancelScope()  # replaced by run()
        self._handlers: dict[Command, Callable[[Request, bytearray | None, Hooks],
                                               Awaitable[list[Chunk] | None]]] = {
            Command.READ: self._read,
            Command.WRITE: self._write,
            Command.FLUSH: self._flush,
            Command.TRIM: self._trim,
            Command.CACHE: self._cache,
            Command.WRITE_ZEROES: self._zero,
            Command.BLOCK_STATUS: self._block_status,
        }

    def __repr__(self) -> str:
        name = self.export.name if self.export else None
        return (f"<ServerConnection {self.peer} export={name!r} requests={self.requests} "
                f"held={self.held}>")

    @property
    def handshaking(self) -> bool:
        """True until the client has entered transmission."""
        return self.export is None

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful: stop reading requests, finish those in progress (for at most
        ``shutdown_timeout`` seconds), then close."""
        if self.export is None:
            self._scope.cancel()  # still in the handshake: nothing to finish
        self._reading.cancel()
        deadline = trio.current_time() + self.config.shutdown_timeout
        self._scope.deadline = min(self._scope.deadline, deadline)

    def kill(self) -> None:
        """Abrupt: shut the socket down now, as if the server crashed."""
        self.channel.shutdown()
        self._scope.cancel()

    async def run(self) -> None:
        """Serve the connection until the client leaves, breaks the rules, or we stop."""
        try:
            with self._scope:
                chosen = flood = None
                with trio.move_on_after(self.config.handshake_timeout) as deadline:
                    self._handshake_deadline = deadline
                    try:
                        chosen = await self._handshake()
                    except _Flood as raised:
                        flood = raised
                if flood is not None:  # until the client goes away, however long
                    await self._flood([flood.prefix], flood.replies)
                elif deadline.cancelled_caught:
                    log.debug("connection %s: no handshake within %g s", self.peer,
                              self.config.handshake_timeout)
                elif chosen is not None:
                    await self._transmission(chosen)
            if self._scope.cancelled_caught and self.export is not None:
                log.debug("connection %s: cut at shutdown", self.peer)
        except* (TransportError, ProtocolError, TLSError, _Dropped) as group:
            for exc in group.exceptions:
                log.debug("connection %s ended: %s", self.peer, exc)
        finally:
            await self.channel.aclose()

    # --- handshake ----------------------------------------------------------------------

    async def _handshake(self) -> ExportChosen | None:
        config = self.config
        neg = ServerNegotiator(config.offers(), tls=config.tls.mode,
                               structured=config.structured, extended=config.extended,
                               allow_list=config.allow_list,
                               default_export=config.default_export, step_options=True)
        while True:
            try:
                event = neg.next_event()
            except ProtocolError:
                await self.channel.send(neg.data_to_send())  # an error reply, maybe
                raise
            out = neg.data_to_send()
            if isinstance(event, _ANSWERS):
                await self._answer_option(neg, out)
                await trio.lowlevel.checkpoint()  # however fast a client sends options
            elif out:
                await self.channel.send(out)  # the greeting
            if event is NEED_DATA:
                neg.receive_data(await self.channel.receive_some())
            elif isinstance(event, ExportChosen):
                self.channel.unread(neg.leftover())
                return event
            elif isinstance(event, ClientAborted):
                return None
            elif isinstance(event, StartTLS):
                await upgrade(self.channel, config.tls, server_side=True)
                neg.tls_started()

    async def _answer_option(self, neg: ServerNegotiator, out: bytes) -> None:
        """Send the answer to the option just handled, as the hostile modes say."""
        option = neg.last_option
        assert option is not None
        export = self.config.exports[neg.last_export or self.config.default_export]
        hooks = [f for f in (self.faults, export.faults) if f.active]
        if not hooks:
            await self.channel.send(out)
            return
        ack = encode_option_reply(option, OptionReply.ACK)
        answered = out.endswith(ack)  # not refused: the modes below make sense
        first_id = max(neg.contexts, default=0) + 1
        if answered and option in FLOOD_OPTIONS and \
                _first(f.mode_for_option(FloodRule, option) for f in hooks):
            raise _Flood(out[:-len(ack)], flood_option_replies(option, export.name,
                                                               first_id))
        if answered and option == Option.SET_META_CONTEXT:
            evil = _first(f.mode_for_option(UnrequestedContextRule, option) for f in hooks)
            if evil is not None:
                out = encode_option_reply(option, OptionReply.META_CONTEXT,
                                          encode_rep_meta_context(first_id, evil.name)) + out
        slow = _first(f.mode_for_option(SlowlorisRule, option) for f in hooks)
        if slow is not None:
            await self._send_trickled([out], slow)
        else:
            await self.channel.send(out)

    # --- transmission -------------------------------------------------------------------

    async def _transmission(self, chosen: ExportChosen) -> None:
        self.export = export = self.config.exports[chosen.name]
        self.structured, self.extended = chosen.structured, chosen.extended
        self.contexts = chosen.contexts
        async with trio.open_nursery() as writing:
            writing.start_soon(self.writer.run)
            try:
                async with trio.open_nursery() as nursery:
                    with self._reading:
                        await self._read_requests(export, nursery)
            finally:
                self.writer.close()  # run() returns once every reply has left

    async def _read_requests(self, export: Export, nursery: trio.Nursery) -> None:
        """The reader loop: requests in, each executed inline (a backend that never
        blocks, no hooks) or in a task of its own."""
        header_size, extended = request_size(self.extended), self.extended
        max_requests, budget = self.config.max_requests, self.config.buffer_budget
        immediate = export.backend.immediate and not self.config.shuffle_replies
        theirs, ours = export.faults, self.faults
        receive, cost_of, answer = self.channel.receive_exactly, self._cost, self._answer
        while True:  # (the hot path: locals, no task, no checkpoint, for most requests)
            if theirs.active or ours.active:
                await self._wait_stall()
            request = decode_request(await receive(header_size), extended=extended)
            command = request.command
            cost = cost_of(request)
            if self.running >= max_requests or (self.held and self.held + cost > budget):
                await self._wait_for_room(cost)
            self.running += 1
            self.held += cost
            payload = None
            if command == _WRITE:
                payload = bytearray(request.length)
                await self.channel.receive_into(memoryview(payload))
            self.requests += 1
            hooked = theirs.active or ours.active
            if hooked and (theirs.active and theirs.request_arrived()
                           or ours.active and ours.request_arrived()):
                self.channel.shutdown()
                raise _Dropped("fault hook: connection dropped after a request")
            if command == _DISC:
                self._sent(cost)
                return
            if immediate and not hooked:
                await answer(request, payload, cost)  # no task: nothing will wait
            else:
                nursery.start_soon(self._serve, request, payload, cost)
            if not self.requests % CHECKPOINT_EVERY:
                # Reads from the read-ahead buffer do not yield: a client that keeps it
                # full must not keep the rest of the server waiting.
                await trio.lowlevel.checkpoint()

    def _cost(self, request: Request) -> int:
        """Bytes a request may make us hold until its reply has left (the budget's
        charge); a WRITE payload over the spec's bound is a ProtocolError here, before
        anything is allocated."""
        assert self.export is not None
        command, length = request.command, request.length
        if command == Command.WRITE:
            if length > max(self.export.max_payload, DEFAULT_MAX_PAYLOAD):
                raise ProtocolError(f"write payload of {length} bytes is too large")
            return max(length, REPLY_OVERHEAD)
        if command == Command.READ and length <= self.export.max_payload:
            return max(length, REPLY_OVERHEAD)  # (chunk headers are a rounding error)
        if command == Command.BLOCK_STATUS:
            return REPLY_OVERHEAD + len(self.contexts) * BLOCK_STATUS_COST
        return REPLY_OVERHEAD

    async def _wait_for_room(self, cost: int) -> None:
        """Wait (not reading requests) until one more request of ``cost`` bytes fits
        the request count and the budget; a request alone always fits."""
        max_requests, budget = self.config.max_requests, self.config.buffer_budget
        while self.running >= max_requests or (self.held and self.held + cost > budget):
            self._room = trio.Event()
            await self._room.wait()
        self._room = None

    async def _serve(self, request: Request, payload: bytearray | None, cost: int) -> None:
        """:meth:`_answer` in a task of its own, counted in ``requests_in_progress``
        until its reply is queued."""
        in_progress = self.counters.requests_in_progress
        in_progress.value += 1
        try:
            await self._answer(request, payload, cost)
        finally:
            in_progress.value -= 1

    async def _answer(self, request: Request, payload: bytearray | None, cost: int) -> None:
        """Execute a request and queue its reply; what it was charged is released once
        the reply has left (:meth:`_sent`)."""
        queued = False
        try:
            hooks = self._hooks()
            if hooks and request.command in FLOOD_COMMANDS and self.structured and \
                    (self.contexts or request.command == Command.READ) and \
                    self._request_mode(FloodRule, request):
                replies = flood_chunks(request, extended=self.extended,
                                       context_id=min(self.contexts, default=0))
                self.writer.run_exclusive(functools.partial(self._flood, [], replies))
                return  # never answered: the flood ends with the connection
            try:
                chunks = await self._execute(request, payload, hooks)
            except _Failure as failure:
                chunks = [self._error_chunk(request, failure.code, failure.message)]
            if chunks is None:
                chunks = [self._ok_chunk(request)]
            del payload  # stored: only the reply is held now
            hooks = self._hooks()  # hooks set while the request ran apply to its reply
            if hooks or self.config.shuffle_replies:
                await self._queue_with_hooks(request, chunks, hooks, cost)
            else:
                self.writer.send(chunks[0] if len(chunks) == 1 else
                                 [b for chunk in chunks for b in chunk], cost)
            queued = True
        finally:
            if not queued:
                self._sent(cost)

    def _sent(self, cost: int) -> None:
        """A request's reply has left (or never will): release what it was charged."""
        self.counters.requests_served += 1
        self.running -= 1
        self.held -= cost
        if self._room is not None:
            self._room.set()

    async def _execute(self, request: Request, payload: bytearray | None,
                       hooks: Hooks) -> list[Chunk] | None:
        command = self._check(request)
        for faults in hooks:
            delay = faults.delay_for(command)
            if delay:
                await trio.sleep(delay)
            code = faults.failure_for(command, request.offset, request.length)
            if code is not None:
                raise _Failure(code, "injected fault")
            if command in (Command.WRITE, Command.WRITE_ZEROES) and faults.lose_write():
                return None
        try:
            return await self._handlers[command](request, payload, hooks)
        except FastZeroUnsupported:
            raise _Failure(errno.ENOTSUP, "fast zero is not possible here") from None
        except OSError as exc:
            raise _Failure(exc.errno or errno.EIO, exc.strerror or str(exc)) from None

    def _check(self, request: Request) -> Command:
        """The spec's checks on a request; raises _Failure with the errno to send."""
        export = self.export
        assert export is not None
        command = _COMMANDS.get(request.command)
        if command is None:
            raise _Failure(errno.EINVAL, f"unknown command {request.command}")
        flags, offset, length = request.flags, request.offset, request.length
        if flags & _NOT_ALLOWED[command]:
            raise _Failure(errno.EINVAL, "flag not valid for this command")
        if flags & _DF and not self.structured:
            raise _Failure(errno.EINVAL, "DF needs structured replies")
        if command in WRITING_COMMANDS and export.read_only:
            raise _Failure(errno.EPERM, "the export is read-only")
        if command == Command.BLOCK_STATUS and not self.contexts:
            raise _Failure(errno.EINVAL, "no meta context was negotiated")
        if command == Command.BLOCK_STATUS and not length:
            raise _Failure(errno.EINVAL, "block status of an empty range")
        if command in _RANGELESS:
            return command
        if offset + length > export.size:
            code = errno.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) \
                else errno.EINVAL
            raise _Failure(code, "request beyond the end of the export")
        if offset % export.min_block or length % export.min_block:
            raise _Failure(errno.EINVAL, "request not aligned to the minimum block size")
        # WRITE_ZEROES and TRIM carry no payload: like qemu-nbd, accept any length
        # inside the export (nbdcopy and libnbd send 128 MiB zeroes to a 32 MiB server).
        if command in _LENGTH_LIMITED and length > export.max_payload:
            raise _Failure(errno.EINVAL, "request longer than the maximum block size")
        return command
