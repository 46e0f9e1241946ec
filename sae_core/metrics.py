"""The metrics of SPEC §6, one definition each (shapes in the docstrings).

Reconstruction metrics are functions of *sufficient statistics*: sums over tokens that
are accumulated batch by batch and merged (:class:`TargetSums` of the activations,
:class:`ErrorSums` of one reconstruction). The in-memory functions (``mse(a, a_hat)``,
…) compute the same sums from one batch and call the same formula, so the streaming
evaluation (:mod:`sae_core.evaluation`) and a direct call cannot drift apart. Sums are
float64 tensors on the device of the data they sum; results are Python floats.

Every function works on CPU and CUDA tensors alike: tensors it creates are made on its
inputs' device, and whatever goes through numpy/scipy (Hungarian matching, the old
co-firing count) is moved to the CPU first. Co-firing (connectivity) streams through
:class:`CoFiring`, whose state does not grow with the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from sae_core.devices import resolve_device, to_device
from sae_core.numerics import NORM_EPS



# ------------------------------------------------------------ sufficient statistics
@dataclass
class TargetSums:
    """Sums over the tokens of the activations a [T, d]: T, Σ_t a_t [d], Σ_t a_t² [d] (float64)."""

    n_tokens: int
    sum_a: Tensor
    sum_a2: Tensor

    @classmethod
    def zeros(cls, d: int, device: torch.device | str | None = None) -> "TargetSums":
        return cls(0, torch.zeros(d, dtype=torch.float64, device=device), torch.zeros(d, dtype=torch.float64, device=device))

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
    Σ_t ‖â_t‖², Σ_t a_t·â_t and Σ_t L0_t (float64).

    The three scalars are 0-dim float64 tensors on the device of ``err`` (from
    :meth:`zeros`), so accumulating never waits for a CUDA device; the ``*_from``
    functions turn them into Python floats."""

    err: Tensor
    recon_sq: float | Tensor = 0.0
    cross: float | Tensor = 0.0
    active: float | Tensor = 0.0

    @classmethod
    def zeros(cls, d: int, device: torch.device | str | None = None) -> "ErrorSums":
        def scalar() -> Tensor:
            return torch.zeros((), dtype=torch.float64, device=device)

        return cls(torch.zeros(d, dtype=torch.float64, device=device), scalar(), scalar(), scalar())

    def add(self, a64: Tensor, recon64: Tensor, active: float | Tensor = 0.0) -> None:
        """Accumulate a batch: a and â [B, d] (float64), and the batch's Σ_t L0_t (a float or
        a 0-dim tensor on the same device)."""
        self.err += (a64 - recon64).pow(2).sum(0)
        self.recon_sq = self.recon_sq + recon64.pow(2).sum()
        self.cross = self.cross + (a64 * recon64).sum()
        self.active = self.active + active

    def merge(self, other: "ErrorSums") -> "ErrorSums":
        return ErrorSums(self.err + other.err, self.recon_sq + other.recon_sq, self.cross + other.cross, self.active + other.active)


def _check_pair(a: Tensor, a_hat: Tensor) -> None:
    if a.shape != a_hat.shape or a.ndim != 2:
        raise ValueError(f"a and a_hat must both be [T, d]; got {tuple(a.shape)} and {tuple(a_hat.shape)}")


def sums_of(a: Tensor, a_hat: Tensor) -> tuple[TargetSums, ErrorSums]:
    """The sufficient statistics of one in-memory pair a, â [T, d]."""
    _check_pair(a, a_hat)
    a64, r64 = a.double(), a_hat.double()
    targets, errors = TargetSums.zeros(a.shape[1], a.device), ErrorSums.zeros(a.shape[1], a.device)
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
    return float(errors.active) / targets.n_tokens


