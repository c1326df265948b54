"""A/B of blockdrv's CPU per request: two installations alternated on one server.

    scripts/ab_cpu.py --old /tmp/perf-base/.venv/bin/blockdrv \\
        --new .venv/bin/blockdrv --uri 'nbd+unix:///?socket=/tmp/nbd.sock' --repeat 5

Runs ``blockdrv bench --json`` of each workload with the old and the new command in turn,
REPEAT times, and prints the medians of the CPU microseconds per request
(``cpu_seconds / ops``, the process CPU time over the requests), IOPS and CPU s/GiB, and
new / old.  CPU per request is what to compare on a shared machine: wall-clock figures
move with the neighbours' load far more than CPU time does.  The export should hold
random data (the write workloads overwrite it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

WORKLOADS = {  # name: (pattern, request size, depth, count)
    "read-4k-qd1": ("read", "4K", 1, 10000),
    "read-4k-qd64": ("read", "4K", 64, 30000),
    "read-64k-qd16": ("read", "64K", 16, 10000),
    "write-1m-qd8": ("write", "1M", 8, 1500),
    "read-1m-qd8": ("read", "1M", 8, 1500),
    "mixed-1m-qd16": ("mixed", "1M", 16, 1500),
}


def run(blockdrv: str, uri: str, workload: str, span: str) -> dict:
    pattern, size, depth, count = WORKLOADS[workload]
    out = subprocess.run([blockdrv, "bench", uri, "--pattern", pattern, "--size", size,
                          "--depth", str(depth), "--count", str(count), "--span", span,
                          "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the old blockdrv command")
    parser.add_argument("--new", required=True, help="the new blockdrv command")
    parser.add_argument("--uri", required=True)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--span", default="256M")
    parser.add_argument("--workloads", default="read-4k-qd1,read-4k-qd64,read-64k-qd16,"
                                                "write-1m-qd8")
    args = parser.parse_args()
    names = args.workloads.split(",")
    for name in names:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}")
    sides = {"old": args.old, "new": args.new}
    samples: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeat):
        for name in names:
            for side, command in sides.items():
                samples.setdefault((name, side), []).append(
                    run(command, args.uri, name, args.span))
    print(f"CPU per request, median of {args.repeat} alternations")
    for name in names:
        line, per_request = f"{name:<14}", {}
        for side in sides:
            runs = samples[(name, side)]
            per_request[side] = statistics.median(r["cpu_seconds"] / r["ops"] * 1e6
                                                  for r in runs)
            iops = statistics.median(r["iops"] for r in runs)
            per_gib = statistics.median(r["cpu_s_per_gib"] for r in runs)
            line += (f"  {side} {per_request[side]:6.1f} us (IOPS {iops:7.0f}, "
                     f"CPU s/GiB {per_gib:.3f})")
        print(f"{line}  new/old {per_request['new'] / per_request['old']:.3f}")


if __name__ == "__main__":
    main()
