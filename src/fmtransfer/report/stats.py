"""Summaries over seeds: mean, standard deviation and a 95% confidence interval (Student's t)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def summarise(values: Sequence[float], bounds: tuple[float, float] | None = None) -> dict:
    """``{"mean", "std", "ci95": [lo, hi], "n"}``; with one value the spread is 0 and the interval a point.

    ``bounds`` clips the interval to a metric's range (accuracy cannot leave [0, 1], whatever t says).
    """
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else 0.0
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "std": std, "ci95": [lo, hi], "n": n}
