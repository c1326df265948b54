"""nbdcopy reading SIZE bytes of data from `blockdrv serve` and from `nbdkit memory`.

Both servers are filled with the same random data first (so nothing is skipped as a
hole), then `nbdcopy URI null:` runs RUNS times against each, interleaved; the table
gives median MiB/s and the ratio embedded / nbdkit.
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

from blockdrv.units import format_size, parse_size  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="1G", type=parse_size)
    parser.add_argument("--runs", default=3, type=int)
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
        (directory / "embedded").mkdir()
        (directory / "nbdkit").mkdir()
        servers = {
            "embedded": EmbeddedServer(directory / "embedded", "--memory", str(size)),
            "nbdkit": Nbdkit(directory / "nbdkit", "memory", str(size)),
        }
        times: dict[str, list[float]] = {name: [] for name in servers}
        try:
            for server in servers.values():
                server.start()
                subprocess.run(["nbdcopy", str(source), server.uri()], check=True)
            for _ in range(args.runs):
                for name, server in servers.items():
                    start = time.perf_counter()
                    subprocess.run(["nbdcopy", server.uri(), "null:"], check=True)
                    times[name].append(time.perf_counter() - start)
        finally:
            for server in servers.values():
                server.stop()
    mib = size / (1 << 20)
    rates = {name: mib / statistics.median(t) for name, t in times.items()}
    print(f"nbdcopy reading {format_size(size)}, median of {args.runs} runs")
    print(f"{'server':<10} {'MiB/s':>10} {'runs (s)':>30}")
    for name, rate in rates.items():
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<10} {rate:>10.1f} {runs:>30}")
    ratio = rates["embedded"] / rates["nbdkit"]
    print(f"ratio embedded / nbdkit: {ratio:.3f}")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(
            {"size": size, "runs": times, "mib_s": rates, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
