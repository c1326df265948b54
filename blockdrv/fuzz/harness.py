"""The server under a fuzz run: start, kill, restart, and notice when it dies on its own.

A server process that dies without being killed by the run is a finding about the
server, not the driver: :meth:`ServerHarness.watch` waits for the process's exit (a
pidfd, no polling), records it with the server's log, and restarts it at once, as a
supervisor would; for the driver it is one more outage and every invariant still holds.
A server that dies within a second of three starts in a row cannot run at all: that
ends the run (``RuntimeError``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import trio
from trio_util import AsyncValue

from ..protocol.uri import NBDAddress, parse_uri
from .availability import Availability
from .config import FuzzConfig
from .servers import CommandServer, Peer, file_server


def make_server(config: FuzzConfig, directory: Path, image: Path) -> Peer:
    """The server the configuration asks for, on ``image`` (the embedded one with its
    own fault hooks for ``error``, ``reorder`` and the checker kinds)."""
    where = directory / "server"
    where.mkdir()
    if config.server_cmd:
        return CommandServer(where, config.server_cmd, image)
    if config.server != "embedded":
        return file_server(config.server, where, image)
    args = ["--seed", str(config.seed)]
    if "reorder" in config.faults:
        args.append("--shuffle-replies")
    if "error" in config.faults:
        args += ["--fail", "read:EIO:0.003", "--fail", "write:EIO:0.003"]
    if "lose-writes" in config.faults:
        args += ["--lose-writes", "0.2"]
    if "stale-reads" in config.faults:
        args += ["--stale-reads", "0.3"]
    if not config.structured:
        args.append("--no-structured")
    return file_server("embedded", where, image, *args)


class ServerHarness:
    """One server process for the length of a run (see the module docstring)."""

    def __init__(self, server: Peer, on_crash: Callable[[str], None],
                 availability: Availability) -> None:
        self.server = server
        self.on_crash = on_crash
        self.availability = availability  # told when the server is down and up again
        self.crashes: list[str] = []
        self.starts = AsyncValue(0)  # restarts so far (the watcher follows them)

    @property
    def address(self) -> NBDAddress:
        return parse_uri(self.server.uri())

    @property
    def running(self) -> bool:
        return bool(self.server.running)

    async def start(self) -> None:
        self.server.start()
        await self.server.wait_ready()

    async def restart(self) -> None:
        """Start the (killed) server again; the watcher then watches the new process."""
        self.server.start()
        self.starts.value += 1
        await self.server.wait_ready()
        self.availability.up()

    def kill(self) -> None:
        """kill -9 now (a crash just before it still counts as one)."""
        process = self.server.process
        if process is not None and process.poll() is not None:
            self._crashed(process, elapsed_note="")
        self.availability.down()
        self.server.kill()

    def stop(self) -> None:
        self.server.stop()

    def log(self) -> str:
        return str(self.server.log())

    async def watch(self, elapsed: Callable[[], float]) -> None:
        """Report and restart the server when it dies without being killed."""
        server = self.server
        quick = 0  # crashes in a row less than a second after a start
        while True:
            starts = self.starts.value
            process = server.process
            if process is not None:
                started = trio.current_time()
                await _process_exit(process)
                if server.process is process and server.running:
                    self.availability.down()
                    self._crashed(process, elapsed_note=f" at {elapsed():.1f}s")
                    quick = quick + 1 if trio.current_time() - started < 1.0 else 0
                    if quick >= 3:  # it cannot even start: no point in going on
                        raise RuntimeError(f"the server keeps dying at start: "
                                           f"{self.crashes[-1]}")
                    server.kill()  # what is left of it: the listener
                    await self.restart()
                    continue
            await self.starts.wait_value(lambda n, seen=starts: n > seen)

    def _crashed(self, process: subprocess.Popen[bytes], *, elapsed_note: str) -> None:
        code = process.poll()
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit status {code}")
        report = (f"{self.server!r} died on its own{elapsed_note} ({how}); "
                  f"its log ends: {self.log()[-1500:]!r}")
        self.crashes.append(report)
        self.on_crash(how)


async def _process_exit(process: subprocess.Popen[bytes]) -> None:
    """Until ``process`` has exited (Linux pidfd; no polling)."""
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return  # gone (and reaped) already
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
