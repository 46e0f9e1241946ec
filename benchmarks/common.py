"""Shared timing of SAE training steps for the benchmarks (run as scripts from the repo root)."""

from __future__ import annotations

import time

import torch

from sae_core import SAEConfig, TrainConfig, train_sae


def member_tokens_per_second(cfg: SAEConfig, n_members: int, batch: int, steps: int, bf16: bool) -> float:
    """Tokens x members per second of full training steps (median step; the first is warm-up)."""
    data = torch.randn(batch * (steps + 2), cfg.d_in)
    times: list[float] = []
    last = [0.0]

    def clock(step, sae, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    tcfg = TrainConfig(n_steps=steps + 1, batch_size=batch, autocast_bf16=bf16, b_dec_init="mean", log_every=10**6)
    last[0] = time.perf_counter()
    train_sae(cfg, data, tcfg, member_seeds=list(range(n_members)), callback=clock)
    per_step = sorted(times[1:])[len(times[1:]) // 2]
    return batch * n_members / per_step
