"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, squared_error


def topk_codes(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest pre-activations of each token (ReLU'd), zero the rest: [..., m]."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Σ_i v_i f_{idx_i} + b_dec from only the active latents: [J, B, m] values/indices -> [J, B, d].

    The fast twin of ``decode_members(scatter(values))``: one ``embedding_bag`` over the
    member-offset rows of W_dec reads m rows per token instead of multiplying a dense
    [B, k] code matrix, in the forward pass and in both backward products (the
    gradient of W_dec is accumulated only into the rows that were used).
    """
    J, k, d = W_dec.shape
    B, m = values.shape[1], values.shape[2]
    offsets = (torch.arange(J, device=indices.device) * k)[:, None, None]
    out = F.embedding_bag(
        (indices + offsets).reshape(J * B, m),
        W_dec.reshape(J * k, d),
        per_sample_weights=values.reshape(J * B, m).to(W_dec.dtype),
        mode="sum",
    )
    return out.view(J, B, d) + b_dec[:, None, :]


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
        """Trains on the k active latents only (:func:`sparse_decode`); dense codes are never built."""
        assert self.cfg.k is not None
        pre = self.pre_activation(a)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        values = torch.relu(values)
        recon = sparse_decode(values, indices, self.W_dec, self.b_dec)
        mse = squared_error(a, recon)
        aux_k = ctx.train_cfg.aux_k or max(self.cfg.d_in // 2, 1)
        aux = auxk_loss(self, pre, (a - recon).detach(), ctx.dead_mask, aux_k)
        per_member = mse + ctx.train_cfg.aux_coefficient * aux
        with torch.no_grad():
            positive = (values > 0).reshape(values.shape[0], -1)
            hits = torch.zeros(self.n_members, self.cfg.d_sae, device=a.device)
            hits.scatter_add_(1, indices.reshape(values.shape[0], -1), positive.float())
            l0 = (values > 0).sum(-1).float().mean(-1)
        return LossOutput(
            per_member=per_member,
            terms={"mse": mse.detach(), "auxk": aux.detach()},
            reconstruction=recon,
            fired=hits > 0,
            l0=l0,
        )
