"""The embedded server (`blockdrv serve` in a subprocess) with real NBD clients."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys

import pytest
from support.client import BlockingClient
from support.libnbd import run_libnbd
from support.peers import EmbeddedServer, nbdinfo_json, sparse_image

from blockdrv.fuzz.servers import ActivatedServer
from blockdrv.protocol import Command
from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop



def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def random_image(path, size: int, data_ranges) -> None:
    """A sparse file with random data at the given (offset, length) ranges."""
    sparse_image(path, size)
    with open(path, "r+b") as f:
        for offset, length in data_ranges:
            f.seek(offset)
            f.write(os.urandom(length))


DISK = 256 * MiB  # holes far longer than the 32 MiB maximum block size


@pytest.fixture(params=["plain", "shuffled"])
def served(request, tmp_path):
    args = ["--memory", str(DISK)]
    if request.param == "shuffled":
        args += ["--shuffle-replies", "--seed", "7"]
    with EmbeddedServer(tmp_path, *args) as server:
        yield server



def test_nbdinfo_sees_what_is_advertised(tmp_path):
    with EmbeddedServer(tmp_path, "--memory", "64M", "--export", "disk", "--description",
                        "scratch disk", "--max-payload", "1M", "--min-block", "512") as srv:
        info = nbdinfo_json(srv.uri("disk"))
    (export,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert export["export-name"] == "disk"
    assert export["description"] == "scratch disk"
    assert export["export-size"] == 64 * MiB
    assert export["contexts"] == ["base:allocation"]
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (512, 4096, MiB)
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn", "can_df", "can_cache"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False


def test_nbdinfo_read_only_export(tmp_path):
    with EmbeddedServer(tmp_path, "--memory", "1M", "--read-only") as srv:
        (export,) = nbdinfo_json(srv.uri())["exports"]
    assert export["is_read_only"] is True
    assert export["can_trim"] is False and export["can_zero"] is False


def test_nbdcopy_in_and_out(served, tmp_path):
    # nbdcopy's default mode: asynchronous, multi-conn, holes sent as 128 MiB zeroes.
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    random_image(src, DISK, [(0, 3 * MiB), (10 * MiB, 512 * 1024), (40 * MiB, 7 * MiB),
                             (200 * MiB, 5 * MiB)])
    # The served disk holds data where src has holes: the copy must zero it.
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 100M 64M", served.uri()],
                   check=True, timeout=60, capture_output=True)
    subprocess.run(["nbdcopy", str(src), served.uri()], check=True, timeout=120)
    subprocess.run(["nbdcopy", served.uri(), str(back)], check=True, timeout=120)
    assert sha256(src) == sha256(back)


def test_libnbd_zero_and_trim_longer_than_the_maximum_block_size(served):
    result = run_libnbd("""
        h = nbd.NBD()
        h.set_strict_mode(0)  # libnbd checks nothing itself: the server decides
        h.connect_uri(sys.argv[1])
        h.pwrite(b"\\x01" * 65536, 100 << 20)
        h.zero(64 << 20, 64 << 20)
        zeroed = h.pread(65536, 100 << 20) == bytes(65536)
        h.pwrite(b"\\x02" * 65536, 200 << 20)
        h.trim(128 << 20, 128 << 20)
        try:
            h.pread(64 << 20, 0)
            long_read = "accepted"
        except nbd.Error as exc:
            long_read = exc.errno
        print(json.dumps({"max": h.get_block_size(nbd.SIZE_MAXIMUM), "zeroed": zeroed,
                          "long_read": long_read}))
        h.shutdown()
    """, served.uri())
    assert result == {"max": 32 * MiB, "zeroed": True, "long_read": "EINVAL"}


def test_qemu_img_convert_and_compare(served, tmp_path):
    src, back = tmp_path / "src.img", tmp_path / "back.qcow2"
    random_image(src, DISK, [(MiB, 5 * MiB), (33 * MiB, MiB), (180 * MiB, 2 * MiB)])
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 64M 100M", served.uri()],
                   check=True, timeout=60, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                    served.uri()], check=True, timeout=120)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.uri()],
                   check=True, timeout=120)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", served.uri(),
                    str(back)], check=True, timeout=120)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(back)],
                   check=True, timeout=120)


def test_qemu_io_patterns(served):
    cmds = ["write -P 0xab 1M 64k", "write -P 0xcd 3M 512", "write -z 1M 4k",
            "read -P 0x00 1M 4k", "read -P 0xab 1052672 61440", "read -P 0xcd 3M 512",
            "aio_write -P 0x11 8M 128k", "aio_write -P 0x22 9M 128k", "aio_flush",
            "read -P 0x11 8M 128k", "read -P 0x22 9M 128k", "discard 8M 64k",
            "flush"]
    args = ["qemu-io", "-f", "raw"]
    for cmd in cmds:
        args += ["-c", cmd]
    out = subprocess.run(args + [served.uri()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Pattern verification failed" not in out.stdout + out.stderr
    assert out.stdout.count("read ") == 5


def test_libnbd_block_status_on_sparse_export(served):
    result = run_libnbd("""
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(sys.argv[1])
        h.pwrite(b"\\x01" * 65536, 1 << 20)
        h.pwrite(b"\\x02" * 131072, 4 << 20)
        extents = []
        def cb(metacontext, offset, entries, err):
            extents.extend(entries)
            return 0
        h.block_status(8 << 20, 0, cb)
        print(json.dumps({"extents": extents,
                          "data": h.pread(65536, 1 << 20) == b"\\x01" * 65536}))
        h.shutdown()
    """, served.uri())
    assert result["data"]
    entries = result["extents"]
    runs = list(zip(entries[0::2], entries[1::2], strict=True))
    # hole, data (64K), hole, data (128K), hole: lengths and flags
    assert runs[0] == (1 << 20, 3)
    assert runs[1] == (65536, 0)
    assert runs[2] == ((4 << 20) - (1 << 20) - 65536, 3)
    assert runs[3] == (131072, 0)
    assert runs[4][1] == 3


def test_multi_conn_writes_then_flush(served):
    result = run_libnbd("""
        handles = []
        for _ in range(4):
            h = nbd.NBD()
            h.connect_uri(sys.argv[1])
            handles.append(h)
        ok = all(h.can_multi_conn() for h in handles)
        cookies = []
        for i, h in enumerate(handles):
            for j in range(8):
                buf = nbd.Buffer.from_bytearray(bytearray([i * 8 + j + 1]) * 65536)
                cookies.append((h, h.aio_pwrite(buf, (i * 8 + j) * 65536)))
        for h, c in cookies:
            while not h.aio_command_completed(c):
                h.poll(-1)
        handles[0].flush()
        # Every connection sees every write after the flush on one of them.
        seen = all(handles[k].pread(65536, n * 65536) == bytes([n + 1]) * 65536
                   for k in range(4) for n in range(32))
        for h in handles:
            h.shutdown()
        print(json.dumps({"multi_conn": ok, "seen": seen}))
    """, served.uri())
    assert result == {"multi_conn": True, "seen": True}


def test_file_backend_is_sparse_aware(tmp_path):
    image = tmp_path / "served.img"
    random_image(image, 32 * MiB, [(4 * MiB, MiB)])
    with EmbeddedServer(tmp_path, "--file", str(image)) as srv:
        out = subprocess.run(["nbdinfo", "--map", srv.uri()], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        back = tmp_path / "back.img"
        subprocess.run(["nbdcopy", srv.uri(), str(back)], check=True, timeout=60)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 20M 1M",
                        srv.uri()], check=True, timeout=60, capture_output=True)
    lines = [line.split() for line in out.strip().splitlines()]
    assert [(int(a), int(b), c) for a, b, c, *_ in lines] == [
        (0, 4 * MiB, "3"), (4 * MiB, MiB, "0"), (5 * MiB, 27 * MiB, "3")]
    assert sha256(image) != sha256(back)  # the qemu-io write came after the copy
    with open(image, "rb") as f:
        f.seek(20 * MiB)
        assert f.read(MiB) == b"\x5a" * MiB


def test_sigterm_is_a_clean_shutdown(tmp_path):
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "blockdrv", "serve", "--memory", "1M",
                             "--unix", str(sock)], stdout=subprocess.PIPE, text=True)
    try:
        uri = proc.stdout.readline().strip()
        assert uri == f"nbd+unix:///?socket={sock}"
        assert nbdinfo_json(uri)["exports"][0]["export-size"] == MiB
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not sock.exists()
    finally:
        proc.kill()
        proc.wait()


def test_hostile_modes_that_real_clients_survive(tmp_path):
    # Valid streams, only unusual: tiny chunks in random order, trickled bytes.  (A
    # flood never ends: that is for clients with caps.)
    with EmbeddedServer(tmp_path, "--memory", "4M", "--seed", "3", "--tiny-chunks", "1",
                        "--tiny-chunk-max", "64", "--slowloris", "1", "--slowloris-delay",
                        "0") as srv:
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 1M 8k",
                              "-c", "read -P 0x5c 1M 8k", srv.uri()],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "verification failed" not in out.stdout, out
        lines = subprocess.run(["nbdinfo", "--map", srv.uri()], capture_output=True,
                               text=True, timeout=120, check=True).stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["0", str(MiB), "3"], [str(MiB), "65536", "0"], [str(MiB + 65536),
                                                         str(3 * MiB - 65536), "3"]]


def test_unrequested_context_qemu_refuses_libnbd_accepts(tmp_path):
    with EmbeddedServer(tmp_path, "--memory", "4M", "--unrequested-context", "1") as srv:
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 4k", srv.uri()],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "server answered with different context 'qemu:evil'" in out.stderr
        result = run_libnbd("""
            h = nbd.NBD()
            h.add_meta_context("base:allocation")
            h.connect_uri(sys.argv[1])
            print(json.dumps([h.can_meta_context("base:allocation"),
                              h.can_meta_context("qemu:evil")]))
            h.shutdown()
        """, srv.uri())
    assert result == [True, True]  # libnbd 1.14 takes what it was not offered


# --- hostile clients over real sockets ---------------------------------------------------


def peak_rss(pid: int) -> int:
    """The peak resident set size of a process, in bytes (VmHWM)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def hostile_reads(server, count: int, length: int) -> socket.socket:
    """A negotiated client that has sent ``count`` READs and will read no reply."""
    client = BlockingClient(server.connect())
    client.negotiate()
    for _ in range(count):
        client.send(Command.READ, 0, length)
    return client.sock


