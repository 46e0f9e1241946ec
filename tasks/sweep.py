"""The sweep's grid points: one single SAE per (point, seed), trained and scored on the validation split.

Layout under the run directory (beside the pipeline's stages, which the sweep leaves alone)::

    sweep/points/point=<p>/seed=<s>/      the SAE (ensemble.json + member_00/) and validation.json
    sweep/results.parquet                 every scored SAE (data_contracts.sweep)
    sweep/best.yaml                       the chosen point as a full pipeline config
    sweep/report.md, sweep/report.html    tasks.report_sweep

A (point, seed) is a unit of work (:mod:`tasks.units`): it trains with the train stage's own
pieces (train split, member config, fingerprints, :func:`train_single`) and scores with the
evaluate stage's (:func:`prefix_reconstruction_metrics`, :func:`dictionary_metrics`). A point
whose saved SAE and scores match its fingerprint is not retrained or rescored on a rerun.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from data_contracts.activations import read_manifest
from sae_core import metrics
from sae_core.devices import resolve_device
from sae_core.ensemble import Ensemble
from sae_core.evaluation import dictionary_metrics, prefix_reconstruction_metrics
from sae_core.io import load_ensemble, save_ensemble
from sae_core.l0_guide import L0Choice, pick_l0
from sae_core.registry import uses_k
from sae_core.training.ensembles import train_single
from tasks.common import ACTIVATIONS_DIR, activation_source
from tasks.config import PipelineConfig, TrainStageConfig
from tasks.config_sweep import SweepConfig, point_train_config
from tasks.evaluate import TOKEN_SUBSET_SEED
from tasks.progress import ProgressLog
from tasks.sweep_results import BEST_FILE, POINTS_DIR, RESULTS_FILE, SWEEP_DIR, point_means  # noqa: F401  (re-exported)
from tasks.train_plan import data_fingerprint, member_config, plan_jobs, saved_model, train_source
from tasks.units import Unit

VALIDATION_FILE = "validation.json"
EVAL_BATCH = 4096


def point_dir(point: int, seed: int) -> str:
    return f"{POINTS_DIR}/point={point:03d}/seed={seed}"


def validation_source(run_dir: Path, split: str, max_tokens: int | None):
    """The validation split as the evaluate stage opens it (streamed shard by shard, the same seeded subset)."""
    acts_dir = Path(run_dir) / ACTIVATIONS_DIR
    return activation_source(acts_dir, split, max_tokens, seed=TOKEN_SUBSET_SEED, manifest=read_manifest(acts_dir))


def validation_metrics(ens: Ensemble, source) -> dict[str, float]:
    """EV, MSE, L0, dead fraction, … and c_dec of a one-member model on ``source``: the evaluate stage's functions."""
    with torch.no_grad():
        recon = prefix_reconstruction_metrics(ens, source.iter_batches(EVAL_BATCH), [ens.n_members])[ens.n_members]
    return {**recon.as_dict(), **dictionary_metrics(ens.W_dec.detach())}


def result_row(mode: str, point: int, seed: int, round_: int, params: dict[str, Any], train: TrainStageConfig,
               steps: int, values: dict[str, float], score: float) -> dict[str, Any]:
    """One row of sweep/results.parquet (data_contracts.sweep)."""
    sae_k = train.k if uses_k(train.architecture) else None
    return {"mode": mode, "point": point, "seed": seed, "round": round_, "params": json.dumps(params, sort_keys=True),
            "architecture": train.architecture, "d_sae": train.d_sae, "k": int(sae_k or 0), "lr": train.recipe.lr,
            "sparsity_coefficient": train.recipe.sparsity_coefficient, "steps": steps, "tokens": steps * train.recipe.batch_size,
            **{m: float(values[m]) for m in ("explained_variance", "explained_variance_total", "mse", "l0", "dead_fraction", "c_dec")},
            "stability": float("nan"), "score": score}


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, sort_keys=True))
    os.replace(tmp, path)


def step_progress(what: str, train: TrainStageConfig, total: int | None = None):
    """A trainer callback that logs ``what``'s progress (steps, tokens/s, loss, batch EV) at the usual interval."""
    log = ProgressLog(what, total or train.recipe.n_steps, "steps", tokens_per_unit=train.recipe.batch_size)

    def callback(step: int, sae, record) -> None:
        values = {"loss": record.mean_loss(), "EV": record.mean_explained_variance()} if record is not None else {}
        log.advance(1, **values)

    return callback


