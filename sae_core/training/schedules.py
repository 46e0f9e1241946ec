"""Learning-rate, sparsity warm-up and p-annealing schedules (pure functions of the step)."""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from sae_core.config import PAnnealConfig, TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor on ``cfg.lr`` at ``step`` (0-based): linear warm-up, constant, linear decay to 0.

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps. Decay: from
    step = round(decay_start_fraction · n_steps), (n_steps − step) / (n_steps − decay_start).
    """
    factor = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        factor = (step + 1) / cfg.warmup_steps
    decay_start = round(cfg.decay_start_fraction * cfg.n_steps)
    if decay_start < cfg.n_steps and step >= decay_start:
        factor = min(factor, (cfg.n_steps - step) / (cfg.n_steps - decay_start))
    return factor


def sparsity_warmup_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor on λ at ``step``: linear from 1/warmup to 1 over ``sparsity_warmup_steps``."""
    if cfg.sparsity_warmup_steps > 0 and step < cfg.sparsity_warmup_steps:
        return (step + 1) / cfg.sparsity_warmup_steps
    return 1.0


class PAnnealer:
    """State of p-annealing for J members (Karvonen et al. 2024, eqs. 13-14).

    p starts at ``p_start``. At each of ``n_updates`` steps evenly spaced in
    [start_step, end_step], p moves to the next value of
    ``linspace(p_start, p_end, n_updates + 1)[1:]`` and each member's coefficient is
    multiplied by Σ_q ||c_q||_{p}^{p} / Σ_q ||c_q||_{p'}^{p'} over the last
    ``queue_length`` batches q (p the old, p' the new exponent), which keeps the size of the
    penalty locally unchanged.
    """

    def __init__(self, cfg: PAnnealConfig, n_steps: int, base_coefficient: float, n_members: int) -> None:
        self.cfg = cfg
        end = cfg.end_step if cfg.end_step is not None else n_steps - 1
        self.update_steps = [int(s) for s in torch.linspace(cfg.start_step, end, cfg.n_updates).round().long()]
        self.p_values = [float(p) for p in torch.linspace(cfg.p_start, cfg.p_end, cfg.n_updates + 1)[1:]]
        self.p = cfg.p_start
        self.n_done = 0
        self.coefficient = torch.full((n_members,), float(base_coefficient), dtype=torch.float64)
        self.queue: deque[tuple[Tensor, Tensor]] = deque(maxlen=cfg.queue_length)

    @property
    def p_next(self) -> float | None:
        """The exponent the next update moves to (None once annealing is over)."""
        return self.p_values[self.n_done] if self.n_done < len(self.p_values) else None

    def record(self, norm_current: Tensor, norm_next: Tensor | None) -> None:
        """Store one batch's summed L_p^p norms at the current and next p ([J] each).

        They stay on their device (no host sync per step); :meth:`advance` brings the
        queue to the coefficient's device (the CPU) at the few update steps.
        """
        if norm_next is not None:
            self.queue.append((norm_current.detach().double(), norm_next.detach().double()))

    def advance(self, step: int) -> None:
        """Apply every update scheduled at ``step`` (called after the step's batch was recorded)."""
        while self.n_done < len(self.update_steps) and self.update_steps[self.n_done] == step:
            if self.queue:
                device = self.coefficient.device
                current = torch.stack([q[0].to(device) for q in self.queue]).sum(0)
                nxt = torch.stack([q[1].to(device) for q in self.queue]).sum(0)
                ratio = torch.where(nxt > 0, current / nxt.clamp_min(1e-300), torch.ones_like(nxt))
                self.coefficient = self.coefficient * ratio
            self.p = self.p_values[self.n_done]
            self.n_done += 1
            self.queue.clear()

    # checkpoint support -----------------------------------------------------
    def state(self) -> tuple[dict, dict[str, Tensor]]:
        """(JSON-able scalars, tensors) for a checkpoint."""
        tensors = {"p_anneal.coefficient": self.coefficient.cpu().clone()}
        for i, (cur, nxt) in enumerate(self.queue):  # on the CPU, as the checkpoint stores them
            tensors[f"p_anneal.queue.{i}.current"] = cur.cpu().clone()
            tensors[f"p_anneal.queue.{i}.next"] = nxt.cpu().clone()
        return {"p": self.p, "n_done": self.n_done, "queue_len": len(self.queue)}, tensors

    def load_state(self, scalars: dict, tensors: dict[str, Tensor]) -> None:
        self.p = float(scalars["p"])
        self.n_done = int(scalars["n_done"])
        self.coefficient = tensors["p_anneal.coefficient"].clone()
        self.queue.clear()
        for i in range(int(scalars["queue_len"])):
            self.queue.append((tensors[f"p_anneal.queue.{i}.current"], tensors[f"p_anneal.queue.{i}.next"]))
