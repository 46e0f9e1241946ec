"""Where a sweep's results lie and how its points are summarised: what the report reads, without
the sweep's training and evaluation code (tasks/sweep.py), so a report never imports torch for it."""

from __future__ import annotations

import pandas as pd

SWEEP_DIR = "sweep"
POINTS_DIR = f"{SWEEP_DIR}/points"
RESULTS_FILE = f"{SWEEP_DIR}/results.parquet"
BEST_FILE = f"{SWEEP_DIR}/best.yaml"


def point_means(frame: pd.DataFrame) -> pd.DataFrame:
    """The last round of every point, its seeds averaged: point, params, l0, c_dec, score, explained_variance, …"""
    last = frame[frame["round"] == frame.groupby("point")["round"].transform("max")]
    numeric = ["l0", "c_dec", "score", "explained_variance", "mse", "dead_fraction", "stability", "tokens"]
    return last.groupby(["point", "params"], as_index=False)[numeric].mean().sort_values("point").reset_index(drop=True)
