"""BlockNode: the interface every block node offers, and its provider port.

Theory of operation
-------------------
A node's public I/O methods (``pread``, ``pread_into``, ``pwrite``, ``zero``, ``trim``,
``flush``, ``cache``, ``block_status``) are its *provider port*, as in FreeBSD GEOM.  A
request entering the port:

1. waits while the node is drained (new requests never fail, they wait);
2. counts in :attr:`BlockNode.in_flight` until it returns;
3. is *routed*: to the top proxy inserted on this port, if any (seed 003: "g_io_request()
   finds that port pp has a proxy attached to it, and immediately redirects the requests
   to the proxy"); else to the node this one was replaced by, if any; else to the
   node's own implementation (the ``_do_*`` methods a subclass provides).

A proxy reaches the node below it through a :class:`Bypass`, which calls the node's own
implementation directly: the proxy's requests are not redirected back to it, and they
skip the drain gate (they belong to requests already admitted at the port, so making
them wait for the drain would deadlock it).  Requests running in a node's own
implementation, from the port or from a bypass, count in ``_executing``.

``drained()`` closes the gate, waits until nothing is in flight through the port and
nothing executes in the node, then drains the node's :meth:`children` (composition down
the graph), and reopens the gate when the section ends.  Drains nest (a counter) and
never cancel or fail anything.  The graph changes of :mod:`blockdrv.block.graph` edit
the routing (:meth:`BlockNode.push_proxy`, :meth:`~BlockNode.pull_proxy`,
:meth:`~BlockNode.redirect`) inside such a section; the node refuses an edit outside one.

The section's *owner* (the task that entered it) can still do I/O: through the
:class:`DrainedSection` handle the section yields, whose calls pass the gates of the
node and of the nodes drained with it (a context variable marks the owner's calls for
the length of each call, so the mark follows them down the graph).  The owner calling
the node directly would wait at its own gate forever; that fails at once with
:class:`~blockdrv.protocol.errors.DeadlockError` instead.  Other tasks wait as usual.

This module sits below both the NBD driver and the block graph: the driver's
:class:`~blockdrv.nbd.NBDDevice` is a BlockNode, and filters are too.
"""

from __future__ import annotations

import abc
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping, NamedTuple, Protocol, Sequence

import trio

from ..protocol.constants import BASE_ALLOCATION, StateFlag
from ..protocol.errors import DeadlockError, InvalidArgumentError, UnsupportedError
from ..util.count import Count

if TYPE_CHECKING:
    from ..protocol.export import ExportInfo


class Extent(NamedTuple):
    """A run of the export with the same status flags, in one metadata context.

    ``hole`` and ``zero`` read the flags as base:allocation defines them, ``dirty`` as
    a ``qemu:dirty-bitmap:`` context does (bit 0); ask them of extents of that context.
    """

    offset: int
    length: int
    flags: int

    @property
    def hole(self) -> bool:
        """base:allocation: the range is not allocated (reads may still be non-zero)."""
        return bool(self.flags & StateFlag.HOLE)

    @property
    def zero(self) -> bool:
        """base:allocation: the range reads as zeroes."""
        return bool(self.flags & StateFlag.ZERO)

    @property
    def dirty(self) -> bool:
        """qemu:dirty-bitmap:NAME: the range changed since the bitmap was started."""
        return bool(self.flags & 1)


@dataclass(frozen=True)
class BlockRange:
    """A run of the export over which every context asked about keeps its flags: what
    :meth:`BlockNode.extents` yields (allocation and dirty bits together, as
    ovirt-imageio's ``extents(dirty=True)`` gives them)."""

    offset: int
    length: int
    flags: Mapping[str, int]  # context name -> that context's flags here

    @property
    def hole(self) -> bool:
        """Not allocated (base:allocation; False if that context was not asked about)."""
        return bool(self.flags.get(BASE_ALLOCATION, 0) & StateFlag.HOLE)

    @property
    def zero(self) -> bool:
        """Reads as zeroes (base:allocation; False if it was not asked about)."""
        return bool(self.flags.get(BASE_ALLOCATION, 0) & StateFlag.ZERO)

    @property
    def dirty(self) -> bool:
        """Changed, in any ``qemu:dirty-bitmap:`` context asked about."""
        return any(flags & 1 for name, flags in self.flags.items()
                   if name.startswith(DIRTY_BITMAP_PREFIX))

    @property
    def end(self) -> int:
        """The offset just past the range."""
        return self.offset + self.length


