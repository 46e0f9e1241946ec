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
- ``not measured``: a point is missing (method not trained, or too few runs);
- ``not testable``: a point cannot tell the methods apart (:func:`why_not_testable`): its
  L0 reaches d, the activation width, where any dictionary reconstructs almost anything
  (and so does every method compared there), or, for a connectivity claim, its
  connectivity is saturated.

Every claim gets two verdicts: on the raw metric, and on the metric minus its random floor
(:data:`sae_core.metric_catalog.FLOORS`: the stabilities of untrained dictionaries of the
same shapes, subtracted run by run). The floor moves with the dictionaries' widths, so only
the floor-corrected verdict of a stability claim across J or widths is a fair one; a metric
without a floor (reconstruction, connectivity) gets the same verdict twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sae_core.metric_catalog import FLOORS, metric_spec
from sae_core.methods import METHODS, TRAINED_METHOD_NAMES, method, method_rank
from tasks.report_doc import NO_VALUE
from tasks.summaries import format_row_ci

#: methods whose J_max is the largest J scored (the trained ensembles, scored at every prefix;
#: an imported bagging ensemble may hold any number of members)
PREFIX_METHODS = [m.name for m in METHODS if m.prefixes and m.name in TRAINED_METHOD_NAMES]
#: connectivity below this is saturated: fewer than 0.1% of latent pairs never fire together
#: on the tokens evaluated, so what is left measures T and L0, not how the code is organised.
#: A connectivity whose CI reaches 0 (the fully connected value) counts as saturated too.
SATURATED_CONNECTIVITY = 1e-3
NOT_TESTABLE = "not testable"
NOT_MEASURED = "not measured"
#: the columns of :func:`check_claims`
CLAIM_COLUMNS = ["claim", "claimed better", "claimed worse", "verdict (raw)", "verdict (floor-corrected)", "note"]


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
        Claim("Bagging is more stable than an expanded SAE of equal width (matched, PW-MCC)", "stability_matched",
              ("bagging", "max"), ("expanded", "max")),
        Claim("Bagging is more stable than an expanded SAE of equal width (shared latents)", "stability_shared",
              ("bagging", "max"), ("expanded", "max")),
        Claim("Bagging's matched stability (PW-MCC) rises with J", "stability_matched", ("bagging", "max"), ("bagging", "1")),
        Claim("Boosting has higher connectivity than bagging", "connectivity", ("boosting", "max"), ("bagging", "max"), higher=True),
    ]


def sanity_claims() -> list[Claim]:
    """Trained SAEs against the random-decoder baseline of the same width and sparsity (the
    2026 sanity checks): what any claim about a trained dictionary presupposes."""
    return [
        Claim("Sanity: a single SAE reconstructs better than a frozen random decoder of its width (MSE)", "mse",
              ("single", "1"), ("random_decoder", "1")),
        Claim("Sanity: bagging reconstructs better than a frozen random decoder of equal width (MSE)", "mse",
              ("bagging", "max"), ("random_decoder", "max")),
        Claim("Sanity: bagging is more stable than a frozen random decoder of equal width (matched, PW-MCC)",
              "stability_matched", ("bagging", "max"), ("random_decoder", "max")),
    ]


def _point(summary: pd.DataFrame, metric: str, name: str, J: int) -> pd.Series | None:
    rows = summary[(summary["metric"] == metric) & (summary["method"] == name) & (summary["n_members"] == J)]
    return None if rows.empty else rows.iloc[0]


def method_label(name: str) -> str:
    """The method's label (:mod:`sae_core.methods`); the name itself for a method not declared there."""
    try:
        return method(name).label
    except KeyError:
        return name


def point_label(name: str, J: int) -> str:
    """'<the method's label> J=<J>'."""
    return f"{method_label(name)} J={J}"


def connectivity_saturated(point: pd.Series) -> bool:
    """Whether a connectivity summary row (mean, ci_low) is saturated: mean below
    :data:`SATURATED_CONNECTIVITY`, or a CI that reaches 0."""
    return bool(point["mean"] < SATURATED_CONNECTIVITY or (pd.notna(point["ci_low"]) and point["ci_low"] <= 0))


def why_not_testable(summary: pd.DataFrame, name: str, J: int, d: int | None, metric: str | None = None) -> list[str]:
    """Why a comparison at (name, J) on ``metric`` cannot be trusted: its mean L0 reaches d
    (None: not checked), or ``metric`` is connectivity and it is saturated. [] when neither."""
    reasons = []
    l0 = _point(summary, "l0", name, J)
    if d is not None and l0 is not None and l0["mean"] >= d:
        reasons.append(f"L0 {l0['mean']:.0f} ≥ d = {d}")
    if metric == "connectivity":
        conn = _point(summary, "connectivity", name, J)
        if conn is not None and connectivity_saturated(conn):
            reasons.append(f"connectivity {conn['mean']:.2g} saturated")
    return reasons


