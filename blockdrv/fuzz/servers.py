"""NBD server processes under control: start on a private address, kill -9, restart.

Used by ``blockdrv-fuzz`` (server kills and restarts) and by the test suite (real peers).

Theory of operation
-------------------
The caller owns the listening socket.  ``start()`` binds it (a Unix socket in a private
directory, or a free loopback TCP port) and hands it to the server, so a client can
connect the moment ``start()`` returns: nothing waits or polls for the server to come
up.

- nbdkit and qemu-nbd get it by systemd socket activation (``LISTEN_FDS=1`` and
  ``LISTEN_PID``, the socket on fd 3).
- nbd-server has no socket activation; it is run inetd style instead: a thread accepts
  each connection and starts ``nbd-server 0 FILE`` with the connection on stdin.

``kill()`` is ``kill -9`` plus closing the listener, so clients see the connection drop
and new connections refused, as when a real server dies; ``start()`` again brings it
back on the same address (same path, same port) and the same backing file.  Every
process gets ``PR_SET_PDEATHSIG`` (via ``setpriv``) so nothing outlives its parent.

:class:`CommandServer` runs any command line with ``{socket}`` and ``{file}``
placeholders; such a server binds the socket itself, so its readiness is found by
connecting until it answers (bounded).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Sequence
from urllib.parse import quote


def _activation_wrapper(fd: int) -> list[str]:
    """argv prefix that puts ``fd`` on fd 3 and execs the server with LISTEN_* set.

    bash's ``$$`` is the pid the server keeps through ``exec``, so LISTEN_PID matches.
    """
    move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
    script = move + 'LISTEN_PID=$$ LISTEN_FDS=1 exec setpriv --pdeathsig KILL "$@"'
    return ["bash", "-c", script, "activate"]


class Endpoint:
    """A listening address owned by the test: a Unix socket path or a loopback port."""

    def __init__(self, directory: Path, transport: str = "unix", name: str = "nbd") -> None:
        if transport not in ("unix", "tcp"):
            raise ValueError(transport)
        self.transport = transport
        self.path = str(directory / f"{name}.sock") if transport == "unix" else None
        self.port: int | None = None
        self.sock: socket.socket | None = None

    def listen(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        if self.transport == "unix":
            assert self.path is not None
            self.unlink()  # a stale socket of a killed server
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port or 0))
            self.port = sock.getsockname()[1]
        sock.listen(64)
        self.sock = sock
        return sock

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        self.unlink()

    def unlink(self) -> None:
        """Remove the Unix socket's file, if there is one (TCP: nothing to do)."""
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)

    def uri(self, export: str = "") -> str:
        path = quote(export, safe="")
        if self.transport == "unix":
            return f"nbd+unix:///{path}?socket={quote(self.path or '', safe='/')}"
        return f"nbd://127.0.0.1:{self.port}/{path}"

    def connect(self) -> socket.socket:
        """A plain blocking client socket to this endpoint."""
        if self.transport == "unix":
            assert self.path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path)
        else:
            sock = socket.create_connection(("127.0.0.1", self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class Peer:
    """A server process (or processes) behind an :class:`Endpoint`."""

    name = "peer"
    #: The server process, while one runs (None for nbd-server's per-connection ones).
    process: subprocess.Popen[bytes] | None = None

    def __init__(self, directory: Path, transport: str = "unix") -> None:
        self.directory = directory
        self.endpoint = Endpoint(directory, transport, self.name)
        self.log_path = directory / f"{self.name}.log"
        self.running = False

    def uri(self, export: str = "") -> str:
        return self.endpoint.uri(export)

    def connect(self) -> socket.socket:
        return self.endpoint.connect()

    def start(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """kill -9 the server and close its listener (new connections are refused)."""
        raise NotImplementedError

    def stop(self) -> None:
        self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the server accepts connections (at once for socket-activated ones)."""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_log(self) -> BinaryIO:
        return open(self.log_path, "ab")


class ActivatedServer(Peer):
    """A server started by socket activation (nbdkit, qemu-nbd)."""

    def __init__(self, directory: Path, argv: Sequence[str], transport: str = "unix",
                 name: str | None = None) -> None:
        if name:
            self.name = name
        super().__init__(directory, transport)
        self.argv = list(argv)

    def start(self) -> None:
        if self.running:
            return
        sock = self.endpoint.listen()
        fd = sock.fileno()
        with self._open_log() as log:
            self.process = subprocess.Popen(
                _activation_wrapper(fd) + self.argv, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                stdout=log, stderr=log)
        self.running = True

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None
        self.endpoint.close()
        self.running = False

    def __repr__(self) -> str:
        return f"<{self.name} {shlex.join(self.argv)} at {self.uri()}>"


class Nbdkit(ActivatedServer):
    name = "nbdkit"

    def __init__(self, directory: Path, *args: str, transport: str = "unix") -> None:
        super().__init__(directory, ["nbdkit", "--foreground", *args], transport)


class QemuNbd(ActivatedServer):
    name = "qemu-nbd"

    def __init__(self, directory: Path, image: Path, *args: str, transport: str = "unix",
                 fmt: str = "raw") -> None:
        super().__init__(directory, ["qemu-nbd", "--persistent", "--shared=16", "-f", fmt,
                                     "--discard=unmap", *args, str(image)], transport)


class EmbeddedServer(ActivatedServer):
    """``blockdrv serve`` as a subprocess, socket-activated like nbdkit."""

    name = "blockdrv-serve"

    def __init__(self, directory: Path, *args: str, transport: str = "unix") -> None:
        super().__init__(directory, [sys.executable, "-m", "blockdrv", "serve", *args],
                         transport)


class NbdServer(Peer):
    """nbd-server, one process per connection with the connection on stdin (inetd mode)."""

    name = "nbd-server"

    def __init__(self, directory: Path, image: Path, *args: str,
                 transport: str = "unix") -> None:
        super().__init__(directory, transport)
        self.argv = ["setpriv", "--pdeathsig", "KILL", "nbd-server", "0", str(image),
                     "-C", "/dev/null", "-d", *args]
        self._children: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.running:
            return
        sock = self.endpoint.listen()
        self._thread = threading.Thread(target=self._accept_loop, args=(sock,),
                                        name="nbd-server-inetd", daemon=True)
        self._thread.start()
        self.running = True

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # listener closed by kill()
            with conn, self._lock, self._open_log() as log:
                child = subprocess.Popen(self.argv, stdin=conn.fileno(), stdout=log,
                                         stderr=log)
                self._children.append(child)

    def kill(self) -> None:
        self.endpoint.close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            for child in self._children:
                if child.poll() is None:
                    child.send_signal(signal.SIGKILL)
                child.wait()
            self._children.clear()
        self.running = False


def file_server(kind: str, directory: Path, image: Path, *extra: str) -> Peer:
    """A server of ``kind`` ("embedded", "nbdkit" or "qemu-nbd") on the file ``image``,
    not started yet; ``extra`` arguments go to its command line (for nbdkit, before the
    plugin).  Its log and socket live in ``directory``."""
    if kind == "embedded":
        return EmbeddedServer(directory, "--file", str(image), *extra)
    if kind == "nbdkit":
        return Nbdkit(directory, *extra, "file", str(image))
    if kind == "qemu-nbd":
        return QemuNbd(directory, image, *extra)
    raise ValueError(f"unknown server kind {kind!r}: embedded, nbdkit or qemu-nbd")


def sparse_image(path: Path, size: int) -> Path:
    """A sparse file of ``size`` bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class CommandServer(Peer):
    """Any server command line; ``{socket}`` and ``{file}`` are filled in.

    The command must listen on the Unix socket ``{socket}`` itself, so after ``start()``
    call :meth:`wait_ready` (it connects until the server answers, for a bounded time).
    """

    name = "command"

    def __repr__(self) -> str:
        return f"<server command {self.command!r}>"

    def __init__(self, directory: Path, command: str, image: Path) -> None:
        super().__init__(directory, "unix")
        self.command = command
        self.image = image

    def start(self) -> None:
        if self.running:
            return
        path = self.endpoint.path
        assert path is not None
        self.endpoint.unlink()  # a stale socket of a killed server
        argv = shlex.split(self.command.format(socket=path, file=str(self.image)))
        with self._open_log() as log:
            self.process = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", *argv],
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, start_new_session=True)
        self.running = True

    async def wait_ready(self, timeout: float = 30.0) -> None:
        import trio

        path = self.endpoint.path
        assert path is not None
        delay = 0.01
        with trio.fail_after(timeout):
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"server command exited with status "
                                       f"{self.process.returncode}: {self.log()[-500:]}")
                try:
                    stream = await trio.open_unix_socket(path)
                except OSError:
                    await trio.sleep(delay)  # not listening yet
                    delay = min(delay * 2, 0.2)
                    continue
                await stream.aclose()
                return

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
        self.endpoint.close()
        self.running = False
