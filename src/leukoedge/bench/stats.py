"""Latency statistics: percentiles over the measured runs.

Percentiles use linear interpolation between order statistics (numpy's
default), so they are monotone in ``q`` and p50 <= p90 <= p99 always holds.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UsageError

PERCENTILES = (50, 90, 99)


def summarise(samples_ms: Sequence[float]) -> dict:
    """p50/p90/p99, mean, min, max and count of a list of millisecond samples.

    Raises UsageError on an empty list: a report with no samples would show
    made-up zeros.
    """
    arr = np.asarray(list(samples_ms), dtype=np.float64)
    if arr.size == 0:
        raise UsageError("no latency samples were measured (runs must be >= 1)")
    p50, p90, p99 = np.percentile(arr, PERCENTILES)
    return {
        "p50_ms": round(float(p50), 4),
        "p90_ms": round(float(p90), 4),
        "p99_ms": round(float(p99), 4),
        "mean_ms": round(float(arr.mean()), 4),
        "min_ms": round(float(arr.min()), 4),
        "max_ms": round(float(arr.max()), 4),
        "n": int(arr.size),
    }
