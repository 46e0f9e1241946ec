"""The sae-probes benchmark's summaries: means over tasks with CIs over tasks (pure pandas).

The probing_results table holds one accuracy per (method, n_members, run, dataset,
class, k); the benchmark's rows are its datasets named ``sae_probes.<tag>``
(:func:`tasks.sae_probes.is_benchmark_dataset`). For each (method, J, k):

1. a task's accuracy is the mean over its classes (one for a binary task) and runs;
2. the mean over tasks gets the Student-t interval over those task accuracies,
   mean ± t_{(1+c)/2, n−1} · s / √n with n the number of tasks
   (:func:`sae_core.stats.mean_ci`): the CI is over tasks, so it says how far the mean
   would move with another draw of tasks of this kind (run-to-run and test-sample noise
   are inside each task's accuracy).

Differences between two (method, J) points are paired by task: the same interval over the
tasks' differences (:func:`paired_differences`), far narrower than either mean's
interval because a task's difficulty cancels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sae_core.methods import RAW, method, ordered_methods
from sae_core.stats import mean_ci
from tasks.sae_probes import DATASET_PREFIX, is_benchmark_dataset

OVER_TASKS_COLUMNS = ["method", "n_members", "k", "mean", "ci_low", "ci_high", "half_width", "n_tasks"]
DIFFERENCE_COLUMNS = ["a", "b", "k", "difference", "ci_low", "ci_high", "outside_ci", "n_tasks"]


def benchmark_rows(probing: pd.DataFrame) -> pd.DataFrame:
    """The rows of the sae-probes tasks."""
    return probing[probing["dataset"].map(is_benchmark_dataset)]


def task_accuracies(probing: pd.DataFrame) -> pd.DataFrame:
    """method, n_members, k, dataset, accuracy: each task's mean over classes, then over runs."""
    rows = benchmark_rows(probing)
    per_run = rows.groupby(["method", "n_members", "k", "dataset", "run"], as_index=False)["accuracy"].mean()
    return per_run.groupby(["method", "n_members", "k", "dataset"], as_index=False)["accuracy"].mean()


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    mean, low, high = mean_ci(values, confidence)
    return mean, (np.nan if low is None else low), (np.nan if high is None else high)


def mean_over_tasks(probing: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """OVER_TASKS_COLUMNS per (method, n_members, k): the mean over tasks of the task
    accuracies and its Student-t interval over tasks (half_width = (high − low) / 2; NaN
    with one task). Empty when the table has no benchmark rows."""
    tasks = task_accuracies(probing)
    rows = []
    for (m, j, k), g in tasks.groupby(["method", "n_members", "k"], sort=True):
        mean, low, high = _interval(g["accuracy"].to_numpy(), confidence)
        rows.append({"method": m, "n_members": int(j), "k": int(k), "mean": mean, "ci_low": low, "ci_high": high,
                     "half_width": (high - low) / 2, "n_tasks": len(g)})
    return pd.DataFrame(rows, columns=OVER_TASKS_COLUMNS)


def largest_j_points(probing: pd.DataFrame) -> list[tuple[str, int]]:
    """(method, J) of each method at its largest J, in table order (raw first)."""
    rows = benchmark_rows(probing)
    top = rows.groupby("method")["n_members"].max()
    return [(m, int(top[m])) for m in ordered_methods(top.index)]


def paired_differences(probing: pd.DataFrame, points: list[tuple[tuple[str, int], tuple[str, int]]],
                       confidence: float) -> pd.DataFrame:
    """DIFFERENCE_COLUMNS for each pair of (method, J) points and each k both have: the
    mean over tasks of accuracy(a) − accuracy(b) (tasks both have) with its Student-t
    interval over tasks; outside_ci when the interval excludes 0."""
    tasks = task_accuracies(probing).set_index(["method", "n_members", "k", "dataset"])["accuracy"]
    rows = []
    for a, b in points:
        for k in sorted(set(tasks.index.get_level_values("k"))):
            try:
                x, y = tasks.loc[(a[0], a[1], k)], tasks.loc[(b[0], b[1], k)]
            except KeyError:
                continue
            both = x.index.intersection(y.index)
            if len(both) == 0:
                continue
            mean, low, high = _interval((x[both] - y[both]).to_numpy(), confidence)
            outside = bool(np.isfinite(low) and (low > 0 or high < 0))
            rows.append({"a": point_label(a), "b": point_label(b), "k": int(k), "difference": mean, "ci_low": low,
                         "ci_high": high, "outside_ci": outside, "n_tasks": len(both)})
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


def point_label(point: tuple[str, int]) -> str:
    """'bagging J=8', or the raw baseline's label."""
    name, j = point
    return method(name).label if name == RAW.name else f"{method(name).label} J={j}"


def comparisons(probing: pd.DataFrame) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """Every pair of methods at their largest J (raw included), in table order."""
    points = largest_j_points(probing)
    return [(points[i], points[j]) for i in range(len(points)) for j in range(i + 1, len(points))]


def identical_across_j(probing: pd.DataFrame, method_name: str) -> tuple[int, int]:
    """(groups whose accuracy is the same at every J, groups): groups are (run, dataset,
    class, k) of ``method_name`` with more than one J; accuracies equal within 1e-12."""
    rows = probing[probing["method"] == method_name]
    if rows["n_members"].nunique() < 2:
        return 0, 0
    spread = rows.groupby(["run", "dataset", "class", "k"])["accuracy"].agg(lambda v: float(v.max() - v.min()))
    return int((spread <= 1e-12).sum()), len(spread)


def task_names(probing: pd.DataFrame) -> list[str]:
    """The benchmark's task tags present in the table, sorted."""
    return sorted(d[len(DATASET_PREFIX):] for d in benchmark_rows(probing)["dataset"].unique())
