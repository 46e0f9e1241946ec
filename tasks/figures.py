"""Figures of the evaluation stage (PNG, written atomically).

The paper's Figure 2: each metric against the number of members J for bagging and
boosting, with CI bands over runs; the single SAE (J = 1) and the expanded SAEs (at the J
whose width they match) as reference lines.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

STYLE = {
    "bagging": {"color": "tab:blue", "label": "bagging"},
    "boosting": {"color": "tab:orange", "label": "boosting"},
    "single": {"color": "black", "label": "single SAE"},
    "expanded": {"color": "tab:green", "label": "expanded SAE"},
    "expanded_compute_matched": {"color": "tab:red", "label": "expanded SAE, J× steps"},
}
GRID_METRICS = (
    "mse", "explained_variance", "l0", "connectivity", "diversity_fraction", "stability",
    "stability_matched", "dead_fraction", "c_dec", "shrinkage_gamma",
)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _draw(ax, summary: pd.DataFrame, metric: str) -> None:
    rows = summary[summary["metric"] == metric]
    for method in ("bagging", "boosting"):
        curve = rows[rows["method"] == method].sort_values("n_members")
        if curve.empty:
            continue
        style = STYLE[method]
        ax.plot(curve["n_members"], curve["mean"], marker="o", ms=3, color=style["color"], label=style["label"])
        if curve["ci_low"].notna().all():
            ax.fill_between(curve["n_members"], curve["ci_low"], curve["ci_high"], color=style["color"], alpha=0.2)
    for method in ("single", "expanded", "expanded_compute_matched"):
        ref = rows[rows["method"] == method]
        style = STYLE[method]
        for _, r in ref.iterrows():
            ax.axhline(r["mean"], color=style["color"], ls="--" if method == "single" else ":", lw=1, label=style["label"])
            if method != "single":
                err = None if pd.isna(r["ci_low"]) else [[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]]
                ax.errorbar([r["n_members"]], [r["mean"]], yerr=err, fmt="s", color=style["color"], ms=4, capsize=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(metric, fontsize=9)
    ax.set_xlabel("members J", fontsize=8)
    ax.tick_params(labelsize=7)


def plot_intrinsic(summary: pd.DataFrame, directory: Path, confidence: float = 0.95) -> list[Path]:
    """One PNG per metric plus the grid ``intrinsic.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric in sorted(summary["metric"].unique()):
        fig, ax = plt.subplots(figsize=(4.2, 3.0))
        _draw(ax, summary, metric)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.text(0.99, 0.01, f"bands: {confidence:.0%} CI over runs", transform=ax.transAxes, ha="right", va="bottom", fontsize=6, color="gray")
        written.append(_save(fig, directory / f"intrinsic_{metric}.png"))
        plt.close(fig)
    present = [m for m in GRID_METRICS if m in set(summary["metric"])]
    if present:
        cols = 5
        rows = -(-len(present) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, present):
            _draw(ax, summary, metric)
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), fontsize=8)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        written.append(_save(fig, directory / "intrinsic.png"))
        plt.close(fig)
    return written
