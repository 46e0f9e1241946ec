"""The L0 guide of *Sparse but Wrong* (Chanin & Garriga-Alonso 2025): pick L0 from c_dec.

At the wrong L0 an SAE learns mixed features: too low and its latents hedge by absorbing
parts of correlated features, too high and they become degenerate mixtures. Either way the
decoder columns grow more similar, so c_dec (the mean absolute pairwise cosine of decoder
columns, :func:`sae_core.metrics.c_dec`), traced over a sweep of L0 (BatchTopK/TopK k, or
λ), is lowest near the true L0. When the curve is flat at high L0 (as on Gemma-2-2B), the
paper picks the elbow just before c_dec jumps at low L0.

:func:`pick_l0` implements both rules on (L0, c_dec) points; :func:`planted_l0_data` is the
paper's toy: features with a planted L0 (decreasing firing probabilities, correlated
firings, orthonormal directions), on which the c_dec minimum sits at the planted L0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

#: c_dec within this fraction of the curve's range above its minimum counts as "at the minimum"
FLAT_TOLERANCE = 0.1


@dataclass(frozen=True)
class L0Choice:
    """What :func:`pick_l0` picked.

    index: position of the chosen point in the caller's order.
    l0, c_dec: its values.
    rule: "minimum" (the c_dec minimum) or "elbow" (the lowest L0 of the flat stretch at high
        L0, just before c_dec jumps at low L0).
    at_edge: the choice is the lowest or highest L0 swept (the true L0 may lie outside: widen the grid).
    """

    index: int
    l0: float
    c_dec: float
    rule: Literal["minimum", "elbow"]
    at_edge: bool

    def describe(self) -> str:
        how = ("the c_dec minimum" if self.rule == "minimum"
               else "the elbow: lowest L0 of the flat stretch at high L0, just before c_dec jumps at low L0")
        edge = "; it is at the edge of the sweep, so the best L0 may lie outside it: widen the grid" if self.at_edge else ""
        return f"L0 = {self.l0:.3g} (c_dec {self.c_dec:.4f}), {how}{edge}"


def pick_l0(l0: Sequence[float], c_dec: Sequence[float], tolerance: float = FLAT_TOLERANCE) -> L0Choice:
    """The L0 the guide picks from points (l0[i], c_dec[i]) of a sweep (one per grid point;
    average seeds first).

    Sort by L0; let c* be the minimum and R = max − c* the curve's range. Points with
    c_dec ≤ c* + tolerance·R are "at the minimum". If the stretch of such points around the
    minimum reaches the highest L0 swept and holds more than the minimum itself, the curve is
    flat at high L0 and the guide takes that stretch's lowest L0 (the elbow); otherwise it
    takes the minimum.
    """
    if len(l0) != len(c_dec):
        raise ValueError(f"pick_l0 needs one c_dec per L0; got {len(l0)} L0 values and {len(c_dec)} c_dec values")
    if len(l0) < 2:
        raise ValueError(f"pick_l0 needs at least 2 sweep points to compare; got {len(l0)}: sweep more L0 values")
    values = [(float(a), float(c)) for a, c in zip(l0, c_dec)]
    bad = [v for v in values if not all(map(lambda x: x == x and abs(x) != float("inf"), v))]
    if bad:
        raise ValueError(f"pick_l0 got non-finite (L0, c_dec) points {bad[:3]}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must lie in [0, 1); got {tolerance}")
    order = sorted(range(len(values)), key=lambda i: (values[i][0], i))
    curve = [values[i][1] for i in order]
    m = min(range(len(curve)), key=lambda i: (curve[i], i))
    spread = max(curve) - curve[m]
    near = [c <= curve[m] + tolerance * spread for c in curve]
    lo, hi = m, m
    while lo > 0 and near[lo - 1]:
        lo -= 1
    while hi + 1 < len(curve) and near[hi + 1]:
        hi += 1
    pick, rule = (lo, "elbow") if hi == len(curve) - 1 and lo < hi and spread > 0 else (m, "minimum")
    index = order[pick]
    return L0Choice(index, values[index][0], values[index][1], rule, pick in (0, len(curve) - 1))  # type: ignore[arg-type]


@dataclass(frozen=True)
class PlantedL0Data:
    """Synthetic activations with a planted L0 (:func:`planted_l0_data`)."""

    activations: Tensor  # [N, d]
    dictionary: Tensor  # [n_features, d], orthonormal rows
    firing_probability: Tensor  # [n_features]
    true_l0: float  # mean active features per sample in ``activations``


def planted_l0_data(
    n_features: int = 50,
    d: int = 100,
    n_samples: int = 40_000,
    p_max: float = 0.345,
    p_min: float = 0.05,
    correlation: float = 0.5,
    magnitude_std: float = 0.15,
    seed: int = 0,
) -> PlantedL0Data:
    """The toy of *Sparse but Wrong*: a = Σ_i c_i f_i with orthonormal f_i (needs d ≥ n_features).

    Feature i fires with probability linearly spaced from p_max (i = 0) to p_min, so the
    planted L0 is about n·(p_max + p_min)/2 (9.9 for the defaults); firings are correlated
    through a Gaussian copula (z ~ N(0, Σ), feature i fires when z_i < Φ⁻¹(p_i), Σ a random
    correlation matrix mixed with the identity by ``correlation``), which is what makes a too-low
    L0 absorb correlated features. Magnitudes are 1 + magnitude_std·N(0, 1).
    """
    if d < n_features:
        raise ValueError(f"planted_l0_data needs d >= n_features for orthonormal features; got d={d}, n_features={n_features}")
    if not 0 < p_min <= p_max < 1:
        raise ValueError(f"firing probabilities need 0 < p_min <= p_max < 1; got p_min={p_min}, p_max={p_max}")
    if not 0 <= correlation < 1:
        raise ValueError(f"correlation must lie in [0, 1); got {correlation}")
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.linalg.qr(torch.randn(d, n_features, generator=gen))[0].T.contiguous()
    p = torch.linspace(p_max, p_min, n_features)
    A = torch.randn(n_features, n_features, generator=gen)
    sigma = correlation * (A @ A.T) / n_features + (1 - correlation) * torch.eye(n_features)
    scale = sigma.diag().sqrt()
    chol = torch.linalg.cholesky(sigma / scale.outer(scale))
    z = torch.randn(n_samples, n_features, generator=gen) @ chol.T
    active = z < torch.distributions.Normal(0.0, 1.0).icdf(p)
    magnitude = 1 + magnitude_std * torch.randn(n_samples, n_features, generator=gen)
    return PlantedL0Data((active * magnitude) @ dictionary, dictionary, p, float(active.float().sum(1).mean()))
