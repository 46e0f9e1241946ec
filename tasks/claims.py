"""The paper's intrinsic claims, checked against a run's metric summary.

Each claim is an ordering of two (method, J) points on one metric (the paper's headline
comparisons are at J = J_max against an expanded SAE of the same width, plus the single SAE
at J = 1). A verdict compares means and 95% CIs:

- ``supported``: the ordering holds and the CIs do not overlap;
- ``same direction, CIs overlap``: the ordering holds but the runs cannot separate them;
- ``contradicted``: the opposite ordering holds with non-overlapping CIs;
- ``opposite direction, CIs overlap``;
- ``not measured``: a point is missing (method not trained, or too few runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Claim:
    text: str
    metric: str
    better: tuple[str, str]  # (method, "max" | "1"): J = J_max or J = 1
    worse: tuple[str, str]
    higher_is_better: bool


def paper_claims() -> list[Claim]:
    """The claims of *Ensembling Sparse Autoencoders* (v2) that intrinsic metrics can test."""
    return [
        Claim("Boosting reconstructs better than bagging (MSE)", "mse", ("boosting", "max"), ("bagging", "max"), False),
        Claim("Boosting reconstructs better than an expanded SAE of equal width (MSE)", "mse", ("boosting", "max"), ("expanded", "max"), False),
        Claim("Boosting explains more variance than an expanded SAE of equal width", "explained_variance", ("boosting", "max"), ("expanded", "max"), True),
        Claim("Bagging reconstructs better than a single SAE (MSE)", "mse", ("bagging", "max"), ("single", "1"), False),
        Claim("Bagging is more stable than boosting", "stability", ("bagging", "max"), ("boosting", "max"), True),
        Claim("Bagging is more stable than an expanded SAE of equal width", "stability", ("bagging", "max"), ("expanded", "max"), True),
        Claim("Boosting is more stable than an expanded SAE of equal width", "stability", ("boosting", "max"), ("expanded", "max"), True),
        Claim("An expanded SAE is less stable than a single SAE", "stability", ("single", "1"), ("expanded", "max"), True),
        Claim("Bagging's stability rises with J", "stability", ("bagging", "max"), ("bagging", "1"), True),
        Claim("Boosting has higher connectivity than bagging", "connectivity", ("boosting", "max"), ("bagging", "max"), True),
    ]


def _point(summary: pd.DataFrame, metric: str, method: str, which: str, j_max: int) -> pd.Series | None:
    J = j_max if which == "max" else 1
    rows = summary[(summary["metric"] == metric) & (summary["method"] == method) & (summary["n_members"] == J)]
    return None if rows.empty else rows.iloc[0]


def _fmt(row: pd.Series) -> str:
    if pd.isna(row["ci_low"]):
        return f"{row['mean']:.4g}"
    return f"{row['mean']:.4g} [{row['ci_low']:.4g}, {row['ci_high']:.4g}]"


def check_claims(summary: pd.DataFrame, claims: list[Claim] | None = None) -> pd.DataFrame:
    """One row per claim: the two points (mean [95% CI], L0), and the verdict.

    ``summary``: the evaluation stage's summary (method, n_members, metric, mean, ci_low,
    ci_high, n_runs). J_max is the largest J of bagging/boosting in it.
    """
    claims = claims if claims is not None else paper_claims()
    ensembles = summary[summary["method"].isin(["bagging", "boosting"])]
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
            return f"{label}: {_fmt(point)}" + (f" (L0 {l0['mean']:.0f})" if l0 is not None else "")

        rows.append({
            "claim": c.text,
            "claimed better": describe(label_a, a, c.better),
            "claimed worse": describe(label_b, b, c.worse),
            "verdict": verdict,
        })
    return pd.DataFrame(rows)
