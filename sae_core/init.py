"""Data-dependent initialisation: the decoder bias b_dec."""

from __future__ import annotations

import torch
from torch import Tensor


def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7, eps: float = 1e-10) -> Tensor:
    """Point minimising the sum of Euclidean distances to ``points`` [N, d] -> [d].

    Weiszfeld's algorithm in float64, started at the mean; distances are clamped at
    ``eps`` so an iterate landing on a data point does not divide by zero.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, d] tensor, got shape {tuple(points.shape)}")
    x = points.double()
    y = x.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_next = (weights[:, None] * x).sum(0) / weights.sum()
        moved = (y_next - y).norm()
        y = y_next
        # one host sync per iteration (the stopping test); this runs once per training, not per step
        if moved <= tol * max(1.0, float(y.norm())):
            break
    return y.to(points.dtype)


def initial_b_dec(activations: Tensor, method: str, n_samples: int) -> Tensor:
    """b_dec from ``n_samples`` evenly spaced rows of ``activations`` [N, d] -> [d].

    The sample is deterministic (no seed), so every member and every boosting stage
    starts from the same bias, whatever its seed.
    """
    n = min(n_samples, activations.shape[0])
    idx = torch.linspace(0, activations.shape[0] - 1, n).round().long().to(activations.device)
    sample = activations[idx].float()
    if method == "geometric_median":
        return geometric_median(sample)
    if method == "mean":
        return sample.mean(0)
    if method == "zeros":
        return torch.zeros(activations.shape[1], device=activations.device)
    raise ValueError(f"unknown b_dec_init {method!r}; use geometric_median, mean or zeros")
