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
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from data_contracts.activations import read_manifest, validate_activations
from sae_core.config import SAEConfig, TrainConfig
from sae_core.ensemble import Ensemble, EnsembleInfo
from sae_core.io import ENSEMBLE_FILE, load_ensemble, load_training_history, save_ensemble
from sae_core.methods import method
from sae_core.registry import uses_k
from sae_core.training.ensembles import (
    EnsembleTrainResult,
    default_seeds,
    train_bagging,
    train_boosting,
    train_expanded,
    train_single,
)
from sae_core.training.records import TrainingRecord
from sae_core.devices import resolve_device
from sae_core.training.sources import ActivationSource
from tasks.common import ACTIVATIONS_DIR, ModelDir, StageResult, activation_source
from tasks.config import TrainStageConfig
from tasks.progress import ProgressLog
from tasks.units import Unit, UnitExecutor, executor_or_default

ProgressCallback = Callable[[float, str], None]
CHECKPOINTS_DIR = ".checkpoints"
#: the single SAE of run r is bagging's member 0 when bagging is trained (same seed, data, recipe)
SINGLE_FROM_BAGGING = "bagging member 0"
SINGLE_ALONE = "trained alone"


def member_config(cfg: TrainStageConfig, d_in: int) -> SAEConfig:
    """The SAEConfig of one member, for activations of width d_in."""
    k = cfg.k if uses_k(cfg.architecture) else None
    return SAEConfig(architecture=cfg.architecture, d_in=d_in, d_sae=cfg.d_sae, k=k)


@dataclass(frozen=True)
class TrainingJob:
    """One model the stage produces and what determines it.

    n_members: members of bagging/boosting, the matched J of an expanded SAE, 1 otherwise.
    seeds: the member seeds (the first one seeds a single or expanded SAE).
    cost: member-steps per recipe step (for progress): J for an ensemble or an expanded
        SAE of width J, J² for the step-matched expanded SAE, 0 for a reused model.
    """

    method: str
    run: int
    n_members: int
    seeds: tuple[int, ...]
    cost: int
    member_group: int | None = None  # bagging (and its single SAE): members per batched module, None = all J

    @property
    def model(self) -> ModelDir:
        return ModelDir(self.method, self.run, self.n_members if method(self.method).matched_width else None)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per recipe step: boosting trains J stages and the step-matched
        expanded SAE J× the steps; everything else one."""
        return self.n_members if self.method in ("boosting", "expanded_compute_matched") else 1

    def fingerprint(self, sae_cfg: SAEConfig, recipe: dict, data_fingerprint: str) -> str:
        """sha256 of the job, the member config, the recipe and the data: a saved model with
        this fingerprint in its ensemble.json is up to date."""
        job = {k: v for k, v in asdict(self).items() if not (k == "member_group" and v is None)}  # as before groups existed
        payload = {**job, "sae": sae_cfg.model_dump(), "recipe": recipe, "data": data_fingerprint}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _existing(directory: Path, fingerprint: str) -> Ensemble | None:
    """The saved model at ``directory`` if it is complete and was trained from ``fingerprint``."""
    if not (directory / ENSEMBLE_FILE).is_file():
        return None
    try:
        ens = load_ensemble(directory)
    except (ValueError, FileNotFoundError):
        return None  # damaged or half-written by something else: retrain it
    return ens if ens.info.fingerprint == fingerprint else None


def seed_block(cfg: TrainStageConfig, run: int) -> int:
    """Run ``run``'s seed block b; its members get seeds {bJ, …, bJ + J − 1}."""
    return cfg.recipe.seed * cfg.n_runs + run


