"""Streaming reconstruction metrics of an ensemble at every prefix J = 1..J_max (SPEC §6).

One pass over the evaluation tokens computes each member's codes and output once; the
J-member prefix's reconstruction is Σ_{j<J} α^(J)_j g_j(a_j) (α^(J) = 1/J for bagging, 1
for boosting), so every prefix is scored from the same forward work. Sums accumulate in
float64 per dimension, so no [T, d] reconstruction is ever kept; co-firing is recorded as
the active sets of the full ensemble (token, latent) and connectivity of every prefix is
counted from them in one blocked pass (:func:`sae_core.metrics.connectivity_of_prefixes`).

The formulas are those of :mod:`sae_core.metrics` (tested against them):
mse, explained_variance, explained_variance_total, l0, dead_fraction, shrinkage_gamma,
connectivity.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from sae_core import metrics
from sae_core.ensemble import Ensemble

RECONSTRUCTION_METRICS = (
    "mse",
    "explained_variance",
    "explained_variance_total",
    "l0",
    "dead_fraction",
    "shrinkage_gamma",
    "connectivity",
)


class _Sums:
    """Float64 sums of one prefix: per-dim squared error, Σ‖â‖², Σ a·â, Σ L0."""

    def __init__(self, d: int) -> None:
        self.err = torch.zeros(d, dtype=torch.float64)
        self.recon_sq = 0.0
        self.cross = 0.0
        self.l0 = 0.0


@torch.no_grad()
def prefix_reconstruction_metrics(
    ensemble: Ensemble,
    batches: Iterable[Tensor],
    prefixes: list[int] | None = None,
    *,
    connectivity_block: int = 16_384,
) -> dict[int, dict[str, float]]:
    """Reconstruction metrics of the first-n-member ensemble for every n in ``prefixes``.

    ensemble: any Ensemble (a single SAE is J = 1).
    batches: iterable of activation batches [B_i, d] (the evaluation split, streamed).
    prefixes: member counts to score (default 1..J).
    Returns {n: {metric: value}} with the metrics of :data:`RECONSTRUCTION_METRICS`.
    """
    J, k, d = ensemble.n_members, ensemble.member_cfg.d_sae, ensemble.d_in
    prefixes = sorted(set(prefixes or range(1, J + 1)))
    if prefixes[0] < 1 or prefixes[-1] > J:
        raise ValueError(f"prefixes must lie in 1..{J}, got {prefixes}")
    weights = {n: ensemble.prefix_alpha(n).double() for n in prefixes}
    sums = {n: _Sums(d) for n in prefixes}
    sum_a = torch.zeros(d, dtype=torch.float64)
    sum_a2 = torch.zeros(d, dtype=torch.float64)
    fired = torch.zeros(J, k, dtype=torch.bool)
    tok_parts, lat_parts = [], []
    T = 0
    for x in batches:
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"activation batches must be [B, {d}] for this ensemble; got {tuple(x.shape)}")
        x = x.float()
        codes, outs = ensemble.member_codes_and_outputs(x)  # [J, B, k], [J, B, d]
        a64, outs64 = x.double(), outs.double()
        sum_a += a64.sum(0)
        sum_a2 += a64.pow(2).sum(0)
        active = codes != 0  # [J, B, k]
        fired |= active.any(1)
        per_member_l0 = active.sum(-1).double().sum(-1)  # [J]: Σ_t L0 of member j
        # active sets in the concatenated view: latent j·k + i
        member, t, i = active.nonzero(as_tuple=True)
        tok_parts.append((t + T).int())
        lat_parts.append((member * k + i).int())
        for n in prefixes:
            recon = torch.einsum("j,jbd->bd", weights[n], outs64[:n])
            s = sums[n]
            s.err += (a64 - recon).pow(2).sum(0)
            s.recon_sq += float(recon.pow(2).sum())
            s.cross += float((a64 * recon).sum())
            s.l0 += float(per_member_l0[:n].sum())
        T += x.shape[0]
    if T == 0:
        raise ValueError("no evaluation tokens: the batches were empty")

    var = sum_a2 - sum_a.pow(2) / T  # Σ_t (a − μ)² per dimension
    keep = var > 0
    tok, lat = torch.cat(tok_parts), torch.cat(lat_parts)
    conn = metrics.connectivity_of_prefixes(tok, lat, T, [n * k for n in prefixes], block=connectivity_block)
    out: dict[int, dict[str, float]] = {}
    for q, n in enumerate(prefixes):
        s = sums[n]
        out[n] = {
            "mse": float(s.err.sum()) / T,
            "explained_variance": float((1 - s.err[keep] / var[keep]).mean()) if bool(keep.any()) else float("nan"),
            "explained_variance_total": 1 - float(s.err.sum()) / float(var.sum()) if float(var.sum()) > 0 else float("nan"),
            "l0": s.l0 / T,
            "dead_fraction": metrics.dead_fraction(fired[:n].reshape(-1)),
            "shrinkage_gamma": s.recon_sq / s.cross if s.cross != 0 else float("nan"),
            "connectivity": conn[q],
        }
    return out


def dictionary_metrics(W: Tensor, diversity_threshold: float = 0.7) -> dict[str, float]:
    """Metrics of one dictionary [m, d]: diversity (count and fraction) and c_dec."""
    count, fraction = metrics.diversity(W, diversity_threshold)
    return {"diversity": float(count), "diversity_fraction": fraction, "c_dec": metrics.c_dec(W)}
