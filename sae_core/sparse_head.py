"""A sparse, interpretable linear head on frozen SAE codes (SARM, arXiv 2508.08746; related.md §9).

For an ensemble the features are its concatenated kJ-dimensional code (Proposition 1), so the
head's weights name the latents, of every member, that drive a prediction: the logit is
Σ_i w_i (z_i − μ_i)/s_i + b exactly, so latent i contributes w_i (z_i − μ_i)/s_i and |w_i| ranks the
latents globally. The head is an L1-regularised logistic regression on standardised codes,

    min_{w, b}  (1/N) Σ_n [log(1 + e^{η_n}) − y_n η_n] + λ‖w‖₁,   η = ((z − μ)/s) w + b,

fitted by FISTA (accelerated proximal gradient, step 1/L with L = ‖Z‖²/(4N) the gradient's
Lipschitz constant; the intercept is not penalised). Tested against scikit-learn's L1 solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCALE_EPS = 1e-8   # features with a smaller spread (dead latents) keep scale 1 and stay at weight 0


@dataclass
class SparseHead:
    """p(y=1|z) = σ(((z − mean)/scale)·coef + intercept); mean, scale, coef: [m]."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def decision(self, z: np.ndarray) -> np.ndarray:
        return ((np.asarray(z, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def accuracy(self, z: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean((self.decision(z) > 0).astype(np.int64) == np.asarray(y)))

    @property
    def n_nonzero(self) -> int:
        return int(np.count_nonzero(self.coef))

    def top(self, n: int) -> np.ndarray:
        """Indices of the n non-zero weights of largest |w|, largest first (ties: lower index)."""
        nonzero = np.flatnonzero(self.coef)
        order = np.lexsort((nonzero, -np.abs(self.coef[nonzero])))
        return nonzero[order][:n]


def _loss_gradient(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
    from scipy.special import expit

    residual = (expit(x @ w + b) - y) / x.shape[0]
    return x.T @ residual, float(residual.sum())


def fit_sparse_head(z: np.ndarray, y: np.ndarray, l1: float, steps: int = 300) -> SparseHead:
    """Fit the head on codes z [N, m] and labels y [N] in {0, 1} with L1 strength ``l1`` (λ)."""
    x = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"codes must be [N, m] and labels [N]; got {x.shape} and {y.shape}")
    if set(np.unique(y).tolist()) != {0.0, 1.0}:
        raise ValueError(f"the head needs labels 0 and 1, both present; got {np.unique(y).tolist()}")
    if l1 <= 0:
        raise ValueError(f"l1 must be positive; got {l1}")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > SCALE_EPS, scale, 1.0)
    x = (x - mean) / scale
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x               # ‖x‖₂² = its largest eigenvalue
    lipschitz = max(float(np.linalg.eigvalsh(gram)[-1]) / (4 * x.shape[0]), 0.25)   # the intercept's own term is 1/4
    step = 1.0 / lipschitz
    w = np.zeros(x.shape[1])
    b = float(np.log(y.mean() / (1 - y.mean())))
    w_prev, b_prev, t = w, b, 1.0
    for _ in range(steps):
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        momentum = (t - 1) / t_next
        v, c = w + momentum * (w - w_prev), b + momentum * (b - b_prev)
        grad_w, grad_b = _loss_gradient(x, y, v, c)
        w_prev, b_prev = w, b
        u = v - step * grad_w
        w = np.sign(u) * np.maximum(np.abs(u) - step * l1, 0.0)   # soft threshold: the prox of λ‖w‖₁
        b = c - step * grad_b
        t = t_next
    return SparseHead(mean, scale, w, b)
