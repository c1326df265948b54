"""The receive side of a device: cookies, and who reads the stream when.

Theory of operation
-------------------
This is qemu's ``nbd_receive_replies`` in trio.  No task reads the socket unless a
request waits for its reply, and there is no reader task: requests take turns.

*Slots and cookies.*  A request in flight owns a :class:`Slot`.  Its cookie is the slot's
index + 1 in the low 16 bits and a generation in the high bits (a count of the requests
the device has sent), so a cookie is never used twice in the device's life and 0 is
never a cookie.  A reply header whose cookie is not that of a live slot on the same
connection (a late or repeated reply included) is a protocol violation, never an
answer to somebody else's request.

*Taking turns* (``receive``).  ``current`` is the reply header being consumed.  A request
waiting for its reply: if ``current`` is its own, it consumes that chunk; if it belongs
to someone else, or someone holds ``receive_mutex`` to read a header, it sleeps; if
there is none, it takes ``receive_mutex``, reads the next header, checks its cookie,
makes it current and wakes its owner.  The owner reads the chunk's payload (READ data
straight into the caller's buffer), driving the reply's
:class:`~blockdrv.protocol.replies.ReplyCursor`, and clears ``current``.  When its reply
is complete it hands the stream on as it leaves (``hand_on``): if the next header is
already there it reads it and wakes that header's owner directly; otherwise it wakes
exactly one sleeper, who becomes the next reader.  Under load replies arrive back to
back, so each costs one wake-up, as a coroutine switch does in qemu.  A reply is read
only from the connection its request was sent on.

*Resumable.*  Headers are peeked (nothing is consumed until a whole header is there) and
a chunk's progress lives in its cursor, so a read cancelled at any checkpoint loses no
byte and the request (or whoever finishes its reply for it) picks up where it stopped.

*Live however fast the peer sends.*  The channel does not checkpoint while data is
available, so ``receive`` does: every :data:`CHECKPOINT_CHUNKS` chunks of one reply,
deadlines and cancellation get their turn (and other tasks run), and the cursor's
chunk cap ends a reply that would never end.  Failures are not handled here: they
propagate (TransportError, ProtocolError, :class:`ReplyLost`) to the device, which
decides what they mean, before any other task runs.
"""

from __future__ import annotations

import trio

from ..io.transport import DEFAULT_READ_AHEAD, Channel
from ..protocol.errors import ProtocolError
from ..protocol.events import BlockStatus, ReadHole
from ..protocol.export import ExportInfo
from ..protocol.replies import READ_DATA, READ_OFFSET, READ_PAYLOAD, ReplyCursor
from ..protocol.wire import ReplyHeader, decode_reply_header, reply_header_sizes
from .locks import FifoMutex

CHECKPOINT_CHUNKS = 16
"""A request consuming a reply checkpoints after this many chunks of it."""

COOKIE_SLOT_BITS = 16
MAX_SLOTS = (1 << COOKIE_SLOT_BITS) - 1
_SLOT_MASK = MAX_SLOTS

_ZEROES = bytes(1 << 20)


class ReplyLost(Exception):
    """The connection a reply was to come on is no longer the live one."""


class Session:
    """One connection as negotiated: its channel and what was agreed on it.

    Referenced by the device and by every request sent on it: ``slot.session is
    dispatcher.live`` is "my connection is the one that is up".
    """

    __slots__ = ("channel", "wire", "sizes", "context_ids")

    def __init__(self, channel: Channel, wire: ExportInfo) -> None:
        self.channel = channel
        self.wire = wire
        self.sizes = reply_header_sizes(structured=wire.structured, extended=wire.extended)
        self.context_ids = frozenset(wire.contexts.values())


class Slot:
    """One request in flight: its cookie, its reply's cursor and where data goes."""

    __slots__ = ("cookie", "session", "cursor", "buffer", "task", "receiving", "extents",
                 "payload", "yielded", "waits", "holes", "cancelled_at")

    def __init__(self, cookie: int, session: Session, cursor: ReplyCursor,
                 buffer: memoryview | None) -> None:
        self.cookie = cookie
        self.session = session  # the connection it was sent on: its reply comes there
        self.cursor = cursor
        self.buffer = buffer  # READ destination; None: discard the data
        self.task: trio.lowlevel.Task | None = None  # the request's task, while asleep
        self.receiving = False  # asleep until its reply is current
        self.extents: dict[int, list[tuple[int, int]]] = {}  # context id -> extents
        self.payload: bytearray | None = None  # a large non-data payload being filled
        self.yielded = False  # the request passed a schedule point (see the device)
        self.waits = session.channel.waits  # the channel's wait count when it was sent
        self.holes: list[tuple[int, int]] | None = None  # READ ranges that came as holes
        self.cancelled_at: float | None = None  # a cancellation absorbed by the send


