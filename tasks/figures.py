"""Every figure of the pipeline, drawn in one style (PNG, written atomically).

A method looks the same in every figure: its colour, label and line style come from
:mod:`sae_core.methods` (the raw-activation baseline from ``methods.RAW``), and a method's
curve is always its mean over runs with the CI band over runs (:func:`draw_curve`).

- Evaluation stage, the paper's Figure 2 (:func:`plot_intrinsic`): each metric against
  the number of members J for bagging and boosting; the single SAE (J = 1) and the
  expanded SAEs (at the J whose width they match) as reference lines.
- Downstream stage (:func:`plot_downstream`): probing accuracy against k per dataset and
  the SCR score against the number of ablated latents per pair, each method at its
  largest J.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from sae_core.methods import METHODS, RAW, Method, method, ordered_methods
from sae_core.metric_catalog import grid_metrics
from tasks.summaries import summarise_over_runs

PROBING_FIGURE_NAME = "probing_accuracy_vs_k.png"
SCR_FIGURE_NAME = "scr_score_vs_n.png"
BENCHMARK_FIGURE_NAME = "probing_benchmark.png"
INTRINSIC_GRID_NAME = "intrinsic.png"

DPI = 110
CI_BAND_ALPHA = 0.2
MARKER_SIZE = 3
REFERENCE_MARKER_SIZE = 4
REFERENCE_LINE_WIDTH = 1
REFERENCE_CAPSIZE = 3
NOTE_FONT = 6
SMALL_FONT = 7  # legends, tick labels
LABEL_FONT = 8
TITLE_FONT = 9
GRID_ALPHA = 0.3

METRIC_FIGSIZE = (4.2, 3.0)  # one intrinsic metric, inches
GRID_COLUMNS = 5
GRID_CELL = (3.2, 2.6)  # one panel of the intrinsic grid, inches
GRID_LEGEND_HEIGHT = 0.06  # fraction of the grid figure kept free below the panels for the legend
PANEL_WIDTH = 4.5  # one dataset or pair of a downstream figure, inches
PANEL_HEIGHT = 3.8
MIN_DOWNSTREAM_WIDTH = 6.5  # a single panel still leaves room for the legend
ACCURACY_YLIM = (0.0, 1.02)  # room above 1 so a perfect probe's markers are not clipped


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def draw_curve(ax, curve: pd.DataFrame, x: str, spec: Method, label: str) -> None:
    """One method's mean against ``x`` in its colour and line style, with its CI band.

    ``curve``: rows sorted by ``x`` with columns mean, ci_low, ci_high (as
    :func:`tasks.summaries.summarise_over_runs` writes them); the band is left out where
    the CI is undefined (a single run).
    """
    ax.plot(curve[x], curve["mean"], marker="o", ms=MARKER_SIZE, color=spec.color, linestyle=spec.linestyle, label=label)
    if curve["ci_low"].notna().any():
        ax.fill_between(curve[x], curve["ci_low"], curve["ci_high"], color=spec.color, alpha=CI_BAND_ALPHA, linewidth=0)


def _unique_handles(ax) -> dict:
    """The legend entries of ``ax``, one per label (reference lines repeat theirs once per run)."""
    handles, labels = ax.get_legend_handles_labels()
    return dict(zip(labels, handles))


# ------------------------------------------------------------------------ intrinsic
def _draw_vs_j(ax, rows, specs) -> None:
    """Each method of ``specs`` in ``rows`` against J: a curve with its CI band for the methods
    scored at every prefix, a reference (line or marker) for the others."""
    for spec in specs:
        sub = rows[rows["method"] == spec.name]
        if sub.empty:
            continue
        if spec.prefixes:
            draw_curve(ax, sub.sort_values("n_members"), "n_members", spec, spec.label)
        else:
            _draw_reference(ax, sub, spec)


def _draw_reference(ax, rows: pd.DataFrame, spec: Method) -> None:
    """A method scored at one J: a horizontal line at its mean; matched-width methods also
    get a marker with the CI at the J they match."""
    for _, r in rows.iterrows():
        ax.axhline(r["mean"], color=spec.color, ls=spec.linestyle, lw=REFERENCE_LINE_WIDTH, label=spec.label)
        if spec.matched_width:
            err = None if pd.isna(r["ci_low"]) else [[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]]
            ax.errorbar([r["n_members"]], [r["mean"]], yerr=err, fmt="s", color=spec.color, ms=REFERENCE_MARKER_SIZE, capsize=REFERENCE_CAPSIZE)


def _draw_metric(ax, summary: pd.DataFrame, metric: str) -> None:
    from matplotlib.ticker import MaxNLocator

    _draw_vs_j(ax, summary[summary["metric"] == metric], METHODS)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(metric, fontsize=TITLE_FONT)
    ax.set_xlabel("members J", fontsize=LABEL_FONT)
    ax.tick_params(labelsize=SMALL_FONT)


def intrinsic_metric_figure(summary: pd.DataFrame, metric: str, confidence: float):
    """One metric of the evaluation summary (metric, method, n_members, mean, ci_low, ci_high) against J."""
    fig, ax = _pyplot().subplots(figsize=METRIC_FIGSIZE)
    _draw_metric(ax, summary, metric)
    unique = _unique_handles(ax)
    ax.legend(unique.values(), unique.keys(), fontsize=SMALL_FONT)
    ax.text(0.99, 0.01, f"bands: {confidence:.0%} CI over runs", transform=ax.transAxes, ha="right", va="bottom",
            fontsize=NOTE_FONT, color="gray")
    return fig


def intrinsic_grid_figure(summary: pd.DataFrame):
    """The metrics of :func:`sae_core.metric_catalog.grid_metrics` present in ``summary``,
    one panel each (the paper's Figure 2); None when none is present."""
    present = [m for m in grid_metrics() if m in set(summary["metric"])]
    if not present:
        return None
    rows = -(-len(present) // GRID_COLUMNS)
    fig, axes = _pyplot().subplots(rows, GRID_COLUMNS, figsize=(GRID_CELL[0] * GRID_COLUMNS, GRID_CELL[1] * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        _draw_metric(ax, summary, metric)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    unique = _unique_handles(axes.flat[0])
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), fontsize=LABEL_FONT)
    fig.tight_layout(rect=(0, GRID_LEGEND_HEIGHT, 1, 1))
    return fig


def plot_intrinsic(summary: pd.DataFrame, directory: Path, confidence: float = 0.95) -> list[Path]:
    """One PNG per metric (``intrinsic_<metric>.png``) plus the grid ``intrinsic.png``; returns the paths written."""
    written = [
        save_figure(intrinsic_metric_figure(summary, metric, confidence), directory / f"intrinsic_{metric}.png")
        for metric in sorted(summary["metric"].unique())
    ]
    grid = intrinsic_grid_figure(summary)
    if grid is not None:
        written.append(save_figure(grid, directory / INTRINSIC_GRID_NAME))
    return written


# ----------------------------------------------------------------------- downstream
def _at_largest_j(frame: pd.DataFrame) -> pd.DataFrame:
    """Each method at its largest J (the comparison the paper makes)."""
    top = frame.groupby("method")["n_members"].transform("max")
    return frame[frame["n_members"] == top]


def _method_panels(summary: pd.DataFrame, panel: str, x: str, ylabel: str, title: str, logx: bool,
                   ylim: tuple[float, float] | None = None):
    """One panel per value of ``panel``: every method's mean against ``x`` with its CI band."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    panels = sorted(summary[panel].unique())
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(max(MIN_DOWNSTREAM_WIDTH, PANEL_WIDTH * len(panels)), PANEL_HEIGHT),
                                   squeeze=False)
    for ax, name in zip(axes[0], panels):
        sub = summary[summary[panel] == name]
        for method_name in ordered_methods(sub["method"]):
            curve = sub[sub["method"] == method_name].sort_values(x)
            spec = method(method_name)
            label = spec.label if spec.name == RAW.name else f"{spec.label} (J={int(curve['n_members'].iloc[0])})"
            draw_curve(ax, curve, x, spec, label)
        if logx:
            ax.set_xscale("log")
        ax.set_xticks(sorted(sub[x].unique()))
        ax.xaxis.set_major_formatter(ScalarFormatter())  # plain numbers on the log axis too
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(str(name))
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=GRID_ALPHA)
    axes[0][-1].legend(fontsize=SMALL_FONT)
    fig.suptitle(title, fontsize=TITLE_FONT)
    fig.tight_layout()
    return fig


def probing_figure(probing: pd.DataFrame, confidence: float):
    """Probing accuracy (mean over classes) against k per dataset, from the probing_results table.

    The raw baseline's dense probe (k = d, far beyond the sparse k's) is left out: it
    would stretch the axis; the report's table shows it.
    """
    trained = probing["method"] != RAW.name
    if trained.any():
        probing = probing[trained | (probing["k"] <= probing.loc[trained, "k"].max())]
    summary = summarise_over_runs(_at_largest_j(probing), ["dataset", "method", "n_members", "k"], "accuracy", confidence)
    return _method_panels(summary, "dataset", "k", "test accuracy (mean over classes)",
                          f"Sparse probing, each method at its largest J; {confidence:.0%} CI over runs", logx=False,
                          ylim=ACCURACY_YLIM)


def scr_figure(scr: pd.DataFrame, confidence: float):
    """SCR score S against the number of ablated latents per pair, from the scr_results table."""
    summary = summarise_over_runs(_at_largest_j(scr), ["pair", "method", "n_members", "n_ablated"], "score", confidence)
    return _method_panels(summary, "pair", "n_ablated", "SCR score S",
                          f"SCR (SHIFT), each method at its largest J; {confidence:.0%} CI over runs", logx=True)


def benchmark_figure(over_tasks: pd.DataFrame, confidence: float):
    """The sae-probes benchmark: mean accuracy over tasks against k (each method at its
    largest J) and against J (one panel per k: bagging and boosting curves, the methods
    scored at one J as reference lines), bands the CI over tasks.

    ``over_tasks``: method, n_members, k, mean, ci_low, ci_high (as
    :func:`tasks.probing_benchmark.mean_over_tasks` writes them); the raw baseline's dense
    probe (k = d) is left out.
    """
    from matplotlib.ticker import MaxNLocator

    trained = over_tasks["method"] != RAW.name
    ks = sorted(over_tasks.loc[trained, "k"].unique()) if trained.any() else sorted(over_tasks["k"].unique())
    frame = over_tasks[over_tasks["k"].isin(ks)]
    fig, axes = _pyplot().subplots(1, 1 + len(ks), figsize=(PANEL_WIDTH * (1 + len(ks)) * 0.8, PANEL_HEIGHT), squeeze=False)
    ax = axes[0][0]
    at_top = _at_largest_j(frame)
    for name in ordered_methods(at_top["method"]):
        curve = at_top[at_top["method"] == name].sort_values("k")
        spec = method(name)
        draw_curve(ax, curve, "k", spec, spec.label if name == RAW.name else f"{spec.label} (J={int(curve['n_members'].iloc[0])})")
    ax.set_xticks(ks)
    ax.set_title("vs k, each method at its largest J", fontsize=TITLE_FONT)
    ax.set_xlabel("k", fontsize=LABEL_FONT)
    ax.set_ylabel("test accuracy, mean over tasks", fontsize=LABEL_FONT)
    ax.legend(fontsize=SMALL_FONT)
    for ax, k in zip(axes[0][1:], ks):
        _draw_vs_j(ax, frame[frame["k"] == k], (RAW, *METHODS))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"vs J, k = {k}", fontsize=TITLE_FONT)
        ax.set_xlabel("members J", fontsize=LABEL_FONT)
        unique = _unique_handles(ax)
        ax.legend(unique.values(), unique.keys(), fontsize=NOTE_FONT)
    for ax in axes[0]:
        ax.grid(alpha=GRID_ALPHA)
        ax.tick_params(labelsize=SMALL_FONT)
    n_tasks = int(over_tasks["n_tasks"].max()) if "n_tasks" in over_tasks else 0
    fig.suptitle(f"sae-probes benchmark: sparse probing over {n_tasks} tasks; bands: {confidence:.0%} CI over tasks", fontsize=TITLE_FONT)
    fig.tight_layout()
    return fig


def plot_downstream(probing: pd.DataFrame, scr: pd.DataFrame, directory: Path, confidence: float = 0.95) -> list[Path]:
    """``probing_accuracy_vs_k.png`` and ``scr_score_vs_n.png`` (each only if its table has
    rows); returns the paths written."""
    written = []
    if len(probing):
        written.append(save_figure(probing_figure(probing, confidence), directory / PROBING_FIGURE_NAME))
    if len(scr):
        written.append(save_figure(scr_figure(scr, confidence), directory / SCR_FIGURE_NAME))
    return written
