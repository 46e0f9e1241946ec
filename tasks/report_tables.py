"""The report's tables, computed from the stages' tables (pure pandas, nothing read or written).

Methods are listed in :mod:`sae_core.methods`' order, by their labels there, and metrics in
:mod:`sae_core.metric_catalog`'s; every "mean [CI]" comes from
:func:`tasks.summaries.summarise_over_runs` and is written by :func:`tasks.summaries.format_ci`.
"""

from __future__ import annotations

import pandas as pd

from sae_core.methods import method_rank, ordered_methods
from sae_core.metric_catalog import METRIC_NAMES, metric_spec, ordered_metrics
from tasks.claims import method_label
from tasks.report_doc import NO_VALUE
from tasks.summaries import format_ci, format_row_ci, summarise_over_runs

OPERATING_EV_BAND = (0.85, 0.92)   # SPEC §11: each member's explained variance in this band
OPERATING_MAX_L0 = 64              # SPEC §11: and its L0 at most this
OPERATING_METRICS = ["explained_variance", "l0"]


def _method_order(column: pd.Series) -> pd.Series:
    """Sort key of a ``method`` column: table order, not alphabetical."""
    return column.map(method_rank) if column.name == "method" else column


def metric_tables(summary: pd.DataFrame, tokens_evaluated: int | None = None) -> dict[str, pd.DataFrame]:
    """Per metric (table order): one row per method and J with 'mean [CI]', L0 of the same
    method and J beside it, T (tokens evaluated) beside a token-dependent metric when
    ``tokens_evaluated`` is known, and the number of runs."""
    l0 = summary[summary["metric"] == "l0"].set_index(["method", "n_members"])
    tables = {}
    for metric in ordered_metrics(summary["metric"]):
        token_dependent = metric in METRIC_NAMES and metric_spec(metric).token_dependent
        part = summary[summary["metric"] == metric]
        rows = []
        for method in ordered_methods(part["method"]):
            for r in part[part["method"] == method].sort_values("n_members").itertuples(index=False):
                row = {"method": method_label(method), "J": int(r.n_members), metric: format_ci(r.mean, r.ci_low, r.ci_high)}
                if metric != "l0":
                    key = (method, r.n_members)
                    row["L0"] = format_row_ci(l0.loc[key]) if key in l0.index else NO_VALUE
                if token_dependent and tokens_evaluated is not None:
                    row["T"] = tokens_evaluated
                row["runs"] = int(r.n_runs)
                rows.append(row)
        tables[metric] = pd.DataFrame(rows)
    return tables


def operating_point(summary: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Explained variance and L0 of one member (J = 1) per method, and a sentence judging
    the single SAE's against SPEC §11's band."""
    one = summary[(summary["n_members"] == 1) & summary["metric"].isin(OPERATING_METRICS)]
    wide = one.pivot_table(index="method", columns="metric", values="mean", aggfunc="first").reset_index()
    wide = wide.sort_values("method", key=_method_order).reset_index(drop=True)
    wide.columns.name = None
    single = wide[wide["method"] == "single"]
    wide["method"] = wide["method"].map(method_label)
    if single.empty or not set(OPERATING_METRICS) <= set(wide.columns):
        return wide, "The single SAE's explained variance and L0 are not in the summary; the operating point cannot be stated."
    ev, l0 = float(single["explained_variance"].iloc[0]), float(single["l0"].iloc[0])
    low, high = OPERATING_EV_BAND
    verdict = "inside" if low <= ev <= high and l0 <= OPERATING_MAX_L0 else "**outside**"
    text = (
        f"Operating point: one member (single SAE) reaches explained variance {ev:.3f} at L0 {l0:.1f}, {verdict} the "
        f"target band (EV {low}–{high}, L0 ≤ {OPERATING_MAX_L0}; SPEC §11)."
    )
    return wide, text


def _over_runs_wide(frame: pd.DataFrame, rows: list[str], column: str, value: str, prefix: str, confidence: float) -> pd.DataFrame:
    """'mean [CI]' over runs of ``value`` (rows sharing ``rows`` + ``column`` + run averaged
    first), one row per ``rows`` in table order, one column '<prefix>=<c>' per ``column`` value."""
    summary = summarise_over_runs(frame, [*rows, column], value, confidence)
    summary["cell"] = [format_row_ci(r) for r in summary.itertuples(index=False)]
    wide = summary.pivot(index=rows, columns=column, values="cell")
    wide.columns = [f"{prefix}={int(c)}" for c in wide.columns]
    wide = wide.reset_index().rename(columns={"n_members": "J"}).astype({"J": int})
    wide = wide.sort_values([r if r != "n_members" else "J" for r in rows], key=_method_order).reset_index(drop=True)
    return wide.assign(method=wide["method"].map(method_label))


def probing_table(probing: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Accuracy (mean over classes, then mean [CI] over runs) per dataset, method, J; one column per k."""
    return _over_runs_wide(probing, ["dataset", "method", "n_members"], "k", "accuracy", "k", confidence)


def scr_table(scr: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """SCR score S (mean over pairs, then mean [CI] over runs) per method, J; one column per n."""
    return _over_runs_wide(scr, ["method", "n_members"], "n_ablated", "score", "n", confidence)


def scr_baselines(scr: pd.DataFrame) -> pd.DataFrame:
    """Per topic pair: the biased probe's accuracy (A_base) and the oracle's (A_oracle)."""
    return scr.groupby("pair", as_index=False)[["acc_base", "acc_oracle"]].mean()
