"""The training stage: S independent runs of every method on the train split (SPEC §5).

Reads ``activations/`` (validated), writes one ensemble directory per (method, run)::

    models/bagging/run=<r>/                      J_max members, α = 1/J, seeds {bJ..bJ+J-1}, b = recipe.seed·S + r
    models/boosting/run=<r>/                     J_max stages, α = 1, same seeds
    models/single/run=<r>/                       bagging's member 0 (seed bJ): the J = 1 point
    models/expanded_J<J>/run=<r>/                one SAE of width J·d_sae, TopK k·J
    models/expanded_compute_matched_J<J>/run=<r>/   the same trained for J× the steps

Every model directory records in ``ensemble.json`` the fingerprint of what it was trained
from (config, seeds, data); a rerun reuses a model whose fingerprint matches and retrains
only the missing or stale ones, so an interrupted stage resumes at model granularity (and
within a model from its checkpoint when ``recipe.checkpoint_every`` is set).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from data_contracts.activations import validate_activations
from sae_core.config import SAEConfig, TrainConfig
from sae_core.ensemble import Ensemble
from sae_core.io import ENSEMBLE_FILE, load_ensemble, save_ensemble
from sae_core.training.ensembles import default_seeds, train_bagging, train_boosting, train_expanded, train_single
from tasks.common import ACTIVATIONS_DIR, StageResult, model_dir, split_tokens
from tasks.config import TrainStageConfig

ProgressCallback = Callable[[float, str], None]
CHECKPOINTS_DIR = ".checkpoints"


def member_config(cfg: TrainStageConfig, d_in: int) -> SAEConfig:
    """The SAEConfig of one member, for activations of width d_in."""
    k = cfg.k if cfg.architecture in ("topk", "batchtopk") else None
    return SAEConfig(architecture=cfg.architecture, d_in=d_in, d_sae=cfg.d_sae, k=k)


def _fingerprint(job: dict, data_fingerprint: str) -> str:
    payload = json.dumps({**job, "data": data_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _existing(directory: Path, fingerprint: str) -> Ensemble | None:
    """The saved model at ``directory`` if it is complete and was trained from ``fingerprint``."""
    if not (directory / ENSEMBLE_FILE).is_file():
        return None
    try:
        ens = load_ensemble(directory)
    except (ValueError, FileNotFoundError):
        return None  # damaged or half-written by something else: retrain it
    return ens if ens.info.get("fingerprint") == fingerprint else None


def seed_block(cfg: TrainStageConfig, run: int) -> int:
    """Run ``run``'s seed block b; its members get seeds {bJ, …, bJ + J − 1}."""
    return cfg.recipe.seed * cfg.n_runs + run


def plan_jobs(cfg: TrainStageConfig) -> list[dict]:
    """Every model the stage produces, in training order, with what determines it."""
    J = cfg.n_members
    jobs = []
    for r in range(cfg.n_runs):
        # seed block of run r: recipe.seed picks a fresh set of S disjoint blocks (0 -> blocks 0..S-1)
        seeds = default_seeds(cfg.recipe.model_copy(update={"seed": seed_block(cfg, r)}), J)
        if "bagging" in cfg.methods:
            jobs.append({"method": "bagging", "run": r, "n_members": J, "seeds": seeds, "cost": J})
        if "single" in cfg.methods:
            # bagging's member 0 has exactly the single SAE's seed, data and recipe: reuse it
            jobs.append({"method": "single", "run": r, "n_members": 1, "seeds": seeds[:1], "cost": 0 if "bagging" in cfg.methods else 1})
        if "boosting" in cfg.methods:
            jobs.append({"method": "boosting", "run": r, "n_members": J, "seeds": seeds, "cost": J})
        for size in cfg.expanded_sizes:
            if "expanded" in cfg.methods:
                jobs.append({"method": "expanded", "run": r, "n_members": size, "seeds": [seeds[0]], "cost": size})
            if "expanded_compute_matched" in cfg.methods and cfg.compute_matched_expanded:
                jobs.append(
                    {"method": "expanded_compute_matched", "run": r, "n_members": size, "seeds": [seeds[0]], "cost": size * size}
                )
    return jobs


def job_directory(run_dir: Path, job: dict) -> Path:
    expanded = job["method"].startswith("expanded")
    return model_dir(run_dir, job["method"], job["run"], job["n_members"] if expanded else None)


