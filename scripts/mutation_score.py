"""Per-module mutation scores from mutmut's last results (for scripts/mutation).

``mutation_score.py MODULE...`` prints killed/total and the score of each module of
blockdrv/protocol/; ``--survivors MODULE`` prints the names of its surviving mutants.
A mutant counts once it was run: killed (some test failed, or timed out), survived (all
passed) or had no test; mutants never run ("not checked") are left out and reported.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED = {"killed", "timeout"}


def statuses() -> dict[str, dict[str, str]]:
    """mutant name -> status, by module, from ``mutmut results --all true``."""
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "mutmut"), "results", "--all", "true"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    for line in out.splitlines():
        name, sep, status = line.strip().partition(": ")
        if sep and name.startswith("blockdrv.protocol."):
            by_module[name.split(".")[2]][name] = status
    return by_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--survivors", action="store_true")
    parser.add_argument("modules", nargs="+")
    args = parser.parse_args()
    by_module = statuses()
    if args.survivors:
        for module in args.modules:
            for name, status in sorted(by_module[module].items()):
                if status == "survived":
                    print(name)
        return
    print(f"{'module':<18} {'killed':>7} {'total':>6} {'score':>7}  survived  no tests")
    low = False
    for module in args.modules:
        counts = Counter(by_module[module].values())
        total = sum(n for status, n in counts.items() if status != "not checked")
        killed = sum(counts[s] for s in KILLED)
        score = killed / total if total else 1.0
        low |= score < 0.9
        unrun = f"   ({counts['not checked']} not run)" if counts["not checked"] else ""
        print(f"{module:<18} {killed:>7} {total:>6} {score:>7.1%}  {counts['survived']:>8}"
              f"  {counts['no tests']:>8}{unrun}")
    sys.exit(1 if low else 0)


if __name__ == "__main__":
    main()
