"""Orderedness of dictionaries across runs (OSAE, arXiv 2512.02194; related.md §6).

Two runs D, D' (decoder rows [m, d]) are matched one to one on their unit rows, maximising
the summed cosine (:func:`sae_core.metrics.match_rows`: Hungarian, or the sparse-candidate
matching for large dictionaries). With μ(j) the index in D' matched to latent j of D:

* **orderedness** Ord(D, D') = Spearman's ρ between j and μ(j)
  = 1 − 6 Σ_j (rank j − rank μ(j))² / (p (p² − 1)) over the p matched pairs: 1 when latent j of
  one run is latent j of the other (same order), about 0 for an unrelated order (TopK SAEs,
  whose latent indices carry no meaning), −1 for the reversed order.
* **prefix stability** at p: the matched mean cosine (PW-MCC) of the first p latents of D
  with the first p latents of D' (each prefix matched on its own). An ordered dictionary is
  stable from its first latents on; an unordered one only as a whole.

The paper averages both over all seed pairs; :func:`matched_across_runs` gives each run the
mean over the other runs, as the stage's other stability metrics do.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from sae_core import metrics


def orderedness_from(rows: Tensor, cols: Tensor) -> float:
    """Spearman's ρ between the matched indices ``rows`` [p] and ``cols`` [p] (distinct each):
    1 − 6 Σ (rank rows − rank cols)² / (p (p² − 1)). Needs p ≥ 2."""
    p = int(rows.numel())
    if p < 2 or cols.numel() != p:
        raise ValueError(f"orderedness needs at least 2 matched pairs of equal length; got {p} rows and {cols.numel()} columns")
    rank_r = torch.argsort(torch.argsort(rows.cpu())).double()
    rank_c = torch.argsort(torch.argsort(cols.cpu())).double()
    return float(1.0 - 6.0 * (rank_r - rank_c).pow(2).sum() / (p * (p * p - 1)))


def orderedness(W1: Tensor, W2: Tensor, *, exact_max: int = metrics.HUNGARIAN_MAX_LATENTS,
                candidates: int = metrics.MATCHING_CANDIDATES, bf16: bool = False) -> float:
    """Ord(W1, W2) of two dictionaries [n, d], [m, d] (module docstring; matching as in
    :func:`sae_core.metrics.match_rows`)."""
    rows, cols, _ = metrics.match_rows(W1, W2, exact_max=exact_max, candidates=candidates, bf16=bf16)
    return orderedness_from(rows, cols)


def prefix_lengths(m: int, step: int = 4) -> list[int]:
    """The prefixes of a prefix-stability curve: step, 2·step, …, and m itself (the paper's {4, 8, …, K})."""
    if m < 1 or step < 1:
        raise ValueError(f"prefix_lengths needs m >= 1 and step >= 1, got m={m}, step={step}")
    return sorted({*range(step, m + 1, step), m})


def prefix_stability(W1: Tensor, W2: Tensor, prefixes: Iterable[int], *, exact_max: int = metrics.HUNGARIAN_MAX_LATENTS,
                     candidates: int = metrics.MATCHING_CANDIDATES, bf16: bool = False) -> list[float]:
    """Per prefix p: PW-MCC of W1[:p] with W2[:p] [p, d] (each prefix matched on its own)."""
    out = []
    for p in prefixes:
        if not 1 <= p <= min(W1.shape[0], W2.shape[0]):
            raise ValueError(f"prefix {p} is outside 1..{min(W1.shape[0], W2.shape[0])} (the smaller dictionary's size)")
        out.append(metrics.stability_matched(W1[:p], W2[:p], exact_max=exact_max, candidates=candidates, bf16=bf16))
    return out


def matched_across_runs(dictionaries: list[Tensor], threshold: float = metrics.SHARED_COSINE, *,
                        exact_max: int = metrics.HUNGARIAN_MAX_LATENTS, candidates: int = metrics.MATCHING_CANDIDATES,
                        bf16: bool = False) -> dict[str, list[float]]:
    """Per run s of S ≥ 2 dictionaries [m_s, d]: the mean over the other runs t of
    stability_matched(s, t), stability_shared(s, t) and orderedness(s, t), from one matching
    per pair (the first two are :func:`sae_core.metrics.matched_stability`'s values)."""
    S = len(dictionaries)
    if S < 2:
        raise ValueError(f"matched stability and orderedness need at least 2 independent runs, got {S}")
    values: dict[str, list[list[float]]] = {name: [[] for _ in range(S)] for name in ("stability_matched", "stability_shared", "orderedness")}
    for s in range(S):
        for t in range(s + 1, S):
            rows, cols, cos = metrics.match_rows(dictionaries[s], dictionaries[t], exact_max=exact_max, candidates=candidates, bf16=bf16)
            ordered = orderedness_from(rows, cols)
            for run in (s, t):
                values["stability_matched"][run].append(metrics.stability_matched_from(cos))
                values["stability_shared"][run].append(metrics.stability_shared_from(cos, dictionaries[run].shape[0], threshold))
                values["orderedness"][run].append(ordered)
    return {name: [sum(v) / len(v) for v in per_run] for name, per_run in values.items()}
