"""Means over runs with confidence intervals, and how every table writes them.

The one place that turns per-run values into "mean [low, high]": the evaluation
summary, the downstream tables, their figures and the report all call
:func:`summarise_over_runs` and :func:`format_ci`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sae_core.stats import mean_ci

SUMMARY_COLUMNS = ("mean", "ci_low", "ci_high", "n_runs")


def summarise_over_runs(frame: pd.DataFrame, by: list[str], value: str, confidence: float) -> pd.DataFrame:
    """Mean and Student-t CI over runs of ``value`` for every group of ``by``.

    Rows that share (``by``, run) are averaged first (e.g. the classes of a probing set,
    the pairs of SCR), so each run counts once; then :func:`sae_core.stats.mean_ci` over
    the runs. Returns ``by`` + mean, ci_low, ci_high (NaN with a single run), n_runs, one
    row per group, sorted by ``by``.
    """
    per_run = frame.groupby([*by, "run"], sort=True, as_index=False)[value].mean()
    rows = []
    for key, group in per_run.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        mean, lo, hi = mean_ci(group[value].to_numpy(), confidence)
        rows.append({**dict(zip(by, key)), "mean": mean, "ci_low": lo, "ci_high": hi, "n_runs": len(group)})
    out = pd.DataFrame(rows, columns=[*by, *SUMMARY_COLUMNS])
    return out.astype({"mean": float, "ci_low": float, "ci_high": float, "n_runs": "int64"})


def format_ci(mean: float, low: float | None, high: float | None) -> str:
    """'mean [low, high]' with 4 significant digits; the mean alone without an interval; '–' for no value."""
    if mean is None or not np.isfinite(mean):
        return "–"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)) or low == high:
        return f"{mean:.4g}"
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def format_row_ci(row) -> str:
    """:func:`format_ci` of a row (Series or namedtuple) with mean, ci_low and ci_high."""
    get = row.get if hasattr(row, "get") else lambda k: getattr(row, k)
    return format_ci(get("mean"), get("ci_low"), get("ci_high"))
