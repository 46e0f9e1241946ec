"""Streaming reconstruction metrics of an ensemble at every prefix J = 1..J_max (SPEC §6).

One pass over the evaluation tokens computes each member's codes and output once; the
J-member prefix's reconstruction is Σ_{j<J} α^(J)_j g_j(a_j) (α^(J) = 1/J for bagging, 1
for boosting), so every prefix is scored from the same forward work. The sufficient
statistics of :mod:`sae_core.metrics` accumulate in float64 (one :class:`TargetSums` for
the tokens, one :class:`ErrorSums` per prefix), so no [T, d] reconstruction is ever kept;
co-firing goes batch by batch into one :class:`sae_core.metrics.CoFiring` of the full
ensemble's concatenated latents (a bitmap of the pairs that fired together, whose size does
not depend on the number of tokens), which gives every prefix's connectivity at the end.
Memory is one batch's codes and outputs plus that bitmap, whatever the number of tokens.

Everything runs on one device (the ensemble's, or ``device``): the batches are moved there,
the sums and the latents that fired stay there (so does the co-firing bitmap, unless its
cost model picks the sparse algorithm, which works on the CPU), and only the final numbers
come back, as Python floats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import Tensor

from sae_core import metrics
from sae_core.devices import resolve_device, to_device
from sae_core.ensemble import Ensemble


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
    device: torch.device | str | None = None,
    connectivity_block: int | None = None,
    connectivity_algorithm: str = "auto",
) -> dict[int, PrefixMetrics]:
    """Reconstruction metrics of the first-n-member ensemble for every n in ``prefixes``.

    ensemble: any Ensemble (a single SAE is J = 1).
    batches: iterable of activation batches [B_i, d] (the evaluation split, streamed), on any device.
    prefixes: member counts to score (default 1..J).
    device: where the work runs (a torch.device, a setting such as "cuda:1", or None: the
        ensemble's device); the ensemble is moved there (in place, as ``Module.to`` does) and
        so is each batch.
    connectivity_block, connectivity_algorithm: ``block`` and ``algorithm`` of
        :class:`sae_core.metrics.CoFiring` (None: its default for the device; "auto": its
        cost model, from the first batch's L0).
    Returns {n: PrefixMetrics}.
    """
    J, d_sae, d = ensemble.n_members, ensemble.member_cfg.d_sae, ensemble.d_in
    prefixes = sorted(set(prefixes or range(1, J + 1)))
    if prefixes[0] < 1 or prefixes[-1] > J:
        raise ValueError(f"prefixes must lie in 1..{J}, got {prefixes}")
    device = resolve_device(device) if device is not None else next(ensemble.parameters()).device
    ensemble.to(device)
    weights = {n: ensemble.prefix_alpha(n).double().to(device) for n in prefixes}
    targets = metrics.TargetSums.zeros(d, device)
    errors = {n: metrics.ErrorSums.zeros(d, device) for n in prefixes}
    fired = torch.zeros(J, d_sae, dtype=torch.bool, device=device)
    cofiring = metrics.CoFiring(J * d_sae, [n * d_sae for n in prefixes], device=device,
                                algorithm=connectivity_algorithm, block=connectivity_block)
    for x in batches:
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"activation batches must be [B, {d}] for this ensemble; got {tuple(x.shape)}")
        x = to_device(x, device).float()
        codes, outs = ensemble.member_codes_and_outputs(x)  # [J, B, d_sae], [J, B, d]
        a64, outs64 = x.double(), outs.double()
        targets.add(a64)
        active = codes != 0  # [J, B, d_sae]
        fired |= active.any(1)
        # [J]: Σ_t L0 of member j (count_nonzero: a bool sum() makes an int64 copy of the codes' size)
        per_member_l0 = torch.count_nonzero(active, dim=-1).double().sum(-1)
        # the concatenated view [B, J·d_sae]: latent j·d_sae + i
        cofiring.add(active.permute(1, 0, 2).reshape(x.shape[0], J * d_sae))
        for n in prefixes:
            recon = torch.einsum("j,jbd->bd", weights[n], outs64[:n])
            errors[n].add(a64, recon, per_member_l0[:n].sum())
    T = targets.n_tokens
    if T == 0:
        raise ValueError("no evaluation tokens: the batches were empty")

    conn = cofiring.connectivity()
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
