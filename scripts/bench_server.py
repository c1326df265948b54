"""Read throughput of the embedded server next to `nbdkit memory`, and of the proxy
(`blockdrv serve --upstream`) in front of that same nbdkit, same run.

Both servers are filled with the same random data first (so nothing is skipped as a
hole), then two clients read, RUNS times against each server and through the proxy,
interleaved:

- `nbdcopy URI null:` reads all SIZE bytes (its default mode: 4 connections, 64
  requests of 256 KiB in flight each);
- `qemu-img bench` makes COUNT reads of 64 KiB, 16 in flight.

The table gives median MiB/s per client and server, the ratio embedded / nbdkit, and
the ratio proxy / nbdkit: the same nbdkit read through the proxy and straight.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.peers import EmbeddedServer, Nbdkit  # noqa: E402

from blockdrv.util.units import format_size, parse_size  # noqa: E402

BENCH_REQUEST = 64 * 1024


def clients(uri: str, count: int) -> dict[str, list[str]]:
    """The command of each client, reading from ``uri``."""
    return {
        "nbdcopy": ["nbdcopy", uri, "null:"],
        "qemu-img bench": ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", "16",
                           "-s", str(BENCH_REQUEST), uri],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="1G", type=parse_size)
    parser.add_argument("--runs", default=3, type=int)
    parser.add_argument("--count", default=20000, type=int,
                        help="qemu-img bench requests per run")
    parser.add_argument("--proxy-connections", default=4, type=int,
                        help="the proxy's connections to nbdkit (--connections)")
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    size = args.size
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        source = directory / "source.img"
        with open(source, "wb") as f:
            for _ in range(size // (16 << 20)):
                f.write(os.urandom(16 << 20))
            f.write(os.urandom(size % (16 << 20)))
        for name in ("embedded", "nbdkit", "proxy"):
            (directory / name).mkdir()
        upstream = Nbdkit(directory / "nbdkit", "memory", str(size))
        servers = {
            "embedded": EmbeddedServer(directory / "embedded", "--memory", str(size)),
            "nbdkit": upstream,
            "proxy": EmbeddedServer(directory / "proxy", "--upstream", upstream.uri(),
                                    "--connections", str(args.proxy_connections)),
        }
        times: dict[str, dict[str, list[float]]] = {}
        try:
            for name, server in servers.items():
                server.start()
                if name != "proxy":  # (it serves what nbdkit holds)
                    subprocess.run(["nbdcopy", str(source), server.uri()], check=True)
            for _ in range(args.runs):
                for name, server in servers.items():
                    for client, argv in clients(server.uri(), args.count).items():
                        start = time.perf_counter()
                        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
                        times.setdefault(client, {}).setdefault(name, []).append(
                            time.perf_counter() - start)
        finally:
            for server in servers.values():
                server.stop()
    volume = {"nbdcopy": size, "qemu-img bench": args.count * BENCH_REQUEST}
    rates = {client: {name: volume[client] / (1 << 20) / statistics.median(t)
                      for name, t in by_server.items()}
             for client, by_server in times.items()}
    ratios = {client: r["embedded"] / r["nbdkit"] for client, r in rates.items()}
    proxy_ratios = {client: r["proxy"] / r["nbdkit"] for client, r in rates.items()}
    print(f"reading {format_size(size)} (nbdcopy) and {args.count} x 64 KiB at depth 16 "
          f"(qemu-img bench), median of {args.runs} runs")
    print(f"{'client':<16} {'server':<10} {'MiB/s':>10} {'runs (s)':>24}")
    for client, by_server in times.items():
        for name, t in by_server.items():
            runs = " ".join(f"{x:.2f}" for x in t)
            print(f"{client:<16} {name:<10} {rates[client][name]:>10.1f} {runs:>24}")
        print(f"{client:<16} ratio embedded / nbdkit: {ratios[client]:.3f}")
        print(f"{client:<16} ratio proxy / nbdkit (its upstream): "
              f"{proxy_ratios[client]:.3f}")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(
            {"size": size, "runs": times["nbdcopy"], "mib_s": rates["nbdcopy"],
             "ratio": ratios["nbdcopy"], "proxy_ratio": proxy_ratios["nbdcopy"],
             "clients": times, "rates": rates, "ratios": ratios,
             "proxy_ratios": proxy_ratios}, indent=2))


if __name__ == "__main__":
    main()