def test_reads_whose_replies_nobody_reads_hold_the_budget_not_more(tmp_path):
    # 1.8 KB of requests asking for 2 GiB of a file's data, never read.
    image = tmp_path / "data.img"
    random_image(image, 32 * MiB, [(0, 32 * MiB)])
    with EmbeddedServer(tmp_path, "--file", str(image)) as srv:
        with hostile_reads(srv, 64, 32 * MiB):
            assert nbdinfo_json(srv.uri())["exports"][0]["export-size"] == 32 * MiB
            out = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 32M", srv.uri()],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert peak_rss(srv.process.pid) < 300 * MiB  # 64 MiB budget + the interpreter


def test_sigterm_with_a_client_that_reads_no_replies(tmp_path):
    with EmbeddedServer(tmp_path, "--memory", "64M", "--shutdown-timeout", "1") as srv:
        # Data, not holes: a hole's reply is a few bytes that would fit a socket buffer.
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 32M", srv.uri()],
                       check=True, timeout=60, capture_output=True)
        with hostile_reads(srv, 64, 32 * MiB):
            assert nbdinfo_json(srv.uri())["exports"][0]["export-size"] == 64 * MiB
            srv.process.send_signal(signal.SIGTERM)
            assert srv.process.wait(timeout=30) == 0


