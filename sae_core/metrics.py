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

#: matched cosine at which a latent counts as shared between two runs (Paulo & Belrose)
SHARED_COSINE = 0.7
#: largest dictionary matched exactly (Hungarian: dense n × m matrix, O(m³) time)
HUNGARIAN_MAX_LATENTS = 1536
#: best partners per row and per column in the sparse candidate graph above that size
MATCHING_CANDIDATES = 8


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


def stability_matched(W1: Tensor, W2: Tensor, *, exact_max: int = HUNGARIAN_MAX_LATENTS,
                      candidates: int = MATCHING_CANDIDATES, bf16: bool = False) -> float:
    """PW-MCC: the mean cosine of the one-to-one matching :func:`match_rows` of the rows of
    W1 [n, d] and W2 [m, d] (min(n, m) pairs; exact_max, candidates, bf16: as there)."""
    return stability_matched_from(match_rows(W1, W2, exact_max=exact_max, candidates=candidates, bf16=bf16)[2])


def stability_matched_from(matched: Tensor) -> float:
    """Mean of the matched cosines [p] (PW-MCC)."""
    if matched.numel() == 0:
        raise ValueError("stability_matched needs at least one matched pair")
    return float(matched.double().mean())


def stability_shared(W1: Tensor, W2: Tensor, threshold: float = SHARED_COSINE, *, exact_max: int = HUNGARIAN_MAX_LATENTS,
                     candidates: int = MATCHING_CANDIDATES, bf16: bool = False) -> float:
    """Fraction of W1's latents [n, d] whose matched cosine (:func:`match_rows` with W2 [m, d]) is
    ≥ ``threshold`` (Paulo & Belrose's shared latents); unmatched latents (n > m) are not shared."""
    cos = match_rows(W1, W2, exact_max=exact_max, candidates=candidates, bf16=bf16)[2]
    return stability_shared_from(cos, W1.shape[0], threshold)


def stability_shared_from(matched: Tensor, n_latents: int, threshold: float = SHARED_COSINE) -> float:
    """#{matched cosines [p] ≥ threshold} / n_latents."""
    if n_latents < 1:
        raise ValueError(f"n_latents must be positive, got {n_latents}")
    return int((matched >= threshold).sum()) / n_latents


def matched_stability(dictionaries: list[Tensor], threshold: float = SHARED_COSINE, *, exact_max: int = HUNGARIAN_MAX_LATENTS,
                      candidates: int = MATCHING_CANDIDATES, bf16: bool = False) -> tuple[list[float], list[float]]:
    """Per run s of S ≥ 2 dictionaries [m_s, d]: the mean over the other runs t of
    stability_matched(s, t), and of stability_shared(s, t) (each pair matched once; exact_max,
    candidates, bf16: as in :func:`match_rows`)."""
    S = len(dictionaries)
    if S < 2:
        raise ValueError(f"matched stability needs at least 2 independent runs, got {S}")
    matched: list[list[float]] = [[] for _ in range(S)]
    shared: list[list[float]] = [[] for _ in range(S)]
    for s in range(S):
        for t in range(s + 1, S):
            cos = match_rows(dictionaries[s], dictionaries[t], exact_max=exact_max, candidates=candidates, bf16=bf16)[2]
            for run in (s, t):
                matched[run].append(stability_matched_from(cos))
                shared[run].append(stability_shared_from(cos, dictionaries[run].shape[0], threshold))
    return [sum(v) / len(v) for v in matched], [sum(v) / len(v) for v in shared]


# -------------------------------------------------------------------- matching
# A one-to-one matching of the rows of two dictionaries that maximises the sum of cosines.
# Hungarian (scipy's linear_sum_assignment) is exact but needs the dense n × m matrix and
# O(m³) time; above ``exact_max`` latents the optimum is taken over a sparse candidate graph
# instead: each row's ``candidates`` most similar columns and each column's most similar rows,
# found in row blocks (memory ``chunk`` × m), solved by scipy's sparse LAPJV
# (min_weight_full_bipartite_matching). A latent's optimal partner is almost always among its
# few nearest ones, so this reaches Hungarian's value (tests/test_matching.py); greedy
# matching on the same candidates falls short of it by a few percent on random dictionaries.