def run_training(
    cfg: TrainStageConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> StageResult:
    """Train (or reuse) every model of ``cfg`` from ``run_dir/activations``; see the module docstring."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    acts_dir = run_dir / ACTIVATIONS_DIR
    manifest = validate_activations(acts_dir, splits=("train",))
    acts = split_tokens(acts_dir, "train", cfg.max_train_tokens, seed=0)
    sae_cfg = member_config(cfg, manifest.d)
    data_fp = f"{manifest.config_fingerprint}:{cfg.max_train_tokens}"
    recipe_dump = cfg.recipe.model_dump(exclude={"seed", "checkpoint_every", "log_every"})

    jobs = plan_jobs(cfg)
    total_cost = sum(job["cost"] * cfg.recipe.n_steps for job in jobs) or 1
    done_cost = 0.0
    result = StageResult(stage="train", read=[f"{ACTIVATIONS_DIR} (train split, {acts.shape[0]} tokens, d={manifest.d})"])
    result.validated.append(f"{ACTIVATIONS_DIR} (train split)")
    trained_bagging: dict[int, Ensemble] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_cost, unit="step", desc="train", unit_scale=True)

    def report(message: str) -> None:
        if on_progress is not None:
            on_progress(min(done_cost / total_cost, 1.0), message)

    for job in jobs:
        directory = job_directory(run_dir, job)
        name = f"{directory.parent.name}/{directory.name}"
        fingerprint = _fingerprint({**job, "sae": sae_cfg.model_dump(), "recipe": recipe_dump}, data_fp)
        existing = _existing(directory, fingerprint)
        if existing is not None:
            if job["method"] == "bagging":
                trained_bagging[job["run"]] = existing
            done_cost += job["cost"] * cfg.recipe.n_steps
            if bar is not None:
                bar.update(job["cost"] * cfg.recipe.n_steps)
            result.notes.append(f"{name}: up to date, reused")
            report(f"{name}: reused")
            continue

        # the callback fires once per optimizer step: J stages × n_steps for boosting,
        # J × n_steps for the compute-matched expanded SAE, n_steps otherwise
        calls = cfg.recipe.n_steps * (job["n_members"] if job["method"] in ("boosting", "expanded_compute_matched") else 1)
        per_step = job["cost"] * cfg.recipe.n_steps / calls

        def step_callback(step: int, sae, record: dict, _w: float = per_step) -> None:
            nonlocal done_cost
            done_cost += _w
            if bar is not None:
                bar.update(_w)
            if record:
                report(f"{name}: step {step}, loss {sum(record['loss']) / len(record['loss']):.4g}")

        tcfg = cfg.recipe.model_copy(update={"seed": seed_block(cfg, job["run"])})
        ckpt = run_dir / CHECKPOINTS_DIR / directory.parent.name / directory.name
        report(f"{name}: training")
        if job["method"] == "bagging":
            ens = train_bagging(sae_cfg, acts, tcfg, job["n_members"], seeds=job["seeds"], checkpoint_dir=ckpt, callback=step_callback).ensemble
            trained_bagging[job["run"]] = ens
        elif job["method"] == "single":
            if job["run"] in trained_bagging:
                ens = Ensemble(trained_bagging[job["run"]].member(0), "single")
            else:
                tsingle = TrainConfig(**{**tcfg.model_dump(), "seed": job["seeds"][0]})
                ens = train_single(sae_cfg, acts, tsingle, checkpoint_dir=ckpt, callback=step_callback).ensemble
            ens.info = {"seeds": job["seeds"], "source": "bagging member 0" if job["run"] in trained_bagging else "trained alone"}
        elif job["method"] == "boosting":
            ens = train_boosting(sae_cfg, acts, tcfg, job["n_members"], seeds=job["seeds"], checkpoint_dir=ckpt, callback=step_callback).ensemble
        else:
            texp = TrainConfig(**{**tcfg.model_dump(), "seed": job["seeds"][0]})
            ens = train_expanded(
                sae_cfg, acts, texp, job["n_members"],
                compute_matched=job["method"] == "expanded_compute_matched",
                checkpoint_dir=ckpt, callback=step_callback,
            ).ensemble
        ens.info = {**ens.info, "fingerprint": fingerprint, "run": job["run"], "method": job["method"], "train_tokens": int(acts.shape[0])}
        save_ensemble(ens, directory)
        shutil.rmtree(ckpt, ignore_errors=True)
        result.written.append(str(directory.relative_to(run_dir)))
        report(f"{name}: saved")
    if bar is not None:
        bar.close()
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    result.did_work = bool(result.written)
    result.notes.insert(
        0,
        f"member: {sae_cfg.architecture}, d_sae={sae_cfg.d_sae}" + (f", k={sae_cfg.k}" if sae_cfg.k else "")
        + f"; J_max={cfg.n_members}, runs={cfg.n_runs}; {cfg.recipe.n_steps} steps × batch {cfg.recipe.batch_size}",
    )
    if not cfg.compute_matched_expanded or "expanded_compute_matched" not in cfg.methods:
        result.notes.append("compute-matched expanded SAE not trained (train.compute_matched_expanded is off)")
    result.seconds = time.perf_counter() - start
    report("done")
    return result
