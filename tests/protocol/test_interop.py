"""The sans-IO protocol layer against real servers, through a small blocking client."""

from __future__ import annotations

import os

import pytest
from support.client import BlockingClient
from support.peers import Nbdkit, make_server

from blockdrv.protocol import Goal, RequestError, StateFlag
from blockdrv.protocol.constants import TransmissionFlag
from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop



def test_negotiate_write_read_back(real_server):
    client = BlockingClient(real_server.connect())
    client.sock.settimeout(10)
    client.negotiate()
    info = client.info
    assert info.size == 64 * MiB
    assert info.flags & TransmissionFlag.HAS_FLAGS
    # nbdkit --no-sr and nbd-server 3.24 only send simple replies.
    simple_only = "--no-sr" in getattr(real_server, "argv", ()) or real_server.name == "nbd-server"
    assert info.structured is not simple_only
    # Of the servers here only the embedded one offers extended headers.
    assert info.extended is (real_server.name == "blockdrv-serve")

    data = os.urandom(256 * 1024)
    client.pwrite(data, 3 * MiB)
    assert client.pread(len(data), 3 * MiB) == data
    # A read spanning written data and a never-written (zero) area.
    mixed = client.pread(512 * 1024, 3 * MiB)
    assert mixed == data + bytes(256 * 1024)
    if info.can_flush:
        client.flush()
    client.disconnect()


def test_block_status_where_offered(real_server):
    client = BlockingClient(real_server.connect())
    client.sock.settimeout(10)
    client.negotiate()
    info = client.info
    if not info.structured or real_server.name == "nbd-server":
        assert not info.can_block_status
        client.disconnect()
        return
    assert "base:allocation" in info.contexts
    client.pwrite(b"\x01" * 65536, MiB)
    statuses = client.block_status(4 * MiB, 0)
    (extents,) = statuses.values()
    assert extents[0][1] & StateFlag.HOLE  # 0..1MiB never written
    offset = 0
    for length, flags in extents:
        if offset <= MiB < offset + length:
            assert not flags & StateFlag.HOLE
        offset += length
    client.disconnect()


def test_error_reply_out_of_range_is_request_error(real_server):
    """A server error reply surfaces as RequestError with the server's errno."""
    client = BlockingClient(real_server.connect())
    client.sock.settimeout(10)
    client.negotiate()
    client.check_requests = False  # provoke a real server error
    with pytest.raises(RequestError) as excinfo:
        client.pread(4096, 64 * MiB)
    assert excinfo.value.errno in (22, 28, 5)
    # The connection stays usable after an error reply.
    assert client.pread(4096, 0) == bytes(4096)
    client.disconnect()


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_list_exports(kind, tmp_path, image):
    with make_server(kind, tmp_path, image) as peer:
        client = BlockingClient(peer.connect())
        client.sock.settimeout(10)
        event = client.negotiate(goal=Goal.LIST)
        assert [e.name for e in event.exports] == [""]
        client.close()


def test_info_goal_against_nbdkit(tmp_path):
    with Nbdkit(tmp_path, "memory", "1M") as peer:
        client = BlockingClient(peer.connect())
        client.sock.settimeout(10)
        event = client.negotiate(goal=Goal.INFO)
        assert event.info.size == 1024 * 1024
        client.close()
