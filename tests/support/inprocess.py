"""The embedded server inside the test's own trio run, reached through memory streams.

Nothing waits for real I/O, so tests can use the autojump clock; ``kill()`` and
``restart()`` simulate a server process dying and coming back on the same storage.
"""

from __future__ import annotations

import errno
from typing import Awaitable, Callable, Sequence

import trio
import trio.testing

from blockdrv.server import Export, NBDServer

URI = "nbd+unix:///?socket=/in-process"


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
