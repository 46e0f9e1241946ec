"""ReLU SAE with an L1 (or annealed L_p^p) penalty weighted by decoder row norms."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, activity_kwargs, lp_sparsity, squared_error


@register_architecture("relu")
class ReLUSAE(SAE):
    """c = ReLU(W_enc^T (a - b_dec) + b_enc).

    Loss per token: ||a - â||² + λ Σ_i (c_i ||f_i||)^p, with p = 1 unless p-annealing is on.
    Weighting by ||f_i|| keeps the penalty meaningful when decoder rows are not unit norm.
    """

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        codes = self.encode_members(a)
        recon = self.decode_members(codes)
        mse = squared_error(a, recon)
        norms = self.decoder_norms()
        sparsity = lp_sparsity(codes, norms, ctx.p)
        per_member = mse + ctx.sparsity_coefficient * sparsity
        stats = {}
        if ctx.p_next is not None:
            with torch.no_grad():
                stats["sparsity_next_p"] = lp_sparsity(codes, norms, ctx.p_next)
        return LossOutput(
            per_member=per_member,
            terms={"mse": mse.detach(), "sparsity": sparsity.detach()},
            reconstruction=recon,
            **activity_kwargs(codes),
            stats={"sparsity_current_p": sparsity.detach(), **stats},
        )
