"""Matryoshka SAE (Bussmann et al. 2025, arXiv 2503.17547; Nabeshima 2024): nested dictionaries.

One code z over all m latents (BatchTopK or per-token TopK, ``SAEConfig.matryoshka_code``) is
decoded by every nested prefix of the dictionary, m_1 < … < m_L = m
(``SAEConfig.prefix_fractions``, as fractions of d_sae), and the loss is the **sum** over the
prefixes of their reconstruction errors, as SAELens' ``MatryoshkaBatchTopKTrainingSAE`` adds
the inner reconstruction losses to the full one (dictionary_learning instead averages
weighted group losses, an effective 1/L² scale; under Adam only the balance against AuxK
differs):

    L = Σ_l ||a − (z[:m_l] W_dec[:m_l] + b_dec)||² + α · AuxK.

The first latents must reconstruct on their own, so they learn the most general directions
and later latents refine them. Inference is that of the inner code: BatchTopK's learned
threshold θ (saved as ``threshold``) or TopK. Prefix sizes come from fractions, so the
expanded SAE of J·d_sae latents (:func:`sae_core.training.ensembles.expanded_config`) has
prefixes of the same shape, J times as wide.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from sae_core.config import SAEConfig, TrainConfig
from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, activity_kwargs, squared_error
from sae_core.saes.batchtopk import BatchTopKSAE, batch_topk_codes
from sae_core.saes.topk import auxk_loss, topk_codes

#: dictionary_learning's group_fractions (1/16, 1/8, 1/4, 9/16), cumulated into prefix ends
DEFAULT_PREFIX_FRACTIONS: tuple[float, ...] = (0.0625, 0.1875, 0.4375, 1.0)


def prefix_sizes(fractions: tuple[float, ...], d_sae: int) -> list[int]:
    """The prefix widths m_l = max(1, round(f_l · d_sae)); a ValueError when two coincide.

    >>> prefix_sizes((0.25, 0.5, 1.0), 8)
    [2, 4, 8]
    """
    sizes = [max(1, round(f * d_sae)) for f in fractions]
    if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[-1] != d_sae:
        raise ValueError(
            f"prefix_fractions {list(fractions)} give prefix widths {sizes} at d_sae={d_sae}, which are not strictly "
            "increasing up to d_sae; use fewer or wider prefixes, or a larger d_sae"
        )
    return sizes


def prefix_reconstructions(codes: Tensor, W_dec: Tensor, b_dec: Tensor, sizes: list[int]) -> list[Tensor]:
    """Every prefix's reconstruction z[:m_l] W_dec[:m_l] + b_dec, built up group by group.

    codes [J, B, m], W_dec [J, m, d], b_dec [J, d] -> L tensors [J, B, d]; the groups'
    products together cost one full decode.
    """
    out, start = [], 0
    partial = b_dec[:, None, :]  # as decode_members: a bf16 product is added to the fp32 bias, not the reverse
    for end in sizes:
        partial = partial + torch.bmm(codes[:, :, start:end], W_dec[:, start:end])
        out.append(partial)
        start = end
    return out


@register_architecture("matryoshka")
class MatryoshkaSAE(SAE):
    """Nested-prefix reconstruction losses over one BatchTopK or TopK code (module docstring)."""

    sparsity = "k"
    config_fields: ClassVar[dict[str, object]] = {"prefix_fractions": DEFAULT_PREFIX_FRACTIONS, "matryoshka_code": "batchtopk"}

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """The prefixes must be distinct at this d_sae (a ValueError says how to fix it)."""
        assert cfg.prefix_fractions is not None
        prefix_sizes(cfg.prefix_fractions, cfg.d_sae)

    def __init__(self, cfg: SAEConfig, n_members: int = 1) -> None:
        super().__init__(cfg, n_members)
        if cfg.matryoshka_code == "batchtopk":
            self.register_buffer("threshold", torch.full((n_members,), -1.0))

    @property
    def prefix_sizes(self) -> list[int]:
        """m_1 < … < m_L = d_sae."""
        assert self.cfg.prefix_fractions is not None
        return prefix_sizes(self.cfg.prefix_fractions, self.cfg.d_sae)

    @property
    def _batch_code(self) -> bool:
        return self.cfg.matryoshka_code == "batchtopk"

    def _init_extra(self, train_cfg: TrainConfig) -> None:
        if self._batch_code:
            self.threshold.fill_(-1.0)

    def activation(self, pre: Tensor) -> Tensor:
        assert self.cfg.k is not None
        if self._batch_code:
            return torch.relu(pre) * (pre > self.threshold[:, None, None])
        return topk_codes(pre, self.cfg.k)

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        assert self.cfg.k is not None
        pre = self.pre_activation(a)
        if self._batch_code:
            codes = batch_topk_codes(pre, self.cfg.k)
            if ctx.update_statistics:
                # the same EMA of the smallest kept activation as BatchTopK (it reads only self.threshold)
                BatchTopKSAE.update_threshold(self, codes.detach(), ctx.train_cfg.batchtopk_threshold_rate)  # type: ignore[arg-type]
        else:
            codes = topk_codes(pre, self.cfg.k)
        recons = prefix_reconstructions(codes, self.W_dec, self.b_dec, self.prefix_sizes)
        prefix_mse = torch.stack([squared_error(a, r) for r in recons])  # [L, J]
        recon = recons[-1]
        aux_k = ctx.train_cfg.auxk_latents(self.cfg.d_sae)
        aux = auxk_loss(self, pre, (a - recon).detach(), ctx.dead_mask, aux_k)
        per_member = prefix_mse.sum(0) + ctx.train_cfg.aux_coefficient * aux
        stats = {"threshold": self.threshold.detach().clone()} if self._batch_code else {}
        return LossOutput(
            per_member=per_member,
            terms={"mse": prefix_mse[-1].detach(), "prefix_mse": prefix_mse.sum(0).detach(), "auxk": aux.detach()},
            reconstruction=recon,
            **activity_kwargs(codes),
            stats=stats,
        )
