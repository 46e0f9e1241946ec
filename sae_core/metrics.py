"""The metrics of SPEC §6, one definition each (shapes in the docstrings).

Reconstruction metrics are functions of *sufficient statistics*: sums over tokens that
are accumulated batch by batch and merged (:class:`TargetSums` of the activations,
:class:`ErrorSums` of one reconstruction). The in-memory functions (``mse(a, a_hat)``,
…) compute the same sums from one batch and call the same formula, so the streaming
evaluation (:mod:`sae_core.evaluation`) and a direct call cannot drift apart. Sums are
float64; results are Python floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from sae_core.numerics import NORM_EPS



# ------------------------------------------------------------ sufficient statistics
@dataclass
class TargetSums:
    """Sums over the tokens of the activations a [T, d]: T, Σ_t a_t [d], Σ_t a_t² [d] (float64)."""

    n_tokens: int
    sum_a: Tensor
    sum_a2: Tensor

    @classmethod
    def zeros(cls, d: int) -> "TargetSums":
        return cls(0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64))

    def add(self, a64: Tensor) -> None:
        """Accumulate a batch [B, d] (already float64)."""
        self.n_tokens += a64.shape[0]
        self.sum_a += a64.sum(0)
        self.sum_a2 += a64.pow(2).sum(0)

    def merge(self, other: "TargetSums") -> "TargetSums":
        return TargetSums(self.n_tokens + other.n_tokens, self.sum_a + other.sum_a, self.sum_a2 + other.sum_a2)

    def variance_sums(self) -> Tensor:
        """Σ_t (a − μ)² per dimension: [d]."""
        return self.sum_a2 - self.sum_a.pow(2) / self.n_tokens


@dataclass
class ErrorSums:
    """Sums over the tokens of one reconstruction â of a: Σ_t (a − â)² per dimension [d],
    Σ_t ‖â_t‖², Σ_t a_t·â_t and Σ_t L0_t (float64)."""

    err: Tensor
    recon_sq: float = 0.0
    cross: float = 0.0
    active: float = 0.0

    @classmethod
    def zeros(cls, d: int) -> "ErrorSums":
        return cls(torch.zeros(d, dtype=torch.float64))

    def add(self, a64: Tensor, recon64: Tensor, active: float = 0.0) -> None:
        """Accumulate a batch: a and â [B, d] (float64), and the batch's Σ_t L0_t."""
        self.err += (a64 - recon64).pow(2).sum(0)
        self.recon_sq += float(recon64.pow(2).sum())
        self.cross += float((a64 * recon64).sum())
        self.active += active

    def merge(self, other: "ErrorSums") -> "ErrorSums":
        return ErrorSums(self.err + other.err, self.recon_sq + other.recon_sq, self.cross + other.cross, self.active + other.active)


def _check_pair(a: Tensor, a_hat: Tensor) -> None:
    if a.shape != a_hat.shape or a.ndim != 2:
        raise ValueError(f"a and a_hat must both be [T, d]; got {tuple(a.shape)} and {tuple(a_hat.shape)}")


def sums_of(a: Tensor, a_hat: Tensor) -> tuple[TargetSums, ErrorSums]:
    """The sufficient statistics of one in-memory pair a, â [T, d]."""
    _check_pair(a, a_hat)
    a64, r64 = a.double(), a_hat.double()
    targets, errors = TargetSums.zeros(a.shape[1]), ErrorSums.zeros(a.shape[1])
    targets.add(a64)
    errors.add(a64, r64)
    return targets, errors


# ------------------------------------------------------------ reconstruction metrics
def mse_from(targets: TargetSums, errors: ErrorSums) -> float:
    """Mean over tokens of Σ_dims (a − â)²: the paper's MSE (not divided by d)."""
    return float(errors.err.sum()) / targets.n_tokens


