"""The one task that writes a server connection's replies.

Theory of operation
-------------------
Request handlers never write to the connection themselves: they queue whole messages
(a reply, or one chunk of it) with :meth:`ReplyWriter.send` and go on; they never
wait, so a reply that cannot leave yet (the client reads slowly) holds nobody up but
the bytes it is made of, which the connection's budget counts.  The writer task
(:meth:`ReplyWriter.run`) takes everything queued, up to :data:`MAX_SEND_BUFFERS`
buffers, and hands it to the kernel in one scatter-gather ``sendmsg``: under load,
many replies leave in one system call, and no task ever waits for a lock to send.

Each message is written whole before the next starts, so messages never mix; the
order is the order they were queued.  Once a message's last byte went out, the
writer's ``sent`` callback gets the message's token (the connection releases what the
request was charged: the token is the charge).
Hooks that must own the stream for a while (fault injection: trickled or cut replies,
floods, stalls) queue an *action* instead: an async callable the writer runs in turn,
with nothing else written meanwhile.

:meth:`close` lets :meth:`run` return once the queue is empty; an error writing (the
client went away) is raised by :meth:`run`, and messages still queued are dropped with
the connection.
"""

from __future__ import annotations

import collections
from typing import Awaitable, Callable, NamedTuple

import trio

from ..io.transport import Channel

Buffer = bytes | bytearray | memoryview
Buffers = list[Buffer]
Action = Callable[[], Awaitable[None]]

MAX_SEND_BUFFERS = 64
"""Buffers per ``sendmsg`` (the kernel takes at most IOV_MAX = 1024; every call that
sends only part of them passes all of them again)."""

BATCH_BYTES = 1 << 20
"""Bytes gathered into one batch before it is sent (a socket takes a few hundred KiB)."""


class _Item(NamedTuple):
    buffers: Buffers  # a message, or [] with an action
    size: int  # bytes in buffers
    action: Action | None
    token: int | None  # handed to ``sent`` once written


class ReplyWriter:
    """Writes queued messages and actions to one channel, in order (see the module
    docstring)."""

    def __init__(self, channel: Channel, sent: Callable[[int], None]) -> None:
        self.channel = channel
        self._sent = sent
        self._queue: collections.deque[_Item] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()  # the writer, when there is nothing to do
        self._closed = False
        self.messages = 0  # written so far

    def __repr__(self) -> str:
        return f"<ReplyWriter queued={len(self._queue)} written={self.messages}>"

    @property
    def queued(self) -> int:
        """Messages and actions waiting to be written."""
        return len(self._queue)

    def send(self, buffers: Buffers, token: int | None = None) -> None:
        """Queue one message (its buffers are written together, in order); once it is
        written, ``sent(token)`` is called unless the token is None."""
        self._queue.append(_Item(buffers, sum(map(len, buffers)), None, token))
        if self._lot:
            self._lot.unpark()

    def run_exclusive(self, action: Action, token: int | None = None) -> None:
        """Queue an action that has the stream to itself while it runs (then
        ``sent(token)``, as for a message)."""
        self._queue.append(_Item([], 0, action, token))
        if self._lot:
            self._lot.unpark()

    def close(self) -> None:
        """No more messages: :meth:`run` returns once the queue is written."""
        self._closed = True
        if self._lot:
            self._lot.unpark()

    async def run(self) -> None:
        """The writer task (see the module docstring)."""
        queue, send = self._queue, self.channel.send
        batches = 0  # since the writer last waited
        while True:
            if not queue:
                if self._closed:
                    return
                batches = 0
                await self._lot.park()
                continue
            action = queue[0].action
            if action is not None:  # alone, in its turn
                token = queue.popleft().token
                await action()
                self._done([token])
                continue
            batch: Buffers = []
            done: list[int | None] = []
            size = 0
            while queue and queue[0].action is None and size < BATCH_BYTES:
                buffers = queue[0].buffers
                if batch and len(batch) + len(buffers) > MAX_SEND_BUFFERS:
                    break
                batch += buffers
                item = queue.popleft()
                size += item.size
                done.append(item.token)
            for i in range(0, len(batch), MAX_SEND_BUFFERS):  # a huge message: in pieces
                await send(*batch[i:i + MAX_SEND_BUFFERS])
            self._done(done)
            batches += 1
            if not batches % 16:  # a socket with room never makes us wait: yield anyway
                await trio.lowlevel.checkpoint()

    def _done(self, tokens: list[int | None]) -> None:
        self.messages += len(tokens)
        sent = self._sent
        for token in tokens:
            if token is not None:
                sent(token)
