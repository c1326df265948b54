"""The embedded server inside the test's own trio run, reached through memory streams.

Nothing waits for real I/O, so tests can use the autojump clock; ``kill()`` and
``restart()`` simulate a server process dying and coming back on the same storage.
:func:`serving` runs a server for the length of a ``with`` block and is the one way
tests run an in-process server: the driver connects through :meth:`InProcessServer.connect`
(a stream factory for ``open_nbd``), protocol-level tests through
:meth:`InProcessServer.client` (a negotiated test client) or :meth:`InProcessServer.raw`.
``lockstep=True`` gives a client whose stream has no buffer at all
(trio.testing.lockstep_stream_pair): the server's sends wait until the client reads, as
over a socket whose client stopped reading.  :func:`open_in_process` also opens a device.
"""

from __future__ import annotations

import errno
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import trio
import trio.testing

from blockdrv import open_nbd
from blockdrv.server import Export, MemoryBackend, NBDServer
from blockdrv.server.connection import ServerConnection
from blockdrv.util.units import MiB
from support.client import AsyncClient
from support.raw import RawClient

URI = "nbd+unix:///?socket=/in-process"


class InProcessServer:
    def __init__(self, nursery: trio.Nursery,
                 exports: NBDServer | Export | Sequence[Export],
                 **server_options: object) -> None:
        self.nursery = nursery
        if isinstance(exports, NBDServer):
            self.server = exports
            self.exports = list(exports.config.exports.values())
        else:
            self.exports = [exports] if isinstance(exports, Export) else list(exports)
            self.server = NBDServer(self.exports, **server_options)  # type: ignore[arg-type]
        self.server_options = server_options
        self.up = True
        self.connections = 0
        self.accepted = trio.Event()  # set on each accepted connection (then renewed)
        self.streams: list[trio.abc.Stream] = []  # what wrapped_connect() handed out
        self.connection_of: dict[int, ServerConnection] = {}  # by id() of a test client
        self._known: set[ServerConnection] = set()

    async def client(self, negotiate: bool = True, *, lockstep: bool = False,
                     **negotiate_args: object) -> AsyncClient:
        """A protocol-level test client, negotiated unless ``negotiate=False``."""
        client = AsyncClient(await self._client_stream(lockstep, None))
        self._name(client)
        if negotiate:
            await client.negotiate(**negotiate_args)
        return client

    async def raw(self, *, lockstep: bool = False,
                  wrap: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None
                  ) -> RawClient:
        """A raw client (nothing sent yet); ``wrap`` wraps the server's side."""
        stream = await self._client_stream(lockstep, wrap)
        client = RawClient(stream, stream)
        self._name(client)
        return client

    async def _client_stream(self, lockstep: bool,
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

    async def connect(self) -> trio.abc.Stream:
        """The stream factory for open_nbd(stream_factory=...)."""
        await trio.lowlevel.checkpoint()
        if not self.up:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        client, server_side = trio.testing.memory_stream_pair()
        return self._serve(client, server_side)

    async def connect_socket(self) -> trio.abc.Stream:
        """A stream factory over a real socket pair: the client's raw-socket paths
        (reads and sends that do not wait while the kernel has data or room) run."""
        await trio.lowlevel.checkpoint()
        if not self.up:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        a, b = trio.socket.socketpair()
        return self._serve(trio.SocketStream(a), trio.SocketStream(b))

    def _serve(self, client: trio.abc.Stream, server_side: trio.abc.Stream) -> trio.abc.Stream:
        self.nursery.start_soon(self.server.handle_stream, server_side)
        self.connections += 1
        self.accepted.set()
        self.accepted = trio.Event()
        return client

    def wrapped_connect(self, wrap: Callable[[trio.abc.Stream], trio.abc.Stream]
                        ) -> Callable[[], Awaitable[trio.abc.Stream]]:
        """A stream factory handing out ``wrap(stream)``; each is kept in ``streams``."""
        async def connect() -> trio.abc.Stream:
            stream = wrap(await self.connect())
            self.streams.append(stream)
            return stream
        return connect

    def kill(self) -> None:
        """The server dies: connections drop, new ones are refused."""
        self.up = False
        self.server.kill()

    def restart(self, **server_options: object) -> None:
        """A new server process on the same exports (their data is kept)."""
        self.server = NBDServer(self.exports, **{**self.server_options, **server_options})  # type: ignore[arg-type]
        self.up = True

    async def restart_after(self, seconds: float) -> None:
        """restart() after ``seconds``: for autojump_clock tests, where that is virtual."""
        await trio.sleep(seconds)
        self.restart()


@asynccontextmanager
async def serving(exports: NBDServer | Export | Sequence[Export],
                  **server_options: object) -> AsyncIterator[InProcessServer]:
    """An InProcessServer (on a server, or a new one on ``exports``) for the length of the
    block; the server is then killed and its nursery cancelled.  ``srv.nursery`` can run
    the server side of a test's own stream factory."""
    async with trio.open_nursery() as nursery:
        srv = InProcessServer(nursery, exports, **server_options)
        yield srv
        srv.server.kill()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_in_process(export: Export | None = None, *,
                          server_options: dict[str, object] | None = None,
                          wrap: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None,
                          sockets: bool = False,
                          **options: Any) -> AsyncIterator[tuple[Any, InProcessServer]]:
    """A server on ``export`` (default: 8 MiB in memory) and a device open on it, with
    open_nbd ``options``; yields (device, server).  ``wrap``: see wrapped_connect();
    ``sockets``: real socket pairs instead of memory streams (see connect_socket())."""
    async with serving(export or Export("", MemoryBackend(8 * MiB)),
                       **(server_options or {})) as srv:
        connect = srv.connect_socket if sockets else srv.connect
        if wrap is not None:
            connect = srv.wrapped_connect(wrap)
        async with open_nbd(URI, stream_factory=connect, **options) as dev:
            yield dev, srv


def disk(size: int = 8 * MiB, *, name: str = "", **kw: Any) -> Export:
    """A memory export: the tests' one export factory (``kw``: Export's options)."""
    return Export(name, MemoryBackend(size), **kw)


async def wait_until_waiting(dev: Any, count: int) -> None:
    """Until ``count`` requests are in flight and everything has settled."""
    await dev.in_flight.wait_value(lambda n: n >= count)
    await trio.testing.wait_all_tasks_blocked()
