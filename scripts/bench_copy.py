"""``blockdrv copy`` next to ``nbdcopy``, same source, same destinations, one run.

The source is ``nbdkit sparse-random SIZE percent=P`` (random data in runs, holes
between them, the image nbdcopy's own tests use).  Each tool copies it, in turn and RUNS times, to
``null:``, to a new local file and to another export (``nbdkit memory``); the table gives
median seconds and MiB/s of the source size, and the files each tool wrote are compared
by SHA-256 (they must be identical).  The target (issue 16): blockdrv within 1.5x of
nbdcopy plus the interpreter's start-up (``blockdrv --version``, median of RUNS), in
the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockdrv.fuzz.servers import Nbdkit  # noqa: E402
from blockdrv.util.units import parse_size  # noqa: E402


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--percent", type=int, default=10,
                        help="percentage of the image that is data (nbdkit's default: 10)")
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    size = parse_size(args.size)
    blockdrv = [str(ROOT / ".venv" / "bin" / "blockdrv"), "copy", "--quiet"]
    tools = {"blockdrv": blockdrv, "nbdcopy": ["nbdcopy"]}
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "src").mkdir()
        (directory / "dst").mkdir()
        with Nbdkit(directory / "src", "sparse-random", str(size), "seed=1",
                    f"percent={args.percent}") as source, \
                Nbdkit(directory / "dst", "memory", str(size)) as target:
            for _ in range(args.runs):
                for tool, argv in tools.items():
                    out = directory / f"{tool}.img"
                    out.unlink(missing_ok=True)
                    for dest, where in (("null", "null:"), ("file", str(out)),
                                        ("nbd", target.uri())):
                        times.setdefault((tool, dest), []).append(
                            timed(argv + [source.uri(), where]))
            digests = {tool: sha256(directory / f"{tool}.img") for tool in tools}
    mib = size / (1 << 20)
    table = {f"{tool}->{dest}": {"seconds": statistics.median(t),
                                  "mib_s": mib / statistics.median(t)}
             for (tool, dest), t in times.items()}
    startup = statistics.median(timed([blockdrv[0], "--version"]) for _ in range(args.runs))
    print(f"copy of nbdkit sparse-random {args.size} percent={args.percent} "
          f"(median of {args.runs}; blockdrv's interpreter start-up alone: {startup:.2f} s)")
    for dest in ("null", "file", "nbd"):
        ours, theirs = table[f"blockdrv->{dest}"], table[f"nbdcopy->{dest}"]
        print(f"  to {dest:<5} blockdrv {ours['seconds']:6.2f} s {ours['mib_s']:8.0f} MiB/s"
              f"   nbdcopy {theirs['seconds']:6.2f} s {theirs['mib_s']:8.0f} MiB/s"
              f"   ratio {ours['mib_s'] / theirs['mib_s']:.2f}")
    for dest in ("null", "file", "nbd"):
        ours, theirs = table[f"blockdrv->{dest}"], table[f"nbdcopy->{dest}"]
        target = 1.5 * theirs["seconds"] + startup
        table[f"blockdrv->{dest}"]["target_s"] = target
        print(f"  target to {dest:<5} 1.5 x {theirs['seconds']:.2f} s + {startup:.2f} s = "
              f"{target:.2f} s: {'met' if ours['seconds'] <= target else 'missed'}")
    identical = len(set(digests.values())) == 1
    print(f"  files identical: {identical} (sha256 {digests['blockdrv'][:16]}...)")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps({"size": size, "runs": args.runs,
                                                    "results": table,
                                                    "identical": identical, "percent": args.percent,
                                                    "blockdrv_startup_s": startup,
                                                    "sha256": digests}, indent=2))
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
