"""Spurious correlation removal (SHIFT) with an SAE-like dictionary (SPEC §7).

Every document has a binary target y and a binary spurious attribute z. Three splits:

- biased train (y = z on every row): the probe we want to repair, p_y;
- balanced train (y ⟂ z, the four cells equal): the oracle probe for y and the probe
  for z, p_z (on biased rows a z probe would be a y probe, so z is only separable here);
- balanced test: every accuracy below.

All probes read mean-pooled activations pool(a). Latent i (decoder row f_i) is scored by
its effect on the z probe, s_i = |mean_diff_z(c̄_i) · ⟨w_z, f_i⟩|, where c̄ are pooled
codes and mean_diff_z is the mean over z = 1 minus the mean over z = 0 on the balanced
train split. Zero-ablating the top-n latents per token, a' = a − Σ_{i∈top} c_i f_i,
keeps the SAE error term; since ablation is linear after the codes,

    pool(a') = pool(a) − pool(c)[:, top] @ W_dec[top]

so pooled activations and pooled codes are all that is needed. The biased probe is
re-evaluated (not retrained) on the ablated test set, and

    S = (A_abl − A_base) / (A_oracle − A_base).

A pair whose headroom A_oracle − A_base is small divides noise by noise (S swings by
units when one test document flips); :func:`has_headroom` is the guard callers apply
before scoring (SAEBench sets S to 0 below a gap of 0.001; we leave such pairs out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from sae_core.probing import LinearProbe, SAELike, as_array, fit_probe, pooled_codes


@dataclass
class SCRData:
    """Pooled activations and labels of the three splits (N_* documents, d dims).

    biased_acts [N_b, d], biased_y [N_b]; balanced_acts [N_o, d], balanced_y, balanced_z [N_o];
    test_acts [N_t, d], test_y [N_t]. Labels are 0/1.
    """

    biased_acts: np.ndarray
    biased_y: np.ndarray
    balanced_acts: np.ndarray
    balanced_y: np.ndarray
    balanced_z: np.ndarray
    test_acts: np.ndarray
    test_y: np.ndarray


@dataclass
class SCRProbes:
    """The three probes of SHIFT and the two reference accuracies on the balanced test."""

    biased: LinearProbe  # p_y on the biased split
    oracle: LinearProbe  # p_y on the balanced split
    spurious: LinearProbe  # p_z on the balanced split
    acc_base: float
    acc_oracle: float

    @property
    def headroom(self) -> float:
        """A_oracle − A_base: what removing the spurious signal can win back at most."""
        return self.acc_oracle - self.acc_base


@dataclass(frozen=True)
class SCRResult:
    """One point of the SCR curve: n latents ablated."""

    n_ablated: int
    acc_base: float
    acc_ablated: float
    acc_oracle: float
    score: float
    latents: tuple[int, ...]


def fit_scr_probes(data: SCRData) -> SCRProbes:
    """Fit p_y (biased), the oracle p_y (balanced) and p_z (balanced); score both p_y on test.

    A_base = accuracy of the biased p_y on the balanced test; A_oracle that of the oracle.
    They depend only on the activations, so one fit serves every dictionary.
    """
    biased = fit_probe(data.biased_acts, data.biased_y)
    oracle = fit_probe(data.balanced_acts, data.balanced_y)
    spurious = fit_probe(data.balanced_acts, data.balanced_z)
    return SCRProbes(
        biased=biased,
        oracle=oracle,
        spurious=spurious,
        acc_base=biased.accuracy(data.test_acts, data.test_y),
        acc_oracle=oracle.accuracy(data.test_acts, data.test_y),
    )


def has_headroom(acc_base: float, acc_oracle: float, minimum: float) -> bool:
    """Whether a pair can be scored: A_oracle − A_base ≥ ``minimum`` (a 1e-12 tolerance for
    rounding, so a gap of exactly the minimum counts)."""
    return acc_oracle - acc_base >= minimum - 1e-12


def latent_scores(codes: Tensor | np.ndarray, z: np.ndarray, W_dec: Tensor | np.ndarray, w_z: np.ndarray) -> np.ndarray:
    """s_i = |mean_diff_z(c̄_i) · ⟨w_z, f_i⟩|, the effect of latent i on the z probe.

    codes: [N, m] pooled codes on the balanced split; z: [N] in {0, 1}; W_dec: [m, d]
    (row i = f_i); w_z: [d] the z probe's direction in activation space. Returns [m].
    """
    c = as_array(codes)
    z = np.asarray(z).astype(bool)
    if z.all() or not z.any():
        raise ValueError("latent scores need documents with z = 0 and z = 1")
    mean_diff = c[z].mean(0) - c[~z].mean(0)
    W = as_array(W_dec)
    if W.shape[0] != c.shape[1]:
        raise ValueError(f"W_dec has {W.shape[0]} rows but the codes have {c.shape[1]} latents")
    return np.abs(mean_diff * (W @ np.asarray(w_z, dtype=np.float64)))


def top_latents(scores: np.ndarray, n: int) -> np.ndarray:
    """The n highest-scoring latents, highest first, ties by lower index: [min(n, m)]."""
    scores = np.asarray(scores)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[: min(n, len(scores))]


def ablate_pooled(acts: Tensor | np.ndarray, codes: Tensor | np.ndarray, W_dec: Tensor | np.ndarray, latents: np.ndarray) -> np.ndarray:
    """pool(a') = pool(a) − pool(c)[:, top] @ W_dec[top] (zero-ablation, error term kept).

    acts: [N, d] pooled activations; codes: [N, m] pooled codes; W_dec: [m, d];
    latents: indices of the ablated latents. Returns [N, d].
    """
    a = as_array(acts)
    if len(latents) == 0:
        return a.copy()
    c = as_array(codes)[:, latents]
    W = as_array(W_dec)[latents]
    return a - c @ W


def shift_score(acc_ablated: float, acc_base: float, acc_oracle: float, min_gap: float) -> float:
    """S = (A_abl − A_base) / max(A_oracle − A_base, min_gap).

    The floor keeps S finite when the bias barely hurts the probe (A_oracle ≈ A_base,
    or below it by noise); pass min_gap = 1 / N_test, one test document of headroom.
    """
    return (acc_ablated - acc_base) / max(acc_oracle - acc_base, min_gap)


def shift_curve(
    probes: SCRProbes,
    data: SCRData,
    codes_balanced: Tensor | np.ndarray,
    codes_test: Tensor | np.ndarray,
    W_dec: Tensor | np.ndarray,
    n_ablated: Iterable[int],
) -> list[SCRResult]:
    """SHIFT for one dictionary: score latents, ablate the top n, re-evaluate the biased probe.

    codes_balanced: [N_o, m] pooled codes of the balanced train split; codes_test:
    [N_t, m] of the test split; W_dec: [m, d]. One result per n in ``n_ablated``
    (n larger than m ablates every latent).
    """
    scores = latent_scores(codes_balanced, data.balanced_z, W_dec, probes.spurious.direction)
    ranked = top_latents(scores, max(n_ablated))
    min_gap = 1.0 / len(data.test_y)
    out = []
    for n in sorted(set(int(n) for n in n_ablated)):
        top = ranked[:n]
        ablated = ablate_pooled(data.test_acts, codes_test, W_dec, top)
        acc = probes.biased.accuracy(ablated, data.test_y)
        out.append(
            SCRResult(n, probes.acc_base, acc, probes.acc_oracle, shift_score(acc, probes.acc_base, probes.acc_oracle, min_gap),
                      tuple(int(i) for i in top))
        )
    return out


@torch.no_grad()
def spurious_correlation_removal(
    sae: SAELike,
    data: SCRData,
    balanced_tokens: tuple[Tensor | np.ndarray, np.ndarray],
    test_tokens: tuple[Tensor | np.ndarray, np.ndarray],
    n_ablated: Iterable[int],
    probes: SCRProbes | None = None,
    device: str | torch.device | None = None,
) -> list[SCRResult]:
    """SHIFT for any SAE-like object (encode + W_dec): single SAE, ensemble, or identity.

    balanced_tokens / test_tokens: (token activations [T, d], document index [T]) of the
    balanced train and test documents, in the order of ``data``'s rows; their codes are
    mean-pooled here, on ``device`` (None: the SAE's own; see
    :func:`~sae_core.probing.pooled_codes`). ``probes`` default to :func:`fit_scr_probes` on ``data``.
    """
    probes = probes if probes is not None else fit_scr_probes(data)
    codes_bal = pooled_codes(sae, balanced_tokens[0], balanced_tokens[1], len(data.balanced_y), device=device)
    codes_test = pooled_codes(sae, test_tokens[0], test_tokens[1], len(data.test_y), device=device)
    return shift_curve(probes, data, codes_bal, codes_test, sae.W_dec.detach().cpu(), n_ablated)
