"""Shared fixtures: real NBD peers started on private sockets and stopped afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from support.peers import Peer, make_server, sparse_image

from blockdrv.util.units import MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A sparse 64 MiB raw image file."""
    return sparse_image(tmp_path / "disk.img", 64 * MiB)


REAL_SERVERS = ["nbdkit-memory", "nbdkit-no-sr", "nbdkit-tcp", "qemu-nbd", "nbd-server", "embedded"]


@pytest.fixture(params=REAL_SERVERS)
def real_server(request: pytest.FixtureRequest, tmp_path: Path, image: Path) -> Iterator[Peer]:
    """Each real server kind in turn, running on a private socket or loopback port."""
    with make_server(request.param, tmp_path, image) as peer:
        yield peer