def untestable_points(summary: pd.DataFrame, d: int | None) -> pd.DataFrame:
    """Every (method, J) of ``summary`` whose L0 reaches d or whose connectivity is saturated:
    method (its label), J, L0, connectivity and why, in table order."""
    keys = summary[["method", "n_members"]].drop_duplicates()
    keys = keys.assign(rank=keys["method"].map(method_rank)).sort_values(["rank", "n_members"])
    rows = []
    for name, J in zip(keys["method"], keys["n_members"]):
        reasons = why_not_testable(summary, name, int(J), d, "connectivity")
        if reasons:
            l0, conn = _point(summary, "l0", name, J), _point(summary, "connectivity", name, J)
            rows.append({"method": method_label(name), "J": int(J),
                         "L0": format_row_ci(l0) if l0 is not None else NO_VALUE,
                         "connectivity": format_row_ci(conn) if conn is not None else NO_VALUE,
                         "why": "; ".join(reasons)})
    return pd.DataFrame(rows, columns=["method", "J", "L0", "connectivity", "why"])


def _verdict(a: pd.Series, b: pd.Series, higher_is_better: bool) -> str:
    """The verdict of 'a beats b' from two summary rows (see the module docstring)."""
    holds = a["mean"] > b["mean"] if higher_is_better else a["mean"] < b["mean"]
    if pd.isna(a["ci_low"]) or pd.isna(b["ci_low"]):
        return ("same direction" if holds else "opposite direction") + ", no CI (one run)"
    overlap = a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]
    if holds:
        return "same direction, CIs overlap" if overlap else "supported"
    return "opposite direction, CIs overlap" if overlap else "contradicted"


def check_claims(summary: pd.DataFrame, claims: list[Claim] | None = None, d: int | None = None) -> pd.DataFrame:
    """One row per claim (:data:`CLAIM_COLUMNS`): the two points (mean [95% CI], L0), the
    verdict on the raw metric and on the metric minus its random floor, and a note (why a
    claim is not testable; the floor-corrected values).

    ``summary``: the evaluation stage's summary (method, n_members, metric, mean, ci_low,
    ci_high, n_runs). J_max is the largest J of bagging/boosting in it. ``d``: the width of
    the activations (``activations/manifest.json``); a point whose L0 reaches it makes the
    claim not testable (None: not checked).
    """
    claims = claims if claims is not None else paper_claims() + sanity_claims()
    ensembles = summary[summary["method"].isin(PREFIX_METHODS)]
    j_max = int(ensembles["n_members"].max()) if not ensembles.empty else 1
    rows = []
    for c in claims:
        (name_a, J_a), (name_b, J_b) = ((n, j_max if w == "max" else 1) for n, w in (c.better, c.worse))
        a, b = _point(summary, c.metric, name_a, J_a), _point(summary, c.metric, name_b, J_b)
        if a is None or b is None:
            rows.append({"claim": c.text, "claimed better": point_label(name_a, J_a), "claimed worse": point_label(name_b, J_b),
                         "verdict (raw)": NOT_MEASURED, "verdict (floor-corrected)": NOT_MEASURED, "note": ""})
            continue

        def describe(name: str, J: int, point: pd.Series) -> str:
            l0 = _point(summary, "l0", name, J)
            return f"{point_label(name, J)}: {format_row_ci(point)}" + (f" (L0 {l0['mean']:.0f})" if l0 is not None else "")

        raw = _verdict(a, b, c.higher_is_better)
        corrected, note = raw, ""
        if c.metric in FLOORS:
            minus_floor = FLOORS[c.metric][1]
            ca, cb = _point(summary, minus_floor, name_a, J_a), _point(summary, minus_floor, name_b, J_b)
            if ca is None or cb is None:
                corrected = NOT_MEASURED
            else:
                corrected = _verdict(ca, cb, c.higher_is_better)
                note = f"{minus_floor}: {format_row_ci(ca)} vs {format_row_ci(cb)}"
        reasons = [f"{point_label(n, J)}: {why}" for n, J in ((name_a, J_a), (name_b, J_b))
                   for why in why_not_testable(summary, n, J, d, c.metric)]
        if reasons:
            raw = corrected = NOT_TESTABLE
            note = "; ".join(reasons) + (f"; {note}" if note else "")
        rows.append({"claim": c.text, "claimed better": describe(name_a, J_a, a), "claimed worse": describe(name_b, J_b, b),
                     "verdict (raw)": raw, "verdict (floor-corrected)": corrected, "note": note})
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)
