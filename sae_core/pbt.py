"""Population-based training of SAEs (Jaderberg et al. 2017; AutoLFADS, Keshtkaran & Pandarinath 2019).

A population of members trains in segments of ``interval`` steps with the ordinary trainer
(:func:`sae_core.training.trainer.train_sae`) and its checkpoints. After each segment every
member is scored on held-out tokens; :func:`exploit_explore` then lets each of the worst
members continue from a copy of one of the best (:func:`adopt_checkpoint`: weights, Adam state,
dead-latent counters) with that member's values perturbed. The keys a population changes
must keep every weight's shape (k, lr, λ, …): a copy continues the same module.

A segment is :func:`train_segment`: the trainer runs the member's whole recipe (so its lr
schedule spans the whole run), resumes from the member's checkpoint and stops once the
segment's last checkpoint is written.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_core.config import SAEConfig, TrainConfig
from sae_core.training.sources import ActivationSource, as_source
from sae_core.training.trainer import CHECKPOINT_FILE, StepCallback, TrainResult, build_sae, train_sae
# the checkpoint's fingerprint is the trainer's own definition (what a resume must match); one definition, imported
from sae_core.training.trainer import _fingerprint as checkpoint_fingerprint


@dataclass(frozen=True)
class Range:
    """Where a perturbed value may go: [low, high], rounded when ``integer``."""

    low: float
    high: float
    integer: bool = False

    def clip(self, value: float) -> float | int:
        value = min(max(value, self.low), self.high)
        return int(round(value)) if self.integer else value


@dataclass(frozen=True)
class Replacement:
    """Member ``loser`` continues from ``winner``'s checkpoint with ``params``."""

    loser: int
    winner: int
    params: dict[str, Any]


def perturb(params: Mapping[str, Any], ranges: Mapping[str, Range], factors: Sequence[float], rng: random.Random) -> dict[str, Any]:
    """Each searched value multiplied by a factor drawn from ``factors``, clipped to its range; an
    integer value that the factor leaves unchanged after rounding moves by one in the factor's direction."""
    out = dict(params)
    for key, rng_ in ranges.items():
        factor = rng.choice(list(factors))
        new = rng_.clip(params[key] * factor)
        if rng_.integer and new == params[key] and factor != 1:
            new = rng_.clip(params[key] + (1 if factor > 1 else -1))
        out[key] = new
    return out


def exploit_explore(scores: Sequence[float], params: Sequence[Mapping[str, Any]], ranges: Mapping[str, Range],
                    n_exploit: int, factors: Sequence[float], rng: random.Random) -> list[Replacement]:
    """Truncation selection: the ``n_exploit`` lowest-scored members each copy a member drawn from
    the ``n_exploit`` highest-scored ones, with its values perturbed (:func:`perturb`).

    scores: one per member, higher is better (ties: the lower index ranks higher).
    """
    if len(scores) != len(params):
        raise ValueError(f"{len(scores)} scores for {len(params)} members")
    if not 1 <= n_exploit <= len(scores) // 2:
        raise ValueError(f"n_exploit={n_exploit} must lie in 1..{len(scores) // 2} for {len(scores)} members")
    ranked = sorted(range(len(scores)), key=lambda i: (-_finite(scores[i]), i))
    best, worst = ranked[:n_exploit], ranked[-n_exploit:]
    out = []
    for loser in sorted(worst):
        winner = rng.choice(best)
        out.append(Replacement(loser, winner, perturb(params[winner], ranges, factors, rng)))
    return out


def _finite(score: float) -> float:
    return score if math.isfinite(score) else -math.inf


def initial_values(ranges: Mapping[str, tuple[Range, bool]], size: int, rng: random.Random) -> list[dict[str, Any]]:
    """``size`` starting points: each key drawn log-uniformly (flag True) or uniformly in its range."""
    members = []
    for _ in range(size):
        point = {}
        for key, (r, log) in ranges.items():
            u = rng.random()
            value = math.exp(math.log(r.low) + u * (math.log(r.high) - math.log(r.low))) if log else r.low + u * (r.high - r.low)
            point[key] = r.clip(value)
        members.append(point)
    return members


class _SegmentEnd(Exception):
    """Raised by the step callback once the segment's last checkpoint is on disk."""


def checkpoint_step(checkpoint_dir: str | Path) -> int:
    """The step of the checkpoint in ``checkpoint_dir`` (0 when there is none)."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return int(json.loads(f.metadata()["state"])["step"])


def train_segment(sae_cfg: SAEConfig, source: ActivationSource | torch.Tensor, train_cfg: TrainConfig, seed: int,
                  checkpoint_dir: str | Path, stop_step: int, device: str | torch.device = "cpu",
                  callback: StepCallback | None = None) -> TrainResult | None:
    """Train one member of the recipe ``train_cfg`` from its checkpoint up to ``stop_step``.

    ``train_cfg.checkpoint_every`` must divide ``stop_step`` (or stop_step = n_steps): the trainer
    writes the checkpoint at that step, the segment ends there and a later call continues from
    it. Returns the trainer's result when the run is complete (stop_step = n_steps), else None.
    callback: the trainer's step callback, called before the segment ends.
    """
    every = train_cfg.checkpoint_every
    if not every or (stop_step % every and stop_step != train_cfg.n_steps) or not 0 < stop_step <= train_cfg.n_steps:
        raise ValueError(f"stop_step={stop_step} must be a checkpoint step (checkpoint_every={every}) in 1..{train_cfg.n_steps}")
    if stop_step < train_cfg.n_steps and checkpoint_step(checkpoint_dir) >= stop_step:
        return None  # this segment is done already (an interrupted sweep resumes here)

    def stop(step: int, sae, record) -> None:
        if callback is not None:
            callback(step, sae, record)
        if step >= stop_step and step < train_cfg.n_steps:
            raise _SegmentEnd

    try:
        return train_sae(sae_cfg, source, train_cfg, member_seeds=[seed], checkpoint_dir=checkpoint_dir, callback=stop, device=device)
    except _SegmentEnd:
        return None


def checkpoint_module(sae_cfg: SAEConfig, checkpoint_dir: str | Path) -> torch.nn.Module:
    """The member saved in ``checkpoint_dir``'s checkpoint, in eval mode on the CPU (what the
    population scores between segments)."""
    tensors = load_file(str(Path(checkpoint_dir) / CHECKPOINT_FILE))
    sae = build_sae(sae_cfg, n_members=1)
    sae.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return sae.eval()


def adopt_checkpoint(source_dir: str | Path, target_dir: str | Path, sae_cfg: SAEConfig, train_cfg: TrainConfig, seed: int,
                     data: ActivationSource | torch.Tensor) -> None:
    """Write ``source_dir``'s checkpoint to ``target_dir`` as the checkpoint of the recipe
    (sae_cfg, train_cfg, seed) on ``data``, so :func:`train_segment` with those continues from it:
    the same tensors (weights, Adam moments, dead-latent counters) and step; the fingerprint is
    the new recipe's (atomic write)."""
    src = Path(source_dir) / CHECKPOINT_FILE
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    tensors = load_file(str(src))
    meta["fingerprint"] = checkpoint_fingerprint(sae_cfg, train_cfg, [seed], as_source(data))
    target = Path(target_dir) / CHECKPOINT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    os.replace(tmp, target)
