"""Side-by-side benchmark: blockdrv, libnbd (Python bindings) and qemu-img bench.

Every client does the same work against the same server in the same run: COUNT
sequential requests of SIZE bytes at queue depth DEPTH, offsets wrapping over a working
set that was filled with random data first (so reads move real data, not holes).  The
clients run one after the other, interleaved, REPEAT times; the table gives medians.

- blockdrv: ``blockdrv bench --count`` in its own process (the project's venv);
- libnbd: a script on the system Python (which has python3-libnbd), aio calls with
  completion callbacks, DEPTH requests in flight;
- qemu: ``qemu-img bench`` (qemu's own NBD driver); it cannot mix reads and writes, so
  mixed-1m-qd16 is absent for it.

CPU seconds per GiB are the client process's user+system time over the requests
(blockdrv and libnbd measure their own loop; qemu-img is measured as a whole process).

The cost of a drained section is measured for blockdrv alone (the peers have no such
thing): 64 reads of 64 KiB in flight, DRAINS drained sections entered while they run,
each timed from asking to being inside (every request in flight answered).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockdrv.fuzz.servers import EmbeddedServer, Nbdkit  # noqa: E402

WORKLOADS = {  # name: (pattern, request size, depth, count)
    "read-4k-qd1": ("read", 4096, 1, 20000),
    "read-4k-qd64": ("read", 4096, 64, 100000),
    "read-64k-qd16": ("read", 65536, 16, 30000),
    "write-64k-qd16": ("write", 65536, 16, 30000),
    "read-1m-qd8": ("read", 1 << 20, 8, 3000),
    "write-1m-qd8": ("write", 1 << 20, 8, 3000),
    "mixed-1m-qd16": ("mixed", 1 << 20, 16, 3000),
}
TARGETS = {  # blockdrv / libnbd (issue 17)
    "read-1m-qd8": 1.0, "write-1m-qd8": 1.0, "mixed-1m-qd16": 1.1,
    "read-64k-qd16": 0.7, "write-64k-qd16": 0.7, "read-4k-qd1": 0.8, "read-4k-qd64": 0.5,
}
CPU_TARGET = ("read-64k-qd16", 0.35)  # blockdrv's CPU s/GiB at 64 KiB: at most this
CLIENTS = ("blockdrv", "libnbd", "qemu")
SPAN = 256 << 20  # the working set requests cycle over

LIBNBD_SCRIPT = r"""
import json, os, sys, time
import nbd
uri, pattern, size, depth, count, span = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
h = nbd.NBD()
h.connect_uri(uri)
payload = nbd.Buffer.from_bytearray(bytearray(os.urandom(size)))
buffers = [nbd.Buffer(size) for _ in range(depth)]
free = list(range(depth))
state = {"done": 0, "issued": 0, "failed": 0}

def issue():
    i = state["issued"]
    state["issued"] += 1
    slot = free.pop()
    offset = (i * size) % span

    def done(error, slot=slot):
        if error.value:
            state["failed"] += 1
        free.append(slot)
        state["done"] += 1
        return 1

    if pattern == "read" or (pattern == "mixed" and i % 2 == 0):
        h.aio_pread(buffers[slot], offset, completion=done)
    else:
        h.aio_pwrite(payload, offset, completion=done)

cpu0, wall0 = time.process_time(), time.perf_counter()
while state["done"] < count:
    while free and state["issued"] < count:
        issue()
    h.poll(-1)
wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
h.shutdown()
if state["failed"]:
    sys.exit(f"{state['failed']} libnbd requests failed")
