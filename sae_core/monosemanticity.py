"""Monosemanticity score of latents (Pach et al. 2025, arXiv 2504.02821; related.md §7), for text.

Each latent k has an activation a^k_n on each of N evaluation contexts x_n (a token and the
text around it); E(x_n) is a sentence embedding of the context from a *separate* encoder.
With the activations min-max normalised over the evaluation set,
ã^k_n = (a^k_n − min_n a^k) / (max_n a^k − min_n a^k), and s_nm = cos(E(x_n), E(x_m)):

    MS^k = Σ_{n<m} ã^k_n ã^k_m s_nm / Σ_{n<m} ã^k_n ã^k_m

— the activation-weighted mean similarity of the contexts a latent fires on; high when they
share one concept. It is undefined (NaN) when the denominator is 0 (a latent that fires on
at most one context, or is constant).

With unit embeddings ê_n the sums over pairs collapse to one matmul (O(N·K·e) instead of
O(N²·K)): numerator = ½(‖Σ_n ã_n ê_n‖² − Σ_n ã_n²), denominator = ½((Σ_n ã_n)² − Σ_n ã_n²).
:func:`monosemanticity` is that form; :func:`monosemanticity_pairwise` is the defining
double sum, kept as its slow twin for tests.
"""

from __future__ import annotations

import numpy as np

#: a denominator at or below this (relative to the largest) counts as 0: the score is undefined
DENOMINATOR_EPS = 1e-12


def minmax_normalise(activations: np.ndarray) -> np.ndarray:
    """ã = (a − min) / (max − min) per column: [N, K] -> [N, K] float64; a constant column -> 0."""
    a = np.asarray(activations, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"activations must be [N contexts, K latents]; got shape {a.shape}")
    low, high = a.min(0), a.max(0)
    span = high - low
    return np.where(span > 0, (a - low) / np.where(span > 0, span, 1.0), 0.0)


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm ([N, e] float64); a zero row is an error (its cosine is undefined)."""
    e = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    if (norms <= 0).any():
        raise ValueError(f"embedding {int(np.flatnonzero(norms[:, 0] <= 0)[0])} is zero: its cosine similarity is undefined")
    return e / norms


def _check(activations: np.ndarray, embeddings: np.ndarray) -> None:
    if np.shape(activations)[0] != np.shape(embeddings)[0]:
        raise ValueError(f"{np.shape(activations)[0]} contexts of activations but {np.shape(embeddings)[0]} embeddings")


def monosemanticity(activations: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """MS^k of every latent, by the one-matmul form: activations [N, K], embeddings [N, e] -> [K]
    float64 (NaN where undefined)."""
    _check(activations, embeddings)
    a = minmax_normalise(activations)
    e = unit_rows(embeddings)
    summed = a.T @ e                                    # [K, e]: Σ_n ã_n ê_n
    squares = (a * a).sum(0)                            # Σ_n ã_n²
    numerator = 0.5 * ((summed * summed).sum(1) - squares)
    denominator = 0.5 * (a.sum(0) ** 2 - squares)
    defined = denominator > DENOMINATOR_EPS * max(1.0, float(np.abs(denominator).max(initial=0.0)))
    return np.where(defined, numerator / np.where(defined, denominator, 1.0), np.nan)


def monosemanticity_pairwise(activations: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """The same score by its definition, a double sum over pairs n < m (O(N²·K)): the slow twin."""
    _check(activations, embeddings)
    a = minmax_normalise(activations)
    e = unit_rows(embeddings)
    n_contexts, n_latents = a.shape
    numerator = np.zeros(n_latents)
    denominator = np.zeros(n_latents)
    for n in range(n_contexts):
        for m in range(n + 1, n_contexts):
            weight = a[n] * a[m]
            numerator += weight * float(e[n] @ e[m])
            denominator += weight
    defined = denominator > DENOMINATOR_EPS * max(1.0, float(np.abs(denominator).max(initial=0.0)))
    return np.where(defined, numerator / np.where(defined, denominator, 1.0), np.nan)


def bootstrap_mean_ci(values: np.ndarray, confidence: float = 0.95, resamples: int = 1000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the finite ``values`` and its percentile-bootstrap interval
    (``resamples`` resamples with replacement, seeded). NaNs are dropped; none left is an error;
    one value gives (v, v, v)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("no finite value to average (every score is undefined)")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(1)
    tail = (1 - confidence) / 2
    return float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