def shrinkage_gamma_from(errors: ErrorSums) -> float:
    """γ = E‖â‖² / E[a·â] (relative reconstruction bias; < 1 means shrinkage)."""
    recon_sq, cross = float(errors.recon_sq), float(errors.cross)
    return recon_sq / cross if cross != 0 else float("nan")


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
    return float(torch.count_nonzero(codes, dim=1).double().mean())  # (no int64 copy of the mask, as a bool sum() makes)


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
        rows = torch.arange(i, min(i + chunk, m), device=U.device)
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
        rows = torch.arange(i, min(i + chunk, m), device=U.device)
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
    rows = torch.empty(U.shape[0], device=U.device)
    cols = torch.full((V.shape[0],), -float("inf"), device=U.device)
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
    best = [torch.zeros(W.shape[0], device=W.device) for W in dictionaries]
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
    """An untrained (Gaussian, unit-row) dictionary of W's shape, on W's device: the floor of the
    stability metrics. Drawn on the CPU (a seed gives the same dictionary on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return unit_rows(torch.randn(W.shape, generator=gen)).to(W.device)


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
    tok_np, lat_np = (np.asarray(torch.as_tensor(v).cpu(), dtype=np.int64) for v in (tok, lat))
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


# ------------------------------------------------------- streaming co-firing record
# The co-fired pairs of the latents are kept as a bitmap, not as the tokens' active sets, so
# the memory of connectivity does not grow with the number of tokens evaluated. Bit (i, j),
# i ≤ j (the upper triangle, the diagonal included), is set once latents i and j have fired
# on the same token; an ordered pair count is twice the off-diagonal bits plus the diagonal.
# The bitmap is stored by row tiles of ``block`` latents, each from its own diagonal on (about
# half the square), in packed bits: bit b of byte q of a row is column 8q + b from the tile's
# start, rows padded to whole 64-bit words (for counting).
#
# Two ways to fill it from a batch's binary codes A [B, m], both exact:
#   sparse: the batch's distinct co-firing pairs from the symbolic-and-numeric sparse product
#           AᵀA (scipy, on the CPU), set in the bitmap; work ~ L0²/2 pair visits per token.
#   dense:  tiles of AᵀA as matmuls of the 0/1 codes (bf16 where the device has native bf16
#           matmuls, fp32 otherwise; a sum of non-negative terms is > 0 exactly when one term
#           is, whatever the rounding), > 0 packed to bits and OR-ed in; work ~ m² multiply-adds
#           per token (the upper triangle of 2·m² FLOP), on the device.
# :func:`connectivity_algorithm` chooses from a cost model whose constants were measured by
# benchmarks/bench_metrics.py (see the constants below).

#: latents per row tile of the co-firing state and of the dense products, by device type
CONNECTIVITY_BLOCK = {"cpu": 1024, "cuda": 4096}
#: dense: most entries of one product (block rows × a whole number of block-wide column tiles)
DENSE_TILE_ENTRIES = {"cpu": 1 << 24, "cuda": 1 << 26}
#: sparse: most row blocks (of whole tiles) of a batch's product (the work is ~ L0²/2·(1 + 1/blocks)
#: visits plus one copy of the batch's active sets per block)
SPARSE_ROW_BLOCKS = 16
# Cost-model constants, measured by ``benchmarks/bench_metrics.py --sections model`` on the
# 2-core Xeon (Sapphire Rapids: AVX-512 bf16 and AMX) that runs the default run, with one torch
# thread (the machine was shared with other jobs; least of 2 repeats), on fresh accumulators fed
# batches of 4,096 tokens of random codes at m = 6,144 and 16,384, L0 = 32, 128 and 512.
# CPU dense rates are per torch thread (the model multiplies by the threads).
#: sparse: seconds per co-firing pair (the upper triangle: L0·(L0+1)/2 a token) of the per-batch path
#: (scipy's symbolic and numeric product, the new bits set); single-threaded (scipy). Measured
#: 14-45 ns: ~14 where a batch repeats most pairs (L0 512 of 6,144), ~30-45 where it does not
#: (also ~40 ns at 8 × 16,384 latents, L0 256)
SPARSE_SECONDS_PER_PAIR = 4e-8
#: sparse: seconds per latent and token of finding a batch's active sets in its [B, m] mask (numpy on
#: the CPU: measured 1.2-2.7 ns; on CUDA torch's nonzero, not measured: HBM-bound, ~1 byte a latent)
SPARSE_SECONDS_PER_LATENT = {"cpu": 1.5e-9, "cuda": 1e-12}
#: dense: multiply-adds per second of the 0/1 tile matmuls, by kind. cpu-amx: bf16 with fp32
#: accumulation, measured 1.1e11-2.3e11 a thread (4 runs); cpu: fp32 (``--fp32-dense``), measured 5.5e10
#: with AVX-512 (an AVX2 CPU has about half); cuda: NOT measured (no GPU on the machine above): a
#: quarter of an H100/H200's dense bf16 peak (~990 TFLOP/s), to be replaced by what
#: ``python benchmarks/bench_metrics.py --sections model --device cuda`` measures on one
DENSE_MULADDS_PER_SECOND = {"cuda": 1.2e14, "cpu-amx": 1.7e11, "cpu": 4.0e10}
#: dense: seconds per tile entry and batch of the saturation check, > 0, triangle, packing and OR
#: (m·(m+1)/2 entries a batch, whatever its tokens). cpu-amx measured 3-18 ns a thread (noisy: the
#: difference of two timings), cpu (fp32 tiles) 10.9 ns; cuda not measured (~20 bytes of HBM an entry)
DENSE_SECONDS_PER_ENTRY = {"cuda": 1e-11, "cpu-amx": 6e-9, "cpu": 1e-8}
#: tokens a batch assumed by the cost model when the caller does not say (EvaluateConfig.batch_size)
COST_MODEL_TOKENS_PER_BATCH = 4096


def _cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 bf16 or AMX); torch emulates it otherwise."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check()) if check is not None else False


def _dense_kind(device: torch.device) -> str:
    """The row of :data:`DENSE_MULADDS_PER_SECOND` for ``device``."""
    if device.type == "cuda":
        return "cuda"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return "cpu-amx" if amx is not None and amx() and _cpu_has_bf16_matmul() else "cpu"


def _dense_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device multiplies it natively, fp32 otherwise (0/1 are exact in both)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_bf16_matmul() else torch.float32


def connectivity_seconds_per_token(mean_l0: float, m: int, device: torch.device | str,
                                   tokens_per_batch: int = COST_MODEL_TOKENS_PER_BATCH) -> dict[str, float]:
    """The cost model's seconds per token of each algorithm of :class:`CoFiring`, for codes of mean
    L0 ``mean_l0`` over ``m`` latents on ``device`` in batches of ``tokens_per_batch`` tokens:

    sparse: m latents scanned (:data:`SPARSE_SECONDS_PER_LATENT`) and L0·(L0+1)/2 pairs
        (:data:`SPARSE_SECONDS_PER_PAIR`, the CPU's whatever the device: scipy runs there);
    dense: m·(m+1)/2 multiply-adds at :data:`DENSE_MULADDS_PER_SECOND` (bf16 or fp32 as
        the device has them) plus a batch's m·(m+1)/2 tile entries
        (:data:`DENSE_SECONDS_PER_ENTRY`) shared by its tokens. The worst case: no tile is
        skipped as saturated.

    On the CPU the dense rates are per torch thread, times the threads.
    """
    device = torch.device(device)
    kind = _dense_kind(device)
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    l0 = min(max(float(mean_l0), 0.0), float(m))
    entries = m * (m + 1) / 2
    scan = SPARSE_SECONDS_PER_LATENT["cuda" if device.type == "cuda" else "cpu"]
    return {
        "sparse": m * scan + l0 * (l0 + 1) / 2 * SPARSE_SECONDS_PER_PAIR,
        "dense": (entries / DENSE_MULADDS_PER_SECOND[kind]
                  + entries * DENSE_SECONDS_PER_ENTRY[kind] / max(1, tokens_per_batch)) / threads,
    }


def connectivity_algorithm(mean_l0: float, m: int, device: torch.device | str,
                           tokens_per_batch: int = COST_MODEL_TOKENS_PER_BATCH) -> str:
    """"sparse" or "dense": the cheaper algorithm of :class:`CoFiring` by
    :func:`connectivity_seconds_per_token` (same arguments)."""
    cost = connectivity_seconds_per_token(mean_l0, m, device, tokens_per_batch)
    return "sparse" if cost["sparse"] <= cost["dense"] else "dense"


def _popcount_u8(x: Tensor) -> Tensor:
    """Set bits of each byte of a uint8 tensor (any device): numpy's ``bitwise_count`` on the CPU
    (~20× the bit tricks there), :func:`_popcount_u8_torch` elsewhere."""
    import numpy as np

    if x.device.type == "cpu":
        return torch.from_numpy(np.bitwise_count(x.numpy()))
    return _popcount_u8_torch(x)


def _popcount_u8_torch(x: Tensor) -> Tensor:
    """Set bits of each byte of a uint8 tensor by bit tricks (any device)."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def _runs(flags: list[bool], longest: int) -> list[tuple[int, int]]:
    """[start, end) of the runs of True in ``flags``, each cut to at most ``longest``."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        if start is not None and (not flag or i - start == longest):
            runs.append((start, i))
            start = i if flag else None
    return runs


def _pack_bits(bits: Tensor) -> Tensor:
    """A bool [r, w] tensor as bytes [r, ⌈w/8⌉] (bit b of byte q = column 8q + b)."""
    r, w = bits.shape
    if w % 8:
        bits = torch.cat([bits, bits.new_zeros(r, 8 - w % 8)], dim=1)
    v = bits.contiguous().view(torch.uint8).view(r, -1, 8)
    out = v[..., 0].clone()
    for b in range(1, 8):
        out |= v[..., b] << b
    return out


class CoFiring:
    """Which latents have fired together on some token, streamed batch by batch.

    m: latents of the codes fed to :meth:`add` ([B, m]).
    sizes: prefix sizes s (1 ≤ s ≤ m) whose connectivity :meth:`connectivity` returns: of the
        first s latents, 1 − (distinct ordered co-firing pairs (i, j), i, j < s, the diagonal
        (i, i) counting where latent i fired) / s², the definition of
        :func:`connectivity_of_prefixes` (its slow twin, which keeps every active (token,
        latent) pair). Latents from max(sizes) on are ignored.
    device: where the batches are (moved there if not) and, for the dense algorithm, where the
        bitmap and the tile matmuls live; the sparse algorithm always works on the CPU (only
        each batch's active indices travel).
    algorithm: "sparse", "dense", or "auto": :func:`connectivity_algorithm` from the first
        non-empty batch's mean L0 and size (kept for the later batches).
    block: latents per row tile of the state and of the dense products (each product up to
        :data:`DENSE_TILE_ENTRIES` entries, ~3.2 bytes an entry, besides the batch's codes as
        a [m, B] bf16 or fp32 matrix); the sparse product takes whole tiles, at most
        :data:`SPARSE_ROW_BLOCKS` row blocks a batch. Default :data:`CONNECTIVITY_BLOCK` of the
        device type; rounded up to a multiple of 8.

    State: the upper triangle (j ≥ i) of the m' × m' co-firing bitmap, m' = max(sizes), kept
    as one packed-bit tensor per row tile: tile t (rows r_t = t·block on) holds columns r_t..m'
    − 1, 8·⌈(m' − r_t)/64⌉ bytes a row (:attr:`state_bytes`, ≈ m'²/16 + m'·block/16), whatever
    the number of tokens: 2.8 MB at m' = 6,144 (8 × 768, the default run; block 1,024) and
    1.08 GB at m' = 131,072 (8 × 16,384, paper scale; 1.11 GB with CUDA's block 4,096).
    """

    #: dense: skip the tiles whose bits are all set already (False: the worst case, for benchmarks)
    skip_saturated = True

    def __init__(self, m: int, sizes: Iterable[int], *, device: torch.device | str | None = None,
                 algorithm: str = "auto", block: int | None = None) -> None:
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) < 1 or max(sizes) > m:
            raise ValueError(f"sizes must be prefix sizes in 1..{m}, got {sizes}")
        if algorithm not in ("auto", "sparse", "dense"):
            raise ValueError(f"algorithm must be auto, sparse or dense, got {algorithm!r}")
        self.n_latents = m
        self.m = max(sizes)
        self.sizes = sizes
        self.device = resolve_device(device) if device is not None else torch.device("cpu")
        self.algorithm: str | None = None if algorithm == "auto" else algorithm
        block = block or CONNECTIVITY_BLOCK.get(self.device.type, CONNECTIVITY_BLOCK["cuda"])
        self.block = max(8, -(-int(block) // 8) * 8)
        self.n_tiles = -(-self.m // self.block)
        self.n_tokens = 0
        #: tile t: [rows of the tile, 8·⌈(m' − r_t)/64⌉] uint8, bit (i, j) at (i − r_t, j − r_t); at the first batch
        self.tiles: list[Tensor] | None = None

    # ------------------------------------------------------------------ layout
    def _rows(self, t: int) -> tuple[int, int]:
        """Rows [r0, r1) of tile t."""
        return t * self.block, min((t + 1) * self.block, self.m)

    def _row_bytes(self, t: int) -> int:
        return 8 * -(-(self.m - t * self.block) // 64)

    @property
    def state_bytes(self) -> int:
        """Bytes of the bitmap: Σ_t rows(t)·8·⌈(m' − r_t)/64⌉."""
        return sum((r1 - r0) * self._row_bytes(t) for t, (r0, r1) in enumerate(map(self._rows, range(self.n_tiles))))

    @property
    def state_device(self) -> torch.device | None:
        """Where the bitmap lives (None before the first batch): the device (dense) or the CPU (sparse)."""
        return self.tiles[0].device if self.tiles else None

    def _allocate(self) -> None:
        where = self.device if self.algorithm == "dense" else torch.device("cpu")
        self.tiles = [torch.zeros(r1 - r0, self._row_bytes(t), dtype=torch.uint8, device=where)
                      for t, (r0, r1) in enumerate(map(self._rows, range(self.n_tiles)))]

    def co_fired(self) -> Tensor:
        """The bitmap unpacked, [m', m'] bool on the CPU, True at (i, j), i ≤ j, where latents i and j
        have fired on the same token (m'² bytes: for tests and small m')."""
        out = torch.zeros(self.m, self.m, dtype=torch.bool)
        for t, tile in enumerate(self.tiles or []):
            r0, r1 = self._rows(t)
            bits = (tile.cpu()[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1
            out[r0:r1, r0:] = bits.reshape(r1 - r0, -1)[:, : self.m - r0].bool()
        return out

    # --------------------------------------------------------------------- add
    def add(self, active: Tensor) -> None:
        """Record one batch: ``active`` [B, m], the codes or their non-zero mask (bool), any device."""
        if active.ndim != 2 or active.shape[1] != self.n_latents:
            raise ValueError(f"co-firing batches must be [B, {self.n_latents}], got {tuple(active.shape)}")
        if active.shape[0] == 0:
            return
        active = active[:, : self.m]
        active = active if active.dtype == torch.bool else active != 0
        self.n_tokens += active.shape[0]
        if self.algorithm is None:
            mean_l0 = int(torch.count_nonzero(active)) / active.shape[0]  # (a bool sum() copies to int64)
            self.algorithm = connectivity_algorithm(mean_l0, self.m, self.device, active.shape[0])
        if self.tiles is None:
            self._allocate()
        if self.algorithm == "dense":
            self._add_dense(active)
        else:
            self._add_sparse(active)

    # ------------------------------------------------------------------ dense
    def _add_dense(self, active: Tensor) -> None:
        """Products AᵀA of each row tile against the column tiles from its own on; (row tile,
        column tile) squares whose bits are all set already are skipped (real codes saturate
        early: on the default run boosting's connectivity is 9e-5 at J = 8, README)."""
        m, block, n = self.m, self.block, self.n_tiles
        tiles_per_chunk = max(1, DENSE_TILE_ENTRIES.get(self.device.type, DENSE_TILE_ENTRIES["cuda"]) // (block * block))
        open_tiles = self._open_tiles() if self.skip_saturated else [[True] * (n - r) for r in range(n)]
        if not any(any(row) for row in open_tiles):
            return
        codes = to_device(active, self.device).contiguous().view(torch.uint8)  # [B, m] 0/1
        # [m, B] latent-major (the transpose in uint8, then the cast: both faster than in bool
        # or bf16 on the CPU), so a product is rows(AT) @ rows(AT)ᵀ
        AT = codes.T.contiguous().to(_dense_dtype(self.device))
        for rt in range(n):
            r0, r1 = self._rows(rt)
            for t0, t1 in _runs(open_tiles[rt], tiles_per_chunk):  # column tiles rt + t0 .. rt + t1 − 1
                c0, c1 = r0 + t0 * block, min(r0 + t1 * block, m)
                P = AT[r0:r1] @ AT[c0:c1].T  # [r, c] co-firing counts (rounded; > 0 is exact)
                if t0 == 0:
                    P[:, : r1 - r0].triu_()  # the diagonal square: only j ≥ i is recorded
                packed = _pack_bits(P > 0)
                self.tiles[rt][:, t0 * block // 8 : t0 * block // 8 + packed.shape[1]] |= packed

    def _open_tiles(self) -> list[list[bool]]:
        """For every row tile r, for its column tiles r, r + 1, …: whether some pair of the square
        (the upper triangle of the diagonal one) is still unset. One device sync."""
        n, block = self.n_tiles, self.block
        sizes = [r1 - r0 for r0, r1 in map(self._rows, range(n))]
        set_bits, full = [], []
        for r, tile in enumerate(self.tiles):
            width = (n - r) * block // 8  # bytes of the column tiles r..n − 1
            per_byte = _popcount_u8(tile).sum(0, dtype=torch.int64)[:width]
            per_byte = torch.cat([per_byte, per_byte.new_zeros(width - per_byte.shape[0])])
            set_bits.append(per_byte.view(n - r, block // 8).sum(1))
            full += [sizes[r] * (sizes[r] + 1) // 2 if c == r else sizes[r] * sizes[c] for c in range(r, n)]
        open_ = (torch.cat(set_bits) < torch.tensor(full, device=self.tiles[0].device)).cpu().tolist()
        offsets = [0]
        for r in range(n):
            offsets.append(offsets[-1] + n - r)
        return [open_[offsets[r] : offsets[r + 1]] for r in range(n)]

    # ----------------------------------------------------------------- sparse
    def _add_sparse(self, active: Tensor) -> None:
        import numpy as np
        import scipy.sparse as sp

        B, m, block, n = active.shape[0], self.m, self.block, self.n_tiles
        if active.device.type == "cpu":  # numpy's scan of a bool array is several times torch's
            flat = np.flatnonzero(active.contiguous().numpy())
            tok, lat = flat // m, flat % m
        else:  # the device finds the active sets; only they travel
            tok, lat = (v.cpu().numpy() for v in active.nonzero(as_tuple=True))
        # (both row-major: ordered by token)
        if lat.size == 0:
            return
        indptr = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(np.bincount(tok, minlength=B), out=indptr[1:])
        H = sp.csr_matrix((np.ones(lat.size, dtype=np.bool_), lat, indptr), shape=(B, m))  # [B, m]
        Hc = H.tocsc()  # the tokens of each latent: column slices are cheap
        # whole tiles a product, at most SPARSE_ROW_BLOCKS products (each copies the active sets)
        step = -(-n // SPARSE_ROW_BLOCKS)
        for g0 in range(0, n, step):
            g1 = min(g0 + step, n)
            r0, r1 = self._rows(g0)[0], self._rows(g1 - 1)[1]
            if Hc.indptr[r1] == Hc.indptr[r0]:
                continue  # no latent of these tiles fired
            left = Hc[:, r0:r1].T.tocsr()  # [r, B]
            right = Hc[:, r0:].tocsr()  # [B, m − r0]: only columns j ≥ r0 can be j ≥ i
            P = left @ right  # [r, m − r0]: each distinct co-firing pair of the batch once
            for t in range(g0, g1):
                a, b = (x - r0 for x in self._rows(t))  # the tile's rows within P
                lo, hi = P.indptr[a], P.indptr[b]
                if lo == hi:
                    continue
                # (i, j) relative to the tile's start r_t (a multiple of 8, so j's byte is j >> 3)
                i = np.repeat(np.arange(b - a, dtype=P.indices.dtype), np.diff(P.indptr[a : b + 1]))
                j = P.indices[lo:hi] - a
                keep = j >= i  # the upper triangle only
                i, j = i[keep], j[keep]
                byte = i.astype(np.int64) * self._row_bytes(t) + (j >> 3)
                self._set_bits(self.tiles[t].view(-1), byte, np.left_shift(np.uint8(1), (j & 7).astype(np.uint8)))

    @staticmethod
    def _set_bits(flat: Tensor, byte, value) -> None:
        """Set bits of ``flat`` (uint8, CPU): for each k, the bit ``value[k]`` (a power of two) of
        byte ``byte[k]`` (numpy int64 and uint8 arrays; no (byte, bit) twice).

        Each bit not yet set is added to its byte: distinct bits of a byte add up to their OR,
        so one scatter-add (which sums repeated bytes) sets them all."""
        new = (flat.numpy()[byte] & value) == 0
        if new.any():
            flat.index_add_(0, torch.from_numpy(byte[new]), torch.from_numpy(value[new]))

    # ----------------------------------------------------------------- result
    def pair_counts(self) -> list[int]:
        """Distinct ordered co-firing pairs among the first s latents, for every s in ``sizes``:
        twice the set bits of the upper triangle of the s × s corner, less its diagonal.
        Counted on the CPU (numpy's popcount of 64-bit words), a tile at a time."""
        import numpy as np

        if self.tiles is None:
            return [0 for _ in self.sizes]
        diagonal, upper = [], [0 for _ in self.sizes]
        for t, tile in enumerate(self.tiles):
            r0, r1 = self._rows(t)
            idx = torch.arange(r1 - r0, device=tile.device)
            diagonal.append(((tile[idx, idx >> 3] >> (idx & 7).to(torch.uint8)) & 1).cpu())  # (i, i) set: i fired
            words = np.ascontiguousarray(tile.cpu().numpy()).view(np.uint64)  # [r, ⌈(m − r0)/64⌉]
            below = np.bitwise_count(words).cumsum(axis=1, dtype=np.int64)  # [r, w]: set bits in words ≤ w
            for q, s in enumerate(self.sizes):
                if s <= r0:
                    continue
                n_rows, full, rest = min(r1, s) - r0, (s - r0) // 64, (s - r0) % 64
                if full:
                    upper[q] += int(below[:n_rows, full - 1].sum())
                if rest:
                    upper[q] += int(np.bitwise_count(words[:n_rows, full] & np.uint64((1 << rest) - 1)).sum())
        fired = torch.cat(diagonal).long().cumsum(0)  # latents ≤ i that fired
        return [2 * u - int(fired[s - 1]) for u, s in zip(upper, self.sizes)]

    def connectivity(self) -> list[float]:
        """1 − pairs(s) / s² for every s in ``sizes`` (1.0 for each before any token)."""
        return [1.0 - c / (s * s) for c, s in zip(self.pair_counts(), self.sizes)]
