"""The proxy with real clients while its upstream (qemu-nbd, nbdkit) is killed and
restarted within reconnect_delay: nbdcopy in and out, qemu-img convert and compare,
qemu-io pattern writes and reads, nbdinfo --map of a dirty bitmap.  No client sees an
error and the data is identical.  Upstream errors reach the client with their errno;
``blockdrv serve --upstream`` mirrors what the upstream advertises.

The proxy runs in the test's trio run (the same code as ``blockdrv serve --upstream``),
so the test can wait for events: an outage starts once a client request is in the proxy
(and enough data has moved), and ends once the proxy's device has noticed it.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import pytest
import trio
from support.peers import EmbeddedServer, Nbdkit, Peer, QemuNbd, sparse_image

from blockdrv import State
from blockdrv.nbd import Device
from blockdrv.nbd.opening import ClientOptions
from blockdrv.server import NBDServer
from blockdrv.server.node_backend import node_export
from blockdrv.server.upstream import UpstreamOptions, open_upstream
from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop

DISK = 64 * MiB
DATA = [(0, 4 * MiB), (10 * MiB, 8 * MiB), (30 * MiB, MiB), (40 * MiB, 16 * MiB)]
DATA_BYTES = sum(n for _, n in DATA)


@dataclass
class Proxy:
    upstream: Peer
    device: Device
    server: NBDServer
    uri: str
    outages: int = 0

    def moved(self) -> int:
        stats = self.device.statistics()
        return stats.bytes_read + stats.bytes_written

    async def outage(self, *, after: int | None = None) -> None:
        """Kill the upstream and bring it back once the proxy's device has noticed.

        ``after=None``: kill it now, so the next client request finds it gone; else
        once a client request is in the proxy and ``after`` bytes have moved."""
        if after is not None:
            await self.server.requests_in_progress.wait_value(
                lambda n: n > 0 and self.moved() >= after)
        self.upstream.kill()
        await self.device.wait_state(State.CONNECTING_WAIT)
        self.upstream.start()
        await self.device.wait_state(State.CONNECTED)
        self.outages += 1

    async def outages_at(self, marks: Sequence[int]) -> None:
        for mark in marks:
            await self.outage(after=mark)


@asynccontextmanager
async def proxy_for(upstream: Peer, directory: Path, *, connections: int = 1
                    ) -> AsyncIterator[Proxy]:
    """``upstream`` started, and the proxy in front of it on a Unix socket."""
    options = UpstreamOptions(client=ClientOptions(reconnect_delay=60),
                              connections=connections, retry_initial=0.05, retry_max=0.2)
    path = str(directory / "proxy.sock")
    with upstream:
        async with open_upstream(upstream.uri(), options) as device:
            server = NBDServer(node_export("", device))
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_unix, path)
                yield Proxy(upstream, device, server, f"nbd+unix:///?socket={path}")
                server.shutdown()


async def run(*argv: str) -> str:
    """A client's stdout; its stderr in the failure if it fails."""
    result = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True,
                                    check=False)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"{argv[0]} failed ({result.returncode}): {err}{out}"
    assert "error" not in err.lower() and "fail" not in out.lower(), err + out
    return out


