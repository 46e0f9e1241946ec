"""Reconstruction metrics of SPEC §6 (one definition each; shapes in the docstrings).

All take activations ``a`` and reconstructions ``a_hat`` of shape [T, d] (or codes
[T, m]) and return Python floats; they accumulate in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_pair(a: Tensor, a_hat: Tensor) -> None:
    if a.shape != a_hat.shape or a.ndim != 2:
        raise ValueError(f"a and a_hat must both be [T, d]; got {tuple(a.shape)} and {tuple(a_hat.shape)}")


def mse(a: Tensor, a_hat: Tensor) -> float:
    """Mean over tokens of Σ_dims (a − â)²: the paper's MSE (not divided by d)."""
    _check_pair(a, a_hat)
    return float((a.double() - a_hat.double()).pow(2).sum(1).mean())


def explained_variance(a: Tensor, a_hat: Tensor) -> float:
    """Mean over dims m of 1 − Σ_t (a − â)²_m / Σ_t (a − μ)²_m (the paper's, per dimension).

    Dimensions with zero variance over the tokens are left out of the mean (their ratio is
    undefined); if every dimension is constant the result is NaN.
    """
    _check_pair(a, a_hat)
    a64, r64 = a.double(), a_hat.double()
    err = (a64 - r64).pow(2).sum(0)
    var = (a64 - a64.mean(0)).pow(2).sum(0)
    keep = var > 0
    if not bool(keep.any()):
        return float("nan")
    return float((1 - err[keep] / var[keep]).mean())


def explained_variance_total(a: Tensor, a_hat: Tensor) -> float:
    """1 − Σ (a − â)² / Σ (a − μ)² over all entries (= 1 − FVU)."""
    _check_pair(a, a_hat)
    a64, r64 = a.double(), a_hat.double()
    var = (a64 - a64.mean(0)).pow(2).sum()
    if float(var) == 0.0:
        return float("nan")
    return float(1 - (a64 - r64).pow(2).sum() / var)


def l0(codes: Tensor) -> float:
    """Mean number of non-zero codes per token: [T, m] -> float."""
    if codes.ndim != 2:
        raise ValueError(f"codes must be [T, m]; got {tuple(codes.shape)}")
    return float((codes != 0).sum(1).double().mean())
