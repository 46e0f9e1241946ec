"""The training stage: S independent runs of every method on the train split (SPEC §5).

Reads ``activations/`` (validated), writes one ensemble directory per (method, run)::

    models/bagging/run=<r>/                      J_max members, α = 1/J, seeds {bJ..bJ+J-1}, b = recipe.seed·S + r
    models/boosting/run=<r>/                     J_max stages, α = 1, same seeds
    models/single/run=<r>/                       bagging's member 0 (seed bJ): the J = 1 point
    models/expanded_J<J>/run=<r>/                one SAE of width J·d_sae, TopK k·J
    models/expanded_compute_matched_J<J>/run=<r>/   the same trained for J× the steps
    models/random_decoder_J<J>/run=<r>/          width J·d_sae, frozen random unit-norm decoder, trained encoder

Every model directory records in ``ensemble.json`` the fingerprint of what it was trained
from (config, seeds, data); a rerun reuses a model whose fingerprint matches and retrains
only the missing or stale ones, so an interrupted stage resumes at model granularity (and
within a model from its checkpoint when ``recipe.checkpoint_every`` is set).

What is trained and how it is cut into units: :mod:`tasks.train_plan`; bagging in groups of
members: :mod:`tasks.train_groups`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sae_core.config import SAEConfig, TrainConfig
from sae_core.devices import resolve_device
from sae_core.ensemble import Ensemble, EnsembleInfo
from sae_core.io import load_training_history, save_ensemble
from sae_core.training.ensembles import EnsembleTrainResult, train_bagging, train_boosting, train_expanded, train_single
from sae_core.training.records import TrainingRecord
from sae_core.training.sources import ActivationSource
from tasks.common import ACTIVATIONS_DIR, StageResult
from tasks.config import TrainStageConfig
from tasks.train_groups import group_relative, stack_bagging, train_bagging_members
from tasks.train_plan import (
    CHECKPOINTS_DIR,
    SINGLE_ALONE,
    SINGLE_FROM_BAGGING,
    ProgressCallback,
    TrainingJob,
    TrainProgress,
    UnitOutcome,
    data_fingerprint,
    member_config,
    plan_jobs,
    saved_model,
    seed_block,
    train_source,
    training_units,
)
from tasks.units import Unit, UnitExecutor, executor_or_default


@dataclass
class _JobContext:
    """What a method's trainer needs besides the job: data, configs, callbacks, earlier results."""

    sae_cfg: SAEConfig
    acts: ActivationSource
    device: torch.device
    recipe: TrainConfig  # the run's recipe (its seed is the run's seed block)
    checkpoint: Path
    callback: Callable[[int, object, TrainingRecord | None], None]
    trained_bagging: dict[int, EnsembleTrainResult]  # run -> bagging, for the single SAE (its member 0)


def _alone(recipe: TrainConfig, seed: int) -> TrainConfig:
    return TrainConfig(**{**recipe.model_dump(), "seed": seed})


def _train_bagging(job: TrainingJob, c: _JobContext) -> EnsembleTrainResult:
    trained = train_bagging(c.sae_cfg, c.acts, c.recipe, job.n_members, seeds=list(job.seeds), checkpoint_dir=c.checkpoint, callback=c.callback,
                            device=c.device)
    c.trained_bagging[job.run] = trained
    return trained


def _train_single(job: TrainingJob, c: _JobContext) -> EnsembleTrainResult:
    if job.run in c.trained_bagging:
        bagging = c.trained_bagging[job.run]
        histories = bagging.histories[:1] if bagging.histories else []
        trained, source = EnsembleTrainResult(Ensemble(bagging.ensemble.member(0), "single"), histories), SINGLE_FROM_BAGGING
    else:
        trained = train_single(c.sae_cfg, c.acts, _alone(c.recipe, job.seeds[0]), checkpoint_dir=c.checkpoint, callback=c.callback,
                               device=c.device)
        source = SINGLE_ALONE
    trained.ensemble.info = EnsembleInfo(seeds=job.seeds, source=source)
    return trained


def _train_boosting(job: TrainingJob, c: _JobContext) -> EnsembleTrainResult:
    return train_boosting(c.sae_cfg, c.acts, c.recipe, job.n_members, seeds=list(job.seeds), checkpoint_dir=c.checkpoint,
                          callback=c.callback, device=c.device)


def _train_expanded(job: TrainingJob, c: _JobContext) -> EnsembleTrainResult:
    return train_expanded(
        c.sae_cfg, c.acts, _alone(c.recipe, job.seeds[0]), job.n_members,
        compute_matched=job.method == "expanded_compute_matched", checkpoint_dir=c.checkpoint, callback=c.callback,
        device=c.device,
    )