class Dispatcher:
    """Slots, the current reply and the turn-taking of one device (see the module
    docstring)."""

    def __init__(self, max_in_flight: int) -> None:
        if not 1 <= max_in_flight <= MAX_SLOTS:
            raise ValueError(f"max_in_flight must be within 1..{MAX_SLOTS}")
        self.slots: list[Slot | None] = [None] * max_in_flight
        self.live: Session | None = None  # the connection that is up (None: none is)
        self.current: ReplyHeader | None = None  # qemu's s->reply
        self.receive_mutex = FifoMutex()
        self.sleepers = 0  # slots asleep until woken
        self.bytes_read = 0  # READ bytes delivered to callers (data and holes)
        self.hole_bytes_read = 0  # of which delivered as holes (no payload)
        self._next_index = 0
        self._generation = 0
        self._scratch = bytearray(1 << 16)  # where discarded READ data goes

    def __repr__(self) -> str:
        busy = sum(slot is not None for slot in self.slots)
        return f"<Dispatcher slots={busy}/{len(self.slots)} sleepers={self.sleepers}>"

    # --- slots ------------------------------------------------------------------------

    def open_slot(self, session: Session, cursor: ReplyCursor,
                  buffer: memoryview | None) -> Slot:
        """A free slot for a request about to be sent on ``session``, with a new cookie.

        Slots are taken round-robin; the cookie's generation makes it unique anyway.
        """
        slots, n = self.slots, len(self.slots)
        index = self._next_index
        for _ in range(n):
            if slots[index] is None:
                break
            index = index + 1 if index + 1 < n else 0
        else:
            raise AssertionError("admitted without a free slot")
        self._next_index = index + 1 if index + 1 < n else 0
        self._generation += 1
        slot = Slot((self._generation << COOKIE_SLOT_BITS) | (index + 1), session, cursor,
                    buffer)
        slots[index] = slot
        return slot

    def close_slot(self, slot: Slot) -> None:
        """The request is done with its slot (its reply was read, or never will be)."""
        index = (slot.cookie & _SLOT_MASK) - 1
        if self.slots[index] is slot:
            self.slots[index] = None

    # --- receiving ------------------------------------------------------------------

    async def receive(self, slot: Slot) -> None:
        """Consume the rest of ``slot``'s reply (resumable after cancellation).

        Raises TransportError or ProtocolError from the stream, or ReplyLost.
        """
        cursor = slot.cursor
        channel = slot.session.channel
        while not (cursor.done and not cursor.step):  # cursor.finished, inlined
            header = cursor.header if cursor.step else await self._wait_for_reply(slot)
            assert header is not None
            step = cursor.step
            if header is not cursor.header:
                step = cursor.begin(header)  # the owner checks its own chunks, once each
            # What the chunk carries, as the cursor asks (inlined: one per reply).
            if step == READ_OFFSET:
                offset = channel.take_u64_nowait()  # usually buffered with the header
                if offset is None:
                    offset = await channel.receive_u64()  # a peek, then consumed
                cursor.data_offset(offset)
                step = cursor.step
            if step == READ_DATA:
                buffer = slot.buffer
                while cursor.left:
                    if buffer is None:
                        scratch = self._scratch
                        n = await channel.receive_some_into(
                            memoryview(scratch)[:min(cursor.left, len(scratch))])
                    else:
                        at = cursor.at
                        view = buffer[at:at + cursor.left]
                        # What was read ahead first, without a coroutine; then the socket.
                        n = channel.take_buffered_into(view) or \
                            await channel.receive_some_into(view)
                        self.bytes_read += n
                    cursor.data_read(n)
            elif step == READ_PAYLOAD:
                self._payload(slot, cursor.payload(await self._read_payload(slot, channel)))
            if self.current is header:  # (not if the connection failed meanwhile)
                self.current = None  # not done: we read on; done: hand_on() as we leave
            if not cursor.chunks % CHECKPOINT_CHUNKS and not cursor.finished:
                slot.yielded = True
                await trio.lowlevel.checkpoint()  # a long reply: deadlines get a turn

    async def _wait_for_reply(self, slot: Slot) -> ReplyHeader:
        """Until the current reply is ``slot``'s, reading headers for others as needed;
        returns the header."""
        while True:
            if slot.session is not self.live:
                raise ReplyLost()
            current = self.current
            if current is not None:
                if current.cookie == slot.cookie:
                    return current
                await self._sleep(slot)  # someone else's reply is being consumed
                continue
            receive_mutex = self.receive_mutex
            if receive_mutex.held:
                await self._sleep(slot)  # someone is reading the next header
                continue
            # Free, and nothing awaited since the checks above: they still hold.
            receive_mutex.held = True  # (acquire_nowait, inlined: nobody can wait)
            try:
                try:
                    raw = await slot.session.channel.peek_framed(slot.session.sizes)
                    owner = self._take_header(slot.session, raw)
                except BaseException:
                    self.wake_one()  # somebody else must read the stream now
                    raise
                if owner is None:
                    raise ReplyLost()
                if owner is not slot:
                    self._wake(owner)
            finally:
                receive_mutex.held = False  # (release, inlined: nobody parks on it)

    def _take_header(self, session: Session, raw: memoryview) -> Slot | None:
        """Consume the header peeked in ``raw`` from ``session`` and make it current;
        returns its owner, who is to be woken (or None, taking nothing, if ``session``
        failed while the header was awaited: bytes that were already on their way still
        arrive, but their request is gone).  Raises ProtocolError for a bad header or an
        unknown cookie.  The owner checks the chunk against its reply's rules itself
        (``begin``), so a reply counts as done only once its owner has seen the end.
        """
        header = decode_reply_header(raw)
        session.channel.consume(len(raw))
        if session is not self.live:
            return None
        cookie = header.cookie  # its owner (_owner, inlined: once a reply)
        index = (cookie & _SLOT_MASK) - 1
        owner = self.slots[index] if 0 <= index < len(self.slots) else None
        if owner is None or owner.cookie != cookie or owner.session is not session:
            raise ProtocolError(f"server replied with unknown cookie {cookie:#x}")
        self.current = header
        return owner

    def _payload(self, slot: Slot, event: ReadHole | BlockStatus | None) -> None:
        """What a hole or block status chunk's payload means for the request."""
        slot.payload = None
        if isinstance(event, ReadHole):
            if slot.buffer is not None:
                pos = event.offset - slot.cursor.offset
                fill_zeroes(slot.buffer[pos:pos + event.length])
                self.bytes_read += event.length
                self.hole_bytes_read += event.length
                if slot.holes is None:
                    slot.holes = []
                slot.holes.append((event.offset, event.length))
        elif isinstance(event, BlockStatus):
            slot.extents[event.context_id] = event.extents

    async def _read_payload(self, slot: Slot, channel: Channel) -> bytes | bytearray:
        cursor = slot.cursor
        length = cursor.left
        if length <= DEFAULT_READ_AHEAD:
            data = bytes(await channel.peek(length))
            channel.consume(length)
            return data
        if slot.payload is None:
            slot.payload = bytearray(length)  # capped by the cursor's rules
        view = memoryview(slot.payload)
        while cursor.left:
            cursor.left -= await channel.receive_some_into(view[length - cursor.left:])
        return slot.payload

    # --- turns ------------------------------------------------------------------------

    async def _sleep(self, slot: Slot) -> None:
        """Sleep until ``_wake(slot)`` (qemu's qemu_coroutine_yield in the receive loop)."""
        slot.task = trio.lowlevel.current_task()
        slot.receiving = True
        slot.yielded = True
        self.sleepers += 1

        def abort(_: object) -> trio.lowlevel.Abort:
            slot.receiving = False  # cancelled while asleep: nobody may wake us now
            self.sleepers -= 1
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake(self, slot: Slot) -> None:
        """Wake a sleeping receiver (qemu's aio_co_wake)."""
        if slot.receiving:
            slot.receiving = False
            self.sleepers -= 1
            assert slot.task is not None
            trio.lowlevel.reschedule(slot.task)

    def wake_one(self) -> None:
        """Wake one sleeping receiver, who will read the stream next."""
        for slot in self.slots:
            if slot is not None and slot.receiving:
                self._wake(slot)
                return

    def wake_all(self) -> None:
        """Wake every sleeper (the connection failed: they all find out)."""
        self.current = None
        for slot in self.slots:
            if slot is not None:
                self._wake(slot)

    def hand_on(self) -> None:
        """A request leaves: if the stream is free and someone sleeps waiting for a
        reply, read the next header now if it is already here and wake its owner; else
        wake one sleeper to read it.  Raises ProtocolError for a bad header."""
        if self.current is not None or self.receive_mutex.held or not self.sleepers:
            return  # someone has the stream, or nobody waits (a later request reads)
        live = self.live
        if live is not None:
            raw = live.channel.peek_framed_nowait(live.sizes)
            if raw is not None:
                owner = self._take_header(live, raw)
                assert owner is not None  # live, and nothing awaited
                self._wake(owner)
                return
        self.wake_one()


def fill_zeroes(view: memoryview) -> None:
    """Zero a (possibly huge) buffer without allocating its size."""
    for start in range(0, len(view), len(_ZEROES)):
        n = min(len(_ZEROES), len(view) - start)
        view[start:start + n] = _ZEROES[:n]