def match_rows(W1: Tensor, W2: Tensor, *, exact_max: int = HUNGARIAN_MAX_LATENTS, candidates: int = MATCHING_CANDIDATES,
               chunk: int = 512, bf16: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One-to-one matching of the rows of W1 [n, d] and W2 [m, d] maximising the summed cosine:
    (rows [p], cols [p], cosines [p]), p = min(n, m), sorted by row.

    Exact (Hungarian) when max(n, m) ≤ ``exact_max``; above, optimal over the sparse graph
    :func:`candidate_edges` (each row's and each column's ``candidates`` best partners),
    found in blocks of ``chunk`` rows. Unit rows are taken first; all-zero rows have
    cosine 0 with everything. bf16: the candidates are found from bf16 cosines (as in
    :func:`mutual_max_cosines`; the choice can differ only among near-ties); the cosines
    returned are fp32 either way.
    """
    if W1.ndim != 2 or W2.ndim != 2 or W1.shape[1] != W2.shape[1]:
        raise ValueError(f"match_rows needs two [m, d] dictionaries of the same d; got {tuple(W1.shape)} and {tuple(W2.shape)}")
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    if min(W1.shape[0], W2.shape[0]) == 0:
        raise ValueError(f"match_rows needs at least one latent on each side; got {W1.shape[0]} and {W2.shape[0]}")
    U, V = unit_rows(W1), unit_rows(W2)
    rows, cols = _match_unit_rows(U, V, exact_max, candidates, chunk, bf16)
    order = torch.argsort(rows)
    rows, cols = rows[order], cols[order]
    return rows, cols, _pair_cosines(U, V, rows, cols)


def _pair_cosines(U: Tensor, V: Tensor, rows: Tensor, cols: Tensor, chunk: int = 65_536) -> Tensor:
    """cos(U[rows[e]], V[cols[e]]) for every pair e (unit rows; index tensors [E]) -> [E] on the
    CPU, in chunks of pairs (memory chunk × d)."""
    rows, cols = rows.to(U.device), cols.to(U.device)
    return torch.cat([(U[rows[i : i + chunk]] * V[cols[i : i + chunk]]).sum(dim=1).cpu()
                      for i in range(0, len(rows), chunk)]) if len(rows) else torch.zeros(0)


def _match_unit_rows(U: Tensor, V: Tensor, exact_max: int, candidates: int, chunk: int, bf16: bool) -> tuple[Tensor, Tensor]:
    """The matched (rows, cols) of unit-row dictionaries U [n, d] and V [m, d] (see :func:`match_rows`)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n, m = U.shape[0], V.shape[0]
    if max(n, m) <= exact_max:
        r, c = linear_sum_assignment((U @ V.T).double().cpu().numpy(), maximize=True)
    else:
        rows, cols, cos = candidate_edges(U, V, candidates, chunk, bf16)
        # weights 2 − cos ≥ 1 (never an implicit zero): the size of a full matching is fixed, so
        # its minimum weight is its maximum summed cosine
        graph = csr_matrix((2.0 - cos.double().numpy(), (rows.numpy(), cols.numpy())), shape=(n, m))
        r, c = min_weight_full_bipartite_matching(graph)
    return torch.from_numpy(np.asarray(r)).long(), torch.from_numpy(np.asarray(c)).long()


def best_partners(U: Tensor, V: Tensor, candidates: int, chunk: int = 512, bf16: bool = False) -> tuple[Tensor, Tensor]:
    """For each row of U [n, d], the ``candidates`` rows of V [m, d] of highest cosine (U and
    V unit rows): (cosines [n, c] float32, indices [n, c]), c = min(candidates, m), best first.
    One pass over the n × m cosines in blocks of ``chunk`` rows (memory chunk × m); bf16: the
    blocks in bf16 (values within bf16 rounding)."""
    c = min(candidates, V.shape[0])
    if bf16:
        U, V = U.bfloat16(), V.bfloat16()
    best = [(U[i : i + chunk] @ V.T).topk(c, dim=1) for i in range(0, U.shape[0], chunk)]
    return torch.cat([b.values for b in best]).float(), torch.cat([b.indices for b in best])


def candidate_edges(U: Tensor, V: Tensor, candidates: int, chunk: int = 512, bf16: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The sparse candidate graph of a matching of the unit rows of U [n, d] and V [m, d]:
    every row of U to its ``candidates`` best rows of V and every row of V to its best rows
    of U (:func:`best_partners`, both ways, so every latent of either side has partners),
    plus the backbone i–i for i < min(n, m), which guarantees the graph a full matching
    (many identical or zero rows could otherwise leave some rows only the same few
    partners). Each pair once: (row index [E], column index [E], cosine [E]) on the CPU,
    E ≤ candidates·(n + m) + min(n, m). bf16: as in :func:`best_partners`."""
    import numpy as np

    n, m = U.shape[0], V.shape[0]
    p = min(n, m)
    cos_uv, to_v = best_partners(U, V, candidates, chunk, bf16)
    cos_vu, to_u = best_partners(V, U, candidates, chunk, bf16)
    backbone = torch.arange(p)
    rows = torch.cat([torch.arange(n).repeat_interleave(to_v.shape[1]), to_u.reshape(-1).cpu(), backbone])
    cols = torch.cat([to_v.reshape(-1).cpu(), torch.arange(m).repeat_interleave(to_u.shape[1]), backbone])
    cos = torch.cat([cos_uv.reshape(-1).cpu(), cos_vu.reshape(-1).cpu(), _pair_cosines(U, V, backbone, backbone)])
    _, first = np.unique((rows * m + cols).numpy(), return_index=True)  # a pair found twice counts once
    first = torch.from_numpy(first)
    return rows[first], cols[first], cos[first]


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
