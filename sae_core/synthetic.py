"""Synthetic activations generated from a known sparse dictionary (for tests and checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sae_core.numerics import NORM_EPS

if TYPE_CHECKING:
    from sae_core.saes.base import SAE


@dataclass(frozen=True)
class SparseDictionaryData:
    """a = Σ_i c_i d_i + offset, each feature i active with probability mean_active / n."""

    dictionary: Tensor  # [n_features, d], unit rows
    offset: Tensor  # [d]
    activations: Tensor  # [N, d]


def make_sparse_dictionary_data(
    n_features: int = 512,
    d: int = 64,
    n_samples: int = 65_536,
    mean_active: float = 4.0,
    seed: int = 0,
    offset_scale: float = 1.0,
    frequency_exponent: float = 0.0,
) -> SparseDictionaryData:
    """Draw a random unit dictionary and N activations with i.i.d. sparse codes.

    Active coefficients are uniform on [0.5, 1.5]; inactive ones are 0. A random offset
    (norm ``offset_scale``) is added so the decoder bias has something to learn.
    ``frequency_exponent`` s > 0 plants features of decreasing frequency (the Zipf-like
    support prior of the OSAE toy, s = 1.2 there): feature i is active with probability
    ∝ (i + 1)^-s, scaled so that ``mean_active`` features are active on average (each
    probability capped at 1), so row i of the dictionary is the i-th most frequent feature.
    s = 0: every feature with probability mean_active / n.
    """
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=gen)
    offset *= offset_scale / offset.norm()
    if frequency_exponent == 0.0:
        active = torch.rand(n_samples, n_features, generator=gen) < mean_active / n_features
    else:
        weights = torch.arange(1, n_features + 1, dtype=torch.float64) ** -frequency_exponent
        active = torch.rand(n_samples, n_features, generator=gen) < (mean_active * weights / weights.sum()).clamp(max=1.0).float()
    magnitude = 0.5 + torch.rand(n_samples, n_features, generator=gen)
    codes = active * magnitude
    return SparseDictionaryData(dictionary=dictionary, offset=offset, activations=codes @ dictionary + offset)


def mean_max_cosine(reference: Tensor, learned: Tensor) -> float:
    """Mean over rows of ``reference`` [n, d] of the max cosine to any row of ``learned`` [m, d]."""
    reference, learned = reference.detach().float(), learned.detach().float()
    ref = reference / reference.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    lrn = learned / learned.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return float((ref @ lrn.T).max(dim=1).values.mean())


def random_dictionary(n: int, d: int, seed: int = 12345) -> Tensor:
    """n random unit vectors in R^d (the chance baseline of :func:`mean_max_cosine`)."""
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True)


#: Per architecture: (SAEConfig overrides, TrainConfig overrides) that recover the default
#: synthetic dictionary (512 features in d = 64, 4 active on average) with 1024 latents.
SYNTHETIC_RECIPES: dict[str, tuple[dict, dict]] = {
    "relu": ({}, {"sparsity_coefficient": 0.3}),
    "topk": ({"k": 4}, {}),
    "batchtopk": ({"k": 4}, {}),
    "jumprelu": ({}, {"sparsity_coefficient": 0.2}),
    "gated": ({}, {"sparsity_coefficient": 1.0}),
    "matryoshka": ({"k": 4}, {}),
    "ordered": ({"k": 4}, {}),
}


@dataclass(frozen=True)
class RecoveryReport:
    """How well one trained SAE recovers the synthetic dictionary (held-out tokens)."""

    architecture: str
    recovery: float  # mean over true features of the max cosine to a learned decoder row
    random_recovery: float  # the same for a random dictionary of the same size
    explained_variance: float
    l0: float
    n_steps: int
    seconds: float


def synthetic_recovery(
    architecture: str,
    *,
    n_steps: int = 1200,
    d_sae: int = 1024,
    seed: int = 0,
    data: SparseDictionaryData | None = None,
    train_overrides: dict | None = None,
) -> tuple[RecoveryReport, "SAE"]:
    """Train one SAE of ``architecture`` on synthetic data with its recipe; report recovery."""
    import time

    from sae_core import metrics
    from sae_core.config import SAEConfig, TrainConfig
    from sae_core.training.trainer import train_sae

    if architecture not in SYNTHETIC_RECIPES:
        raise KeyError(f"no synthetic recipe for {architecture!r}; known: {sorted(SYNTHETIC_RECIPES)}")
    data = data or make_sparse_dictionary_data(n_samples=40_960, seed=seed)
    sae_kwargs, train_kwargs = SYNTHETIC_RECIPES[architecture]
    d = data.activations.shape[1]
    cfg = SAEConfig(architecture=architecture, d_in=d, d_sae=d_sae, **sae_kwargs)  # type: ignore[arg-type]
    train_cfg = TrainConfig(
        n_steps=n_steps,
        batch_size=512,
        lr=3e-3,
        warmup_steps=min(50, n_steps // 10),
        seed=seed,
        dead_tokens_threshold=50_000,
        log_every=max(n_steps // 10, 1),
        **{**train_kwargs, **(train_overrides or {})},
    )
    n_test = 8192
    train, test = data.activations[:-n_test], data.activations[-n_test:]
    start = time.perf_counter()
    sae = train_sae(cfg, train, train_cfg).sae
    seconds = time.perf_counter() - start
    with torch.no_grad():
        codes = sae.encode(test)
        recon = sae.decode(codes)
    report = RecoveryReport(
        architecture=architecture,
        recovery=mean_max_cosine(data.dictionary, sae.W_dec[0]),
        random_recovery=mean_max_cosine(data.dictionary, random_dictionary(d_sae, d)),
        explained_variance=metrics.explained_variance(test, recon),
        l0=metrics.l0(codes),
        n_steps=n_steps,
        seconds=seconds,
    )
    return report, sae
