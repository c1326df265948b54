"""The embedded NBD server: exports, listeners, connections, shutdown.

Theory of operation
-------------------
:class:`NBDServer` owns its exports and, while :meth:`NBDServer.serve` runs, a nursery
of connections and an accept loop per listener.  Each connection is a
:class:`~blockdrv.server.connection.ServerConnection` task, given the server's
:class:`~blockdrv.server.config.ServerConfig` and counters (never the server); anything
it raises ends that connection only (and is logged), so one bad client never disturbs
another.

What many clients can make the server hold is bounded:

- at most ``max_connections`` connections at once (handshakes included); a connection
  beyond that is closed as soon as it is accepted, before the server says anything
  (warned about at most once a minute).
  The NBD handshake has no way to refuse before the client's first option, and
  answering that option would mean holding the socket (and a task) for a client the
  server has no room for, which is what the limit is there to prevent; the client sees
  the connection closed at once, and a reconnecting client retries;
- a connection that has not finished its handshake after ``handshake_timeout`` seconds
  is closed, so idle sockets cannot keep file descriptors;
- when ``accept`` fails (for want of resources above all: EMFILE, ENFILE, ENOBUFS,
  ENOMEM) the accept loop waits for a connection to close, or a delay that doubles up
  to 2 s when the shortage is the system's, before it tries again; it warns at most
  once a minute (with the count of failures), so it never spins or floods the log.

Two ways to stop, as a real server dies in two ways:

- :meth:`shutdown` (SIGINT/SIGTERM in ``blockdrv serve``): stop accepting, let every
  connection finish the requests it already read and send their replies, then close;
  a connection still busy after ``shutdown_timeout`` seconds (a client that does not
  read its replies) is closed anyway; ``serve`` returns when all are done.
- :meth:`kill`: a simulated crash for tests: listeners and connections are shut down at
  once (clients see the connection drop and new connections refused) and nothing in
  progress is answered.

Servers can be served on Unix sockets, TCP ports, listeners handed over by systemd
socket activation, or, in tests, on any trio stream via :meth:`handle_stream` (or any
``trio.abc.Listener``).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket as _stdlib_socket
from dataclasses import dataclass
from typing import Iterable, Sequence

import trio
from trio_util import AsyncValue

from ..io.tls import NO_TLS, TLSMode, TLSSettings
from ..io.transport import open_unix_listener, remove_socket_file, tune_socket
from ..protocol.uri import NBDAddress
from .config import DEFAULT_BUFFER_BUDGET, ServerConfig, ServerCounters
from .connection import ServerConnection
from .export import Export

log = logging.getLogger("blockdrv.server")

Listener = trio.abc.Listener[trio.abc.Stream]
Started = trio.TaskStatus[list[Listener]]  # serve() reports the listeners it serves on

OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
DEFAULT_SOCKET_BUFFER = 2 * 1024 * 1024
"""SO_SNDBUF/SO_RCVBUF of accepted connections (the kernel caps it at wmem_max): a
reply of a few hundred KiB then leaves in one system call, not in several with a wait
for the client in between (+20 % for nbdcopy here)."""
ACCEPT_BACKOFF = (0.1, 2.0)  # first and longest wait after a failed accept
REPORT_INTERVAL = 60  # seconds between two warnings of one kind (accept, limit)


class _RateLimit:
    """Says when a repeated warning is due again: at most once every ``interval``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last: float | None = None

    def due(self) -> bool:
        now = trio.current_time()
        if self.last is not None and now - self.last < self.interval:
            return False
        self.last = now
        return True


@dataclass(frozen=True)
class ServerStatistics:
    """A snapshot of :meth:`NBDServer.statistics`."""

    connections: int
    handshakes: int
    requests_in_progress: int
    connections_served: int
    connections_refused: int
    requests_served: int
    bytes_held: int


