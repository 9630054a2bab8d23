"""Order statistics for the benchmark: percentiles, medians and ranges.

Pure functions on lists of floats, so that the figures in results/latest.json can
be checked by hand and are covered by tests/unit/test_bench_stats.py."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0 <= p <= 100), by linear interpolation between the
    closest ranks (numpy's default "linear" method), so p50 of an even-sized list
    is the mean of its two middle values."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty list")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside 0..100")
    pos = (len(xs) - 1) * p / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def value_range(values: Iterable[float]) -> tuple[float, float]:
    xs = list(values)
    if not xs:
        raise ValueError("range of an empty list")
    return min(xs), max(xs)


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max (and count) of one run's latencies in milliseconds."""
    return {
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "n": float(len(ms)),
    }


def across_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine the summaries of several rounds: the median of each numeric figure
    across rounds, and its range as [min, max] under "range"."""
    if not rounds:
        raise ValueError("no rounds to combine")
    keys = [
        k
        for k, v in rounds[0].items()
        if isinstance(v, int | float) and all(isinstance(r.get(k), int | float) for r in rounds)
    ]
    out: dict[str, Any] = {k: median(r[k] for r in rounds) for k in keys}
    out["range"] = {k: list(value_range(r[k] for r in rounds)) for k in keys}
    out["rounds"] = len(rounds)
    return out


def ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs, or None when theirs is zero (no meaningful ratio)."""
    return None if theirs == 0 else ours / theirs