def grid_point_unit(run_dir: Path, train: TrainStageConfig, point: int, seed: int, split: str,
                    max_tokens: int | None) -> dict[str, float]:
    """Train (or reuse) the SAE of one (point, seed) and score it on ``split``; returns its metrics."""
    run_dir = Path(run_dir)
    directory = run_dir / point_dir(point, seed)
    device = resolve_device(train.device)
    manifest, acts = train_source(train, run_dir, device, validate=False)
    sae_cfg = member_config(train, manifest.d)
    recipe = train.recipe.model_dump(exclude={"seed", "checkpoint_every", "log_every"})
    fingerprint = plan_jobs(train)[0].fingerprint(sae_cfg, recipe, data_fingerprint(train, manifest, acts))
    scored = directory / VALIDATION_FILE
    key = {"fingerprint": fingerprint, "split": split, "max_tokens": max_tokens}
    if scored.is_file() and saved_model(directory, fingerprint) is not None:
        saved = json.loads(scored.read_text())
        if saved.get("key") == key:
            return saved["metrics"]
    ens = saved_model(directory, fingerprint)
    if ens is None:
        checkpoint = run_dir / SWEEP_DIR / ".checkpoints" / f"point={point:03d}" / f"seed={seed}"
        trained = train_single(sae_cfg, acts, train.recipe, checkpoint_dir=checkpoint, device=device,
                               callback=step_progress(f"sweep point {point} seed {seed}", train))
        ens = trained.ensemble
        ens.info = ens.info.updated(seeds=(seed,), fingerprint=fingerprint, run=0, method="single", train_tokens=int(acts.n_rows))
        save_ensemble(ens, directory, histories=trained.histories)
        shutil.rmtree(checkpoint, ignore_errors=True)
    values = validation_metrics(ens.to(device), validation_source(run_dir, split, max_tokens))
    write_json_atomic(scored, {"key": key, "metrics": values})
    return values


def grid_units(sweep: SweepConfig, base: PipelineConfig) -> list[tuple[Unit, int, int, dict[str, Any], TrainStageConfig]]:
    """One unit per (point, seed), with its point, seed, values and train section."""
    out = []
    for point, params in enumerate(sweep.grid_points()):
        for seed in sweep.seeds:
            train = point_train_config(base.train, params, seed)
            label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in params.items())
            unit = Unit(grid_point_unit, {"train": train, "point": point, "seed": seed, "split": sweep.validation_split,
                                          "max_tokens": sweep.validation_max_tokens},
                        f"sweep point {point} ({label}) seed {seed}", reads=(ACTIVATIONS_DIR, point_dir(point, seed)),
                        writes=(point_dir(point, seed),), cost=train.recipe.n_steps)
            out.append((unit, point, seed, params, train))
    return out


def add_stability(frame: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """Per grid point with ≥ 2 seeds: each seed's stability (SPEC §6: mean over its latents of the max
    |cosine| to any latent of the other seeds' SAEs), from the saved decoders."""
    frame = frame.copy()
    for point, rows in frame[frame["mode"] == "grid"].groupby("point"):
        if len(rows) < 2:
            continue
        dictionaries = [load_ensemble(run_dir / point_dir(int(point), int(s))).W_dec.detach() for s in rows["seed"]]
        frame.loc[rows.index, "stability"] = metrics.stability(dictionaries)
    return frame


def choose(frame: pd.DataFrame, sweep: SweepConfig) -> tuple[int, str, L0Choice | None]:
    """The chosen point, why, and the L0 guide's pick: the guide's L0 when the grid moves L0 (its
    points' L0 spread over more than 10%); otherwise (and in population mode) the best score."""
    means = point_means(frame)
    guide = None
    if sweep.mode == "grid" and len(means) >= 2 and means["l0"].max() > 1.1 * means["l0"].min():
        guide = pick_l0(means["l0"].tolist(), means["c_dec"].tolist(), sweep.guide_tolerance)
        return int(means["point"].iloc[guide.index]), f"the L0 guide: {guide.describe()}", guide
    best = means.sort_values(["score", "point"], ascending=[False, True]).iloc[0]
    return int(best["point"]), f"the best {sweep.objective} on the {sweep.validation_split} split", guide


def best_config(base: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """``base`` with the chosen values set in its train section (everything else as in the base)."""
    data = base.model_dump(mode="json")
    for key, value in params.items():
        parts = key.split(".")
        (data["train"]["recipe"] if parts[1] == "recipe" else data["train"])[parts[-1]] = value
    data["name"] = f"{base.name}-sweep-best"
    return PipelineConfig(**data)


def write_best(run_dir: Path, base: PipelineConfig, params: dict[str, Any], why: str) -> str:
    """sweep/best.yaml: the chosen recipe as a pipeline config `sae-ensembles run --config` takes."""
    import yaml

    config = best_config(base, params)
    path = Path(run_dir) / BEST_FILE
    text = (f"# chosen by the sweep: {why}\n# values: {json.dumps(params, sort_keys=True)}\n"
            + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return BEST_FILE
