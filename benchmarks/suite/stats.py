"""Percentiles and summaries the benchmarks report, computed one way everywhere."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the closest ranks; NaN when there is no
    value (a table shows "n/a" rather than a made-up 0)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """p50, p90, p99 and the mean of `values`, each times `scale` (1000 for seconds to ms)."""
    return {
        "p50": percentile(values, 50) * scale,
        "p90": percentile(values, 90) * scale,
        "p99": percentile(values, 99) * scale,
        "mean": (statistics.fmean(values) if values else math.nan) * scale,
    }


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan
