"""Shared timing of SAE training steps and matmuls for the benchmarks (run as scripts from the repo root)."""

from __future__ import annotations

import time

import torch

from sae_core import SAEConfig, TrainConfig, train_sae

#: active latents per token of the TopK SAEs every benchmark times
TOPK_ACTIVE = 32


def step_seconds(cfg: SAEConfig, data: torch.Tensor, n_members: int, batch: int, steps: int, bf16: bool,
                 fast_paths: bool = True) -> list[float]:
    """Seconds of each full training step after the first (warm-up) one, on ``data``."""
    times: list[float] = []
    last = [0.0]

    def clock(step, sae, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    tcfg = TrainConfig(n_steps=steps + 1, batch_size=batch, autocast_bf16=bf16, fast_paths=fast_paths,
                       b_dec_init="mean", log_every=10**6)
    last[0] = time.perf_counter()
    train_sae(cfg, data, tcfg, member_seeds=list(range(n_members)), callback=clock)
    return times[1:]


def member_tokens_per_second(cfg: SAEConfig, n_members: int, batch: int, steps: int, bf16: bool) -> float:
    """Tokens x members per second of full training steps on random data (median step)."""
    times = sorted(step_seconds(cfg, torch.randn(batch * (steps + 2), cfg.d_in), n_members, batch, steps, bf16))
    return batch * n_members / times[len(times) // 2]


def matmul_flops_per_second(batch: int, d: int, d_sae: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of a [batch, d] x [d, d_sae] matmul in ``dtype`` (the roofline's yardstick)."""
    a = torch.randn(batch, d).to(dtype)
    w = torch.randn(d, d_sae).to(dtype)
    for _ in range(2):
        a @ w
    start = time.perf_counter()
    for _ in range(repeats):
        a @ w
    return 2 * batch * d * d_sae * repeats / (time.perf_counter() - start)
