"""Shared fixtures: real NBD peers started on private sockets and stopped afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from support.peers import EmbeddedServer, Nbdkit, NbdServer, Peer, QemuNbd, sparse_image

MiB = 1024 * 1024


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A sparse 64 MiB raw image file."""
    return sparse_image(tmp_path / "disk.img", 64 * MiB)


def _make_peer(kind: str, tmp_path: Path, image: Path) -> Peer:
    if kind == "nbdkit":
        return Nbdkit(tmp_path, "memory", "64M")
    if kind == "nbdkit-no-sr":
        return Nbdkit(tmp_path, "--no-sr", "memory", "64M")
    if kind == "nbdkit-tcp":
        return Nbdkit(tmp_path, "memory", "64M", transport="tcp")
    if kind == "qemu-nbd":
        return QemuNbd(tmp_path, image)
    if kind == "nbd-server":
        return NbdServer(tmp_path, image)
    if kind == "embedded":
        return EmbeddedServer(tmp_path, "--file", str(image))
    raise ValueError(kind)


REAL_SERVERS = ["nbdkit", "nbdkit-no-sr", "nbdkit-tcp", "qemu-nbd", "nbd-server", "embedded"]


@pytest.fixture(params=REAL_SERVERS)
def real_server(request: pytest.FixtureRequest, tmp_path: Path, image: Path) -> Iterator[Peer]:
    """Each real server kind in turn, running on a private socket or loopback port."""
    with _make_peer(request.param, tmp_path, image) as peer:
        yield peer
