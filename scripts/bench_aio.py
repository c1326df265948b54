"""asyncio vs trio: the same blockdrv bench through blockdrv.aio and the trio API.

Against nbdkit's memory plugin (the working set filled with random data first), each
workload is run REPEAT times with ``blockdrv bench --api trio`` and ``--api asyncio``
interleaved, each in its own process; the table gives medians and the asyncio/trio ratio
of the medians.  Usage: scripts/bench-aio [--repeat N] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SPAN, Nbdkit, figures, fill, run_blockdrv  # noqa: E402

WORKLOADS = {  # name: (pattern, request size, depth, count)
    "read-4k-qd1": ("read", 4096, 1, 20000),
    "read-1m-qd8": ("read", 1 << 20, 8, 3000),
}
APIS = ("trio", "asyncio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tenth of the requests")
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        with Nbdkit(directory, "memory", f"{SPAN >> 20}M") as server:
            uri = server.uri()
            fill(uri, directory)
            for _ in range(args.repeat):
                for name, (pattern, size, depth, count) in WORKLOADS.items():
                    for api in APIS:
                        raw = run_blockdrv(uri, pattern, size, depth, count // scale,
                                           "--api", api)
                        runs.setdefault((name, api), []).append(
                            figures(raw) | {"p50": raw["p50"]})
    rows = []
    print(f"blockdrv bench, asyncio vs trio (nbdkit memory; median of {args.repeat})")
    print(f"{'workload':<13} {'api':<8} {'IOPS':>8} {'MiB/s':>8} {'p50 us':>7} "
          f"{'CPU s/GiB':>9} {'asyncio/trio':>12}")
    for name in WORKLOADS:
        medians = {api: {key: statistics.median(s[key] for s in runs[(name, api)])
                         for key in ("iops", "mib_s", "p50", "cpu_s_per_gib")}
                   for api in APIS}
        ratio = medians["asyncio"]["iops"] / medians["trio"]["iops"]
        for api in APIS:
            m = medians[api]
            print(f"{name:<13} {api:<8} {m['iops']:>8.0f} {m['mib_s']:>8.1f} "
                  f"{m['p50'] * 1e6:>7.0f} {m['cpu_s_per_gib']:>9.2f} "
                  f"{(format(ratio, '.2f') if api == 'asyncio' else ''):>12}")
            rows.append({"workload": name, "api": api, **m})
    if args.json_file:
        Path(args.json_file).write_text(json.dumps({"repeat": args.repeat,
                                                    "results": rows}, indent=2))


if __name__ == "__main__":
    main()