BlockStatus = dict[str, list[Extent]]
"""Every negotiated context's extents over one range, by context name."""

BLOCK_STATUS_WINDOW = 1 << 30
"""Bytes asked about per BLOCK_STATUS request (servers answer the whole window or less;
nbdkit 1.32 aborts on a request of 4 GiB - 1)."""

DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"


_SECTION_IO: ContextVar[bool] = ContextVar("blockdrv_drained_section_io", default=False)
"""True while a drained section's owner does I/O through the section's handle."""


class IO(Protocol):
    """The I/O methods a port routes to (a node, a proxy, or a bypass)."""

    async def pread_into(self, buf: bytearray | memoryview, offset: int, *,
                         holes: list[tuple[int, int]] | None = None) -> None: ...
    async def pwrite(self, buf: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None: ...
    async def zero(self, count: int, offset: int, *, may_trim: bool = True,
                   fast: bool = False, fua: bool = False) -> None: ...
    async def trim(self, count: int, offset: int, *, fua: bool = False) -> None: ...
    async def flush(self) -> None: ...
    async def cache(self, count: int, offset: int) -> None: ...
    async def block_status_all(self, count: int, offset: int) -> BlockStatus: ...


class BlockNode(abc.ABC):
    """A block device node: the same I/O methods as NBDDevice, plus ``drained()``.

    Subclasses implement ``size``, ``info`` and the ``_do_*`` methods; the public
    methods add the port behaviour described in the module docstring.
    """

    def __init__(self) -> None:
        self.in_flight = Count(0)  # through the port, until they return
        self._executing = Count(0)  # inside this node's own implementation
        self._drains = Count(0)
        self._drain_owners: list[trio.lowlevel.Task] = []  # tasks inside drained()
        self._proxies: list[BlockNode] = []  # inserted on this port, bottom first
        self._replacement: BlockNode | None = None
        self._own = _Own(self)

    # --- what subclasses provide ---------------------------------------------------------

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size in bytes."""

    @property
    @abc.abstractmethod
    def info(self) -> ExportInfo:
        """The export this node presents (flags, block sizes, contexts)."""

    def children(self) -> Sequence[BlockNode]:
        """Nodes this one sends requests to (drained along with it)."""
        return ()

    # The _do_* methods take exactly the arguments of the public methods.

    @abc.abstractmethod
    async def _do_pread_into(self, buf: memoryview, offset: int,
                             holes: list[tuple[int, int]] | None = None) -> None: ...

    @abc.abstractmethod
    async def _do_pwrite(self, buf: memoryview, offset: int, *, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def _do_zero(self, count: int, offset: int, *, may_trim: bool = True,
                       fast: bool = False, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def _do_trim(self, count: int, offset: int, *, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def _do_flush(self) -> None: ...

    @abc.abstractmethod
    async def _do_cache(self, count: int, offset: int) -> None: ...

    @abc.abstractmethod
    async def _do_block_status(self, count: int, offset: int) -> BlockStatus:
        """Every negotiated context's extents, each covering exactly the range."""

    # --- the port ---------------------------------------------------------------------

    async def _gate(self) -> None:
        """Wait while the node is drained (called only while it is); the section's
        owner passes with its handle, and fails at once without it."""
        while self._drains.value:  # re-check: a new drain may start as one ends
            if self._drain_owners and trio.lowlevel.current_task() in self._drain_owners:
                if _SECTION_IO.get():
                    return
                raise DeadlockError(
                    f"I/O on {self!r} from inside its own drained section would wait "
                    "forever; do it through the section's handle: "
                    "`async with node.drained() as io: await io.pread(...)`")
            await self._drains.wait_value(0)

    @property
    def draining(self) -> bool:
        """A drained section of this node is active (new requests wait)."""
        return bool(self._drains.value)

    async def wait_draining(self) -> None:
        """Wait until a drained section of this node is active.

        Raises: nothing (cancellation only).
        """
        await self._drains.wait_value(lambda drains: drains > 0)

    @property
    def filters(self) -> tuple[BlockNode, ...]:
        """The filters inserted on this node's port, bottom first."""
        return tuple(self._proxies)

    @property
    def replacement(self) -> BlockNode | None:
        """The node this one's I/O goes to instead of its own code (None: its own)."""
        return self._replacement

    # The three edits of the port's routing, for blockdrv.block.graph, which calls them
    # inside a drained section of this node (checked: outside one they would race with
    # requests being routed).

    def _require_drained(self, edit: str) -> None:
        if not self._drains.value:
            raise RuntimeError(f"{edit} on {self!r} outside a drained section")

    def push_proxy(self, proxy: BlockNode) -> BlockNode | Bypass:
        """Route this port's I/O to ``proxy`` from now on; returns the node ``proxy``
        must send its own requests to (the proxy below it, or this node's bypass)."""
        self._require_drained("inserting a proxy")
        below = self._proxies[-1] if self._proxies else self.bypass()
        self._proxies.append(proxy)
        return below

    def pull_proxy(self, proxy: BlockNode) -> BlockNode | None:
        """Take ``proxy`` off this port; returns the proxy that was right above it
        (which must now send to what ``proxy`` sent to), or None when it was the top."""
        self._require_drained("removing a proxy")
        index = self._proxies.index(proxy)
        above = self._proxies[index + 1] if index + 1 < len(self._proxies) else None
        del self._proxies[index]
        return above

    def redirect(self, target: BlockNode | None) -> None:
        """Send what reaches this node's own code to ``target`` (None: undo)."""
        self._require_drained("replacing a node")
        self._replacement = target

    @asynccontextmanager
    async def _entry(self) -> AsyncIterator[IO]:
        """Wait at the drain gate, count the request, yield where to route it."""
        if self._drains.value:
            await self._gate()
        self.in_flight.value += 1
        try:
            route = self._route()
            yield self._own if route is None else route
        finally:
            self.in_flight.value -= 1

    async def pread(self, count: int, offset: int) -> bytes:
        """Read ``count`` bytes at ``offset``.

        Raises:
            InvalidArgumentError: a bad range or buffer, or flags the export refuses.
            UnsupportedError: the export does not offer the command.
            RequestError: the server answered with an error (its errno).
            ConnectionLostError: the connection was lost and not back within
                ``reconnect_delay`` (EBADF: the device is closed).
            ProtocolError: the server broke the protocol (the device is dead).
            DeadlockError: called from inside the node's own drained section.
        """
        if count < 0 or offset < 0 or offset + count > self.size:
            raise InvalidArgumentError(
                f"read of {count} bytes at {offset} is outside the export ({self.size})")
        buf = bytearray(count)
        await self.pread_into(buf, offset)
        return bytes(buf)

    def _route(self) -> IO | None:
        """Where port calls go: the top proxy, the replacement, or None (own code)."""
        if self._proxies:
            return self._proxies[-1]
        return self._replacement

    async def pread_into(self, buf: bytearray | memoryview, offset: int, *,
                         holes: list[tuple[int, int]] | None = None) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``.

        ``holes``: a list to which the (offset, length) of every range that came as a
        hole (zeroes without data, e.g. an NBD OFFSET_HOLE chunk) is appended.

        Raises: as :meth:`pread`.
        """
        if self._drains.value:
            await self._gate()
        in_flight = self.in_flight
        in_flight.add(1)
        try:
            route = self._route()
            if route is None:  # the common case, kept short
                view = memoryview(buf).cast("B")
                if view.readonly:
                    raise InvalidArgumentError("pread_into needs a writable buffer")
                await self._do_pread_into(view, offset, holes)
            else:
                await route.pread_into(buf, offset, holes=holes)
        finally:
            in_flight.add(-1)

    async def pwrite(self, buf: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        """Write ``buf`` at ``offset``; ``buf`` must not change until this returns.

        Raises: as :meth:`pread`.
        """
        if self._drains.value:
            await self._gate()
        in_flight = self.in_flight
        in_flight.add(1)
        try:
            route = self._route()
            if route is None:
                await self._do_pwrite(memoryview(buf).cast("B"), offset, fua=fua)
            else:
                await route.pwrite(buf, offset, fua=fua)
        finally:
            in_flight.add(-1)

    async def zero(self, count: int, offset: int, *, may_trim: bool = True,
                   fast: bool = False, fua: bool = False) -> None:
        """Write zeroes (``may_trim=False``: keep allocated; ``fast``: only if cheap).

        Raises: as :meth:`pread`.
        """
        async with self._entry() as route:
            await route.zero(count, offset, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        """Discard a range (its contents become unspecified).

        Raises: as :meth:`pread`.
        """
        async with self._entry() as route:
            await route.trim(count, offset, fua=fua)

    async def flush(self) -> None:
        """Make every completed write durable.

        Raises: as :meth:`pread`.
        """
        async with self._entry() as route:
            await route.flush()

    async def cache(self, count: int, offset: int) -> None:
        """Prefetch a range.

        Raises: as :meth:`pread`.
        """
        async with self._entry() as route:
            await route.cache(count, offset)

    async def block_status_all(self, count: int, offset: int) -> BlockStatus:
        """Every negotiated context's extents covering the range, in order, by context
        name: all of what the server said, from one reply per window
        (:data:`BLOCK_STATUS_WINDOW`), each context cut to the part all of them
        describe.

        Raises:
            UnsupportedError: the export offers no block status.
            InvalidArgumentError: a bad range.
        """
        async with self._entry() as route:
            return await route.block_status_all(count, offset)

    async def block_status(self, count: int, offset: int, *,
                           context: str | None = None) -> list[Extent]:
        """Extents of one ``context`` covering the range, in order.

        ``context`` may be left out only when base:allocation is the one context that
        was negotiated: with others (``open_nbd(meta_contexts=...)``) say which, or use
        :meth:`block_status_all` or :meth:`extents`, which return them all.

        Raises:
            InvalidArgumentError: ``context`` was not negotiated (the message names the
                ones that were), or was left out while several were; a bad range.
            UnsupportedError: the export offers no block status.
        """
        name = self.pick_context(context)
        return (await self.block_status_all(count, offset))[name]

    def pick_context(self, context: str | None) -> str:
        """The negotiated context ``context`` names (None: the only one); see
        :meth:`block_status` for the errors."""
        negotiated = list(self.info.contexts)
        if not negotiated:
            raise UnsupportedError("no metadata context was negotiated: the server does "
                                   "not offer block status")
        if context is None:
            if len(negotiated) > 1:
                raise InvalidArgumentError(
                    f"several metadata contexts were negotiated ({', '.join(negotiated)}): "
                    "say which with context=..., or use block_status_all() or extents() "
                    "for all of them")
            return negotiated[0]
        if context not in self.info.contexts:
            raise InvalidArgumentError(f"meta context {context!r} was not negotiated "
                                       f"(negotiated: {', '.join(negotiated)}; ask for it "
                                       "with open_nbd(meta_contexts=[...]))")
        return context

    async def extents(self, offset: int = 0, length: int | None = None, *,
                      contexts: Sequence[str] | None = None,
                      window: int = BLOCK_STATUS_WINDOW) -> AsyncIterator[BlockRange]:
        """The export from ``offset`` (``length`` bytes, default to the end) as ranges
        over which every one of ``contexts`` (default: all negotiated) keeps its flags,
        adjacent equal ranges merged, in order.  One block status request per
        ``window``; nothing is held beyond one window's extents.

        Raises: as :meth:`block_status`.
        """
        names = list(self.info.contexts) if contexts is None else \
            [self.pick_context(name) for name in contexts]
        if not names:
            self.pick_context(None)  # raises: no context at all
        end = self.size if length is None else offset + length
        pending: BlockRange | None = None
        pos = offset
        while pos < end:
            n = min(window, end - pos)
            reply = await self.block_status_all(n, pos)
            for block in _combine(pos, n, {name: reply[name] for name in names}):
                if pending is not None and pending.flags == block.flags:
                    pending = BlockRange(pending.offset, pending.length + block.length,
                                         block.flags)
                    continue
                if pending is not None:
                    yield pending
                pending = block
            pos += n
        if pending is not None:
            yield pending

    # --- drained sections -------------------------------------------------------------

    @asynccontextmanager
    async def drained(self) -> AsyncIterator[DrainedSection]:
        """No request through this node: new ones wait, in-flight ones finish.

        Drains this node's children too; never cancels or fails a request; nests.
        Yields a :class:`DrainedSection`: the owner's own I/O goes through it.
        """
        owner = trio.lowlevel.current_task()
        self._drains.value += 1
        self._drain_owners.append(owner)
        try:
            await self.in_flight.wait_value(0)
            await self._executing.wait_value(0)
            async with AsyncExitStack() as stack:
                for child in self._below():
                    await stack.enter_async_context(child.drained())
                yield DrainedSection(self)
        finally:
            self._drains.value -= 1
            self._drain_owners.remove(owner)

    def _below(self) -> Sequence[BlockNode]:
        """Where this node's own requests go: its replacement, or its children."""
        return [self._replacement] if self._replacement is not None else self.children()

    def bypass(self) -> Bypass:
        """This node's own implementation, without its port (for a proxy above it)."""
        return Bypass(self)


class _Calls:
    """The I/O methods of a port, each one call of ``_call(method, *args)``: the router
    classes below differ only in where that goes."""

    __slots__ = ("node",)

    def __init__(self, node: Any) -> None:
        self.node = node

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def pread(self, count: int, offset: int) -> bytes:
        """Read ``count`` bytes at ``offset``.

        Raises: as :meth:`BlockNode.pread`.
        """
        buf = bytearray(count)
        await self.pread_into(buf, offset)
        return bytes(buf)

    async def pread_into(self, buf: bytearray | memoryview, offset: int, *,
                         holes: list[tuple[int, int]] | None = None) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (``holes``: see
        :meth:`BlockNode.pread_into`).

        Raises: as :meth:`BlockNode.pread`.
        """
        await self._call("pread_into", buf, offset, holes=holes)

    async def pwrite(self, buf: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        """Write ``buf`` at ``offset``.

        Raises: as :meth:`BlockNode.pread`.
        """
        await self._call("pwrite", buf, offset, fua=fua)

    async def zero(self, count: int, offset: int, *, may_trim: bool = True,
                   fast: bool = False, fua: bool = False) -> None:
        """Write zeroes.

        Raises: as :meth:`BlockNode.pread`.
        """
        await self._call("zero", count, offset, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        """Discard a range.

        Raises: as :meth:`BlockNode.pread`.
        """
        await self._call("trim", count, offset, fua=fua)

    async def flush(self) -> None:
        """Make every completed write durable.

        Raises: as :meth:`pread`.
        """
        await self._call("flush")

    async def cache(self, count: int, offset: int) -> None:
        """Prefetch a range.

        Raises: as :meth:`pread`.
        """
        await self._call("cache", count, offset)

    async def block_status_all(self, count: int, offset: int) -> BlockStatus:
        """Every negotiated context's extents covering the range.

        Raises: as :meth:`BlockNode.block_status_all`.
        """
        return await self._call("block_status_all", count, offset)  # type: ignore[no-any-return]

    async def block_status(self, count: int, offset: int, *,
                           context: str | None = None) -> list[Extent]:
        """Extents of one context (see :meth:`BlockNode.block_status`).

        Raises: as :meth:`BlockNode.block_status`.
        """
        name = self.pick_context(context)
        return (await self.block_status_all(count, offset))[name]

    def pick_context(self, context: str | None) -> str:
        """See :meth:`BlockNode.pick_context`."""
        return self.node.pick_context(context)  # type: ignore[no-any-return]


_OWN = {name: "_do_" + name for name in ("pread_into", "pwrite", "zero", "trim", "flush",
                                         "cache")}
_OWN["block_status_all"] = "_do_block_status"


class _Own(_Calls):
    """Routes port calls to the node's own ``_do_*`` implementation, counted."""

    __slots__ = ()
    node: BlockNode

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        node = self.node
        node._executing.value += 1
        try:
            return await getattr(node, _OWN[method])(*args, **kwargs)
        finally:
            node._executing.value -= 1

    async def pread_into(self, buf: bytearray | memoryview, offset: int, *,
                         holes: list[tuple[int, int]] | None = None) -> None:
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise InvalidArgumentError("pread_into needs a writable buffer")
        await self._call("pread_into", view, offset, holes=holes)

    async def pwrite(self, buf: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        await self._call("pwrite", memoryview(buf).cast("B"), offset, fua=fua)


class Bypass(_Own):
    """A node reached from the proxy right above it: its own implementation, or the
    port of the node it was replaced by.

    Looks like a node to the proxy: ``size``, ``info``, the I/O methods and
    ``drained()``, which waits only for what executes below this point (requests
    parked at the node's port are the proxy's own, and are drained through it).
    """

    __slots__ = ()

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        replacement = self.node.replacement
        if replacement is not None:
            return await getattr(replacement, method)(*args, **kwargs)
        return await super()._call(method, *args, **kwargs)

    @property
    def size(self) -> int:
        """The node's size."""
        return self.node.size

    @property
    def info(self) -> ExportInfo:
        """The node's export info."""
        return self.node.info

    @asynccontextmanager
    async def drained(self) -> AsyncIterator[DrainedSection]:
        """Drained section of what executes below this point (not the port)."""
        node = self.node
        await node._executing.wait_value(0)
        async with AsyncExitStack() as stack:
            for child in node._below():
                await stack.enter_async_context(child.drained())
            yield DrainedSection(self)

    def __repr__(self) -> str:
        return f"<Bypass of {self.node!r}>"


class DrainedSection(_Calls):
    """The owner's way in while a drained section is active: the node's I/O methods,
    passing the gates the section closed.

    ``async with node.drained() as io: await io.pread(4096, 0)``.  Only the task that
    entered the section may use it (other tasks wait at the gate as usual).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<DrainedSection of {self.node!r}>"

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        token = _SECTION_IO.set(True)
        try:
            return await getattr(self.node, method)(*args, **kwargs)
        finally:
            _SECTION_IO.reset(token)


def _combine(offset: int, length: int, runs: Mapping[str, list[Extent]]) -> list[BlockRange]:
    """Per-context extents over one range, cut at every context's boundaries: ranges in
    which each context keeps one value."""
    if not runs:
        return [BlockRange(offset, length, {})]
    cursors = {name: iter(extents) for name, extents in runs.items()}
    current = {name: next(cursor) for name, cursor in cursors.items()}
    end = offset + length
    pos = offset
    out: list[BlockRange] = []
    while pos < end:
        stop = min(min(e.offset + e.length for e in current.values()), end)
        out.append(BlockRange(pos, stop - pos,
                              {name: e.flags for name, e in current.items()}))
        pos = stop
        for name, extent in current.items():
            if extent.offset + extent.length <= pos < end:
                current[name] = next(cursors[name])
    return out
