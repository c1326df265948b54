"""The embedded server in the test's trio run, with test clients on in-memory streams.

Nothing waits for real I/O, so tests can use the autojump clock.  ``lockstep=True`` gives
a client whose stream has no buffer at all (trio.testing.lockstep_stream_pair): the
server's sends wait until the client reads, as over a socket whose client stopped
reading.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Protocol

import trio
import trio.testing

from blockdrv.protocol import ReadData, ReadHole
from blockdrv.server import Backend, FileBackend, MemoryBackend, NBDServer
from blockdrv.server.connection import ServerConnection
from support.client import AsyncClient
from support.raw import RawClient

MiB = 1024 * 1024


STORE_KINDS = ["memory", "file"]


@contextmanager
def open_store(kind: str, directory: Path) -> Iterator[Backend]:
    """An 8 MiB backend of a kind in STORE_KINDS, closed afterwards."""
    backend: Backend
    if kind == "file":
        backend = FileBackend(directory / "x.img", size=8 * MiB, create=True)
    else:
        backend = MemoryBackend(8 * MiB)
    try:
        yield backend
    finally:
        backend.close()


class Connect(Protocol):
    async def __call__(self, negotiate: bool = True, *, lockstep: bool = False,
                       **negotiate_args: object) -> AsyncClient: ...


class ServerRig:
    """A running server; :meth:`connect` gives clients, :attr:`connection_of` the
    server side of each."""

    def __init__(self, server: NBDServer, nursery: trio.Nursery) -> None:
        self.server = server
        self.nursery = nursery
        self.connection_of: dict[int, ServerConnection] = {}  # by id() of the client
        self._known: set[ServerConnection] = set()

    async def connect(self, negotiate: bool = True, *, lockstep: bool = False,
                      **negotiate_args: object) -> AsyncClient:
        client_side = await self._start(lockstep, None)
        client = AsyncClient(client_side)
        self._name(client)
        if negotiate:
            await client.negotiate(**negotiate_args)
        return client

    async def raw(self, *, lockstep: bool = False,
                  wrap: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None
                  ) -> RawClient:
        """A raw client (nothing sent yet); ``wrap`` wraps the server's side."""
        client_side = await self._start(lockstep, wrap)
        client = RawClient(client_side, client_side)
        self._name(client)
        return client

    async def _start(self, lockstep: bool,
                     wrap: Callable[[trio.abc.Stream], trio.abc.Stream] | None
                     ) -> trio.abc.Stream:
        pair = trio.testing.lockstep_stream_pair if lockstep \
            else trio.testing.memory_stream_pair
        client_side, server_side = pair()
        self._known = set(self.server.connections)
        self.nursery.start_soon(self.server.handle_stream,
                                server_side if wrap is None else wrap(server_side))
        await trio.testing.wait_all_tasks_blocked()  # the server has taken it (or not)
        return client_side

    def _name(self, client: object) -> None:
        new = self.server.connections - self._known
        if new:
            (self.connection_of[id(client)],) = new


@asynccontextmanager
async def serving(server: NBDServer) -> AsyncIterator[Connect]:
    """Run ``server``; yield ``connect(negotiate=True, lockstep=False, **negotiate_args)``
    giving clients (see :class:`ServerRig` for the server side of each)."""
    async with rig_for(server) as rig:
        yield rig.connect


@asynccontextmanager
async def rig_for(server: NBDServer) -> AsyncIterator[ServerRig]:
    """A :class:`ServerRig` for the length of the block; the server is then killed."""
    async with trio.open_nursery() as nursery:
        rig = ServerRig(server, nursery)
        yield rig
        server.kill()
        nursery.cancel_scope.cancel()


async def read_reply(client: AsyncClient, cookie: int, offset: int, count: int) -> bytes:
    """The data of a READ reply (request ``count`` bytes at ``offset``) sent earlier."""
    buf = bytearray(count)
    events = await client.wait(cookie)
    if events[-1].error is not None:
        raise events[-1].error
    for event in events:
        if isinstance(event, ReadData):
            buf[event.offset - offset:event.offset - offset + len(event.data)] = event.data
        elif isinstance(event, ReadHole):
            buf[event.offset - offset:event.offset - offset + event.length] = bytes(
                event.length)
    return bytes(buf)