def plan_jobs(cfg: TrainStageConfig) -> list[TrainingJob]:
    """Every model the stage produces, in training order."""
    J = cfg.n_members
    jobs = []
    for r in range(cfg.n_runs):
        # seed block of run r: recipe.seed picks a fresh set of S disjoint blocks (0 -> blocks 0..S-1)
        seeds = tuple(default_seeds(cfg.recipe.model_copy(update={"seed": seed_block(cfg, r)}), J))
        group = cfg.bagging_group if cfg.bagging_group and cfg.bagging_group < J and "bagging" in cfg.methods else None
        if "bagging" in cfg.methods:
            jobs.append(TrainingJob("bagging", r, J, seeds, J, group))
        if "single" in cfg.methods:
            jobs.append(TrainingJob("single", r, 1, seeds[:1], 0 if "bagging" in cfg.methods else 1, group))
        if "boosting" in cfg.methods:
            jobs.append(TrainingJob("boosting", r, J, seeds, J))
        for size in cfg.expanded_sizes:
            if "expanded" in cfg.methods:
                jobs.append(TrainingJob("expanded", r, size, seeds[:1], size))
            if "expanded_compute_matched" in cfg.methods and cfg.compute_matched_expanded:
                jobs.append(TrainingJob("expanded_compute_matched", r, size, seeds[:1], size * size))
        if "random_decoder" in cfg.methods:
            # seeded like the single SAE: at J = 1 its decoder is member 0's untrained one
            jobs += [TrainingJob("random_decoder", r, size, seeds[:1], size) for size in cfg.random_decoder_widths]
    return jobs


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