async def with_outages(proxy: Proxy, client: Callable[[], object], marks: Sequence[int]
                       ) -> None:
    """Run ``client`` while the upstream goes down at each mark (bytes moved)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.outages_at, marks)
        await client()  # type: ignore[misc]
        nursery.cancel_scope.cancel()
    assert proxy.outages == len(marks), "the client finished before every outage"


def random_image(path: Path) -> Path:
    sparse_image(path, DISK)
    with open(path, "r+b") as f:
        for offset, length in DATA:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def upstream_on(kind: str, directory: Path, image: Path) -> Peer:
    directory.mkdir(exist_ok=True)
    if kind == "qemu-nbd":
        return QemuNbd(directory, image)
    return Nbdkit(directory, "file", str(image))


UPSTREAMS = [("qemu-nbd", 1), ("nbdkit", 2)]  # (kind, connections to it)


@pytest.mark.parametrize("kind, connections", UPSTREAMS)
async def test_nbdcopy_into_the_proxy(tmp_path, kind, connections):
    source = random_image(tmp_path / "source.img")
    target = sparse_image(tmp_path / "target.img", DISK)
    with trio.fail_after(120):
        async with proxy_for(upstream_on(kind, tmp_path / "up", target), tmp_path,
                             connections=connections) as proxy:
            await with_outages(proxy, lambda: run("nbdcopy", str(source), proxy.uri),
                               [DATA_BYTES // 4, DATA_BYTES // 2])
            assert proxy.device.statistics().reconnects >= 2
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("kind, connections", UPSTREAMS)
async def test_nbdcopy_out_of_the_proxy(tmp_path, kind, connections):
    source = random_image(tmp_path / "source.img")
    copy = tmp_path / "copy.img"
    with trio.fail_after(120):
        async with proxy_for(upstream_on(kind, tmp_path / "up", source), tmp_path,
                             connections=connections) as proxy:
            await with_outages(proxy, lambda: run("nbdcopy", proxy.uri, str(copy)),
                               [DATA_BYTES // 4, DATA_BYTES // 2])
    assert copy.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
async def test_qemu_img_convert_then_compare_through_an_outage(tmp_path, kind):
    source = random_image(tmp_path / "source.img")
    target = sparse_image(tmp_path / "target.img", DISK)
    with trio.fail_after(120):
        async with proxy_for(upstream_on(kind, tmp_path / "up", target), tmp_path) as proxy:
            await with_outages(proxy, lambda: run(
                "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source),
                proxy.uri), [DATA_BYTES // 3])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy.outage)  # the compare's first request finds it gone
                out = await run("qemu-img", "compare", "-f", "raw", "-F", "raw",
                                str(source), proxy.uri)
            assert "Images are identical" in out and proxy.outages == 2
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
async def test_qemu_io_pattern_write_and_read_through_outages(tmp_path, kind):
    image = sparse_image(tmp_path / "disk.img", DISK)
    with trio.fail_after(60):
        async with proxy_for(upstream_on(kind, tmp_path / "up", image), tmp_path) as proxy:
            for command, said in (("write -P 0xab 0 1M", "wrote"),
                                  ("read -P 0xab 0 1M", "read")):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(proxy.outage)
                    out = await run("qemu-io", "-f", "raw", "-c", command, proxy.uri)
                assert f"{said} 1048576/1048576 bytes" in out
            assert proxy.outages == 2
    assert image.read_bytes()[:MiB] == b"\xab" * MiB


def nbdinfo_map(uri: str, context: str) -> list[dict[str, object]]:
    out = subprocess.run(["nbdinfo", "--json", f"--map={context}", uri],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


async def test_nbdinfo_map_of_a_dirty_bitmap_through_an_outage(tmp_path):
    """qemu-nbd serves a qcow2 with bitmap b0 (read-only: a SIGKILL then leaves the
    bitmap consistent); every context it offers passes through the proxy."""
    image = tmp_path / "disk.qcow2"
    for argv in (["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"],
                 ["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", str(image)],
                 ["qemu-img", "bitmap", "--add", str(image), "b0"],
                 ["qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 3M",
                  "-c", "write -P 3 40M 64K", str(image)]):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    upstream = QemuNbd(tmp_path, image, "-r", "-B", "b0", "-A", fmt="qcow2")
    contexts = ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth"]
    with trio.fail_after(60):
        async with proxy_for(upstream, tmp_path) as proxy:
            straight = {c: nbdinfo_map(upstream.uri(), c) for c in contexts}
            for context in contexts:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(proxy.outage)
                    out = await run("nbdinfo", "--json", f"--map={context}", proxy.uri)
                assert json.loads(out) == straight[context], context
            assert proxy.outages == 3
    dirty = [(e["offset"], e["length"]) for e in straight["qemu:dirty-bitmap:b0"]
             if e["type"] & 1]
    assert dirty == [(MiB, 3 * MiB), (40 * MiB, 64 * 1024)]


async def test_an_upstream_errno_reaches_a_real_client(tmp_path):
    upstream = Nbdkit(tmp_path, "--filter=error", "memory", "64M",
                      "error-pwrite=ENOSPC", "error-pwrite-rate=100%")
    with trio.fail_after(60):
        async with proxy_for(upstream, tmp_path) as proxy:
            result = await trio.run_process(
                ["qemu-io", "-f", "raw", "-c", "write -P 1 0 64K", proxy.uri],
                capture_stdout=True, capture_stderr=True, check=False)
            out = await run("qemu-io", "-f", "raw", "-c", "read -P 0 0 64K", proxy.uri)
    said = (result.stdout + result.stderr).decode()
    assert "write failed: No space left on device" in said, said
    assert "read 65536/65536 bytes" in out


def test_blockdrv_serve_upstream_mirrors_and_reconnects(tmp_path):
    """The command: nbdinfo sees what it sees upstream; after the upstream was killed
    and restarted, a write and a read through the proxy still work (the proxy finds
    its connection dead and reconnects)."""
    image = sparse_image(tmp_path / "disk.img", DISK)
    (tmp_path / "up").mkdir()
    with QemuNbd(tmp_path / "up", image) as upstream, \
            EmbeddedServer(tmp_path, "--upstream", upstream.uri(),
                           "--reconnect-delay", "30") as proxy:
        def describe(uri: str) -> dict[str, object]:
            out = subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                 text=True, timeout=60, check=True).stdout
            (export,) = json.loads(out)["exports"]
            return {k: v for k, v in export.items() if k != "uri"}

        assert describe(proxy.uri()) == describe(upstream.uri())
        upstream.restart()
        for command in ("write -P 0xcd 1M 1M", "read -P 0xcd 1M 1M"):
            done = subprocess.run(["qemu-io", "-f", "raw", "-c", command, proxy.uri()],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0 and "fail" not in done.stdout + done.stderr
    assert image.read_bytes()[MiB:2 * MiB] == b"\xcd" * MiB


def test_serve_upstream_refuses_options_that_do_not_apply(tmp_path):
    from support.cli import blockdrv

    done = blockdrv("serve", "--upstream", "nbd://localhost:1/", "--min-block", "512",
                    check=False)
    assert done.returncode == 2 and "--min-block cannot be used with --upstream" \
        in done.stderr
    done = blockdrv("serve", "--memory", "1M", "--reconnect-delay", "5", check=False)
    assert done.returncode == 2 and "without --upstream" in done.stderr
    done = blockdrv("serve", "--upstream", f"nbd+unix:///?socket={tmp_path}/none.sock",
                    check=False)
    assert done.returncode == 1 and "none.sock" in done.stderr \
        and "Traceback" not in done.stderr