class NBDServer:
    """An NBD server with one or more exports (see the module docstring).

    ``max_requests`` requests of a connection are processed at once; ``buffer_budget``
    bytes is what one connection may make the server hold (WRITE payloads received and
    replies not yet sent; see :class:`~blockdrv.server.config.ServerConfig`);
    ``max_connections`` connections are served at once; ``handshake_timeout`` is how
    long a client may take to enter transmission and ``shutdown_timeout`` how long
    :meth:`shutdown` lets connections finish what they started.  Accepted sockets get
    ``socket_buffer_size`` send and receive buffers (None: the system's default).
    """

    def __init__(self, exports: Export | Sequence[Export], *, structured: bool = True,
                 extended: bool = True, shuffle_replies: bool = False,
                 seed: int | None = None, max_requests: int = 64, allow_list: bool = True,
                 default_export: str | None = None,
                 socket_buffer_size: int | None = DEFAULT_SOCKET_BUFFER,
                 tls: TLSSettings = NO_TLS,
                 buffer_budget: int = DEFAULT_BUFFER_BUDGET, max_connections: int = 128,
                 handshake_timeout: float = 10.0, shutdown_timeout: float = 5.0) -> None:
        exports = [exports] if isinstance(exports, Export) else list(exports)
        if not exports:
            raise ValueError("a server needs at least one export")
        by_name: dict[str, Export] = {}
        for export in exports:
            if export.name in by_name:
                raise ValueError(f"two exports named {export.name!r}")
            by_name[export.name] = export
        if tls.mode is not TLSMode.OFF and tls.context is None:
            raise ValueError("TLS needs a server SSL context (blockdrv.tls.server_context)")
        if max_connections < 1:
            raise ValueError("max_connections must be positive")
        self.config = ServerConfig(
            exports=by_name,
            default_export=exports[0].name if default_export is None else default_export,
            structured=structured, extended=extended and structured, allow_list=allow_list,
            tls=tls,  # REQUIRE: FORCEDTLS; ALLOW: the client chooses
            shuffle_replies=shuffle_replies, max_requests=max_requests,
            buffer_budget=buffer_budget, handshake_timeout=handshake_timeout,
            shutdown_timeout=shutdown_timeout)
        self.counters = ServerCounters()
        self.max_connections = max_connections
        self.socket_buffer_size = socket_buffer_size
        self.rng = random.Random(seed)
        self.connections: set[ServerConnection] = set()
        self.open_connections = AsyncValue(0)  # len(connections), awaitable
        self.connections_refused = 0
        self.listeners: list[Listener] = []
        self._accepting = trio.CancelScope()
        self._unix_paths: list[str] = []
        self._limit_report = _RateLimit(REPORT_INTERVAL)
        self._accept_report = _RateLimit(REPORT_INTERVAL)
        self._accept_failures = 0  # since the last warning

    def __repr__(self) -> str:
        return (f"<NBDServer exports={list(self.exports)} "
                f"connections={len(self.connections)}>")

    @property
    def exports(self) -> dict[str, Export]:
        """The exports by name."""
        return dict(self.config.exports)

    @property
    def default_export(self) -> str:
        """The export a client asking for ``""`` gets."""
        return self.config.default_export

    @property
    def requests_in_progress(self) -> AsyncValue[int]:
        """Requests being processed over all connections (awaitable)."""
        return self.counters.requests_in_progress

    @property
    def requests_served(self) -> int:
        """Requests answered so far."""
        return self.counters.requests_served

    @property
    def connections_served(self) -> int:
        """Connections admitted so far."""
        return self.counters.connections_served

    def statistics(self) -> ServerStatistics:
        """Connections, handshakes and requests now, and totals so far."""
        return ServerStatistics(
            connections=len(self.connections),
            handshakes=sum(c.handshaking for c in self.connections),
            requests_in_progress=self.counters.requests_in_progress.value,
            connections_served=self.counters.connections_served,
            connections_refused=self.connections_refused,
            requests_served=self.counters.requests_served,
            bytes_held=sum(c.held for c in self.connections))

    # --- serving ----------------------------------------------------------------------

    async def serve(self, listeners: Sequence[Listener], *,
                    task_status: Started = trio.TASK_STATUS_IGNORED) -> None:
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

    async def serve_unix(self, path: str, *,
                         task_status: Started = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on a Unix socket at ``path`` (replacing a stale socket file)."""
        listener = await open_unix_listener(path)
        self._unix_paths.append(path)
        await self.serve([listener], task_status=task_status)

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0, *,
                        task_status: Started = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on a TCP port (0 picks a free one; see :attr:`addresses`)."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: "
                                     f"{exc.strerror or exc}") from None
        await self.serve(listeners, task_status=task_status)

    async def serve_sockets(self, socks: Iterable[_stdlib_socket.socket], *,
                            task_status: Started = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on already listening sockets (e.g. from systemd socket activation)."""
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
        await self.serve(listeners, task_status=task_status)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str = "stream") -> None:
        """Serve one already connected stream (tests use memory streams)."""
        connection = self._admit(stream, peer)
        if connection is None:
            await trio.aclose_forcefully(stream)
            return
        await self._run(connection)

    def _admit(self, stream: trio.abc.Stream, peer: str) -> ServerConnection | None:
        """A connection for ``stream``, counted at once; None over the limit."""
        if len(self.connections) >= self.max_connections:
            self.connections_refused += 1
            if self._limit_report.due():
                log.warning("connection limit (%d) reached: new connections are closed "
                            "at once (%d refused so far; reported at most every %d s)",
                            self.max_connections, self.connections_refused,
                            REPORT_INTERVAL)
            return None
        connection = ServerConnection(self.config, self.counters, stream, peer,
                                      seed=self.rng.randrange(1 << 32))
        self.connections.add(connection)
        self.open_connections.value = len(self.connections)
        self.counters.connections_served += 1
        return connection

    async def _run(self, connection: ServerConnection) -> None:
        try:
            await connection.run()
        except Exception:  # a bug must not take the server down with it
            log.exception("connection %s failed", connection.peer)
        finally:
            self.connections.discard(connection)
            self.open_connections.value = len(self.connections)

    async def _accept_loop(self, listener: Listener,
                           connections: trio.Nursery) -> None:
        backoff = 0.0
        while True:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            except OSError as exc:
                backoff = await self._accept_failed(exc, backoff)
                continue
            backoff = 0.0
            peer = "stream"
            if isinstance(stream, trio.SocketStream):
                tune_socket(stream.socket, buffer_size=self.socket_buffer_size)
                try:
                    peer = str(stream.socket.getpeername()) or "unix"
                except OSError:
                    peer = "unknown"
            connection = self._admit(stream, peer)
            if connection is None:
                await trio.aclose_forcefully(stream)
            else:
                connections.start_soon(self._run, connection)

    async def _accept_failed(self, exc: OSError, backoff: float) -> float:
        """Wait after a failed accept; returns the next wait.  Reported at most once
        every :data:`REPORT_INTERVAL` seconds, however often it fails."""
        self._accept_failures += 1
        if self._accept_report.due():
            what = "out of resources" if exc.errno in OUT_OF_RESOURCES else "failing"
            log.warning("accept is %s (%s), %d times since the last report: waiting for "
                        "connections to close (reported at most every %d s)", what, exc,
                        self._accept_failures, REPORT_INTERVAL)
            self._accept_failures = 0
        backoff = min(backoff * 2, ACCEPT_BACKOFF[1]) if backoff else ACCEPT_BACKOFF[0]
        count = len(self.connections)
        with trio.move_on_after(backoff):  # the shortage may be the system's, not ours
            await self.open_connections.wait_value(lambda n: n < count)
        return backoff

    # --- stopping ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful stop: no new connections; in-progress requests finish (for at most
        ``shutdown_timeout`` seconds), then close."""
        self._accepting.cancel()
        for connection in list(self.connections):
            connection.stop()

    def kill(self) -> None:
        """Abrupt stop (a simulated crash): every socket is shut down at once."""
        self._accepting.cancel()
        for listener in self.listeners:
            if isinstance(listener, trio.SocketListener):
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
            if not isinstance(listener, trio.SocketListener):
                continue
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