def test_idle_sockets_out_of_file_descriptors(tmp_path):
    # 40 open files at most: idle clients use them all up; the handshake deadline
    # frees them, the accept loop backs off quietly meanwhile, and nbdinfo is served.
    srv = ActivatedServer(tmp_path, ["prlimit", "--nofile=40", sys.executable, "-m",
                                     "blockdrv", "serve", "--memory", "1M",
                                     "--handshake-timeout", "1"], name="blockdrv-serve")
    with srv, contextlib.ExitStack() as idle:
        for _ in range(60):
            idle.enter_context(srv.connect())
        assert nbdinfo_json(srv.uri())["exports"][0]["export-size"] == MiB
    log = srv.log()
    assert log.count("accept is out of resources") == 1, log


def test_port_zero_prints_the_chosen_port():
    proc = subprocess.Popen([sys.executable, "-m", "blockdrv", "serve", "--memory", "1M",
                             "--port", "0", "--export", "a b"], stdout=subprocess.PIPE,
                            text=True)
    try:
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/a%20b")
        assert not uri.startswith("nbd://127.0.0.1:0/")
        assert nbdinfo_json(uri)["exports"][0]["export-name"] == "a b"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("args, message", [
    (["--memory", "12Q"], "not a size"),
    ([], "exactly one of --memory SIZE, --file PATH or --upstream URI"),
    (["--file", "/nonexistent/dir/x.img"], "cannot open /nonexistent/dir/x.img"),
    (["--memory", "1M", "--min-block", "3"], "power of two"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    out = subprocess.run([sys.executable, "-m", "blockdrv", "serve", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
