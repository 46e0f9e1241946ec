"""The sweep's population mode: population-based training over ``population.search`` (:mod:`sae_core.pbt`).

Member m trains one single SAE (seed ``population.seed · size + m``) in ``rounds`` segments of
``interval`` steps, each segment a unit of work; after each segment every member is scored on
the validation split (the grid's scoring, :func:`tasks.sweep.validation_metrics`) and the worst
continue from copies of the best's trainer checkpoints with perturbed values. State:

    sweep/population/member=<m>/checkpoint.safetensors   the member's trainer checkpoint
    sweep/population/state.json                          rounds done, each member's values, rows, replacements
    sweep/population/best/                               the best member's final SAE

state.json is written before a round's checkpoints are replaced (the replacements are
idempotent copies of the winners' checkpoints), so an interrupted sweep resumes at its round.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

from sae_core.devices import resolve_device
from sae_core.ensemble import Ensemble
from sae_core.io import save_ensemble
from sae_core.pbt import Range, adopt_checkpoint, checkpoint_module, exploit_explore, initial_values, train_segment
from tasks.common import ACTIVATIONS_DIR
from tasks.config import PipelineConfig, TrainStageConfig
from tasks.config_sweep import SweepConfig, point_train_config
from tasks.sweep import SWEEP_DIR, result_row, step_progress, validation_metrics, validation_source, write_json_atomic
from tasks.train_plan import data_fingerprint, member_config, train_source
from tasks.units import Unit, UnitExecutor

POPULATION_DIR = f"{SWEEP_DIR}/population"
STATE_FILE = f"{POPULATION_DIR}/state.json"
BEST_MODEL_DIR = f"{POPULATION_DIR}/best"


def member_dir(member: int) -> str:
    return f"{POPULATION_DIR}/member={member:02d}"


def member_seed(sweep: SweepConfig, member: int) -> int:
    return sweep.population.seed * sweep.population.size + member


def member_settings(sweep: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Everything a member's recipe sets besides the base config: the grid's fixed values, the
    run's steps and the searched values (what best.yaml needs to reproduce it)."""
    fixed = sweep.grid_points()[0] if sweep.grid else {}
    return {**fixed, "train.recipe.n_steps": sweep.population.n_steps, **params}


def member_train_config(sweep: SweepConfig, base: PipelineConfig, params: dict[str, Any], member: int) -> TrainStageConfig:
    """The train section of member ``member`` with ``params``: the whole run's steps, a checkpoint every interval."""
    pop = sweep.population
    fixed = sweep.grid_points()[0] if sweep.grid else {}
    train = point_train_config(base.train, {**fixed, **params}, member_seed(sweep, member), pop.n_steps)
    return train.model_copy(update={"recipe": train.recipe.model_copy(update={"checkpoint_every": pop.interval})})


def member_segment_unit(run_dir: Path, train: TrainStageConfig, member: int, stop_step: int, split: str,
                        max_tokens: int | None) -> dict[str, float]:
    """Train member ``member`` from its checkpoint to ``stop_step`` and score it on ``split``."""
    run_dir = Path(run_dir)
    device = resolve_device(train.device)
    manifest, acts = train_source(train, run_dir, device, validate=False)
    sae_cfg = member_config(train, manifest.d)
    checkpoint = run_dir / member_dir(member)
    interval = train.recipe.checkpoint_every
    result = train_segment(sae_cfg, acts, train.recipe, train.recipe.seed, checkpoint, stop_step, device,
                           callback=step_progress(f"population member {member} steps ..{stop_step}", train, interval))
    sae = result.sae if result is not None else checkpoint_module(sae_cfg, checkpoint)
    return validation_metrics(Ensemble(sae, "single").to(device), validation_source(run_dir, split, max_tokens))


