"""Real NBD peers for the tests (the classes live in blockdrv.fuzz.servers), and the one
way tests pick a server by kind: :func:`make_server`.

Kinds: ``embedded`` (``blockdrv serve``), ``nbdkit`` (file plugin), ``nbdkit-memory``,
``nbdkit-delay`` (20 ms per read and write), ``nbdkit-no-sr`` (simple replies only),
``nbdkit-t1`` (one thread), ``nbdkit-tcp`` (loopback TCP instead of a Unix socket),
``qemu-nbd``, ``nbd-server``.  Every one serves the file ``image`` except nbdkit-memory
(64 MiB in memory).  :data:`SERVER_KINDS` are the three that the fuzzer and the command
tests run against (:func:`file_server` also takes extra arguments for them).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

from blockdrv.fuzz.config import SERVER_KINDS
from blockdrv.fuzz.servers import (
    EmbeddedServer,
    Nbdkit,
    NbdServer,
    Peer,
    QemuNbd,
    file_server,
    sparse_image,
)

__all__ = ["SERVER_KINDS", "EmbeddedServer", "Nbdkit", "NbdServer", "Peer", "QemuNbd",
           "file_server", "make_server", "nbdinfo_json", "sparse_image"]

_MAKERS: dict[str, Callable[[Path, Path], Peer]] = {
    "embedded": lambda d, image: EmbeddedServer(d, "--file", str(image)),
    "nbdkit": lambda d, image: Nbdkit(d, "file", str(image)),
    "nbdkit-memory": lambda d, image: Nbdkit(d, "memory", "64M"),
    "nbdkit-delay": lambda d, image: Nbdkit(d, "--filter=delay", "file", str(image),
                                            "rdelay=20ms", "wdelay=20ms"),
    "nbdkit-no-sr": lambda d, image: Nbdkit(d, "--no-sr", "file", str(image)),
    "nbdkit-t1": lambda d, image: Nbdkit(d, "-t", "1", "file", str(image)),
    "nbdkit-tcp": lambda d, image: Nbdkit(d, "file", str(image), transport="tcp"),
    "qemu-nbd": lambda d, image: QemuNbd(d, image),
    "nbd-server": lambda d, image: NbdServer(d, image),
}
ALL_KINDS = list(_MAKERS)


def make_server(kind: str, directory: Path, image: Path) -> Peer:
    """A server of ``kind`` (see the module docstring), not started yet; its log and
    socket live in ``directory``."""
    return _MAKERS[kind](directory, image)


def nbdinfo_json(*args: str) -> dict:  # type: ignore[type-arg]
    """``nbdinfo --json ARGS`` (a URI, and options), parsed."""
    out = subprocess.run(["nbdinfo", "--json", *args], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]
