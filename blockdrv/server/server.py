"""The embedded NBD server: exports, listeners, connections, shutdown.

Theory of operation
-------------------
:class:`NBDServer` owns its exports and, while :meth:`NBDServer.serve` runs, a nursery
of connections and an accept loop per listener.  Each connection is a
:class:`~blockdrv.server.connection.ServerConnection` task; anything it raises ends that
connection only (and is logged), so one bad client never disturbs another.

Two ways to stop, as a real server dies in two ways:

- :meth:`shutdown` (SIGINT/SIGTERM in ``blockdrv serve``): stop accepting, let every
  connection finish the requests it already read and send their replies, then close;
  ``serve`` returns when all are done.
- :meth:`kill`: a simulated crash for tests: listeners and connections are shut down at
  once (clients see the connection drop and new connections refused) and nothing in
  progress is answered.

Servers can be served on Unix sockets, TCP ports, listeners handed over by systemd
socket activation, or, in tests, on any trio stream via :meth:`handle_stream`.
"""

from __future__ import annotations

import logging
import os
import random
import socket as _stdlib_socket
from typing import Iterable, Sequence

import trio
from trio_util import AsyncValue

from ..protocol.uri import NBDAddress
from ..tls import NO_TLS, TLSMode, TLSSettings
from ..transport import open_unix_listener, remove_socket_file, tune_socket
from .connection import ServerConnection
from .export import Export

log = logging.getLogger("blockdrv.server")


class NBDServer:
    """An NBD server with one or more exports (see the module docstring)."""

    def __init__(self, exports: Export | Sequence[Export], *, structured: bool = True,
                 extended: bool = True, shuffle_replies: bool = False,
                 seed: int | None = None, max_requests: int = 64, allow_list: bool = True,
                 default_export: str | None = None,
                 socket_buffer_size: int | None = None, tls: TLSSettings = NO_TLS) -> None:
        exports = [exports] if isinstance(exports, Export) else list(exports)
        if not exports:
            raise ValueError("a server needs at least one export")
        self.exports: dict[str, Export] = {}
        for export in exports:
            if export.name in self.exports:
                raise ValueError(f"two exports named {export.name!r}")
            self.exports[export.name] = export
        self.default_export = exports[0].name if default_export is None else default_export
        self.structured = structured
        self.extended = extended and structured
        self.shuffle_replies = shuffle_replies
        self.rng = random.Random(seed)
        self.max_requests = max_requests
        self.allow_list = allow_list
        self.socket_buffer_size = socket_buffer_size
        if tls.mode is not TLSMode.OFF and tls.context is None:
            raise ValueError("TLS needs a server SSL context (blockdrv.tls.server_context)")
        self.tls = tls  # REQUIRE: FORCEDTLS; ALLOW: the client chooses
        self.connections: set[ServerConnection] = set()
        self.listeners: list[trio.SocketListener] = []
        self.connections_served = 0
        self.requests_in_progress = AsyncValue(0)  # awaitable, e.g. wait_value(1)
        self.requests_served = 0
        self._accepting = trio.CancelScope()
        self._unix_paths: list[str] = []
        self._stopped = False

    def __repr__(self) -> str:
        return (f"<NBDServer exports={list(self.exports)} "
                f"connections={len(self.connections)}>")

    # --- serving ----------------------------------------------------------------------

    async def serve(self, listeners: Sequence[trio.SocketListener], *,
                    task_status: trio.TaskStatus[list[trio.SocketListener]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections on ``listeners`` until shutdown() or kill()."""
        self.listeners = list(listeners)
        try:
            async with trio.open_nursery() as connections:
                with self._accepting:
                    async with trio.open_nursery() as accepting:
                        for listener in self.listeners:
                            accepting.start_soon(self._accept_loop, listener, connections)
                        task_status.started(self.listeners)
                await self._close_listeners()
        finally:
            await self._close_listeners()

    async def serve_unix(self, path: str, *, task_status: trio.TaskStatus[
            list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on a Unix socket at ``path`` (replacing a stale socket file)."""
        listener = await open_unix_listener(path)
        self._unix_paths.append(path)
        await self.serve([listener], task_status=task_status)

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0, *,
                        task_status: trio.TaskStatus[list[trio.SocketListener]]
                        = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on a TCP port (0 picks a free one; see :attr:`addresses`)."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: "
                                     f"{exc.strerror or exc}") from None
        await self.serve(listeners, task_status=task_status)

    async def serve_sockets(self, socks: Iterable[_stdlib_socket.socket], *,
                            task_status: trio.TaskStatus[list[trio.SocketListener]]
                            = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on already listening sockets (e.g. from systemd socket activation)."""
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
        await self.serve(listeners, task_status=task_status)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str = "stream") -> None:
        """Serve one already connected stream (tests use memory streams)."""
        connection = ServerConnection(self, stream, peer)
        self.connections.add(connection)
        self.connections_served += 1
        try:
            await connection.run()
        except Exception:  # a bug must not take the server down with it
            log.exception("connection %s failed", peer)
        finally:
            self.connections.discard(connection)

    async def _accept_loop(self, listener: trio.SocketListener,
                           connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            except OSError as exc:  # EMFILE and friends: keep the listener alive
                log.warning("accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            tune_socket(stream.socket, buffer_size=self.socket_buffer_size)
            try:
                peer = str(stream.socket.getpeername()) or "unix"
            except OSError:
                peer = "unknown"
            connections.start_soon(self.handle_stream, stream, peer)

    # --- stopping ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful stop: no new connections; in-progress requests finish, then close."""
        self._accepting.cancel()
        for connection in list(self.connections):
            connection.stop()

    def kill(self) -> None:
        """Abrupt stop (a simulated crash): every socket is shut down at once."""
        self._accepting.cancel()
        for listener in self.listeners:
            try:
                listener.socket.shutdown(_stdlib_socket.SHUT_RDWR)
            except OSError:
                pass
        self._unlink_paths()
        for connection in list(self.connections):
            connection.kill()

    def _unlink_paths(self) -> None:
        for path in self._unix_paths:
            remove_socket_file(path)
        self._unix_paths.clear()

    async def _close_listeners(self) -> None:
        for listener in self.listeners:
            await listener.aclose()
        self._unlink_paths()

    # --- addresses --------------------------------------------------------------------

    @property
    def addresses(self) -> list[NBDAddress]:
        """Where the server listens, for the default export (one per listener)."""
        out = []
        for listener in self.listeners:
            name = listener.socket.getsockname()
            if listener.socket.family == _stdlib_socket.AF_UNIX:
                path = os.fsdecode(name) if isinstance(name, bytes) else name
                out.append(NBDAddress(transport="unix", socket=path,
                                      export=self.default_export))
            else:
                out.append(NBDAddress(transport="tcp", host=name[0], port=name[1],
                                      export=self.default_export))
        return out

    def close(self) -> None:
        """Release the exports' backends (files are closed)."""
        for export in self.exports.values():
            export.backend.close()
