"""The embedded server inside the test's own trio run, reached through memory streams.

Nothing waits for real I/O, so tests can use the autojump clock; ``kill()`` and
``restart()`` simulate a server process dying and coming back on the same storage.
:func:`serving` runs a server for the length of a ``with`` block, :func:`open_in_process`
also opens a device on it.
"""

from __future__ import annotations

import errno
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import trio
import trio.testing

from blockdrv import open_nbd
from blockdrv.server import Export, MemoryBackend, NBDServer

URI = "nbd+unix:///?socket=/in-process"
MiB = 1024 * 1024


class InProcessServer:
    def __init__(self, nursery: trio.Nursery, exports: Export | Sequence[Export],
                 **server_options: object) -> None:
        self.nursery = nursery
        self.exports = [exports] if isinstance(exports, Export) else list(exports)
        self.server_options = server_options
        self.server = NBDServer(self.exports, **server_options)  # type: ignore[arg-type]
        self.up = True
        self.connections = 0
        self.accepted = trio.Event()  # set on each accepted connection (then renewed)
        self.streams: list[trio.abc.Stream] = []  # what wrapped_connect() handed out

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
async def serving(exports: Export | Sequence[Export],
                  **server_options: object) -> AsyncIterator[InProcessServer]:
    """An InProcessServer for the length of the block (its nursery is then cancelled);
    ``srv.nursery`` can run the server side of a test's own stream factory."""
    async with trio.open_nursery() as nursery:
        yield InProcessServer(nursery, exports, **server_options)
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


def disk(size: int = 8 * MiB, **kw: Any) -> Export:
    """A memory export (the in-process tests' usual disk)."""
    return Export("", MemoryBackend(size), **kw)


async def wait_until_waiting(dev: Any, count: int) -> None:
    """Until ``count`` requests are in flight and everything has settled."""
    await dev.in_flight.wait_value(lambda n: n >= count)
    await trio.testing.wait_all_tasks_blocked()
