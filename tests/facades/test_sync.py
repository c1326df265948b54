"""The blocking API, blockdrv.sync.open_nbd, used from plain threads (issue 8).

These tests are synchronous, so trio.fail_after cannot guard them; the ``deadline``
fixture makes a hang fail fast instead (faulthandler dumps every thread and exits).
"""

from __future__ import annotations

import errno
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.deadline import deadline_fixture
from support.peers import EmbeddedServer, Nbdkit

from blockdrv import ConnectError, ConnectionLostError, InvalidArgumentError, sync
from blockdrv.protocol.errors import UnsupportedError
from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop

BLOCK = 65536


deadline = deadline_fixture(60)


@pytest.mark.parametrize("server", ["embedded", "nbdkit"])
def test_many_threads_share_one_device(server, tmp_path):
    peer = (EmbeddedServer(tmp_path, "--memory", "64M") if server == "embedded"
            else Nbdkit(tmp_path, "memory", "64M"))
    with peer, sync.open_nbd(peer.uri(), max_in_flight=8) as dev:
        assert dev.size == 64 * MiB and dev.info.can_flush
        written: dict[int, bytes] = {}

        def worker(lane: int) -> int:
            rng = random.Random(lane)
            for i in range(lane, 512, 8):
                data = rng.randbytes(BLOCK)
                dev.pwrite(data, i * BLOCK)
                written[i] = data
                assert dev.pread(BLOCK, i * BLOCK) == data
            return threading.get_ident()

        with ThreadPoolExecutor(8) as pool:
            threads = set(pool.map(worker, range(8)))
        assert len(threads) > 1 and threading.get_ident() not in threads
        dev.flush()
        for i, data in written.items():
            buf = bytearray(BLOCK)
            dev.pread_into(buf, i * BLOCK)
            assert buf == data
        dev.zero(BLOCK, 0)
        assert dev.pread(BLOCK, 0) == bytes(BLOCK)
        extents = dev.block_status(MiB, 0)
        assert extents and extents[0].offset == 0
        stats = dev.statistics()
        assert stats.requests >= 1024 and stats.in_flight == 0


def test_errors_are_the_async_api_classes(tmp_path):
    with pytest.raises(ConnectError, match="nobody-listens") as refused:
        sync.open_nbd(f"nbd+unix:///?socket={tmp_path}/nobody-listens")
    assert refused.value.errno == errno.ENOENT
    with EmbeddedServer(tmp_path, "--memory", "1M", "--read-only") as peer:
        dev = sync.open_nbd(peer.uri())
        with pytest.raises(InvalidArgumentError):
            dev.pread(4096, MiB)
        with pytest.raises(UnsupportedError):
            dev.pwrite(b"x", 0)
        assert dev.pread(10, 0) == bytes(10)  # the device is still fine
        dev.close()
        dev.close()  # closing twice is harmless
        with pytest.raises(ConnectionLostError) as closed:
            dev.pread(10, 0)
        assert closed.value.errno == errno.EBADF


def test_drained_section_from_a_thread_while_others_do_io(tmp_path):
    with EmbeddedServer(tmp_path, "--memory", "64M") as peer, \
            sync.open_nbd(peer.uri(), connections=2) as dev:
        assert dev.connections == 2
        stop = threading.Event()
        done = [0] * 4

        def worker(lane: int) -> None:
            while not stop.is_set():
                dev.pwrite(bytes([lane]) * BLOCK, lane * BLOCK)
                assert dev.pread(BLOCK, lane * BLOCK) == bytes([lane]) * BLOCK
                done[lane] += 1

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(worker, lane) for lane in range(4)]
            seen = []
            try:
                for _ in range(5):
                    with dev.drained():
                        first = dev.statistics()
                        dev.statistics()  # a round trip through the loop: workers may run
                        last = dev.statistics()
                        seen.append((first.in_flight, last.requests - first.requests))
            finally:
                stop.set()  # also when an assertion fails: never leave the workers running
            for future in futures:
                future.result()  # no request failed
        assert seen == [(0, 0)] * 5  # nothing in flight, nothing admitted while drained
        assert sum(done) > 0
