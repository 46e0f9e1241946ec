"""Streaming reconstruction metrics of an ensemble at every prefix J = 1..J_max (SPEC §6).

One pass over the evaluation tokens computes each member's codes and output once; the
J-member prefix's reconstruction is Σ_{j<J} α^(J)_j g_j(a_j) (α^(J) = 1/J for bagging, 1
for boosting), so every prefix is scored from the same forward work. The sufficient
statistics of :mod:`sae_core.metrics` accumulate in float64 (one :class:`TargetSums` for
the tokens, one :class:`ErrorSums` per prefix), so no [T, d] reconstruction is ever kept;
co-firing is recorded as the active sets of the full ensemble (token, latent) and
connectivity of every prefix is counted from them in one blocked pass
(:func:`sae_core.metrics.connectivity_of_prefixes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import Tensor

from sae_core import metrics
from sae_core.ensemble import Ensemble

#: tokens per block of the co-firing count (bounds its memory)
CONNECTIVITY_BLOCK_TOKENS = 16_384


@dataclass(frozen=True)
class PrefixMetrics:
    """The reconstruction metrics of one prefix (definitions in :mod:`sae_core.metrics`)."""

    mse: float
    explained_variance: float
    explained_variance_total: float
    l0: float
    dead_fraction: float
    shrinkage_gamma: float
    connectivity: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def prefix_reconstruction_metrics(
    ensemble: Ensemble,
    batches: Iterable[Tensor],
    prefixes: list[int] | None = None,
    *,
    connectivity_block: int = CONNECTIVITY_BLOCK_TOKENS,
) -> dict[int, PrefixMetrics]:
    """Reconstruction metrics of the first-n-member ensemble for every n in ``prefixes``.

    ensemble: any Ensemble (a single SAE is J = 1).
    batches: iterable of activation batches [B_i, d] (the evaluation split, streamed).
    prefixes: member counts to score (default 1..J).
    Returns {n: PrefixMetrics}.
    """
    J, d_sae, d = ensemble.n_members, ensemble.member_cfg.d_sae, ensemble.d_in
    prefixes = sorted(set(prefixes or range(1, J + 1)))
    if prefixes[0] < 1 or prefixes[-1] > J:
        raise ValueError(f"prefixes must lie in 1..{J}, got {prefixes}")
    weights = {n: ensemble.prefix_alpha(n).double() for n in prefixes}
    targets = metrics.TargetSums.zeros(d)
    errors = {n: metrics.ErrorSums.zeros(d) for n in prefixes}
    fired = torch.zeros(J, d_sae, dtype=torch.bool)
    tok_parts, lat_parts = [], []
    for x in batches:
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"activation batches must be [B, {d}] for this ensemble; got {tuple(x.shape)}")
        x = x.float()
        codes, outs = ensemble.member_codes_and_outputs(x)  # [J, B, d_sae], [J, B, d]
        a64, outs64 = x.double(), outs.double()
        offset = targets.n_tokens
        targets.add(a64)
        active = codes != 0  # [J, B, d_sae]
        fired |= active.any(1)
        per_member_l0 = active.sum(-1).double().sum(-1)  # [J]: Σ_t L0 of member j
        # active sets in the concatenated view: latent j·d_sae + i
        member, t, i = active.nonzero(as_tuple=True)
        tok_parts.append((t + offset).int())
        lat_parts.append((member * d_sae + i).int())
        for n in prefixes:
            recon = torch.einsum("j,jbd->bd", weights[n], outs64[:n])
            errors[n].add(a64, recon, float(per_member_l0[:n].sum()))
    T = targets.n_tokens
    if T == 0:
        raise ValueError("no evaluation tokens: the batches were empty")

    tok, lat = torch.cat(tok_parts), torch.cat(lat_parts)
    conn = metrics.connectivity_of_prefixes(tok, lat, T, [n * d_sae for n in prefixes], block=connectivity_block)
    return {
        n: PrefixMetrics(
            mse=metrics.mse_from(targets, errors[n]),
            explained_variance=metrics.explained_variance_from(targets, errors[n]),
            explained_variance_total=metrics.explained_variance_total_from(targets, errors[n]),
            l0=metrics.l0_from(targets, errors[n]),
            dead_fraction=metrics.dead_fraction(fired[:n].reshape(-1)),
            shrinkage_gamma=metrics.shrinkage_gamma_from(errors[n]),
            connectivity=conn[q],
        )
        for q, n in enumerate(prefixes)
    }


def dictionary_metrics(W: Tensor, diversity_threshold: float = 0.7) -> dict[str, float]:
    """Metrics of one dictionary [m, d]: diversity (count and fraction) and c_dec."""
    count, fraction = metrics.diversity(W, diversity_threshold)
    return {"diversity": float(count), "diversity_fraction": fraction, "c_dec": metrics.c_dec(W)}
