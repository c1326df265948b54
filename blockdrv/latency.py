"""Latency figures shared by the benchmark and the fuzz runner."""

from __future__ import annotations

from collections.abc import Sequence


def quantile(samples: Sequence[float], q: float) -> float:
    """The sample at quantile ``q`` (0..1) by the nearest-rank rule; 0.0 when empty."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
