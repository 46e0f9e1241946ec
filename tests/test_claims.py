"""Paper-claim verdicts from a hand-made metric summary."""

import pandas as pd

from tasks.claims import Claim, check_claims


def _row(method, J, metric, mean, lo, hi):
    return {"method": method, "n_members": J, "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi, "n_runs": 3}


SUMMARY = pd.DataFrame([
    _row("boosting", 4, "mse", 10.0, 9.0, 11.0),
    _row("bagging", 4, "mse", 20.0, 19.0, 21.0),
    _row("expanded", 4, "mse", 10.5, 9.5, 11.5),
    _row("single", 1, "mse", 8.0, 7.0, 9.0),
    _row("bagging", 4, "l0", 128.0, 128.0, 128.0),
    _row("boosting", 4, "l0", 128.0, 128.0, 128.0),
])


def test_verdicts_follow_means_and_ci_overlap():
    claims = [
        Claim("boost < bag", "mse", ("boosting", "max"), ("bagging", "max"), False),      # holds, CIs apart
        Claim("boost < expanded", "mse", ("boosting", "max"), ("expanded", "max"), False),  # holds, CIs overlap
        Claim("bag < single", "mse", ("bagging", "max"), ("single", "1"), False),         # reversed, CIs apart
        Claim("stability", "stability", ("bagging", "max"), ("boosting", "max"), True),    # not measured
    ]
    got = check_claims(SUMMARY, claims)
    assert list(got["verdict"]) == ["supported", "same direction, CIs overlap", "contradicted", "not measured"]
    assert got.loc[0, "claimed better"] == "boosting J=4: 10 [9, 11] (L0 128)"
    assert got.loc[2, "claimed worse"] == "single J=1: 8 [7, 9]"


def test_a_single_run_has_no_ci_and_says_so():
    one = SUMMARY.assign(ci_low=float("nan"), ci_high=float("nan"), n_runs=1)
    got = check_claims(one, [Claim("boost < bag", "mse", ("boosting", "max"), ("bagging", "max"), False)])
    assert got.loc[0, "verdict"] == "same direction, no CI (one run)"
