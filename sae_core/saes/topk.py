"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead latents."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, squared_error


def topk_codes(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest pre-activations of each token (ReLU'd), zero the rest: [..., m]."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def auxk_loss(sae: SAE, pre: Tensor, residual: Tensor, dead_mask: Tensor | None, aux_k: int) -> Tensor:
    """AuxK: reconstruct the detached residual from the top ``aux_k`` dead latents.

    pre [J, B, k], residual = (a - â) detached [J, B, d], dead_mask [J, k] -> [J].
    Per member: min(n_dead / aux_k, 1) · mean_t ||e - ê||² / mean_t ||e - mean(e)||²,
    with ê = z_aux W_dec (no bias). Normalising by the residual's variance (as OpenAI's
    reference does) makes the coefficient independent of the activation scale.
    """
    J = pre.shape[0]
    if dead_mask is None or not bool(dead_mask.any()):
        return torch.zeros(J, device=pre.device)
    k_aux = min(aux_k, pre.shape[-1])
    masked = torch.relu(pre) * dead_mask[:, None, :].to(pre.dtype)
    values, indices = masked.topk(k_aux, dim=-1, sorted=False)
    aux_codes = torch.zeros_like(pre).scatter(-1, indices, values)
    e_hat = torch.bmm(aux_codes, sae.W_dec)
    err = squared_error(residual, e_hat)
    centered = residual.float() - residual.float().mean(1, keepdim=True)
    denom = centered.pow(2).sum(-1).mean(-1).clamp_min(1e-12)
    scale = (dead_mask.sum(-1).float() / k_aux).clamp(max=1.0)
    return scale * err / denom


@register_architecture("topk")
class TopKSAE(SAE):
    """c = TopK_k(W_enc^T (a - b_dec) + b_enc), the kept values ReLU'd.

    Loss: ||a - â||² + α · AuxK (α = ``aux_coefficient``, default 1/32).
    """

    def activation(self, pre: Tensor) -> Tensor:
        assert self.cfg.k is not None
        return topk_codes(pre, self.cfg.k)

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        pre = self.pre_activation(a)
        codes = self.activation(pre)
        recon = self.decode_members(codes)
        mse = squared_error(a, recon)
        aux_k = ctx.train_cfg.aux_k or max(self.cfg.d_in // 2, 1)
        aux = auxk_loss(self, pre, (a - recon).detach(), ctx.dead_mask, aux_k)
        per_member = mse + ctx.train_cfg.aux_coefficient * aux
        return LossOutput(
            per_member=per_member,
            terms={"mse": mse.detach(), "auxk": aux.detach()},
            codes=codes,
            reconstruction=recon,
        )
