"""Reconnect recovery: from a restarted server accepting to the first completed request.

Scenario (same for every client): a read completes; the server (nbdkit on a file) is
killed with SIGKILL; one second later the client issues a read, which waits (both
clients run with a reconnect delay of 30 s); after an outage of OUTAGE seconds the
server is restarted on the same socket and file.  The figure is the time from the
restarted server's socket accepting again to the waiting read completing.

Clients: blockdrv (default retry schedule 1, 2, 4, 8, 16 s, like qemu; and a fast one,
0.1 s doubling to 0.5 s) and qemu-io with reconnect-delay=30 (qemu's own NBD driver).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from blockdrv import open_nbd
from blockdrv.fuzz.servers import Nbdkit, sparse_image


async def blockdrv_run(server: Nbdkit, outage: float, **retry: float) -> float:
    async with open_nbd(server.uri(), reconnect_delay=30, **retry) as dev:
        await dev.pread(4096, 0)
        server.kill()
        restarted = 0.0
        done = 0.0

        async def waiting_read() -> None:
            nonlocal done
            await dev.pread(4096, 0)
            done = time.monotonic()

        async with trio.open_nursery() as nursery:
            await trio.sleep(1)
            nursery.start_soon(waiting_read)
            await trio.sleep(outage - 1)
            server.start()
            restarted = time.monotonic()
        return done - restarted


def qemu_io_run(server: Nbdkit, outage: float) -> float:
    opts = (f"driver=nbd,server.type=unix,server.path={server.endpoint.path},"
            f"reconnect-delay=30")
    proc = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "--image-opts", opts, "-c", "read 0 4k",
                             "-c", "sleep 1000", "-c", "read 0 4k"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # "read 4096/4096 bytes at offset 0": the first read is done
    server.kill()
    time.sleep(outage)
    server.start()
    restarted = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    done = time.monotonic()
    if proc.returncode != 0 or out.count("read 4096/4096") != 1:
        raise RuntimeError(f"qemu-io failed ({proc.returncode}): {out}")
    return done - restarted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outage", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    clients = {
        "blockdrv": lambda s: trio.run(blockdrv_run, s, args.outage),
        "blockdrv-fast-retry": lambda s: trio.run(
            lambda: blockdrv_run(s, args.outage, retry_initial=0.1, retry_max=0.5)),
        "qemu-io": lambda s: qemu_io_run(s, args.outage),
    }
    results: dict[str, list[float]] = {name: [] for name in clients}
    with tempfile.TemporaryDirectory() as tmp:
        image = sparse_image(Path(tmp) / "disk.img", 64 << 20)
        for _ in range(args.runs):
            for name, run in clients.items():
                with Nbdkit(Path(tmp), "file", str(image)) as server:
                    results[name].append(run(server))
    print(f"reconnect recovery after a {args.outage:g} s outage (median of {args.runs}):")
    for name, times in results.items():
        runs = " ".join(f"{t:.3f}" for t in times)
        print(f"  {name:<22} {statistics.median(times):7.3f} s   runs: {runs}")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
