"""Confidence intervals over independent runs."""

from __future__ import annotations

import math

import numpy as np


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of the Student-t interval mean ± t_{(1+c)/2, n−1} · s / √n.

    ``values``: the per-run values (n ≥ 1, NaNs dropped). With one value the interval is
    undefined and returned as (mean, None, None).
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        raise ValueError("mean_ci needs at least one non-NaN value")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    from scipy.stats import t

    half = float(t.ppf((1 + confidence) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half
