"""Reconstruction metrics against hand-computed cases."""

import math

import pytest
import torch

from sae_core import metrics


A = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])  # dim 0 varies, dims 1 and 2 are constant
A_HAT = torch.tensor([[1.5, 0.0, 2.0], [2.0, 1.0, 2.0]])


def test_mse_sums_dims_and_averages_tokens():
    # token 0: 0.25; token 1: 1 + 1 = 2 -> mean 1.125
    assert metrics.mse(A, A_HAT) == pytest.approx(1.125)


def test_explained_variance_per_dim_skips_zero_variance_dims():
    # dim 0: mu = 2, var sum = 2, err sum = 0.25 + 1 = 1.25 -> 1 - 0.625 = 0.375
    assert metrics.explained_variance(A, A_HAT) == pytest.approx(0.375)
    assert math.isnan(metrics.explained_variance(A[:, 1:], A_HAT[:, 1:]))


def test_explained_variance_per_dim_differs_from_total():
    a = torch.tensor([[0.0, 0.0], [2.0, 20.0]])
    a_hat = torch.tensor([[0.0, 0.0], [1.0, 20.0]])
    # per dim: dim0 var 2, err 1 -> 0.5; dim1 err 0 -> 1.0; mean 0.75
    assert metrics.explained_variance(a, a_hat) == pytest.approx(0.75)
    # total: err 1 / var (2 + 200) -> 1 - 1/202
    assert metrics.explained_variance_total(a, a_hat) == pytest.approx(1 - 1 / 202)


def test_perfect_and_mean_reconstructions():
    a = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert metrics.explained_variance(a, a) == 1.0
    assert metrics.explained_variance_total(a.clone(), a) == 1.0
    mean = a.mean(0, keepdim=True).expand_as(a)
    assert metrics.explained_variance(a, mean) == pytest.approx(0.0, abs=1e-12)


def test_l0_counts_nonzeros_including_negative_codes():
    codes = torch.tensor([[0.0, 1.0, -2.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    assert metrics.l0(codes) == pytest.approx(5 / 3)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 2\)"):
        metrics.mse(A, A_HAT[:, :2])