def explained_variance_from(targets: TargetSums, errors: ErrorSums) -> float:
    """Mean over dims m of 1 − Σ_t (a − â)²_m / Σ_t (a − μ)²_m (the paper's, per dimension).

    Dimensions with zero variance over the tokens are left out of the mean (their ratio is
    undefined); if every dimension is constant the result is NaN.
    """
    var = targets.variance_sums()
    keep = var > 0
    if not bool(keep.any()):
        return float("nan")
    return float((1 - errors.err[keep] / var[keep]).mean())


def explained_variance_total_from(targets: TargetSums, errors: ErrorSums) -> float:
    """1 − Σ (a − â)² / Σ (a − μ)² over all entries (= 1 − FVU)."""
    total = float(targets.variance_sums().sum())
    return 1 - float(errors.err.sum()) / total if total > 0 else float("nan")


def l0_from(targets: TargetSums, errors: ErrorSums) -> float:
    """Mean number of non-zero codes per token (an ensemble's: the sum over its members)."""
    return errors.active / targets.n_tokens


def shrinkage_gamma_from(errors: ErrorSums) -> float:
    """γ = E‖â‖² / E[a·â] (relative reconstruction bias; < 1 means shrinkage)."""
    return errors.recon_sq / errors.cross if errors.cross != 0 else float("nan")


def mse(a: Tensor, a_hat: Tensor) -> float:
    """:func:`mse_from` of one in-memory pair a, â [T, d]."""
    return mse_from(*sums_of(a, a_hat))


def explained_variance(a: Tensor, a_hat: Tensor) -> float:
    """:func:`explained_variance_from` of one in-memory pair a, â [T, d]."""
    return explained_variance_from(*sums_of(a, a_hat))


def explained_variance_total(a: Tensor, a_hat: Tensor) -> float:
    """:func:`explained_variance_total_from` of one in-memory pair a, â [T, d]."""
    return explained_variance_total_from(*sums_of(a, a_hat))


def shrinkage_gamma(a: Tensor, a_hat: Tensor) -> float:
    """:func:`shrinkage_gamma_from` of one in-memory pair a, â [T, d]."""
    return shrinkage_gamma_from(sums_of(a, a_hat)[1])


def l0(codes: Tensor) -> float:
    """Mean number of non-zero codes per token: [T, m] -> float."""
    if codes.ndim != 2:
        raise ValueError(f"codes must be [T, m]; got {tuple(codes.shape)}")
    return float((codes != 0).sum(1).double().mean())


def dead_fraction(fired: Tensor) -> float:
    """Fraction of latents never active: ``fired`` [m] bool (any activation over the split)."""
    if fired.ndim != 1 or fired.numel() == 0:
        raise ValueError(f"fired must be a non-empty [m] vector; got {tuple(fired.shape)}")
    return float((~fired.bool()).double().mean())


# ----------------------------------------------------------------- dictionaries
# Dictionaries are [m, d] (one row per latent, SAELens orientation). Pairwise cosines are
# computed in row blocks of ``chunk`` rows, so memory stays at chunk × m, never m × m.


