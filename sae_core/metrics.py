"""Reconstruction metrics of SPEC §6 (one definition each; shapes in the docstrings).

All take activations ``a`` and reconstructions ``a_hat`` of shape [T, d] (or codes
[T, m]) and return Python floats; they accumulate in float64.
"""

from __future__ import annotations

from typing import Iterable

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


def shrinkage_gamma(a: Tensor, a_hat: Tensor) -> float:
    """γ = E‖â‖² / E[a·â] (relative reconstruction bias; < 1 means shrinkage). [T, d] each."""
    _check_pair(a, a_hat)
    a64, r64 = a.double(), a_hat.double()
    cross = float((a64 * r64).sum())
    if cross == 0.0:
        return float("nan")
    return float(r64.pow(2).sum()) / cross


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
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


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


def stability(dictionaries: list[Tensor], chunk: int = 4096) -> list[float]:
    """Relaxed stability per run s: mean over its latents of max(0, max cosine to any latent
    of any other run) (the paper's ``stability_relaxed``). ``dictionaries``: S ≥ 2 [m_s, d]."""
    if len(dictionaries) < 2:
        raise ValueError(f"stability needs at least 2 independent runs, got {len(dictionaries)}")
    out = []
    for s, W in enumerate(dictionaries):
        best = torch.zeros(W.shape[0])
        for t, other in enumerate(dictionaries):
            if t != s:
                best = torch.maximum(best, max_cosine_to(W, other, chunk))
        out.append(float(best.double().mean()))
    return out


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


def connectivity(
    codes: Tensor | Iterable[Tensor], m: int | None = None, block: int = 2048, pairs_per_step: int = 1 << 24
) -> float:
    """1 − nnz(HᵀH) / m², H the binary [T, m] code matrix (fraction of latent pairs, the
    diagonal included, that never fire on the same token).

    ``codes``: [T, m] or an iterable of [T_i, m] chunks (only non-zeros matter). See
    :func:`connectivity_of_prefixes` for how it is computed without forming HᵀH.
    """
    tok, lat, n_tokens, m = active_sets(codes, m)
    return connectivity_of_prefixes(tok, lat, n_tokens, [m], block, pairs_per_step)[0]


def connectivity_of_prefixes(
    tok: Tensor, lat: Tensor, n_tokens: int, sizes: list[int], block: int = 2048, pairs_per_step: int = 1 << 24
) -> list[float]:
    """Connectivity of the first ``s`` latents, for every s in ``sizes``, in one pass.

    tok, lat [nnz]: token and latent index of every non-zero code (:func:`active_sets`).
    The J-member prefix of an ensemble is the first J·k latents of its concatenated view,
    so one pass over the full ensemble's active sets gives every prefix.

    Never forms HᵀH: for each block of latents I it marks, in a [|I|, m] bool matrix, every
    pair (i ∈ S_t ∩ I, j ∈ S_t) of each token's active set S_t, then counts the marks
    inside each prefix square. Work Σ_t L0_t², memory |I| × m bytes plus the active sets.
    """
    if not sizes:
        raise ValueError("sizes is empty: give at least one prefix size")
    m = max(sizes)
    keep = lat < m
    tok, lat = tok[keep].long(), lat[keep].long()
    order = torch.argsort(tok, stable=True)  # CSR: token t's latents are lat[indptr[t]:indptr[t + 1]]
    tok, lat = tok[order], lat[order]
    counts = torch.bincount(tok, minlength=n_tokens)
    indptr = torch.zeros(n_tokens + 1, dtype=torch.long)
    indptr[1:] = counts.cumsum(0)
    nnz = [0] * len(sizes)
    for start in range(0, m, block):
        stop = min(start + block, m)
        marks = torch.zeros(stop - start, m, dtype=torch.bool)
        flat = marks.view(-1)
        sel = (lat >= start) & (lat < stop)
        src_tok, src_lat = tok[sel], lat[sel] - start
        lens = counts[src_tok]
        # process the entries of this block in pieces of at most ~pairs_per_step pairs
        bounds = torch.cumsum(lens, 0)
        begin = 0
        while begin < len(src_tok):
            limit = (bounds[begin - 1] if begin > 0 else 0) + pairs_per_step
            end = max(begin + 1, int(torch.searchsorted(bounds, limit, right=True)))
            t, i, n = src_tok[begin:end], src_lat[begin:end], lens[begin:end]
            first = torch.repeat_interleave(indptr[t], n)
            within = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            j = lat[first + within]
            flat[torch.repeat_interleave(i, n) * m + j] = True
            begin = end
        for q, size in enumerate(sizes):
            if size > start:
                nnz[q] += int(marks[: min(stop, size) - start, :size].sum())
    return [1.0 - n / (s * s) for n, s in zip(nnz, sizes)]
