"""What a fuzz run keeps: its operations, violations, figures and trace.

The trace (every operation and fault, with its time) goes to a file as the run goes, so
a long run holds no more of it in memory than a short one; the reproducer is the
configuration plus that trace.  Latencies are kept in an ``array`` of doubles.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import weakref
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from ..bench.latency import quantiles
from ..util import core
from .config import FuzzConfig


@dataclass(frozen=True)
class Op:
    index: int
    kind: str
    offset: int
    length: int
    cancel_after: float | None = None  # we cancel it after this many seconds

    def describe(self) -> str:
        if self.kind in ("flush", "list"):
            return f"#{self.index} {self.kind}"
        return f"#{self.index} {self.kind} {self.offset}+{self.length}"


@dataclass(frozen=True)
class Violation:
    operation: str
    expected: str
    found: str
    at: float = 0.0  # seconds into the run
    invariant: str = ""  # which invariant (fairness, liveness, deadline, memory, ...)


class Trace:
    """Operations and faults, one JSON line each, in a temporary file that lives as
    long as this object (so a long run holds none of it in memory)."""

    def __init__(self) -> None:
        self._file: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - owned here
        weakref.finalize(self, self._file.close)
        self.entries = 0

    def add(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self.entries += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._file.flush()
        self._file.seek(0)
        try:
            for line in self._file:
                yield json.loads(line)
        finally:
            self._file.seek(0, 2)  # appending goes on at the end


@dataclass
class FuzzResult:
    config: FuzzConfig
    ops_by_kind: Counter[str] = field(default_factory=Counter)
    failures_by_kind: Counter[str] = field(default_factory=Counter)
    faults_by_kind: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    reopens: int = 0
    delay_expiries_explained: int = 0  # faults kept the server away for all of the delay
    drains: int = 0
    graph_changes: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    violations: list[Violation] = field(default_factory=list)
    elapsed: float = 0.0
    trace: Trace = field(default_factory=Trace)
    server_crashes: list[str] = field(default_factory=list)  # how, and the server's log
    loop_lag_max: float = 0.0  # seconds late, worst wake-up of the lag monitor
    step_cpu_max: float = 0.0  # CPU seconds of the longest task step
    rss_peak: int = 0  # bytes, the process's peak resident set
    rss_growth_peak: int = 0  # bytes above the resident set once the device was open
    admission_wait_max: float = 0.0
    admission_overtakes: int = 0

    @property
    def ok(self) -> bool:
        """No invariant of the driver was violated (server crashes are reported apart)."""
        return not self.violations

    @property
    def ops_total(self) -> int:
        return sum(self.ops_by_kind.values())

    def latency(self, q: float) -> float:
        return quantiles(sorted(self.latencies), (q,))[0]

    def summary(self) -> dict[str, Any]:
        """The figures as ``--json`` writes them."""
        ordered = sorted(self.latencies)  # once: the figures below re-sort it in O(n)
        p50, p99 = quantiles(ordered, (0.5, 0.99))
        return {
            "seed": self.config.seed,
            "server": self.config.server_cmd or self.config.server,
            "elapsed": round(self.elapsed, 3),
            "ops_total": self.ops_total,
            "ops_by_kind": dict(self.ops_by_kind),
            "failures_by_kind": dict(self.failures_by_kind),
            "faults_injected": sum(self.faults_by_kind.values()),
            "faults_by_kind": dict(self.faults_by_kind),
            "reconnects": self.reconnects,
            "reopens": self.reopens,
            "delay_expiries_explained": self.delay_expiries_explained,
            "drains": self.drains,
            "graph_changes": self.graph_changes,
            "concurrency": self.config.concurrency,
            "max_in_flight": self.config.max_in_flight,
            "latency": {"p50": p50, "p99": p99,
                        "max": ordered[-1] if ordered else 0.0,
                        "median": statistics.median(ordered) if ordered else 0.0},
            "loop_lag_max_s": round(self.loop_lag_max, 4),
            "step_cpu_max_s": round(self.step_cpu_max, 4),
            "rss_peak_mib": round(self.rss_peak / (1 << 20), 1),
            "rss_growth_peak_mib": round(self.rss_growth_peak / (1 << 20), 1),
            "admission_wait_max_s": round(self.admission_wait_max, 4),
            "admission_overtakes": self.admission_overtakes,
            "violations": [asdict(v) for v in self.violations],
            "server_crashes": self.server_crashes,
            "core": core.in_use(),
        }

    def write_reproducer(self, path: str | Path) -> None:
        """Seed, configuration and the trace of operations and faults (for --replay),
        written entry by entry."""
        with Path(path).open("w") as out:
            out.write('{"config": ' + json.dumps(asdict(self.config)) + ', "trace": [\n')
            for i, entry in enumerate(self.trace):
                out.write((",\n" if i else "") + json.dumps(entry))
            out.write("\n]}\n")


def load_reproducer(path: str | Path) -> tuple[FuzzConfig, list[dict[str, Any]]]:
    raw = json.loads(Path(path).read_text())
    config = raw["config"]
    config["faults"] = tuple(config["faults"])
    return FuzzConfig(**config), raw["trace"]
