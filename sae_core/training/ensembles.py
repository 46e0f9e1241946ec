"""Training of the four methods compared in the paper: single, expanded, bagging, boosting.

Each returns an :class:`~sae_core.ensemble.Ensemble` (a single SAE is one with J = 1).

Seeds: run r of a J-member bagging ensemble uses seeds {rJ, …, rJ + J − 1} by default
(``TrainConfig.seed`` = r), so runs with different ``seed`` never share a member, as in
the paper's disjoint seed blocks.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sae_core.config import SAEConfig, TrainConfig
from sae_core.registry import uses_k
from sae_core.ensemble import Ensemble, EnsembleInfo, ExpandedMatch
from sae_core.training.records import TrainingRecord
from sae_core.devices import resolve_device
from sae_core.training.sources import ActivationSource, InMemorySource, as_source
from sae_core.training.trainer import StepCallback, train_sae

#: the training data: a tensor [N, d] in memory or an activation source (streamed shards)
Activations = Tensor | ActivationSource

RESIDUAL_CHUNK = 65_536


@dataclass
class EnsembleTrainResult:
    """A trained ensemble and each member's (or stage's) training history."""

    ensemble: Ensemble
    histories: list[list[TrainingRecord]] = field(default_factory=list)


def default_seeds(train_cfg: TrainConfig, n_members: int) -> list[int]:
    """Seeds {rJ, …, rJ + J − 1} for run r = ``train_cfg.seed``."""
    return [train_cfg.seed * n_members + j for j in range(n_members)]


def _checkpoint(directory: str | Path | None, name: str) -> Path | None:
    return None if directory is None else Path(directory) / name


def train_single(
    cfg: SAEConfig,
    activations: Activations,
    train_cfg: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    callback: StepCallback | None = None,
    device: str | torch.device = "cpu",
) -> EnsembleTrainResult:
    """One SAE (J = 1) seeded by ``train_cfg.seed``."""
    result = train_sae(cfg, activations, train_cfg, checkpoint_dir=checkpoint_dir, callback=callback, device=device)
    return EnsembleTrainResult(Ensemble(result.sae, "single"), [result.history])


def train_bagging(
    cfg: SAEConfig,
    activations: Activations,
    train_cfg: TrainConfig,
    n_members: int,
    *,
    seeds: list[int] | None = None,
    checkpoint_dir: str | Path | None = None,
    callback: StepCallback | None = None,
    device: str | torch.device = "cpu",
) -> EnsembleTrainResult:
    """Naive bagging: J members differing only in seed, trained as ONE batched module.

    α = 1/J. With ``train_cfg.bootstrap`` each member also sees its own bootstrap
    resample of the tokens (true bagging).
    """
    seeds = seeds if seeds is not None else default_seeds(train_cfg, n_members)
    if len(seeds) != n_members or len(set(seeds)) != n_members:
        raise ValueError(f"bagging needs {n_members} distinct seeds, got {seeds}")
    result = train_sae(cfg, activations, train_cfg, member_seeds=seeds, checkpoint_dir=checkpoint_dir, callback=callback, device=device)
    histories = [[record.member(j) for record in result.history] for j in range(n_members)]
    ens = Ensemble(result.sae, "bagging")
    ens.info = EnsembleInfo(seeds=tuple(seeds), bootstrap=train_cfg.bootstrap)
    return EnsembleTrainResult(ens, histories)


@torch.no_grad()
def _subtract_stage(residual: Tensor, stage, device: torch.device) -> Tensor:
    """r − g(r) for every row, in chunks on ``device`` (memory stays at one extra [chunk, d])."""
    out = torch.empty_like(residual)
    for start in range(0, residual.shape[0], RESIDUAL_CHUNK):
        chunk = residual[start : start + RESIDUAL_CHUNK].to(device)
        out[start : start + RESIDUAL_CHUNK] = (chunk - stage(chunk)).cpu()
    return out


class _Residual:
    """x ↦ the residual of x after ``stages`` in turn (r ← r − g(r)): boosting's input when
    the data is streamed, computed per batch on the device."""

    def __init__(self, stages: list, device: torch.device) -> None:
        self.stages = [copy.deepcopy(s).to(device).eval() for s in stages]
        h = hashlib.sha256()
        for stage in stages:
            for tensor in stage.state_dict().values():
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        #: names the earlier stages' weights in the checkpoint fingerprint of the stage trained on this residual
        self.identity = f"residual of {len(stages)} stages {h.hexdigest()[:16]}"

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = x - stage(x)
        return x


def train_boosting(
    cfg: SAEConfig,
    activations: Activations,
    train_cfg: TrainConfig,
    n_members: int,
    *,
    seeds: list[int] | None = None,
    checkpoint_dir: str | Path | None = None,
    callback: StepCallback | None = None,
    device: str | torch.device = "cpu",
) -> EnsembleTrainResult:
    """Boosting: stage j trains on r_j = a − Σ_{l<j} g_l(r_l), earlier stages frozen; α = 1.

    In memory, the residual of the whole training set is computed once per stage (without
    gradients), which is the same target the paper recomputes on every batch, at O(J)
    instead of O(J²) cost. Streamed data is not held, so there each batch's residual is
    recomputed through the earlier stages on the device, as in the paper. Each stage's
    b_dec is initialised from its own input (the residual), not from the raw activations
    as in the authors' code: the residual is centred near 0, so the raw median would start
    the stage far from its data.
    """
    seeds = seeds if seeds is not None else default_seeds(train_cfg, n_members)
    if len(seeds) != n_members:
        raise ValueError(f"boosting needs {n_members} seeds, got {seeds}")
    source = as_source(activations)
    if not source.streams:  # held in memory anyway (e.g. shards that fit the buffer): precompute the residuals
        source = source.in_memory()
    device = resolve_device(device)
    in_memory = isinstance(source, InMemorySource)
    residual = source.rows if in_memory else None
    stages, histories = [], []
    for j, seed in enumerate(seeds):
        streamed = {}
        if not in_memory and j > 0:
            transform = _Residual(stages, device)
            streamed = {"transform": transform, "transform_id": transform.identity}
        result = train_sae(
            cfg,
            residual if in_memory else source,
            train_cfg,
            member_seeds=[seed],
            checkpoint_dir=_checkpoint(checkpoint_dir, f"stage_{j:02d}"),
            callback=callback,
            device=device,
            **streamed,
        )
        stages.append(result.sae)
        histories.append(result.history)
        if in_memory and j + 1 < n_members:
            residual = _subtract_stage(residual, copy.deepcopy(result.sae).to(device), device)
    stacked = type(stages[0]).stack(stages)
    ens = Ensemble(stacked, "boosting")
    ens.info = EnsembleInfo(seeds=tuple(seeds))
    return EnsembleTrainResult(ens, histories)


def expanded_config(cfg: SAEConfig, n_members: int) -> SAEConfig:
    """One SAE as wide as J members: d_sae·J latents; TopK-type sparsity k·J (L0 matched).

    L1/L0-penalised architectures keep the same λ (a TrainConfig setting).
    """
    update: dict = {"d_sae": cfg.d_sae * n_members}
    if uses_k(cfg.architecture):
        assert cfg.k is not None
        update["k"] = cfg.k * n_members
    return cfg.model_copy(update=update)


def train_expanded(
    cfg: SAEConfig,
    activations: Activations,
    train_cfg: TrainConfig,
    n_members: int,
    *,
    compute_matched: bool = False,
    checkpoint_dir: str | Path | None = None,
    callback: StepCallback | None = None,
    device: str | torch.device = "cpu",
) -> EnsembleTrainResult:
    """The expanded baseline: one SAE of width J·d_sae with the same recipe.

    ``compute_matched`` gives it J× the training steps (the compute the J members spent
    together), answering the reviewers' objection that it is otherwise under-trained.
    """
    wide = expanded_config(cfg, n_members)
    steps = train_cfg.n_steps * (n_members if compute_matched else 1)
    tcfg = train_cfg.model_copy(update={"n_steps": steps})
    tcfg = TrainConfig(**tcfg.model_dump())  # re-validate the changed schedule
    result = train_sae(wide, activations, tcfg, checkpoint_dir=checkpoint_dir, callback=callback, device=device)
    ens = Ensemble(result.sae, "expanded")
    ens.info = EnsembleInfo(expanded=ExpandedMatch(
        n_members_matched=n_members,
        d_sae=wide.d_sae,
        k=wide.k,
        sparsity="k x J" if wide.k is not None else f"same lambda ({train_cfg.sparsity_coefficient})",
        compute_matched=compute_matched,
        n_steps=steps,
    ))
    return EnsembleTrainResult(ens, [result.history])
