"""The figures: one style from sae_core.methods in every figure, the grid from the metric
catalog, the file names the stages and the report rely on, atomic writes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba

from sae_core.methods import METHODS, RAW, method
from sae_core.metric_catalog import grid_metrics
from tasks.figures import (
    INTRINSIC_GRID_NAME,
    PROBING_FIGURE_NAME,
    SCR_FIGURE_NAME,
    intrinsic_grid_figure,
    intrinsic_metric_figure,
    plot_downstream,
    plot_intrinsic,
    probing_figure,
    scr_figure,
)

J_MAX = 3


@pytest.fixture(autouse=True)
def close_figures():
    """The figure builders return open figures; close them whatever the test did."""
    yield
    plt.close("all")


def _intrinsic_summary(metrics: list[str]) -> pd.DataFrame:
    """An evaluation summary: bagging/boosting at every J, single at 1, expanded SAEs at J_MAX."""
    rows = []
    for metric in metrics:
        for spec in METHODS:
            js = range(1, J_MAX + 1) if spec.prefixes else [J_MAX if spec.matched_width else 1]
            for j in js:
                rows.append({"method": spec.name, "n_members": j, "metric": metric, "mean": 1.0 + j,
                             "ci_low": 0.5 + j, "ci_high": 1.5 + j, "n_runs": 2})
    return pd.DataFrame(rows)


def _probing_rows() -> pd.DataFrame:
    """probing_results rows: every method at J = 1..J_MAX over 2 runs, raw at J = 0 (one run) with its dense probe k = 32."""
    rows = []
    for spec in METHODS:
        for j in range(1, J_MAX + 1):
            for run in (0, 1):
                for k in (1, 2):
                    rows.append({"method": spec.name, "n_members": j, "run": run, "dataset": "bbc", "class": "tech", "k": k,
                                 "accuracy": 0.5 + 0.1 * k + 0.01 * run})
    for k in (1, 2, 32):
        rows.append({"method": RAW.name, "n_members": 0, "run": 0, "dataset": "bbc", "class": "tech", "k": k, "accuracy": 0.6})
    return pd.DataFrame(rows)


def _scr_rows() -> pd.DataFrame:
    rows = []
    for spec in (RAW, *METHODS):
        for run in ((0,) if spec is RAW else (0, 1)):
            for n in (2, 10):
                rows.append({"method": spec.name, "n_members": 0 if spec is RAW else J_MAX, "run": run, "pair": "a-b",
                             "n_ablated": n, "acc_base": 0.5, "acc_ablated": 0.6, "acc_oracle": 0.9, "score": 0.1 * n + run})
    return pd.DataFrame(rows)


def _line_colours(fig) -> dict[str, tuple]:
    """Legend label -> RGBA of the lines drawn with that label."""
    return {line.get_label(): to_rgba(line.get_color()) for ax in fig.axes for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_intrinsic_and_downstream_figures_give_each_method_its_declared_colour_label_and_line_style():
    intrinsic = intrinsic_metric_figure(_intrinsic_summary(["mse"]), "mse", 0.95)
    probing = probing_figure(_probing_rows(), 0.95)
    drawn = _line_colours(intrinsic)
    assert drawn == {spec.label: to_rgba(spec.color) for spec in METHODS}
    # downstream labels carry the J each method stands at; the raw baseline has RAW's style
    downstream = _line_colours(probing)
    assert downstream == {RAW.label: to_rgba(RAW.color),
                          **{f"{spec.label} (J={J_MAX})": to_rgba(spec.color) for spec in METHODS}}
    styles = {line.get_label(): line.get_linestyle() for line in probing.axes[0].get_lines()}
    assert styles == {RAW.label: RAW.linestyle, **{f"{spec.label} (J={J_MAX})": spec.linestyle for spec in METHODS}}
    # legend order is the methods' table order, raw first
    labels = [t.get_text() for t in probing.axes[0].get_legend().get_texts()]
    assert labels == [RAW.label, *[f"{spec.label} (J={J_MAX})" for spec in METHODS]]


def test_probing_figure_shows_each_method_at_its_largest_j_without_the_dense_probe():
    fig = probing_figure(_probing_rows(), 0.95)
    ax = fig.axes[0]
    for line in ax.get_lines():
        assert list(line.get_xdata()) == [1, 2]  # the dense probe (k = 32) is left out
    bagging = next(line for line in ax.get_lines() if line.get_label().startswith(method("bagging").label))
    # mean over the 2 runs of 0.5 + 0.1 k + 0.01 run: 0.605 at k = 1, 0.705 at k = 2
    assert list(bagging.get_ydata()) == pytest.approx([0.605, 0.705])
    # a band per method with 2 runs; none for raw (one run: no CI)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(METHODS)


def test_scr_figure_uses_a_log_axis_and_the_method_colours():
    fig = scr_figure(_scr_rows(), 0.95)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == "a-b"
    assert _line_colours(fig)[RAW.label] == to_rgba(RAW.color)


def test_grid_panels_follow_the_metric_catalog():
    grid = list(grid_metrics())
    present = [grid[3], grid[0], "diversity"]  # out of order, plus a metric not in the grid
    fig = intrinsic_grid_figure(_intrinsic_summary(present))
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert titles == [grid[0], grid[3]]
    assert intrinsic_grid_figure(_intrinsic_summary(["diversity"])) is None


def test_plot_functions_write_the_fixed_file_names_and_no_temporary_files(tmp_path):
    out = tmp_path / "figures"
    intrinsic = plot_intrinsic(_intrinsic_summary(["mse", "diversity"]), out, confidence=0.9)
    assert [p.name for p in intrinsic] == ["intrinsic_diversity.png", "intrinsic_mse.png", INTRINSIC_GRID_NAME]
    downstream = plot_downstream(_probing_rows(), _scr_rows(), out, confidence=0.9)
    assert [p.name for p in downstream] == [PROBING_FIGURE_NAME, SCR_FIGURE_NAME]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in [*intrinsic, *downstream])
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.iterdir())
    # an empty table draws nothing
    assert plot_downstream(_probing_rows().iloc[:0], _scr_rows(), tmp_path / "only_scr", 0.9)[0].name == SCR_FIGURE_NAME
    assert not (tmp_path / "only_scr" / PROBING_FIGURE_NAME).exists()
