"""The training and evaluation stages on a tiny random model's activations."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from data_contracts import ContractViolation, validate
from data_contracts.activations import load_split
from data_contracts.metrics import read_intrinsic, write_intrinsic
from sae_core import load_ensemble, metrics
from sae_core.io import load_training_history
from sae_core.config import TrainConfig
from tasks.config import CorpusSource, EvaluateConfig, ExtractConfig, TrainStageConfig
from tasks.evaluate import run_evaluation
from tasks.extract import run_extraction
from tasks.train import run_training
from tests.tiny_models import TEXTS, build_tiny_model

TRAIN = TrainStageConfig(
    d_sae=48, k=4, n_members=3, n_runs=2, expanded_sizes=[2, 3],
    recipe=TrainConfig(n_steps=12, batch_size=32, lr=3e-3),
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    corpus = root / "docs.txt"
    corpus.write_text("\n".join(f"{t} {TEXTS[(i + 2) % 5]}" for i, t in enumerate(TEXTS * 4)) + "\n")
    model = build_tiny_model(root / "model", "bert")
    cfg = ExtractConfig(model=str(model), layer=1, context_length=16, batch_size=8, corpus=[CorpusSource(name=str(corpus))],
                        split_fractions={"train": 0.6, "val": 0.1, "test": 0.3})
    run = root / "run"
    run_extraction(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def trained(run_dir):
    fractions = []
    result = run_training(TRAIN, run_dir, progress=False, on_progress=lambda f, m: fractions.append(f))
    return result, fractions


def test_training_writes_every_method_and_run_and_reports_progress(trained, run_dir):
    result, fractions = trained
    expected = {f"models/{m}/run={r}" for m in ("bagging", "boosting", "single", "expanded_J2", "expanded_J3",
                                                "expanded_compute_matched_J2", "expanded_compute_matched_J3",
                                                "random_decoder_J1", "random_decoder_J2", "random_decoder_J3") for r in (0, 1)}
    assert set(result.written) == expected
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    bag, single = load_ensemble(run_dir / "models/bagging/run=1"), load_ensemble(run_dir / "models/single/run=1")
    assert bag.info.seeds == (3, 4, 5)  # run r uses the seed block {rJ..rJ+J-1}
    assert torch.equal(single.W_dec, bag.member(0).W_dec[0])  # single = bagging member 0
    wide = load_ensemble(run_dir / "models/expanded_J3/run=0")
    assert wide.d_sae == 3 * 48 and wide.member_cfg.k == 3 * 4
    assert wide.info.expanded.n_steps == 12
    assert load_ensemble(run_dir / "models/expanded_compute_matched_J3/run=0").info.expanded.n_steps == 36
    # the random-decoder baseline: width J·d_sae and sparsity of J members; its decoder stayed at a
    # seeded random unit-norm init (seeded like the single SAE, which trained its own decoder away)
    rand = load_ensemble(run_dir / "models/random_decoder_J3/run=1")
    assert rand.d_sae == 3 * 48 and rand.member_cfg.k == 3 * 4 and rand.info.seeds is None and rand.info.method == "random_decoder"
    assert torch.allclose(rand.W_dec.norm(dim=1), torch.ones(3 * 48), atol=1e-5)
    assert not torch.equal(load_ensemble(run_dir / "models/random_decoder_J1/run=1").W_dec, single.W_dec)
    # every model keeps its members' training records; single's are bagging member 0's
    bag_history, single_history = load_training_history(run_dir / "models/bagging/run=1"), load_training_history(run_dir / "models/single/run=1")
    assert len(bag_history) == 3 and single_history == bag_history[:1] and bag_history[0][-1].step == 12
    assert len(load_training_history(run_dir / "models/boosting/run=0")) == 3


def test_training_rerun_reuses_models_and_retrains_only_what_is_missing(trained, run_dir):
    again = run_training(TRAIN, run_dir, progress=False)
    assert not again.did_work and again.written == []
    shutil.rmtree(run_dir / "models/boosting/run=1")
    before = load_ensemble(run_dir / "models/bagging/run=0").W_dec.clone()
    redo = run_training(TRAIN, run_dir, progress=False)
    assert redo.written == ["models/boosting/run=1"]
    assert torch.equal(load_ensemble(run_dir / "models/bagging/run=0").W_dec, before)


def test_evaluation_table_matches_direct_metrics_and_validates(trained, run_dir):
    result = run_evaluation(EvaluateConfig(batch_size=17), run_dir, progress=False)
    frame = validate(run_dir / "metrics/intrinsic.parquet")
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    test = torch.from_numpy(load_split(run_dir / "activations", "test"))
    boost = load_ensemble(run_dir / "models/boosting/run=1").prefix(2)
    with torch.no_grad():
        recon, codes = boost(test), boost.encode(test)

    def value(method, J, run, metric):
        row = frame[(frame.method == method) & (frame.n_members == J) & (frame.run == run) & (frame.metric == metric)]
        assert len(row) == 1, (method, J, run, metric)
        return float(row.value.iloc[0])

    assert value("boosting", 2, 1, "mse") == pytest.approx(metrics.mse(test, recon), rel=1e-5)
    assert value("boosting", 2, 1, "connectivity") == pytest.approx(metrics.connectivity(codes))
    assert value("boosting", 2, 1, "l0") == pytest.approx(metrics.l0(codes))
    stab = metrics.stability([load_ensemble(run_dir / f"models/bagging/run={r}").W_dec for r in (0, 1)])
    assert value("bagging", 3, 0, "stability") == pytest.approx(stab[0], rel=1e-5)
    # expanded SAEs stand at the J they match; the single SAE at J = 1
    assert set(frame[frame.method == "expanded"].n_members) == {2, 3}
    assert set(frame[frame.method == "single"].n_members) == {1}
    summary = validate(run_dir / "metrics/summary.parquet")
    row = summary[(summary.method == "bagging") & (summary.n_members == 3) & (summary.metric == "mse")].iloc[0]
    runs = [value("bagging", 3, r, "mse") for r in (0, 1)]
    assert row["mean"] == pytest.approx(sum(runs) / 2) and row.ci_low < row["mean"] < row.ci_high
    assert (run_dir / "figures/intrinsic.png").stat().st_size > 10_000
    assert "figures/intrinsic_stability.png" in result.figures


def test_metric_contract_names_the_broken_rows(tmp_path, trained, run_dir):
    if not (run_dir / "metrics/intrinsic.parquet").exists():
        run_evaluation(EvaluateConfig(), run_dir, progress=False)
    frame = read_intrinsic(run_dir / "metrics/intrinsic.parquet")
    bad = frame.copy()
    bad.loc[bad.metric == "connectivity", "value"] = 1.5
    with pytest.raises(ContractViolation, match="expect_column_values_to_be_between") as err:
        write_intrinsic(bad, tmp_path / "bad.parquet")
    assert "1.5" in str(err.value) and not (tmp_path / "bad.parquet").exists()
    dup = pd.concat([frame, frame.head(1)])
    with pytest.raises(ContractViolation, match="unique"):
        write_intrinsic(dup, tmp_path / "dup.parquet")
    nan = frame.copy()
    nan.loc[0, "value"] = float("nan")
    with pytest.raises(ContractViolation, match="non-finite"):
        write_intrinsic(nan, tmp_path / "nan.parquet")


def test_stages_refuse_missing_inputs_clearly(tmp_path):
    with pytest.raises(ContractViolation, match="manifest"):
        run_training(TRAIN, tmp_path, progress=False)


def test_encoder_runs_record_that_ce_does_not_apply(trained, run_dir):
    result = run_evaluation(EvaluateConfig(max_tokens=64), run_dir, progress=False)
    assert any("not a causal LM" in n for n in result.notes)
    assert "ce_loss_recovered" not in set(validate(run_dir / "metrics/intrinsic.parquet").metric)


def test_decoder_runs_get_ce_loss_recovered_and_kl(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(f"{t} {TEXTS[(i + 1) % 5]}" for i, t in enumerate(TEXTS * 3)) + "\n")
    model = build_tiny_model(tmp_path / "llama", "llama")
    run = tmp_path / "run"
    run_extraction(ExtractConfig(model=str(model), layer=1, context_length=16, batch_size=8, corpus=[CorpusSource(name=str(corpus))],
                                 split_fractions={"train": 0.6, "val": 0.1, "test": 0.3}), run, progress=False)
    train = TrainStageConfig(d_sae=48, k=4, n_members=2, n_runs=1, methods=["bagging", "boosting"], expanded_sizes=[2],
                             recipe=TrainConfig(n_steps=10, batch_size=32, lr=3e-3))
    run_training(train, run, progress=False)
    run_evaluation(EvaluateConfig(ce_max_windows=4), run, progress=False)
    frame = validate(run / "metrics/intrinsic.parquet")
    ce = frame[frame.metric == "ce_loss_recovered"]
    assert set(zip(ce.method, ce.n_members)) == {("bagging", 1), ("bagging", 2), ("boosting", 1), ("boosting", 2)}
    clean = frame[frame.metric == "ce_loss_clean"].value.unique()
    zero = frame[frame.metric == "ce_loss_zero"].value.unique()
    assert len(clean) == 1 and len(zero) == 1  # one clean and one zero-ablated reference for all models
    for _, row in ce.iterrows():
        sae = frame[(frame.metric == "ce_loss_sae") & (frame.method == row.method) & (frame.n_members == row.n_members)].value.iloc[0]
        assert row.value == pytest.approx((zero[0] - sae) / (zero[0] - clean[0]))
    assert (frame[frame.metric == "kl_divergence"].value >= 0).all()


def test_expanded_sizes_are_checked_only_when_an_expanded_sae_is_trained():
    # bagging and boosting alone with J = 4: the default expanded_sizes [8] is irrelevant
    cfg = TrainStageConfig(n_members=4, methods=["single", "bagging", "boosting"])
    assert not cfg.trains_expanded
    for methods in (["bagging", "expanded"], ["expanded_compute_matched"]):
        with pytest.raises(ValueError, match=r"expanded_sizes \[8\] must lie in 1..n_members=4.*leave expanded"):
            TrainStageConfig(n_members=4, methods=methods)
    # compute-matched switched off: nothing expanded is trained
    assert not TrainStageConfig(n_members=4, methods=["expanded_compute_matched"], compute_matched_expanded=False).trains_expanded