print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "ops": count, "bytes": count * size}))
"""


def run_blockdrv(uri: str, pattern: str, size: int, depth: int, count: int,
                 *extra: str) -> dict:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "blockdrv"), "bench", uri,
                          "--pattern", pattern, "--size", str(size), "--depth", str(depth),
                          "--count", str(count), "--span", str(SPAN), "--json", *extra],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


DRAIN_DEPTH, DRAIN_SIZE = 64, 65536


def run_drains(uri: str, drains: int) -> dict:
    """Quiesce times of ``drains`` drained sections with 64 requests in flight."""
    return run_blockdrv(uri, "read", DRAIN_SIZE, DRAIN_DEPTH, drains * DRAIN_DEPTH * 4,
                        "--drains", str(drains))


def run_libnbd(uri: str, pattern: str, size: int, depth: int, count: int) -> dict:
    out = subprocess.run(["/usr/bin/python3", "-c", LIBNBD_SCRIPT, uri, pattern, str(size),
                          str(depth), str(count), str(SPAN)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run_qemu(uri: str, pattern: str, size: int, depth: int, count: int) -> dict | None:
    if pattern == "mixed":
        return None  # qemu-img bench cannot mix reads and writes
    args = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth),
            "-s", str(size)]
    if pattern == "write":
        args.append("-w")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(args + [uri], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    seconds = wall
    for line in out.stdout.splitlines():  # "Run completed in 1.234 seconds."
        if line.startswith("Run completed in"):
            seconds = float(line.split()[3])
    return {"seconds": seconds, "cpu_seconds": cpu, "ops": count, "bytes": count * size}


RUNNERS = {"blockdrv": run_blockdrv, "libnbd": run_libnbd, "qemu": run_qemu}


def figures(raw: dict) -> dict:
    gib = raw["bytes"] / (1 << 30)
    return {"iops": raw["ops"] / raw["seconds"],
            "mib_s": raw["bytes"] / raw["seconds"] / (1 << 20),
            "cpu_s_per_gib": raw["cpu_seconds"] / gib if gib else 0.0}


def fill(uri: str, directory: Path) -> None:
    """Write the working set with random data, so reads move real bytes."""
    source = directory / "fill.img"
    with open(source, "wb") as f:
        for _ in range(SPAN >> 24):
            f.write(os.urandom(1 << 24))
    subprocess.run(["nbdcopy", "--destination-is-zero", str(source), uri], check=True)
    source.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=["nbdkit", "embedded"], default="nbdkit")
    parser.add_argument("--uri", help="benchmark this server instead of starting one")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="fewer requests per run (the whole thing in under a minute)")
    parser.add_argument("--workloads", help="comma-separated subset of the workloads")
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    scale = 20 if args.quick else 1
    names = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    for name in names:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}")

    runs: dict[tuple[str, str], list[dict]] = {}
    drain_runs: list[dict] = []
    drains = 10 if args.quick else 100
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        if args.uri:
            uri = args.uri
        else:
            # the export is the working set: qemu-img bench wraps at the image's end
            size = f"{SPAN >> 20}M"
            server = stack.enter_context(
                Nbdkit(directory, "memory", size) if args.server == "nbdkit"
                else EmbeddedServer(directory, "--memory", size))
            uri = server.uri()
        fill(uri, directory)
        for _ in range(args.repeat):
            for name in names:
                pattern, size, depth, count = WORKLOADS[name]
                for client in CLIENTS:
                    raw = RUNNERS[client](uri, pattern, size, depth,
                                          max(count // scale, depth * 4))
                    if raw is not None:
                        runs.setdefault((name, client), []).append(figures(raw) | {
                            "peak_rss": raw.get("peak_rss")})
            drain_runs.append(run_drains(uri, drains))

    results, ratios = [], {}
    for name in names:
        medians = {}
        for client in CLIENTS:
            samples = runs.get((name, client))
            if not samples:
                continue
            medians[client] = {key: statistics.median(s[key] for s in samples)
                               for key in ("iops", "mib_s", "cpu_s_per_gib")}
            row = {"workload": name, "client": client, **medians[client]}
            if client == "blockdrv":
                row["peak_rss"] = max(s["peak_rss"] or 0 for s in samples)
            results.append(row)
        mine = medians["blockdrv"]["mib_s"]
        ratios[name] = {peer: (mine / medians[peer]["mib_s"] if peer in medians else None)
                        for peer in ("libnbd", "qemu")}

    drain = {"in_flight": DRAIN_DEPTH, "request_size": DRAIN_SIZE,
             "drains_per_run": drains,
             "p50_s": statistics.median(r["drain_p50"] for r in drain_runs),
             "max_s": max(r["drain_max"] for r in drain_runs)}
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, " \
              f"Python {platform.python_version()}"
    print(f"blockdrv side-by-side benchmark ({machine}; server: "
          f"{args.uri or args.server}; median of {args.repeat}"
          f"{', quick' if args.quick else ''})")
    header = f"{'workload':<16} {'client':<9} {'IOPS':>10} {'MiB/s':>9} {'CPU s/GiB':>10}"
    print(header + f" {'vs libnbd':>10} {'vs qemu':>8} {'target':>7}")
    for row in results:
        line = (f"{row['workload']:<16} {row['client']:<9} {row['iops']:>10.0f} "
                f"{row['mib_s']:>9.1f} {row['cpu_s_per_gib']:>10.2f}")
        if row["client"] == "blockdrv":
            r = ratios[row["workload"]]
            target = TARGETS[row["workload"]]
            met = "met" if r["libnbd"] is not None and r["libnbd"] >= target else "MISSED"
            line += (f" {r['libnbd']:>10.2f} "
                     f"{(format(r['qemu'], '.2f') if r['qemu'] is not None else '-'):>8} "
                     f"{target:>5.2f} {met}")
        print(line)
    cpu_workload, cpu_target = CPU_TARGET
    cpu_rows = [row for row in results
                if row["workload"] == cpu_workload and row["client"] == "blockdrv"]
    if cpu_rows:
        cpu = cpu_rows[0]["cpu_s_per_gib"]
        print(f"blockdrv CPU s/GiB at {cpu_workload}: {cpu:.2f} (target <= {cpu_target:.2f}: "
              f"{'met' if cpu <= cpu_target else 'MISSED'})")
    print(f"drained section with {DRAIN_DEPTH} x {DRAIN_SIZE >> 10} KiB reads in flight: "
          f"time to quiesce median {drain['p50_s'] * 1e3:.2f} ms, "
          f"max {drain['max_s'] * 1e3:.2f} ms")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps({
            "machine": machine, "date": time.strftime("%Y-%m-%d"),
            "server": args.uri or args.server, "repeat": args.repeat, "quick": args.quick,
            "results": results, "ratios": ratios, "targets": TARGETS,
            "drain": drain}, indent=2))


if __name__ == "__main__":
    main()
