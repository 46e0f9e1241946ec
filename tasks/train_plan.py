"""What the training stage trains and how it is cut into units of work (see :mod:`tasks.train`).

The models (:class:`TrainingJob`, :func:`plan_jobs`), their seeds and fingerprints, a saved
model that is up to date (:func:`saved_model`), the units (:func:`training_units`), the
train split as a unit opens it (:func:`train_source`) and the stage's progress.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from data_contracts.activations import read_manifest, validate_activations
from sae_core.config import SAEConfig
from sae_core.ensemble import Ensemble
from sae_core.io import ENSEMBLE_FILE, load_ensemble
from sae_core.methods import method
from sae_core.registry import uses_k
from sae_core.training.ensembles import default_seeds
from sae_core.training.records import TrainingRecord
from sae_core.training.sources import ActivationSource
from tasks.common import ACTIVATIONS_DIR, ModelDir, activation_source
from tasks.config import TrainStageConfig
from tasks.progress import ProgressLog

ProgressCallback = Callable[[float, str], None]
CHECKPOINTS_DIR = ".checkpoints"
#: the single SAE of run r is bagging's member 0 when bagging is trained (same seed, data, recipe)
SINGLE_FROM_BAGGING = "bagging member 0"
SINGLE_ALONE = "trained alone"


def member_config(cfg: TrainStageConfig, d_in: int) -> SAEConfig:
    """The SAEConfig of one member, for activations of width d_in."""
    k = cfg.k if uses_k(cfg.architecture) else None
    options = cfg.architecture_options.sae_fields() if cfg.architecture_options is not None else {}
    return SAEConfig(architecture=cfg.architecture, d_in=d_in, d_sae=cfg.d_sae, k=k, **options)


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


def saved_model(directory: Path, fingerprint: str) -> Ensemble | None:
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



class TrainProgress:
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


def train_source(cfg: TrainStageConfig, run_dir: Path, device: torch.device, *, validate: bool = True):
    """The train split's manifest and source; ``validate`` runs its contract (a unit on a worker
    skips it: the stage validated the split before planning the units, and a pull from object
    storage verifies every file's sha256)."""
    acts_dir = run_dir / ACTIVATIONS_DIR
    manifest = validate_activations(acts_dir, splits=("train",)) if validate else read_manifest(acts_dir)
    acts = activation_source(acts_dir, "train", cfg.max_train_tokens, seed=0, manifest=manifest, device=device,
                             buffer_mb=cfg.shuffle_buffer_mb if cfg.activations == "stream" else None)
    return manifest, acts


def data_fingerprint(cfg: TrainStageConfig, manifest, acts: ActivationSource) -> str:
    # batches drawn through windows smaller than the data differ from in-memory ones
    return f"{manifest.config_fingerprint}:{cfg.max_train_tokens}" + (f":windows of {acts.buffer_rows} rows" if acts.streams else "")