def unit_rows(W: Tensor) -> Tensor:
    """Rows scaled to unit norm (all-zero rows stay zero): [m, d] -> [m, d] float32."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def max_cosine_to(W: Tensor, others: Tensor, chunk: int = 4096) -> Tensor:
    """For each row of ``W`` [n, d], its max cosine to any row of ``others`` [m, d]: -> [n]."""
    U, V = unit_rows(W), unit_rows(others)
    return torch.cat([(U[i : i + chunk] @ V.T).max(dim=1).values for i in range(0, U.shape[0], chunk)])


def c_dec(W: Tensor, chunk: int = 4096) -> float:
    """Mean |cos(f_i, f_j)| over pairs i < j of decoder rows (Sparse but Wrong). [m, d]."""
    U = unit_rows(W)
    m = U.shape[0]
    if m < 2:
        raise ValueError("c_dec needs at least two latents")
    total = 0.0
    for i in range(0, m, chunk):
        block = (U[i : i + chunk] @ U.T).abs()
        rows = torch.arange(i, min(i + chunk, m))
        block[rows - i, rows] = 0.0  # the diagonal (self-similarity) is not a pair
        total += float(block.double().sum())
    return total / (m * (m - 1))  # every pair was counted twice


def diversity(W: Tensor, threshold: float = 0.7, chunk: int = 4096) -> tuple[int, float]:
    """Latents whose cosine with every *other* latent is < ``threshold``: (count, fraction). [m, d]."""
    U = unit_rows(W)
    m = U.shape[0]
    count = 0
    for i in range(0, m, chunk):
        block = U[i : i + chunk] @ U.T
        rows = torch.arange(i, min(i + chunk, m))
        block[rows - i, rows] = -float("inf")
        count += int((block.max(dim=1).values < threshold).sum())
    return count, count / m


def mutual_max_cosines(W: Tensor, others: Tensor, chunk: int = 1024, bf16: bool = False) -> tuple[Tensor, Tensor]:
    """Each row's max cosine to the other dictionary, both ways, from one pass over the
    n × m cosines (in row blocks of ``chunk``; memory chunk × m): W [n, d], others [m, d]
    -> ([n] for the rows of W, [m] for the rows of others).

    bf16: the block products and the max reductions run in bf16 (a higher matmul rate on
    CPUs with AVX-512 bf16, and half the memory traffic); each value is then within
    bf16 rounding of the fp32 one (|error| < 1e-2, tested; typically ~2e-3).
    """
    U, V = unit_rows(W), unit_rows(others)
    if bf16:
        U, V = U.bfloat16(), V.bfloat16()
    rows = torch.empty(U.shape[0])
    cols = torch.full((V.shape[0],), -float("inf"))
    for i in range(0, U.shape[0], chunk):
        block = U[i : i + chunk] @ V.T
        # amax, not max: the index-returning reductions are much slower along dim 0
        rows[i : i + chunk] = block.amax(dim=1).float()
        cols = torch.maximum(cols, block.amax(dim=0).float())
    return rows, cols


def stability(dictionaries: list[Tensor], chunk: int = 1024, bf16: bool = False) -> list[float]:
    """Relaxed stability per run s: mean over its latents of max(0, max cosine to any latent
    of any other run) (the paper's ``stability_relaxed``). ``dictionaries``: S ≥ 2 [m_s, d].

    Each pair of runs is compared once (:func:`mutual_max_cosines` serves both directions);
    ``bf16`` as there.
    """
    if len(dictionaries) < 2:
        raise ValueError(f"stability needs at least 2 independent runs, got {len(dictionaries)}")
    best = [torch.zeros(W.shape[0]) for W in dictionaries]
    for s in range(len(dictionaries)):
        for t in range(s + 1, len(dictionaries)):
            rows, cols = mutual_max_cosines(dictionaries[s], dictionaries[t], chunk, bf16)
            best[s] = torch.maximum(best[s], rows)
            best[t] = torch.maximum(best[t], cols)
    return [float(b.double().mean()) for b in best]


def stability_matched(W1: Tensor, W2: Tensor) -> float:
    """Mean cosine of a Hungarian one-to-one matching of the rows of W1 [n, d] and W2 [m, d].

    Matches min(n, m) pairs. Costs O(max(n, m)^3) time and an n × m matrix: meant for
    dictionaries up to a few thousand latents (per member), not the whole ensemble.
    """
    from scipy.optimize import linear_sum_assignment

    cos = (unit_rows(W1) @ unit_rows(W2).T).double().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return float(cos[rows, cols].mean())


def random_dictionary_like(W: Tensor, seed: int) -> Tensor:
    """An untrained (Gaussian, unit-row) dictionary of W's shape: the floor of the stability metrics."""
    gen = torch.Generator().manual_seed(seed)
    return unit_rows(torch.randn(W.shape, generator=gen))


# ------------------------------------------------------------------ co-activation
def active_sets(codes: Tensor | Iterable[Tensor], m: int | None = None) -> tuple[Tensor, Tensor, int, int]:
    """The non-zeros of a [T, m] code matrix (or of an iterable of [T_i, m] chunks) as
    (token index [nnz], latent index [nnz], T, m); the chunks themselves are not kept, so
    a generator of encoded batches streams through."""
    chunks = [codes] if isinstance(codes, Tensor) else codes
    rows_list, cols_list, offset = [], [], 0
    for c in chunks:
        m = m if m is not None else c.shape[1]
        if c.ndim != 2 or c.shape[1] != m:
            raise ValueError(f"code chunks must be [T, {m}], got {tuple(c.shape)}")
        r, k = (c != 0).nonzero(as_tuple=True)
        rows_list.append(r + offset)
        cols_list.append(k)
        offset += c.shape[0]
    if m is None or not rows_list:
        raise ValueError("connectivity needs at least one chunk of codes")
    return torch.cat(rows_list), torch.cat(cols_list), offset, m


def connectivity(codes: Tensor | Iterable[Tensor], m: int | None = None) -> float:
    """1 − nnz(HᵀH) / m², H the binary [T, m] code matrix (fraction of latent pairs, the
    diagonal included, that never fire on the same token).

    ``codes``: [T, m] or an iterable of [T_i, m] chunks (only non-zeros matter). See
    :func:`connectivity_of_prefixes` for how it is computed without forming HᵀH.
    """
    tok, lat, n_tokens, m = active_sets(codes, m)
    return connectivity_of_prefixes(tok, lat, n_tokens, [m])[0]


def connectivity_of_prefixes(tok: Tensor, lat: Tensor, n_tokens: int, sizes: list[int], block: int = 16_384) -> list[float]:
    """Connectivity of the first ``s`` latents, for every s in ``sizes``, in one pass.

    tok, lat [nnz]: token and latent index of every non-zero code (:func:`active_sets`).
    The J-member prefix of an ensemble is the first J·d_sae latents of its concatenated view,
    so one pass over the full ensemble's active sets gives every prefix.

    HᵀH is never formed, not even sparsely: the latents are cut into intervals at every
    prefix size (and every ``block`` latents), and for each pair of intervals (P, Q) the
    number of distinct co-firing pairs (i ∈ P, j ∈ Q) is counted by scipy's symbolic
    sparse-product pass (``csr_matmat_maxnnz``: for each i, a mask over Q marks the j it
    reaches through the tokens where i fires). Work Σ_t L0_t² (each co-firing pair is
    visited once per token), memory two int32 copies of the active sets plus one mask of
    ``block`` entries. A prefix's count is the sum over the interval pairs inside it.
    """
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse import _sparsetools

    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be positive prefix sizes, got {sizes}")
    m = max(sizes)
    edges = sorted(set(sizes) | set(range(0, m, block)) | {m})
    tok_np, lat_np = np.asarray(tok, dtype=np.int64), np.asarray(lat, dtype=np.int64)
    keep = lat_np < m
    H = sp.csc_matrix(
        (np.ones(int(keep.sum()), dtype=np.bool_), (tok_np[keep], lat_np[keep])), shape=(n_tokens, m)
    )
    H.sum_duplicates()
    pieces = [H[:, a:b] for a, b in zip(edges[:-1], edges[1:])]  # [T, |P|] column slices
    rows = [p.T.tocsr() for p in pieces]  # [|P|, T]: the tokens where each latent fires
    cols = [p.tocsr() for p in pieces]  # [T, |Q|]: the latents of Q active on each token
    n = len(pieces)
    counts = np.zeros((n, n), dtype=np.int64)
    for a in range(n):
        for b in range(n):
            A, B = rows[a], cols[b]
            counts[a, b] = _sparsetools.csr_matmat_maxnnz(
                A.shape[0], B.shape[1],
                A.indptr.astype(np.int32), A.indices.astype(np.int32),
                B.indptr.astype(np.int32), B.indices.astype(np.int32),
            )
    out = []
    for s in sizes:
        q = edges.index(s)  # intervals [0, q) make up the first s latents
        out.append(1.0 - float(counts[:q, :q].sum()) / (s * s))
    return out
