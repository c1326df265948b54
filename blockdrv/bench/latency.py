"""Latency figures shared by the benchmark and the fuzz runner."""

from __future__ import annotations

from collections.abc import Sequence


def quantiles(samples: Sequence[float], qs: Sequence[float]) -> list[float]:
    """The samples at quantiles ``qs`` (each 0..1) by the nearest-rank rule, sorting
    once; 0.0 for each when there are no samples."""
    if not samples:
        return [0.0] * len(qs)
    ordered = sorted(samples)
    last = len(ordered) - 1
    return [ordered[min(last, int(q * len(ordered)))] for q in qs]


def quantile(samples: Sequence[float], q: float) -> float:
    """The sample at quantile ``q`` (0..1) by the nearest-rank rule; 0.0 when empty."""
    return quantiles(samples, (q,))[0]
