"""Multi-conn: one block node spread over several connections to one export.

Theory of operation
-------------------
:func:`~blockdrv.open_nbd` with ``connections=N`` opens one :class:`NBDDevice` first.
When its server advertises CAN_MULTI_CONN it opens N-1 more to the same export and
returns a :class:`MultiConnDevice` over all of them; otherwise it keeps the one and says
why in :attr:`MultiConnDevice.connections_note`.  Every member is a complete device of
its own: its own ``send_mutex``, ``receive_mutex``, cookie slots, connection worker and
``reconnect_delay`` timer, so a member's outage and reconnect are exactly those of a
single device, and the others carry on meanwhile.

A request goes to the connected member with the fewest requests in flight (a member
that lost its connection gets nothing while another is connected), through that
member's port, so members count and drain their own requests.  This node
lists its members as its children: ``drained()`` closes this node's gate, waits for
what it has in flight, then drains every member.

FLUSH.  CAN_MULTI_CONN promises that a flush on any connection covers every write that
was *replied to* on any connection before the flush was sent.  So ``flush()`` first
waits until every write, zero and trim that was in flight when it was called has been
replied to (``writes_pending`` below), and only then sends one FLUSH, on the least busy
member.  Writes that start after ``flush()`` was called are not waited for: they were
not ordered before the flush by the caller either.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Iterable, Sequence, TypeVar

from trio_util import AsyncValue, compose_values

from ..block.node import BlockNode, BlockStatus
from ..protocol.errors import ConnectError, InvalidArgumentError
from ..protocol.export import ExportInfo, incompatibility
from ..protocol.uri import NBDAddress
from .device import DeviceStatistics, NBDDevice
from .states import State

T = TypeVar("T")


class MultiConnDevice(BlockNode):
    """Several :class:`NBDDevice` connections to one export behind one block node.

    Offers what an NBDDevice offers (the I/O methods, ``size``, ``info``, ``state``,
    ``statistics()``, ``drained()``, ``cancel_in_flight()``, ``wait_connected()``,
    ``aclose()``); :attr:`members` are the connections.
    """

    def __init__(self, members: Sequence[NBDDevice], note: str = "") -> None:
        super().__init__()
        if not members:
            raise InvalidArgumentError("a multi-conn device needs at least one connection")
        self.members: tuple[NBDDevice, ...] = tuple(members)
        self.connections_note = note
        self._write_numbers = itertools.count()
        # Writes waiting for their reply, oldest first (numbers only grow).
        self._writes_pending: dict[int, None] = {}
        # The number of the oldest write still waiting for its reply (None: none).
        self._oldest_pending: AsyncValue[int | None] = AsyncValue(None)

    def __repr__(self) -> str:
        return (f"<MultiConnDevice {self.members[0].address} "
                f"connections={len(self.members)} in_flight={self.in_flight.value}>")

    @property
    def connections(self) -> int:
        """How many connections requests are spread over."""
        return len(self.members)

    @property
    def info(self) -> ExportInfo:
        """The export as negotiated on the first connection (all of them agree)."""
        return self.members[0].info

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self.members[0].size

    @property
    def address(self) -> NBDAddress:
        """Where the export lives (the parsed URI)."""
        return self.members[0].address

    @property
    def state(self) -> State:
        """The worst state of the connections: QUIT, CONNECTING_NOWAIT, CONNECTING_WAIT,
        CONNECTED (CONNECTED only when every connection is)."""
        return _worst(member.state for member in self.members)

    async def wait_state(self, *states: State) -> State:
        """Wait until :attr:`state` is one of ``states``; returns it.

        Raises: nothing (cancellation only).
        """
        with compose_values(_transform_=_worst, **{f"m{i}": member.state_value for i, member
                                                   in enumerate(self.members)}) as worst:
            return await worst.wait_value(lambda state: state in states)  # type: ignore[no-any-return]

    def statistics(self) -> DeviceStatistics:
        """The members' figures added up (``state`` as :attr:`state`)."""
        parts = [member.statistics() for member in self.members]
        totals = {field.name: sum(getattr(p, field.name) for p in parts)
                  for field in dataclasses.fields(DeviceStatistics)
                  if field.name not in ("state", "reconnect_timer_armed")}
        return DeviceStatistics(state=self.state,
                                reconnect_timer_armed=any(p.reconnect_timer_armed
                                                          for p in parts),
                                **totals)

    def children(self) -> Sequence[BlockNode]:
        return self.members

    def cancel_in_flight(self) -> None:
        """Fail requests waiting for a reconnect, on every connection."""
        for member in self.members:
            member.cancel_in_flight()

    async def wait_connected(self) -> None:
        """Wait until every connection is connected again.

        Raises: as :meth:`NBDDevice.wait_connected`.
        """
        for member in self.members:
            await member.wait_connected()

    async def aclose(self) -> None:
        """Close every connection (each waits for its own requests).

        Raises: as :meth:`NBDDevice.aclose`.
        """
        for member in self.members:
            await member.aclose()

    # --- routing ----------------------------------------------------------------------

    def _least_busy(self) -> NBDDevice:
        """The connected member with the fewest requests in flight (any member if none
        is connected: its own reconnect rules then apply)."""
        best: NBDDevice | None = None
        for member in self.members:
            if member.state is State.CONNECTED and (
                    best is None or member.in_flight.value < best.in_flight.value):
                best = member
        if best is None:
            return min(self.members, key=lambda member: member.in_flight.value)
        return best

    async def _write(self, call: Callable[[NBDDevice], Awaitable[T]]) -> T:
        """Run a data-changing request, counted as pending until it is replied to."""
        number = next(self._write_numbers)
        pending = self._writes_pending
        pending[number] = None
        if self._oldest_pending.value is None:
            self._oldest_pending.value = number
        try:
            return await call(self._least_busy())
        finally:
            del pending[number]
            if self._oldest_pending.value == number:
                self._oldest_pending.value = next(iter(pending), None)

    async def _do_pread_into(self, buf: memoryview, offset: int,
                             holes: list[tuple[int, int]] | None = None) -> None:
        await self._least_busy().pread_into(buf, offset, holes=holes)

    async def _do_pwrite(self, buf: memoryview, offset: int, *, fua: bool = False) -> None:
        await self._write(lambda member: member.pwrite(buf, offset, fua=fua))

    async def _do_zero(self, count: int, offset: int, *, may_trim: bool = True,
                       fast: bool = False, fua: bool = False) -> None:
        await self._write(lambda member: member.zero(count, offset, may_trim=may_trim,
                                                     fast=fast, fua=fua))

    async def _do_trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        await self._write(lambda member: member.trim(count, offset, fua=fua))

    async def _do_flush(self) -> None:
        mark = next(self._write_numbers)  # writes numbered below were in flight already
        await self._oldest_pending.wait_value(lambda oldest: oldest is None or oldest > mark)
        await self._least_busy().flush()

    async def _do_cache(self, count: int, offset: int) -> None:
        await self._least_busy().cache(count, offset)

    async def _do_block_status(self, count: int, offset: int) -> BlockStatus:
        return await self._least_busy().block_status_all(count, offset)


_SEVERITY = {State.CONNECTED: 0, State.CONNECTING_WAIT: 1, State.CONNECTING_NOWAIT: 2,
             State.QUIT: 3}


def _worst(states: Iterable[State]) -> State:
    return max(states, key=_SEVERITY.__getitem__)


@asynccontextmanager
async def open_multi(open_one: Callable[[], AbstractAsyncContextManager[NBDDevice]],
                     connections: int) -> AsyncIterator[MultiConnDevice]:
    """Open one device; when its server allows multi-conn, ``connections - 1`` more.

    Every extra connection must agree with the first about the export (size, flags,
    negotiated features and contexts); one that does not ends the open with a
    ConnectError naming the difference.
    """
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_one())
        if not first.info.can_multi_conn:
            yield MultiConnDevice([first], f"{connections} connections asked for, using 1: "
                                           "the server does not advertise multi-conn")
            return
        members = [first]
        for _ in range(connections - 1):
            member = await stack.enter_async_context(open_one())
            reason = incompatibility(first.info, member.info)
            if reason is not None:
                raise ConnectError(f"cannot open {first.address} with {connections} "
                                   f"connections: {reason}", errno=errno.EPROTO)
            members.append(member)
        yield MultiConnDevice(members)
