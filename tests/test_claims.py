"""Paper-claim verdicts from a hand-made metric summary."""

import pandas as pd
import pytest

from tasks.claims import Claim, check_claims, paper_claims


def _row(method, J, metric, mean, lo, hi):
    return {"method": method, "n_members": J, "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi, "n_runs": 3}


SUMMARY = pd.DataFrame([
    _row("boosting", 4, "mse", 10.0, 9.0, 11.0),
    _row("bagging", 4, "mse", 20.0, 19.0, 21.0),
    _row("expanded", 4, "mse", 10.5, 9.5, 11.5),
    _row("single", 1, "mse", 8.0, 7.0, 9.0),
    _row("bagging", 4, "l0", 128.0, 128.0, 128.0),
    _row("boosting", 4, "l0", 128.0, 128.0, 128.0),
    _row("bagging", 4, "connectivity", 0.2, 0.1, 0.3),
    _row("boosting", 4, "connectivity", 0.6, 0.5, 0.7),
])


def test_verdicts_follow_means_and_ci_overlap():
    claims = [
        Claim("boost < bag", "mse", ("boosting", "max"), ("bagging", "max")),      # holds, CIs apart
        Claim("boost < expanded", "mse", ("boosting", "max"), ("expanded", "max")),  # holds, CIs overlap
        Claim("bag < single", "mse", ("bagging", "max"), ("single", "1")),         # reversed, CIs apart
        Claim("stability", "stability", ("bagging", "max"), ("boosting", "max")),    # not measured
    ]
    got = check_claims(SUMMARY, claims)
    assert list(got["verdict"]) == ["supported", "same direction, CIs overlap", "contradicted", "not measured"]
    assert got.loc[0, "claimed better"] == "boosting J=4: 10 [9, 11] (L0 128)"
    assert got.loc[2, "claimed worse"] == "single J=1: 8 [7, 9]"


def test_the_direction_comes_from_the_metric_unless_the_claim_states_it():
    assert not Claim("mse", "mse", ("boosting", "max"), ("bagging", "max")).higher_is_better   # MSE: lower is better
    assert Claim("ev", "explained_variance", ("boosting", "max"), ("bagging", "max")).higher_is_better
    with pytest.raises(ValueError, match="connectivity.*declares no better direction"):
        Claim("more connected", "connectivity", ("boosting", "max"), ("bagging", "max"))
    higher = Claim("more connected", "connectivity", ("boosting", "max"), ("bagging", "max"), higher=True)
    lower = Claim("less connected", "connectivity", ("boosting", "max"), ("bagging", "max"), higher=False)
    # boosting 0.6 [0.5, 0.7] vs bagging 0.2 [0.1, 0.3]: higher, CIs apart
    assert list(check_claims(SUMMARY, [higher, lower])["verdict"]) == ["supported", "contradicted"]


def test_the_paper_claims_are_all_well_formed():
    claims = paper_claims()
    assert len(claims) == 10 and all(isinstance(c.higher_is_better, bool) for c in claims)
    assert [c.higher_is_better for c in claims if c.metric == "mse"] == [False, False, False]


def test_a_single_run_has_no_ci_and_says_so():
    one = SUMMARY.assign(ci_low=float("nan"), ci_high=float("nan"), n_runs=1)
    got = check_claims(one, [Claim("boost < bag", "mse", ("boosting", "max"), ("bagging", "max"))])
    assert got.loc[0, "verdict"] == "same direction, no CI (one run)"
    assert got.loc[0, "claimed better"] == "boosting J=4: 10 (L0 128)"