class _Progress:
    """Training progress in member-steps: a tqdm bar in a terminal, a log line at a steady
    interval without one (:mod:`tasks.progress`), and the stage's callback (the Prefect
    progress artifact)."""

    def __init__(self, total: float, progress: bool, on_progress: ProgressCallback | None, batch_size: int) -> None:
        self.total, self.done, self.on_progress = total or 1, 0.0, on_progress
        self.bar = None
        self.log = ProgressLog("train", self.total, "member-steps", tokens_per_unit=batch_size, enabled=not progress)
        self.loss: float | None = None
        self.ev: float | None = None
        self.model = ""
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="step", desc="train", unit_scale=True)

    def advance(self, amount: float, trained: bool = True) -> None:
        self.done += amount
        if self.bar is not None:
            self.bar.update(amount)
        if trained:
            self.log.advance(amount, self.model, loss=self.loss, EV=self.ev)
        else:  # reused: counts as done without counting towards tokens/s
            self.log.total = max(self.log.total - amount, 1e-9)

    def record(self, record: TrainingRecord) -> None:
        self.loss, self.ev = record.mean_loss(), record.mean_explained_variance()

    def report(self, message: str) -> None:
        if self.on_progress is not None:
            self.on_progress(min(self.done / self.total, 1.0), message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log.done:
            self.log.finish()


def training_units(jobs: list[TrainingJob]) -> list[list[TrainingJob]]:
    """The stage's units of work, in training order: per run, bagging with the single SAE
    (bagging's member 0), boosting as one chain, and every other model alone."""
    groups: list[list[TrainingJob]] = []
    bagging_group: dict[int, list[TrainingJob]] = {}
    for job in jobs:
        if job.method == "bagging":
            bagging_group[job.run] = [job]
            groups.append(bagging_group[job.run])
        elif job.method == "single" and job.run in bagging_group:
            bagging_group[job.run].append(job)
        else:
            groups.append([job])
    return groups


@dataclass(frozen=True)
class UnitOutcome:
    """What a training unit did, per model: (relative path, 'reused' | 'trained', note)."""

    models: tuple[tuple[str, str, str], ...]
    seconds: float


def _train_source(cfg: TrainStageConfig, run_dir: Path, device: torch.device, *, validate: bool = True):
    """The train split's manifest and source; ``validate`` runs its contract (a unit on a worker
    skips it: the stage validated the split before planning the units, and a pull from object
    storage verifies every file's sha256)."""
    acts_dir = run_dir / ACTIVATIONS_DIR
    manifest = validate_activations(acts_dir, splits=("train",)) if validate else read_manifest(acts_dir)
    acts = activation_source(acts_dir, "train", cfg.max_train_tokens, seed=0, manifest=manifest, device=device,
                             buffer_mb=cfg.shuffle_buffer_mb if cfg.activations == "stream" else None)
    return manifest, acts


def _data_fingerprint(cfg: TrainStageConfig, manifest, acts: ActivationSource) -> str:
    # batches drawn through windows smaller than the data differ from in-memory ones
    return f"{manifest.config_fingerprint}:{cfg.max_train_tokens}" + (f":windows of {acts.buffer_rows} rows" if acts.streams else "")


def train_unit(run_dir: Path, cfg: TrainStageConfig, jobs: tuple[TrainingJob, ...], *, data=None, bar: "_Progress | None" = None) -> UnitOutcome:
    """Train (or reuse) the models of one unit; see :func:`training_units`.

    data: (manifest, source) already opened by an in-process stage; a worker opens its own
    (the same split, the same seeded subset: the batches do not depend on where it runs).
    bar: the stage's progress in process; a worker logs its own progress lines.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    manifest, acts = data if data is not None else _train_source(cfg, run_dir, device, validate=False)
    sae_cfg = member_config(cfg, manifest.d)
    data_fp = _data_fingerprint(cfg, manifest, acts)
    recipe_dump = cfg.recipe.model_dump(exclude={"seed", "checkpoint_every", "log_every"})
    steps = cfg.recipe.n_steps
    own_bar = bar is None
    if own_bar:
        bar = _Progress(sum(job.cost * steps for job in jobs), False, None, cfg.recipe.batch_size)
    trained_bagging: dict[int, EnsembleTrainResult] = {}
    done: list[tuple[str, str, str]] = []
    for job in jobs:
        directory = job.model.path(run_dir)
        name = f"{directory.parent.name}/{directory.name}"
        fingerprint = job.fingerprint(sae_cfg, recipe_dump, data_fp)
        existing = _existing(directory, fingerprint)
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


#: where member groups of a split bagging ensemble wait to be stacked (under the checkpoints, removed at the end)
GROUPS_DIR = f"{CHECKPOINTS_DIR}/bagging-groups"


def _group_relative(job: TrainingJob, members: tuple[int, ...]) -> str:
    return f"{GROUPS_DIR}/run={job.run}/members={members[0]}-{members[-1]}"


def train_bagging_members(run_dir: Path, cfg: TrainStageConfig, job: TrainingJob, members: tuple[int, ...], *, data=None) -> UnitOutcome:
    """A unit of a bagging ensemble split by ``train.bagging_group``: members ``members`` of
    ``job`` as one batched module, saved under :data:`GROUPS_DIR`; :func:`_stack_bagging` puts
    the groups together. The members are independent (own parameters, seeds, batches and
    optimizer state), so a member is what it would be trained alone in a module of the same
    size; the module's size can still change the last bits (kernel shapes), which is why the
    grouping is a train setting and part of the models' fingerprints."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    manifest, acts = data if data is not None else _train_source(cfg, run_dir, device, validate=False)
    rel = _group_relative(job, members)
    recipe = cfg.recipe.model_copy(update={"seed": seed_block(cfg, job.run)})
    bar = _Progress(len(members) * cfg.recipe.n_steps, False, None, cfg.recipe.batch_size)
    bar.model = f"bagging/run={job.run} members {members[0]}..{members[-1]}"
    trained = train_bagging(member_config(cfg, manifest.d), acts, recipe, len(members), seeds=[job.seeds[j] for j in members],
                            checkpoint_dir=run_dir / CHECKPOINTS_DIR / "bagging" / f"run={job.run}" / f"members={members[0]}-{members[-1]}",
                            callback=lambda step, sae, record: (bar.record(record) if record is not None else None, bar.advance(len(members))),
                            device=device)
    bar.close()
    save_ensemble(trained.ensemble, run_dir / rel, histories=trained.histories)
    return UnitOutcome(((rel, "group", ""),), time.perf_counter() - start)


def _stack_bagging(run_dir: Path, group: list[TrainingJob], parts: list[str], sae_cfg: SAEConfig, recipe_dump: dict, data_fp: str,
                   n_rows: int) -> list[str]:
    """Bagging (and its single SAE, member 0) from the member groups ``parts``, saved as
    :func:`train_unit` saves them; returns the models written."""
    bagging = group[0]
    groups = [load_ensemble(run_dir / rel) for rel in parts]
    histories = [h for rel in parts for h in (load_training_history(run_dir / rel) or [])]
    stacked = type(groups[0].members).stack([g.member(j) for g in groups for j in range(g.n_members)])
    ens = Ensemble(stacked, "bagging")
    ens.info = EnsembleInfo(seeds=tuple(bagging.seeds), bootstrap=groups[0].info.bootstrap).updated(
        fingerprint=bagging.fingerprint(sae_cfg, recipe_dump, data_fp), run=bagging.run, method="bagging", train_tokens=n_rows)
    save_ensemble(ens, bagging.model.path(run_dir), histories=histories or None)
    written = [bagging.model.relative]
    for job in group[1:]:  # the single SAE: bagging's member 0
        single = Ensemble(ens.member(0), "single")
        single.info = EnsembleInfo(seeds=job.seeds, source=SINGLE_FROM_BAGGING).updated(
            fingerprint=job.fingerprint(sae_cfg, recipe_dump, data_fp), run=job.run, method=job.method, train_tokens=n_rows)
        save_ensemble(single, job.model.path(run_dir), histories=histories[:1] or None)
        written.append(job.model.relative)
    return written


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
    manifest, acts = _train_source(cfg, run_dir, device)
    sae_cfg = member_config(cfg, manifest.d)
    data_fp = _data_fingerprint(cfg, manifest, acts)
    recipe_dump = cfg.recipe.model_dump(exclude={"seed", "checkpoint_every", "log_every"})

    jobs = plan_jobs(cfg)
    steps = cfg.recipe.n_steps
    bar = _Progress(sum(job.cost * steps for job in jobs), progress, on_progress, cfg.recipe.batch_size)
    result = StageResult(stage="train", read=[ACTIVATIONS_DIR], validated=[ACTIVATIONS_DIR])
    how = (f"streamed through a shuffle buffer of {acts.buffer_rows:,} rows ({cfg.shuffle_buffer_mb} MB)" if acts.streams
           else "held in memory")
    if manifest.is_live("train"):
        how += f", computed by {manifest.model} as it is read (extract.store_train: false)"
    result.notes.append(f"read the train split: {acts.n_rows} tokens, d={manifest.d}, {how}; trained on {device}")

    units = []
    stacks: list[tuple[list[TrainingJob], list[str]]] = []  # split bagging ensembles: (its jobs, its member groups)
    for group in training_units(jobs):
        fresh = all(_existing(job.model.path(run_dir), job.fingerprint(sae_cfg, recipe_dump, data_fp)) is not None for job in group)
        if fresh and not executor.in_process:  # nothing to train: no worker needed
            for job in group:
                bar.advance(job.cost * steps, trained=False)
                result.notes.append(f"{job.model.name}/run={job.run}: up to date, reused")
            continue
        size = group[0].member_group if group[0].method == "bagging" else None
        if size and not fresh:
            bagging, shared = group[0], ({"data": (manifest, acts)} if executor.in_process else {})
            parts = [tuple(range(i, min(i + size, bagging.n_members))) for i in range(0, bagging.n_members, size)]
            stacks.append((group, [_group_relative(bagging, m) for m in parts]))
            units += [Unit(train_bagging_members, {"cfg": cfg, "job": bagging, "members": m, **shared},
                           f"train bagging/run={bagging.run} members {m[0]}..{m[-1]}", reads=(ACTIVATIONS_DIR,),
                           writes=(_group_relative(bagging, m),), cost=len(m) * steps) for m in parts]
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
        result.written += _stack_bagging(run_dir, group, parts, sae_cfg, recipe_dump, data_fp, int(acts.n_rows))
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