def _state_key(sweep: SweepConfig, base: PipelineConfig, run_dir: Path) -> str:
    manifest, acts = train_source(base.train, run_dir, "cpu", validate=False)
    payload = [sweep.model_dump(mode="json", exclude={"base"}), base.train.model_dump(mode="json"), data_fingerprint(base.train, manifest, acts)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _ranges(sweep: SweepConfig) -> dict[str, Range]:
    return {k: Range(r.low, r.high, r.integer) for k, r in sweep.population.search.items()}


def run_population(sweep: SweepConfig, base: PipelineConfig, run_dir: Path, executor: UnitExecutor,
                   report=print, publish=None) -> tuple[list[dict], list[dict[str, Any]], list[str]]:
    """Every round of the population (resuming from state.json); returns the result rows, the
    members' final values and a log of the replacements.

    publish: called with the run-dir paths the flow process rewrote (the adopted checkpoints,
    state.json), so workers on an object-store run directory pull them (RunStore.push)."""
    pop = sweep.population
    run_dir = Path(run_dir)
    key = _state_key(sweep, base, run_dir)
    state_path = run_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is None or state.get("key") != key:
        shutil.rmtree(run_dir / POPULATION_DIR, ignore_errors=True)  # another population's members: start over
        rng = random.Random(pop.seed)
        start = initial_values({k: (Range(r.low, r.high, r.integer), r.log) for k, r in pop.search.items()}, pop.size, rng)
        state = {"key": key, "round": 0, "params": start, "rows": [], "pending": [], "log": [], "rng": None}
        (run_dir / POPULATION_DIR).mkdir(parents=True, exist_ok=True)
    rng = random.Random(pop.seed)
    if state["rng"] is not None:
        rng.setstate(_rng_state(state["rng"]))
    _apply_pending(state, sweep, base, run_dir, publish)
    for round_ in range(state["round"], pop.rounds):
        stop = (round_ + 1) * pop.interval
        trains = [member_train_config(sweep, base, state["params"][m], m) for m in range(pop.size)]
        units = [Unit(member_segment_unit, {"train": t, "member": m, "stop_step": stop, "split": sweep.validation_split,
                                            "max_tokens": sweep.validation_max_tokens},
                      f"population member {m} steps {stop - pop.interval}..{stop}", reads=(ACTIVATIONS_DIR, member_dir(m)),
                      writes=(member_dir(m),), cost=pop.interval) for m, t in enumerate(trains)]
        values = executor.run("train", units)
        scores = [sweep.score(v) for v in values]
        rows = [result_row("population", m, t.recipe.seed, round_ + 1, member_settings(sweep, state["params"][m]), t, stop, v, s)
                for m, (t, v, s) in enumerate(zip(trains, values, scores))]
        best = max(range(pop.size), key=lambda m: (scores[m], -m))
        report(f"population round {round_ + 1}/{pop.rounds} (step {stop}): best member {best} "
               f"{sweep.objective} {values[best][sweep.objective]:.4f} with {state['params'][best]}")
        pending = []
        if round_ + 1 < pop.rounds:
            for rep in exploit_explore(scores, state["params"], _ranges(sweep), pop.n_exploit, pop.perturbation_factors, rng):
                pending.append([rep.loser, rep.winner])
                state["log"].append(f"round {round_ + 1}: member {rep.loser} (score {scores[rep.loser]:.4f}) continues from member "
                                    f"{rep.winner} (score {scores[rep.winner]:.4f}) with {rep.params}")
                state["params"][rep.loser] = rep.params
        state.update(round=round_ + 1, rows=state["rows"] + rows, pending=pending, rng=_rng_json(rng.getstate()))
        write_json_atomic(state_path, state)  # before the copies: a rerun redoes them (idempotent)
        _apply_pending(state, sweep, base, run_dir, publish)
    _save_best(state, sweep, base, run_dir)
    return state["rows"], state["params"], state["log"]


def _apply_pending(state: dict, sweep: SweepConfig, base: PipelineConfig, run_dir: Path, publish=None) -> None:
    """Copy each pending winner's checkpoint to its loser, under the loser's new values."""
    if not state["pending"]:
        return
    losers = [member_dir(loser) for loser, _ in state["pending"]]
    manifest, acts = train_source(base.train, run_dir, "cpu", validate=False)
    for loser, winner in state["pending"]:
        train = member_train_config(sweep, base, state["params"][loser], loser)
        adopt_checkpoint(run_dir / member_dir(winner), run_dir / member_dir(loser), member_config(train, manifest.d), train.recipe,
                         train.recipe.seed, acts)
    state["pending"] = []
    write_json_atomic(run_dir / STATE_FILE, state)
    if publish is not None:
        publish([*losers, STATE_FILE])


def _save_best(state: dict, sweep: SweepConfig, base: PipelineConfig, run_dir: Path) -> None:
    """The best member of the last round as a saved SAE (sweep/population/best/)."""
    last = [r for r in state["rows"] if r["round"] == sweep.population.rounds]
    best = max(last, key=lambda r: (r["score"], -r["point"]))
    train = member_train_config(sweep, base, state["params"][best["point"]], best["point"])
    manifest, _ = train_source(base.train, run_dir, "cpu", validate=False)
    sae = checkpoint_module(member_config(train, manifest.d), run_dir / member_dir(best["point"]))
    save_ensemble(Ensemble(sae, "single"), run_dir / BEST_MODEL_DIR)


def _rng_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _rng_state(data: list) -> tuple:
    return (data[0], tuple(data[1]), data[2])
