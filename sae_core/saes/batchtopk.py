"""BatchTopK SAE (Bussmann et al. 2024): top B·k activations per batch, a threshold at inference."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_core.config import SAEConfig, TrainConfig
from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, activity_kwargs, squared_error
from sae_core.saes.topk import auxk_loss


def batch_topk_codes(pre: Tensor, k: int) -> Tensor:
    """Per member, keep the B·k largest ReLU'd pre-activations of the whole batch: [J, B, m]."""
    J, B, m = pre.shape
    flat = torch.relu(pre).reshape(J, B * m)
    values, indices = flat.topk(B * k, dim=-1, sorted=False)
    return torch.zeros_like(flat).scatter(-1, indices, values).reshape(J, B, m)


@register_architecture("batchtopk")
class BatchTopKSAE(SAE):
    """Training: the B·k largest ReLU'd pre-activations across the batch (mean L0 = k).

    Inference (``encode``): c_i = ReLU(π_i) · 1[π_i > θ] with one learned threshold θ per
    member. θ is an exponential moving average (rate ``batchtopk_threshold_rate``) of the
    smallest positive activation the batch top-k kept; the first estimate is taken as is.
    It is saved as ``threshold`` in sae.safetensors. θ < 0 means "not estimated yet", in
    which case every positive pre-activation passes.
    """

    sparsity = "k"

    def __init__(self, cfg: SAEConfig, n_members: int = 1) -> None:
        super().__init__(cfg, n_members)
        self.register_buffer("threshold", torch.full((n_members,), -1.0))

    def _init_extra(self, train_cfg: TrainConfig) -> None:
        self.threshold.fill_(-1.0)

    def activation(self, pre: Tensor) -> Tensor:
        theta = self.threshold[:, None, None]
        return torch.relu(pre) * (pre > theta)

    @torch.no_grad()
    def update_threshold(self, kept_codes: Tensor, rate: float) -> None:
        """EMA update of θ from the smallest positive kept activation of each member."""
        positive = kept_codes.float() > 0
        big = torch.finfo(torch.float32).max
        batch_min = torch.where(positive, kept_codes.float(), torch.full_like(kept_codes, big, dtype=torch.float32))
        batch_min = batch_min.flatten(1).min(-1).values  # [J]
        has_any = positive.flatten(1).any(-1)
        fresh = self.threshold < 0
        updated = torch.where(fresh, batch_min, (1 - rate) * self.threshold + rate * batch_min)
        self.threshold.copy_(torch.where(has_any, updated, self.threshold))

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        assert self.cfg.k is not None
        pre = self.pre_activation(a)
        codes = batch_topk_codes(pre, self.cfg.k)
        if ctx.update_statistics:
            self.update_threshold(codes.detach(), ctx.train_cfg.batchtopk_threshold_rate)
        recon = self.decode_members(codes)
        mse = squared_error(a, recon)
        aux_k = ctx.train_cfg.auxk_latents(self.cfg.d_sae)
        aux = auxk_loss(self, pre, (a - recon).detach(), ctx.dead_mask, aux_k)
        per_member = mse + ctx.train_cfg.aux_coefficient * aux
        return LossOutput(
            per_member=per_member,
            terms={"mse": mse.detach(), "auxk": aux.detach()},
            reconstruction=recon,
            **activity_kwargs(codes),
            stats={"threshold": self.threshold.detach().clone()},
        )