def _train_random_decoder(job: TrainingJob, c: _JobContext) -> EnsembleTrainResult:
    """One SAE of width J·d_sae (sparsity of J members) whose seeded random unit-norm decoder
    stays frozen while the encoder trains."""
    recipe = TrainConfig(**{**c.recipe.model_dump(), "seed": job.seeds[0], "freeze_decoder": True})
    return train_expanded(c.sae_cfg, c.acts, recipe, job.n_members, checkpoint_dir=c.checkpoint, callback=c.callback, device=c.device)


#: how each method is trained
TRAINERS: dict[str, Callable[[TrainingJob, _JobContext], EnsembleTrainResult]] = {
    "bagging": _train_bagging,
    "single": _train_single,
    "boosting": _train_boosting,
    "expanded": _train_expanded,
    "expanded_compute_matched": _train_expanded,
    "random_decoder": _train_random_decoder,
}


def train_unit(run_dir: Path, cfg: TrainStageConfig, jobs: tuple[TrainingJob, ...], *, data=None, bar: "TrainProgress | None" = None) -> UnitOutcome:
    """Train (or reuse) the models of one unit; see :func:`training_units`.

    data: (manifest, source) already opened by an in-process stage; a worker opens its own
    (the same split, the same seeded subset: the batches do not depend on where it runs).
    bar: the stage's progress in process; a worker logs its own progress lines.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    manifest, acts = data if data is not None else train_source(cfg, run_dir, device, validate=False)
    sae_cfg = member_config(cfg, manifest.d)
    data_fp = data_fingerprint(cfg, manifest, acts)
    recipe_dump = cfg.recipe.model_dump(exclude={"seed", "checkpoint_every", "log_every"})
    steps = cfg.recipe.n_steps
    own_bar = bar is None
    if own_bar:
        bar = TrainProgress(sum(job.cost * steps for job in jobs), False, None, cfg.recipe.batch_size)
    trained_bagging: dict[int, EnsembleTrainResult] = {}
    done: list[tuple[str, str, str]] = []
    for job in jobs:
        directory = job.model.path(run_dir)
        name = f"{directory.parent.name}/{directory.name}"
        fingerprint = job.fingerprint(sae_cfg, recipe_dump, data_fp)
        existing = saved_model(directory, fingerprint)
        if existing is not None:
            if job.method == "bagging":
                trained_bagging[job.run] = EnsembleTrainResult(existing, load_training_history(directory) or [])
            bar.advance(job.cost * steps, trained=False)
            done.append((job.model.relative, "reused", f"{name}: up to date, reused"))
            bar.report(f"{name}: reused")
            continue

        # the callback fires once per optimizer step; spread the job's cost over those calls
        per_call = job.cost * steps / (steps * job.optimizer_steps)

        def step_callback(step: int, sae, record: TrainingRecord | None, _w: float = per_call, _name: str = name) -> None:
            if record is not None:
                bar.record(record)
            bar.advance(_w)
            if record is not None:
                bar.report(f"{_name}: step {step}, loss {record.mean_loss():.4g}")

        bar.model = name
        context = _JobContext(
            sae_cfg, acts, device, cfg.recipe.model_copy(update={"seed": seed_block(cfg, job.run)}),
            run_dir / CHECKPOINTS_DIR / directory.parent.name / directory.name, step_callback, trained_bagging,
        )
        bar.report(f"{name}: training")
        trained = TRAINERS[job.method](job, context)
        ens = trained.ensemble
        ens.info = ens.info.updated(fingerprint=fingerprint, run=job.run, method=job.method, train_tokens=int(acts.n_rows))
        save_ensemble(ens, directory, histories=trained.histories or None)
        shutil.rmtree(context.checkpoint, ignore_errors=True)
        done.append((job.model.relative, "trained", ""))
        bar.report(f"{name}: saved")
    if own_bar:
        bar.close()
    return UnitOutcome(tuple(done), time.perf_counter() - start)


def run_training(
    cfg: TrainStageConfig,
    run_dir: str | Path,
    *,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
    executor: UnitExecutor | None = None,
) -> StageResult:
    """Train (or reuse) every model of ``cfg`` from ``run_dir/activations``; see the module docstring.

    The models are trained in units (:func:`training_units`) by ``executor`` (default: one
    after another in this process, sharing one read of the split).
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    executor = executor_or_default(executor, run_dir)
    device = resolve_device(cfg.device)
    manifest, acts = train_source(cfg, run_dir, device)
    sae_cfg = member_config(cfg, manifest.d)
    data_fp = data_fingerprint(cfg, manifest, acts)
    recipe_dump = cfg.recipe.model_dump(exclude={"seed", "checkpoint_every", "log_every"})

    jobs = plan_jobs(cfg)
    steps = cfg.recipe.n_steps
    bar = TrainProgress(sum(job.cost * steps for job in jobs), progress, on_progress, cfg.recipe.batch_size)
    result = StageResult(stage="train", read=[ACTIVATIONS_DIR], validated=[ACTIVATIONS_DIR])
    how = (f"streamed through a shuffle buffer of {acts.buffer_rows:,} rows ({cfg.shuffle_buffer_mb} MB)" if acts.streams
           else "held in memory")
    if manifest.is_live("train"):
        how += f", computed by {manifest.model} as it is read (extract.store_train: false)"
    result.notes.append(f"read the train split: {acts.n_rows} tokens, d={manifest.d}, {how}; trained on {device}")

    units = []
    stacks: list[tuple[list[TrainingJob], list[str]]] = []  # split bagging ensembles: (its jobs, its member groups)
    for group in training_units(jobs):
        fresh = all(saved_model(job.model.path(run_dir), job.fingerprint(sae_cfg, recipe_dump, data_fp)) is not None for job in group)
        if fresh and not executor.in_process:  # nothing to train: no worker needed
            for job in group:
                bar.advance(job.cost * steps, trained=False)
                result.notes.append(f"{job.model.name}/run={job.run}: up to date, reused")
            continue
        size = group[0].member_group if group[0].method == "bagging" else None
        if size and not fresh:
            bagging, shared = group[0], ({"data": (manifest, acts)} if executor.in_process else {})
            parts = [tuple(range(i, min(i + size, bagging.n_members))) for i in range(0, bagging.n_members, size)]
            stacks.append((group, [group_relative(bagging, m) for m in parts]))
            units += [Unit(train_bagging_members, {"cfg": cfg, "job": bagging, "members": m, **shared},
                           f"train bagging/run={bagging.run} members {m[0]}..{m[-1]}", reads=(ACTIVATIONS_DIR,),
                           writes=(group_relative(bagging, m),), cost=len(m) * steps) for m in parts]
            continue
        kwargs: dict = {"cfg": cfg, "jobs": tuple(group)}
        if executor.in_process:
            kwargs.update(data=(manifest, acts), bar=bar)
        reads = (ACTIVATIONS_DIR, *(j.model.relative for j in group))  # its own models: reused when up to date
        label = " + ".join(f"{j.model.name}/run={j.run}" for j in group)
        units.append(Unit(train_unit, kwargs, f"train {label}", reads=reads, writes=tuple(j.model.relative for j in group),
                          cost=sum(job.cost * steps for job in group)))

    def finished(unit: Unit, outcome: UnitOutcome) -> None:
        if not executor.in_process or unit.function is train_bagging_members:
            bar.advance(unit.cost)
            bar.report(f"{unit.label}: done in {outcome.seconds:.1f} s")

    for outcome in executor.run("train", units, on_done=finished):
        for relative, what, note in outcome.models:
            if what == "trained":
                result.written.append(relative)
            elif what == "reused":
                result.notes.append(note)
    for group, parts in stacks:
        result.written += stack_bagging(run_dir, group, parts, sae_cfg, recipe_dump, data_fp, int(acts.n_rows))
        result.notes.append(f"bagging/run={group[0].run}: trained as {len(parts)} groups of members, stacked")
    bar.close()
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    if cfg.imported:  # SAELens folders listed in the config become models like the trained ones
        from tasks.interop import import_saelens_models

        imported, notes = import_saelens_models(cfg.imported, run_dir, manifest)
        result.written += imported
        result.notes += notes
    result.did_work = bool(result.written)
    result.notes.insert(
        0,
        f"member: {sae_cfg.architecture}, d_sae={sae_cfg.d_sae}" + (f", k={sae_cfg.k}" if sae_cfg.k else "")
        + f"; J_max={cfg.n_members}, runs={cfg.n_runs}; {steps} steps × batch {cfg.recipe.batch_size}",
    )
    if not cfg.compute_matched_expanded or "expanded_compute_matched" not in cfg.methods:
        result.notes.append("step-matched expanded SAE not trained (train.compute_matched_expanded is off)")
    result.seconds = time.perf_counter() - start
    bar.report("done")
    return result
