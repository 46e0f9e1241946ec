"""Paper-claim verdicts from a hand-made metric summary."""

import pandas as pd
import pytest

from tasks.claims import CLAIM_COLUMNS, Claim, check_claims, paper_claims, sanity_claims, untestable_points


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
    assert list(got.columns) == CLAIM_COLUMNS
    assert list(got["verdict (raw)"]) == ["supported", "same direction, CIs overlap", "contradicted", "not measured"]
    # MSE has no random floor: the floor-corrected verdict is the raw one
    assert list(got["verdict (floor-corrected)"]) == list(got["verdict (raw)"])
    assert got.loc[0, "claimed better"] == "boosting J=4: 10 [9, 11] (L0 128)"
    assert got.loc[2, "claimed worse"] == "single SAE J=1: 8 [7, 9]"  # the method's label (sae_core.methods)


def test_the_direction_comes_from_the_metric_unless_the_claim_states_it():
    assert not Claim("mse", "mse", ("boosting", "max"), ("bagging", "max")).higher_is_better   # MSE: lower is better
    assert Claim("ev", "explained_variance", ("boosting", "max"), ("bagging", "max")).higher_is_better
    with pytest.raises(ValueError, match="connectivity.*declares no better direction"):
        Claim("more connected", "connectivity", ("boosting", "max"), ("bagging", "max"))
    higher = Claim("more connected", "connectivity", ("boosting", "max"), ("bagging", "max"), higher=True)
    lower = Claim("less connected", "connectivity", ("boosting", "max"), ("bagging", "max"), higher=False)
    # boosting 0.6 [0.5, 0.7] vs bagging 0.2 [0.1, 0.3]: higher, CIs apart
    assert list(check_claims(SUMMARY, [higher, lower])["verdict (raw)"]) == ["supported", "contradicted"]


def test_the_paper_claims_are_all_well_formed():
    claims = paper_claims() + sanity_claims()
    assert len(paper_claims()) == 13 and len(claims) == 16 and all(isinstance(c.higher_is_better, bool) for c in claims)
    assert {c.metric for c in claims} >= {"stability", "stability_matched", "stability_shared"}
    assert [c.higher_is_better for c in claims if c.metric == "mse"] == [False] * 5
    assert {c.worse[0] for c in sanity_claims()} == {"random_decoder"}


def test_a_single_run_has_no_ci_and_says_so():
    one = SUMMARY.assign(ci_low=float("nan"), ci_high=float("nan"), n_runs=1)
    got = check_claims(one, [Claim("boost < bag", "mse", ("boosting", "max"), ("bagging", "max"))])
    assert got.loc[0, "verdict (raw)"] == "same direction, no CI (one run)"
    assert got.loc[0, "claimed better"] == "boosting J=4: 10 (L0 128)"


BOOST_VS_BAG = Claim("boost < bag", "mse", ("boosting", "max"), ("bagging", "max"))


def test_a_prefix_whose_l0_reaches_d_is_not_testable():
    # bagging and boosting at J = 4 have L0 128: with d = 128 any dictionary reconstructs almost anything
    at_d = check_claims(SUMMARY, [BOOST_VS_BAG], d=128)
    assert at_d.loc[0, ["verdict (raw)", "verdict (floor-corrected)"]].tolist() == ["not testable", "not testable"]
    assert at_d.loc[0, "note"] == "boosting J=4: L0 128 ≥ d = 128; bagging J=4: L0 128 ≥ d = 128"
    assert check_claims(SUMMARY, [BOOST_VS_BAG], d=129).loc[0, "verdict (raw)"] == "supported"  # L0 below d
    assert check_claims(SUMMARY, [BOOST_VS_BAG]).loc[0, "verdict (raw)"] == "supported"  # d unknown: not checked
    # a missing point is still "not measured", whatever d
    single = Claim("bag < single", "stability", ("bagging", "max"), ("single", "1"))
    assert check_claims(SUMMARY, [single], d=64).loc[0, "verdict (raw)"] == "not measured"


def test_a_saturated_connectivity_is_not_testable():
    claim = Claim("more connected", "connectivity", ("boosting", "max"), ("bagging", "max"), higher=True)
    saturated = SUMMARY.copy()
    at = (saturated["method"] == "bagging") & (saturated["metric"] == "connectivity")
    saturated.loc[at, ["mean", "ci_low", "ci_high"]] = [2e-7, 1e-7, 3e-7]  # below 1e-3
    got = check_claims(saturated, [claim], d=1000)
    assert got.loc[0, "verdict (raw)"] == "not testable" and got.loc[0, "note"] == "bagging J=4: connectivity 2e-07 saturated"
    saturated.loc[at, ["mean", "ci_low", "ci_high"]] = [0.01, -0.005, 0.025]  # a CI reaching 0: indistinguishable from it
    assert check_claims(saturated, [claim], d=1000).loc[0, "verdict (raw)"] == "not testable"
    # saturation concerns connectivity claims only
    assert check_claims(saturated, [BOOST_VS_BAG], d=1000).loc[0, "verdict (raw)"] == "supported"
    flagged = untestable_points(saturated, d=128)
    assert flagged.to_dict("records") == [
        {"method": "bagging", "J": 4, "L0": "128", "connectivity": "0.01 [-0.005, 0.025]",
         "why": "L0 128 ≥ d = 128; connectivity 0.01 saturated"},
        {"method": "boosting", "J": 4, "L0": "128", "connectivity": "0.6 [0.5, 0.7]", "why": "L0 128 ≥ d = 128"},
    ]
    assert untestable_points(SUMMARY, d=None).empty


def test_stability_claims_get_a_floor_corrected_verdict_too():
    rows = [
        # raw: bagging 0.50 [0.49, 0.51] beats expanded 0.40 [0.39, 0.41], CIs apart
        _row("bagging", 4, "stability", 0.50, 0.49, 0.51), _row("expanded", 4, "stability", 0.40, 0.39, 0.41),
        # minus each run's random floor, expanded is ahead, CIs apart
        _row("bagging", 4, "stability_corrected", 0.05, 0.04, 0.06), _row("expanded", 4, "stability_corrected", 0.10, 0.09, 0.11),
    ]
    claim = Claim("bag more stable", "stability", ("bagging", "max"), ("expanded", "max"))
    got = check_claims(pd.DataFrame(rows), [claim])
    assert got.loc[0, "verdict (raw)"] == "supported" and got.loc[0, "verdict (floor-corrected)"] == "contradicted"
    assert got.loc[0, "note"] == "stability_corrected: 0.05 [0.04, 0.06] vs 0.1 [0.09, 0.11]"
    assert got.loc[0, "claimed worse"] == "expanded SAE J=4: 0.4 [0.39, 0.41]"
    # no corrected values in the summary: the raw verdict stands, the corrected one is not measured
    got = check_claims(pd.DataFrame(rows[:2]), [claim])
    assert got.loc[0, ["verdict (raw)", "verdict (floor-corrected)"]].tolist() == ["supported", "not measured"]
