"""Running the embedded server as a program (``blockdrv serve``).

Listens on a Unix socket, a TCP address, or the sockets systemd socket activation hands
over (``LISTEN_PID``/``LISTEN_FDS``, first fd 3); prints the export's NBD URI as the first
line of stdout once it is listening; serves until SIGINT or SIGTERM, then shuts down
gracefully (a second signal kills at once).
"""

from __future__ import annotations

import os
import signal
import socket
from functools import partial
from typing import Callable

import trio

from ..util.taskgroups import first_failure
from .server import NBDServer

SD_LISTEN_FDS_START = 3


def activated_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation to this process (may be none)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


async def serve_until_signalled(server: NBDServer, *, unix: str | None = None,
                                bind: str = "127.0.0.1", port: int | None = None,
                                announce: Callable[[str], None] = print) -> None:
    """Serve, announce the URI, and stop gracefully on SIGINT/SIGTERM.

    A failure (e.g. the address is in use) is raised as itself, not in a group.
    """
    activated = activated_sockets() if unix is None and port is None else []
    if unix is not None:
        serve = partial(server.serve_unix, unix)
    elif activated:
        serve = partial(server.serve_sockets, activated)
    else:
        serve = partial(server.serve_tcp, bind, 10809 if port is None else port)

    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def serve_then_stop(task_status: trio.TaskStatus[object]) -> None:
                    try:
                        await serve(task_status=task_status)
                    finally:
                        nursery.cancel_scope.cancel()  # served to the end: stop watching

                await nursery.start(serve_then_stop)
                announce(str(server.addresses[0]))
                count = 0
                async for _ in signals:
                    count += 1
                    if count == 1:
                        server.shutdown()
                    else:
                        server.kill()
    except BaseExceptionGroup as group:
        raise first_failure(group) from None
