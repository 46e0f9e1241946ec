"""The paper's intrinsic claims, checked against a run's metric summary.

Each claim is an ordering of two (method, J) points on one metric (the paper's headline
comparisons are at J = J_max against an expanded SAE of the same width, plus the single SAE
at J = 1). Which way is better comes from the metric's declaration
(:func:`sae_core.metric_catalog.metric_spec`) unless the claim states it. A verdict
compares means and 95% CIs:

- ``supported``: the ordering holds and the CIs do not overlap;
- ``same direction, CIs overlap``: the ordering holds but the runs cannot separate them;
- ``contradicted``: the opposite ordering holds with non-overlapping CIs;
- ``opposite direction, CIs overlap``;
- ``not measured``: a point is missing (method not trained, or too few runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sae_core.metric_catalog import metric_spec
from sae_core.methods import METHODS
from tasks.summaries import format_row_ci

#: methods whose J_max is the largest J scored (the ensembles, scored at every prefix)
PREFIX_METHODS = [m.name for m in METHODS if m.prefixes]


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``worse`` on ``metric``.

    better, worse: (method, "max" | "1"): the method at J = J_max or at J = 1.
    higher: whether ``better`` is claimed to have the higher value; None (the default)
        takes the metric's declared direction. Only a claim on a metric without one
        (connectivity: neither more nor less is good in itself) states it.
    """

    text: str
    metric: str
    better: tuple[str, str]
    worse: tuple[str, str]
    higher: bool | None = None

    def __post_init__(self) -> None:
        if self.higher is None and metric_spec(self.metric).better is None:
            raise ValueError(f"claim {self.text!r}: metric {self.metric!r} declares no better direction; pass higher=")

    @property
    def higher_is_better(self) -> bool:
        return self.higher if self.higher is not None else metric_spec(self.metric).better == "higher"


def paper_claims() -> list[Claim]:
    """The claims of *Ensembling Sparse Autoencoders* (v2) that intrinsic metrics can test."""
    return [
        Claim("Boosting reconstructs better than bagging (MSE)", "mse", ("boosting", "max"), ("bagging", "max")),
        Claim("Boosting reconstructs better than an expanded SAE of equal width (MSE)", "mse", ("boosting", "max"), ("expanded", "max")),
        Claim("Boosting explains more variance than an expanded SAE of equal width", "explained_variance", ("boosting", "max"), ("expanded", "max")),
        Claim("Bagging reconstructs better than a single SAE (MSE)", "mse", ("bagging", "max"), ("single", "1")),
        Claim("Bagging is more stable than boosting", "stability", ("bagging", "max"), ("boosting", "max")),
        Claim("Bagging is more stable than an expanded SAE of equal width", "stability", ("bagging", "max"), ("expanded", "max")),
        Claim("Boosting is more stable than an expanded SAE of equal width", "stability", ("boosting", "max"), ("expanded", "max")),
        Claim("An expanded SAE is less stable than a single SAE", "stability", ("single", "1"), ("expanded", "max")),
        Claim("Bagging's stability rises with J", "stability", ("bagging", "max"), ("bagging", "1")),
        Claim("Boosting has higher connectivity than bagging", "connectivity", ("boosting", "max"), ("bagging", "max"), higher=True),
    ]


def _point(summary: pd.DataFrame, metric: str, method: str, which: str, j_max: int) -> pd.Series | None:
    J = j_max if which == "max" else 1
    rows = summary[(summary["metric"] == metric) & (summary["method"] == method) & (summary["n_members"] == J)]
    return None if rows.empty else rows.iloc[0]


def check_claims(summary: pd.DataFrame, claims: list[Claim] | None = None) -> pd.DataFrame:
    """One row per claim: the two points (mean [95% CI], L0), and the verdict.

    ``summary``: the evaluation stage's summary (method, n_members, metric, mean, ci_low,
    ci_high, n_runs). J_max is the largest J of bagging/boosting in it.
    """
    claims = claims if claims is not None else paper_claims()
    ensembles = summary[summary["method"].isin(PREFIX_METHODS)]
    j_max = int(ensembles["n_members"].max()) if not ensembles.empty else 1
    rows = []
    for c in claims:
        a = _point(summary, c.metric, *c.better, j_max)
        b = _point(summary, c.metric, *c.worse, j_max)
        label_a = f"{c.better[0]} J={j_max if c.better[1] == 'max' else 1}"
        label_b = f"{c.worse[0]} J={j_max if c.worse[1] == 'max' else 1}"
        if a is None or b is None:
            rows.append({"claim": c.text, "claimed better": label_a, "claimed worse": label_b, "verdict": "not measured"})
            continue
        holds = a["mean"] > b["mean"] if c.higher_is_better else a["mean"] < b["mean"]
        have_ci = not (pd.isna(a["ci_low"]) or pd.isna(b["ci_low"]))
        overlap = have_ci and a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]
        if not have_ci:
            verdict = ("same direction" if holds else "opposite direction") + ", no CI (one run)"
        elif holds:
            verdict = "same direction, CIs overlap" if overlap else "supported"
        else:
            verdict = "opposite direction, CIs overlap" if overlap else "contradicted"

        def describe(label: str, point: pd.Series, where: tuple[str, str]) -> str:
            l0 = _point(summary, "l0", *where, j_max)
            return f"{label}: {format_row_ci(point)}" + (f" (L0 {l0['mean']:.0f})" if l0 is not None else "")

        rows.append({
            "claim": c.text,
            "claimed better": describe(label_a, a, c.better),
            "claimed worse": describe(label_b, b, c.worse),
            "verdict": verdict,
        })
    return pd.DataFrame(rows)
