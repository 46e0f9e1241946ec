"""The sweep flow, the L0 guide of *Sparse but Wrong* and population-based training (issue 20)."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

from sae_core.l0_guide import pick_l0, planted_l0_data


# --------------------------------------------------------------------------- config
def _pipeline(**train):
    from tasks.config import PipelineConfig

    return PipelineConfig(name="t", train={"d_sae": 32, "k": 4, "recipe": {"n_steps": 20, "batch_size": 8}, **train})


@pytest.mark.parametrize("changes, named", [
    ({"grid": {"train.kk": [1]}}, "train.kk"),                      # unknown key
    ({"grid": {"train.n_members": [2]}}, "train.n_members"),        # the sweep sets it itself
    ({"grid": {"train.recipe.seed": [1]}}, "train.recipe.seed"),    # seeds come from `seeds`
    ({"grid": {"train.k": [4, 64]}}, "k=64 exceeds d_sae=32"),       # a value no train config takes
    ({"grid": {"train.recipe.lr": [-1.0]}}, "lr"),
    ({"grid": {"train.k": []}}, "train.k"),
    ({"grid": {}}, "mode grid needs a grid"),
    ({"seeds": [0, 0]}, "distinct"),
    ({"mode": "population", "grid": {}}, "needs a population section"),
    ({"mode": "population", "grid": {}, "population": {"search": {"train.d_sae": {"low": 8, "high": 64}}}}, "train.d_sae"),
    ({"mode": "population", "grid": {}, "population": {"search": {"train.k": {"low": 2, "high": 64, "integer": True}}}}, "k=64 exceeds"),
    ({"mode": "population", "grid": {}, "population": {"perturbation_factors": [0.0],
                                                       "search": {"train.recipe.lr": {"low": 1e-4, "high": 1e-2}}}}, "positive"),
    ({"mode": "population", "grid": {"train.k": [4]}, "population": {"search": {"train.k": {"low": 2, "high": 8, "integer": True}}}},
     "both in the grid"),
    ({"mode": "population", "population": {"search": {"train.recipe.lr": {"low": 1e-4, "high": 1e-2}}}}, "one value per grid key"),
])
def test_a_bad_sweep_config_fails_before_anything_runs_naming_the_key(changes, named):
    from pydantic import ValidationError

    from tasks.config_sweep import SweepConfig

    raw = {"base": _pipeline(), "grid": {"train.k": [2, 4]}, **changes}
    with pytest.raises(ValidationError) as err:
        SweepConfig(**raw)
    assert named in str(err.value)


def test_grid_points_are_the_product_and_each_sets_its_keys():
    from tasks.config_sweep import SweepConfig, point_train_config

    sweep = SweepConfig(base=_pipeline(), grid={"train.k": [2, 4], "train.recipe.lr": [1e-3, 3e-3, 1e-2]}, seeds=[0, 1])
    points = sweep.grid_points()
    assert len(points) == 6 and points[1] == {"train.k": 2, "train.recipe.lr": 3e-3}
    train = point_train_config(sweep.pipeline().train, points[4], seed=1)
    assert (train.k, train.recipe.lr, train.recipe.seed, train.methods, train.n_members, train.n_runs) == (4, 3e-3, 1, ["single"], 1, 1)
    assert train.recipe.batch_size == 8  # the rest of the base recipe is kept


def test_a_sweep_yaml_reads_its_base_relative_to_itself_and_errors_name_the_file(tmp_path):
    import yaml

    from flows.configs import ConfigError
    from flows.sweep import load_sweep_config

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(_pipeline().model_dump(mode="json")))
    (tmp_path / "s.yaml").write_text("base: base.yaml\ngrid: {train.k: [2, 4]}\n")
    assert load_sweep_config(tmp_path / "s.yaml").pipeline().name == "t"
    (tmp_path / "bad.yaml").write_text("base: base.yaml\ngrid: {train.q: [2]}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.q"):
        load_sweep_config(tmp_path / "bad.yaml")


# --------------------------------------------------------------------------- the L0 guide
def test_the_guide_takes_the_minimum_of_a_u_shaped_curve_whatever_the_order():
    # c_dec over L0 = 2, 4, ..., 12 with its minimum at 8 (given shuffled: the index is the caller's)
    l0 = [12, 2, 8, 4, 10, 6]
    c = [0.060, 0.090, 0.010, 0.070, 0.030, 0.050]
    choice = pick_l0(l0, c)
    assert (choice.index, choice.l0, choice.rule, choice.at_edge) == (2, 8, "minimum", False)


def test_the_guide_takes_the_elbow_when_the_curve_is_flat_at_high_l0():
    # jump below L0 = 100, then flat within 10% of the range (range 0.30 - 0.100 = 0.2; flat: c <= 0.120)
    l0 = [25, 50, 100, 200, 300, 400]
    c = [0.300, 0.200, 0.115, 0.104, 0.100, 0.108]
    choice = pick_l0(l0, c)
    assert (choice.l0, choice.rule, choice.at_edge) == (100, "elbow", False)
    # a rise at high L0 beyond the tolerance makes it a minimum again
    assert pick_l0(l0, [0.300, 0.200, 0.115, 0.104, 0.100, 0.180]).rule == "minimum"
    # tolerance 0: only the minimum is flat
    assert pick_l0(l0, c, tolerance=0).l0 == 300


def test_the_guide_says_when_its_choice_is_at_the_edge_and_refuses_too_few_points():
    choice = pick_l0([1, 2, 3], [0.3, 0.2, 0.1])
    assert (choice.l0, choice.rule, choice.at_edge) == (3, "minimum", True) and "widen the grid" in choice.describe()
    with pytest.raises(ValueError, match="at least 2"):
        pick_l0([1], [0.1])
    with pytest.raises(ValueError, match="non-finite"):
        pick_l0([1, 2], [0.1, float("nan")])


def test_the_guide_recovers_the_planted_l0_of_the_sparse_but_wrong_toy():
    """BatchTopK k = 6, 8, …, 14 on 50 correlated orthonormal features with planted L0 ≈ 9.9:
    the guide's k is within one grid step (2) of the planted L0. Measured here (300 steps of
    256, data seeds 0/1/2): c_dec 0.046, 0.033, 0.024, 0.030, 0.037 for seed 0, minimum at
    k = 10 for all three seeds."""
    from sae_core import metrics
    from sae_core.config import SAEConfig, TrainConfig
    from sae_core.training.trainer import train_sae

    data = planted_l0_data(n_samples=12_000, seed=0)
    assert 9.5 < data.true_l0 < 10.3
    train, held = data.activations[:-2048], data.activations[-2048:]
    ks, l0s, cdecs = [6, 8, 10, 12, 14], [], []
    for k in ks:
        cfg = SAEConfig(architecture="batchtopk", d_in=100, d_sae=50, k=k)
        sae = train_sae(cfg, train, TrainConfig(n_steps=300, batch_size=256, lr=3e-3, warmup_steps=20, b_dec_init="zeros")).sae
        with torch.no_grad():
            l0s.append(metrics.l0(sae.encode(held)))
        cdecs.append(metrics.c_dec(sae.W_dec[0].detach()))
    choice = pick_l0(l0s, cdecs)
    assert abs(ks[choice.index] - data.true_l0) <= 2 and not choice.at_edge, (ks, [round(c, 4) for c in cdecs])


# --------------------------------------------------------------------------- population-based training
def test_exploit_explore_replaces_the_worst_by_perturbed_copies_of_the_best():
    from sae_core.pbt import Range, exploit_explore

    params = [{"lr": 1e-3, "k": 4}, {"lr": 2e-3, "k": 8}, {"lr": 4e-3, "k": 16}, {"lr": 8e-3, "k": 10}]
    ranges = {"lr": Range(1e-4, 1e-2), "k": Range(2, 8, integer=True)}
    reps = exploit_explore([0.5, 0.9, 0.1, 0.7], params, ranges, 1, [2.0], random.Random(0))
    # the worst (member 2, score 0.1) copies the best (member 1, 0.9): lr 2e-3·2 = 4e-3; k 8·2 = 16 clipped to 8,
    # unchanged after clipping... so it moves by one in the factor's direction and is clipped again: 8
    assert [(r.loser, r.winner) for r in reps] == [(2, 1)] and reps[0].params == {"lr": 4e-3, "k": 8}
    reps = exploit_explore([0.5, 0.9, 0.1, 0.7], params, ranges, 2, [0.5], random.Random(0))
    assert sorted(r.loser for r in reps) == [0, 2] and {r.winner for r in reps} <= {1, 3}
    for r in reps:  # halved and rounded: k 8 -> 4, 10 -> 5; lr halved
        assert r.params == {"lr": params[r.winner]["lr"] / 2, "k": params[r.winner]["k"] // 2}
    with pytest.raises(ValueError, match="n_exploit"):
        exploit_explore([0.1, 0.2], params[:2], ranges, 2, [2.0], random.Random(0))


def _tiny_recipe(n_steps=20, **kw):
    from sae_core.config import SAEConfig, TrainConfig

    return SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2), TrainConfig(n_steps=n_steps, batch_size=16, lr=3e-3, checkpoint_every=10, **kw)


def test_training_in_segments_gives_the_uninterrupted_run(tmp_path):
    from sae_core.pbt import checkpoint_step, train_segment
    from sae_core.training.trainer import train_sae

    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    cfg, recipe = _tiny_recipe()
    assert train_segment(cfg, x, recipe, 3, tmp_path / "m", 10) is None and checkpoint_step(tmp_path / "m") == 10
    assert train_segment(cfg, x, recipe, 3, tmp_path / "m", 10) is None  # done already: nothing trained
    segmented = train_segment(cfg, x, recipe, 3, tmp_path / "m", 20).sae
    whole = train_sae(cfg, x, recipe, member_seeds=[3]).sae
    for name, value in whole.state_dict().items():
        assert torch.equal(value, segmented.state_dict()[name]), name
    with pytest.raises(ValueError, match="checkpoint step"):
        train_segment(cfg, x, recipe, 3, tmp_path / "n", 15)


def test_an_adopted_checkpoint_continues_the_winner_under_the_new_values(tmp_path):
    from safetensors.torch import load_file

    from sae_core.pbt import adopt_checkpoint, checkpoint_module, train_segment
    from sae_core.training.trainer import CHECKPOINT_FILE

    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    cfg, recipe = _tiny_recipe()
    train_segment(cfg, x, recipe, 0, tmp_path / "winner", 10)
    train_segment(cfg, x, recipe, 1, tmp_path / "loser", 10)
    new = recipe.model_copy(update={"lr": 6e-3})
    adopt_checkpoint(tmp_path / "winner", tmp_path / "loser", cfg, new, 1, x)
    won, copied = load_file(str(tmp_path / "winner" / CHECKPOINT_FILE)), load_file(str(tmp_path / "loser" / CHECKPOINT_FILE))
    assert won.keys() == copied.keys() and all(torch.equal(won[k], copied[k]) for k in won)  # weights, Adam moments, counters
    start = checkpoint_module(cfg, tmp_path / "loser").W_dec.clone()
    with pytest.raises(ValueError, match="different config"):  # the old values no longer match its checkpoint
        train_segment(cfg, x, recipe, 1, tmp_path / "loser", 20)
    final = train_segment(cfg, x, new, 1, tmp_path / "loser", 20).sae
    assert not torch.equal(final.W_dec, start)


# --------------------------------------------------------------------------- the flow
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from tasks.config import PipelineConfig
    from tests.tiny_models import tiny_extract_section

    base = tmp_path_factory.mktemp("tiny-sweep")
    return PipelineConfig(
        name="tiny",
        extract=tiny_extract_section(base),
        train={"architecture": "batchtopk", "d_sae": 32, "k": 4, "recipe": {"n_steps": 30, "batch_size": 32}},
        evaluate={"ce_loss": False},
    ), base


def test_a_grid_sweep_trains_scores_and_chooses_and_a_rerun_reuses_its_points(prefect_harness, tiny_base):
    from data_contracts.sweep import read_results
    from flows.configs import load_pipeline_config
    from flows.sweep import sweep_flow
    from sae_core.evaluation import prefix_reconstruction_metrics
    from sae_core.io import load_ensemble
    from tasks.config_sweep import SweepConfig, point_train_config
    from tasks.sweep import grid_point_unit, point_dir, validation_source

    base, where = tiny_base
    run = where / "run"
    sweep = SweepConfig(base=base, grid={"train.k": [2, 8]}, seeds=[0, 1])
    summary = sweep_flow(config=sweep, run_dir=str(run))
    frame = read_results(run / "sweep" / "results.parquet")
    assert len(frame) == 4 and set(frame["k"]) == {2, 8} and frame["stability"].notna().all()
    assert (frame["steps"] == 30).all() and (frame["tokens"] == 30 * 32).all()
    # the row is the evaluate stage's metric of the saved SAE on the validation split
    row = frame[(frame["point"] == 1) & (frame["seed"] == 1)].iloc[0]
    ens = load_ensemble(run / point_dir(1, 1))
    assert ens.info.seeds == (1,) and ens.member_cfg.k == 8
    ev = prefix_reconstruction_metrics(ens, validation_source(run, "val", None).iter_batches(4096))[1].explained_variance
    assert row["explained_variance"] == pytest.approx(ev, abs=1e-12)
    # the L0 guide chose (the grid moves L0), and best.yaml is a pipeline config with the chosen k
    assert summary["guide_rule"] in ("minimum", "elbow") and summary["why"].startswith("the L0 guide")
    best = load_pipeline_config(run / "sweep" / "best.yaml")
    assert best.train.k == summary["params"]["train.k"] and best.train.n_members == base.train.n_members
    assert best.extract == base.extract
    report = (run / "sweep" / "report.md").read_text()
    assert "c_dec vs L0" in report and "figures/c_dec_vs_l0.png" in report and (run / "sweep" / "figures" / "ev_vs_l0.png").is_file()
    # a rerun reuses a finished point: nothing is trained or written again, the scores are the saved ones
    stamp = (run / point_dir(0, 0) / "ensemble.json").stat().st_mtime_ns
    again = grid_point_unit(run, point_train_config(base.train, {"train.k": 2}, 0), 0, 0, "val", None)
    assert (run / point_dir(0, 0) / "ensemble.json").stat().st_mtime_ns == stamp
    first = frame[(frame["point"] == 0) & (frame["seed"] == 0)].iloc[0]
    assert again["explained_variance"] == first["explained_variance"] and again["c_dec"] == first["c_dec"]


def test_a_population_sweep_exploits_explores_and_writes_a_runnable_best_config(prefect_harness, tiny_base):
    from data_contracts.sweep import read_results
    from flows.configs import load_pipeline_config
    from flows.sweep import sweep_flow
    from tasks.config_sweep import SweepConfig

    base, where = tiny_base
    run = where / "run"  # the grid test's run directory: extraction is cached
    sweep = SweepConfig(base=base, mode="population", grid={"train.d_sae": [16]},  # a fixed setting of every member
                        population={"size": 4, "interval": 10, "rounds": 2, "search": {"train.recipe.lr": {"low": 1e-4, "high": 1e-2}}})
    summary = sweep_flow(config=sweep, run_dir=str(run))
    frame = read_results(run / "sweep" / "results.parquet")
    assert len(frame) == 8 and sorted(set(frame["round"])) == [1, 2] and (frame["mode"] == "population").all()
    assert sorted(set(frame[frame["round"] == 2]["steps"])) == [20]
    state = json.loads((run / "sweep" / "population" / "state.json").read_text())
    assert state["round"] == 2 and len(summary["log"]) == 1  # one replacement after round 1 (size 4 × 0.25)
    loser = int(summary["log"][0].split()[3])
    round1 = frame[frame["round"] == 1].set_index("point")["score"]
    assert loser == int(round1.idxmin())
    last = frame[frame["round"] == 2]
    assert summary["point"] == int(last.loc[last["score"].idxmax(), "point"])
    best = load_pipeline_config(run / "sweep" / "best.yaml")  # the member's whole recipe: fixed settings, steps, searched values
    assert best.train.recipe.lr == pytest.approx(summary["params"]["train.recipe.lr"])
    assert (best.train.d_sae, best.train.recipe.n_steps, best.train.architecture) == (16, 20, "batchtopk")
    assert (frame["d_sae"] == 16).all()
    assert (run / "sweep" / "population" / "best" / "ensemble.json").is_file()


def test_the_results_contract_names_a_bad_column():
    from data_contracts.core import ContractViolation
    from data_contracts.sweep import SCHEMA, check_results

    row = {c: 1 for c in SCHEMA.names}
    row.update(mode="grid", params="{}", architecture="topk", explained_variance=0.5, explained_variance_total=0.5,
               dead_fraction=0.0, c_dec=0.1, stability=float("nan"), l0=float("inf"))
    with pytest.raises(ContractViolation, match="column l0 has non-finite"):
        check_results(pd.DataFrame([row]), "sweep/results.parquet")
    row.update(l0=3.0, c_dec=1.5)
    with pytest.raises(ContractViolation, match="c_dec"):
        check_results(pd.DataFrame([row]), "sweep/results.parquet")
    row.update(c_dec=0.1)
    check_results(pd.DataFrame([row]), "sweep/results.parquet")  # stability may be null (one seed)


@pytest.mark.slow  # worker processes start slowly here (~1 min); the units are the same functions the local runner calls
def test_a_grid_sweep_on_a_process_pool_gives_the_local_runners_results(prefect_harness, tiny_base, tmp_path):
    from data_contracts.sweep import read_results
    from flows.sweep import sweep_flow
    from tasks.config_sweep import SweepConfig

    base, _ = tiny_base
    frames = []
    for runner in ("local", "process"):
        config = base.model_copy(update={"orchestration": base.orchestration.model_copy(update={"runner": runner, "workers": 2})})
        sweep_flow(config=SweepConfig(base=config, grid={"train.k": [2, 8]}, seeds=[0, 1]), run_dir=str(tmp_path / runner))
        frames.append(read_results(tmp_path / runner / "sweep" / "results.parquet"))
    pd.testing.assert_frame_equal(frames[0], frames[1])
