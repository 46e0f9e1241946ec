"""The declarations every module shares: methods, metrics, model directories, run summaries,
and the typed records (ensemble info, training history)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from data_contracts.metrics import METHODS as CONTRACT_METHODS, METRIC_RANGES
from sae_core.ensemble import EnsembleInfo, ExpandedMatch
from sae_core.methods import METHOD_NAMES, RAW, method, ordered_methods
from sae_core.metric_catalog import METRIC_NAMES, metric_spec, ordered_metrics
from sae_core.training.records import TrainingRecord
from tasks.common import ModelDir, NoTrainedModels, discover_models
from tasks.summaries import format_ci, summarise_over_runs


def test_method_and_metric_orders_are_the_declared_ones():
    assert METHOD_NAMES == ("single", "expanded", "expanded_compute_matched", "bagging", "boosting", "random_decoder",
                            "imported", "imported_bagging")
    assert ordered_methods(["boosting", "zzz", "raw", "single"]) == ["raw", "single", "boosting", "zzz"]
    assert method("bagging").alpha == "mean" and method("boosting").alpha == "one" and RAW.name == "raw"
    with pytest.raises(KeyError, match="known methods"):
        method("stacking")
    # the report used to order a metric called "kl" that nobody writes: KL is declared once, by its real name
    assert "kl_divergence" in METRIC_NAMES and "kl" not in METRIC_NAMES
    assert ordered_metrics(["kl_divergence", "mse", "l0"]) == ["mse", "l0", "kl_divergence"]
    assert metric_spec("connectivity").token_dependent and not metric_spec("mse").token_dependent


def test_the_metric_contract_reads_the_catalog():
    assert CONTRACT_METHODS == METHOD_NAMES
    assert list(METRIC_RANGES) == list(METRIC_NAMES)
    assert METRIC_RANGES["explained_variance"] == (None, 1.0) and METRIC_RANGES["dead_fraction"] == (0.0, 1.0)


def test_model_directories_parse_print_and_place_their_prefixes(tmp_path):
    wide = ModelDir.parse(tmp_path / "models" / "expanded_compute_matched_J8" / "run=2")
    assert wide == ModelDir("expanded_compute_matched", 2, 8) and wide.name == "expanded_compute_matched_J8"
    assert wide.relative == "models/expanded_compute_matched_J8/run=2" and wide.path(tmp_path) == tmp_path / wide.relative
    assert wide.prefixes(1) == [(1, 8)]  # one SAE, scored at the J whose width it matches
    assert ModelDir("bagging", 0).prefixes(3) == [(1, 1), (2, 2), (3, 3)]
    assert ModelDir("single", 1).prefixes(1) == [(1, 1)]
    for bad in ("models/stacking/run=0", "models/bagging/run=x", "models/bagging/0"):
        with pytest.raises(ValueError, match="unexpected model directory"):
            ModelDir.parse(tmp_path / bad)
    with pytest.raises(ValueError, match="needs a matched J"):
        ModelDir("expanded", 0)
    with pytest.raises(NoTrainedModels, match="run the train stage first"):
        discover_models(tmp_path)
    for rel in ("models/single/run=0", "models/bagging/run=1", "models/bagging/run=0", "models/expanded_J4/run=0"):
        (tmp_path / rel).mkdir(parents=True)
    assert [m.relative for m in discover_models(tmp_path)] == [
        "models/bagging/run=0", "models/bagging/run=1", "models/expanded_J4/run=0", "models/single/run=0"]


def test_summarise_over_runs_averages_within_a_run_first():
    frame = pd.DataFrame({
        "method": ["a"] * 4 + ["b"], "run": [0, 0, 1, 1, 0], "value": [0.6, 0.8, 0.9, 0.9, 0.5],
    })
    out = summarise_over_runs(frame, ["method"], "value", 0.95)
    # method a: run means 0.7 and 0.9 -> mean 0.8, s = 0.1414, t_{0.975,1} = 12.7062 -> half 12.7062 · 0.1 = 1.27062
    a = out[out["method"] == "a"].iloc[0]
    assert a["mean"] == pytest.approx(0.8) and a["n_runs"] == 2
    assert a["ci_high"] - a["mean"] == pytest.approx(12.7062 * 0.1, rel=1e-4)
    b = out[out["method"] == "b"].iloc[0]
    assert b["mean"] == 0.5 and b["n_runs"] == 1 and math.isnan(b["ci_low"]) and math.isnan(b["ci_high"])
    assert format_ci(0.8, 0.1, 1.5) == "0.8 [0.1, 1.5]" and format_ci(0.5, float("nan"), float("nan")) == "0.5"
    assert format_ci(float("nan"), 0.0, 1.0) == "–"


def test_ensemble_info_writes_the_same_json_as_the_dicts_it_replaces():
    bagging = EnsembleInfo(seeds=(3, 4), bootstrap=False).updated(fingerprint="f", run=1, method="bagging", train_tokens=10)
    assert json.dumps(bagging.to_json()) == json.dumps(
        {"seeds": [3, 4], "bootstrap": False, "fingerprint": "f", "run": 1, "method": "bagging", "train_tokens": 10})
    wide = EnsembleInfo(expanded=ExpandedMatch(8, 1024, None, "same lambda (1.0)", True, 40)).updated(run=0)
    assert list(wide.to_json()) == ["n_members_matched", "d_sae", "k", "sparsity", "compute_matched", "n_steps", "run"]
    assert wide.to_json()["k"] is None  # a ReLU expanded SAE records k: null, as before
    for info in (bagging, wide, EnsembleInfo()):
        assert EnsembleInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    with pytest.raises(ValueError, match="unknown keys"):
        EnsembleInfo.from_json({"seeds": [1], "colour": "red"})


def test_training_records_split_by_member_and_round_trip_through_json():
    record = TrainingRecord(step=10, lr=1e-3, loss=(1.0, 3.0), l0=(4.0, 6.0), dead_fraction=(0.0, 0.5),
                            terms={"mse": (0.9, 2.9)}, grad_norm=(0.1, 0.2))
    one = record.member(1)
    assert one.loss == (3.0,) and one.terms == {"mse": (2.9,)} and one.grad_norm == (0.2,) and one.p is None
    assert record.mean_loss() == 2.0 and record.n_members == 2
    assert TrainingRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
