"""TopK SAE (Gao et al. 2024) with the AuxK loss for dead latents."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_core.numerics import NORM_EPS
from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, squared_error
from sae_core.saes.sparse import selected_pre_activations, sparse_decode


def topk_codes(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest pre-activations of each token (ReLU'd), zero the rest: [..., m]."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def _auxk_scale(residual: Tensor, dead_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """(min(n_dead / k_aux, 1), mean_t ||e - mean(e)||²) per member: [J], [J]."""
    centered = residual.float() - residual.float().mean(1, keepdim=True)
    denom = centered.pow(2).sum(-1).mean(-1).clamp_min(NORM_EPS)
    return (dead_mask.sum(-1).float() / k_aux).clamp(max=1.0), denom


def auxk_loss(sae: SAE, pre: Tensor, residual: Tensor, dead_mask: Tensor | None, aux_k: int) -> Tensor:
    """AuxK: reconstruct the detached residual from the top ``aux_k`` dead latents.

    pre [J, B, m], residual = (a - â) detached [J, B, d], dead_mask [J, m] -> [J].
    Per member: min(n_dead / aux_k, 1) · mean_t ||e - ê||² / mean_t ||e - mean(e)||²,
    with ê = z_aux W_dec (no bias). Normalising by the residual's variance (as OpenAI's
    reference does) makes the coefficient independent of the activation scale.
    This is the dense reference; :func:`sparse_auxk_loss` is its fast twin.
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
    scale, denom = _auxk_scale(residual, dead_mask, k_aux)
    return scale * err / denom


def sparse_auxk_loss(sae: SAE, pre: Tensor, a: Tensor, residual: Tensor, dead_mask: Tensor | None, aux_k: int) -> Tensor:
    """:func:`auxk_loss` touching only the ``aux_k`` selected dead latents per token.

    ``pre`` is the dense pre-activation computed without a graph; the gradient reaches
    W_enc, b_enc, b_dec through :func:`selected_pre_activations` and W_dec through
    :func:`sparse_decode`. Latents that are not dead (picked only when fewer than aux_k
    are dead) get the value 0, as in the dense version.
    """
    J = pre.shape[0]
    if dead_mask is None or not bool(dead_mask.any()):
        return torch.zeros(J, device=pre.device)
    k_aux = min(aux_k, pre.shape[-1])
    with torch.no_grad():
        masked = torch.relu(pre) * dead_mask[:, None, :].to(pre.dtype)
        indices = masked.topk(k_aux, dim=-1, sorted=False).indices
        is_dead = dead_mask[:, None, :].expand(-1, pre.shape[1], -1).gather(-1, indices)
    selected = selected_pre_activations(pre, indices, a, sae.W_enc, sae.b_enc, sae.b_dec, sae.cfg.apply_b_dec_to_input)
    values = torch.relu(selected) * is_dead.to(selected.dtype)
    e_hat = sparse_decode(values, indices, sae.W_dec, torch.zeros_like(sae.b_dec))
    err = squared_error(residual, e_hat)
    scale, denom = _auxk_scale(residual, dead_mask, k_aux)
    return scale * err / denom


@register_architecture("topk")
class TopKSAE(SAE):
    """c = TopK_k(W_enc^T (a - b_dec) + b_enc), the kept values ReLU'd.

    Loss: ||a - â||² + α · AuxK (α = ``aux_coefficient``, default 1/32).
    """

    sparsity = "k"

    def activation(self, pre: Tensor) -> Tensor:
        assert self.cfg.k is not None
        return topk_codes(pre, self.cfg.k)

    #: The sparse kernels pay off only when few latents are active: gathering m rows per
    #: token (embedding_bag, fp32) costs more per multiply-add than a dense bf16 product.
    #: Above this fraction of active latents the dense step runs (the break-even point
    #: measured with bench_training.py; README, "Measurements behind design choices").
    sparse_max_fraction: float = 1 / 32

    def _sparse_pays(self, m: int) -> bool:
        return m <= self.sparse_max_fraction * self.cfg.d_sae

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        """Sparse step when ``train_cfg.fast_paths`` and k / d_sae <= ``sparse_max_fraction``.

        The dense pre-activations are computed without a graph; the k selected entries
        per token carry the gradient (:func:`selected_pre_activations`) and are decoded
        from k decoder rows (:func:`sparse_decode`); AuxK likewise if its aux_k latents
        are few enough, else densely from a graph-carrying pre-activation (only on steps
        with dead latents). Otherwise, and with ``fast_paths=False``, the plain dense
        autograd step runs (same loss and gradients, tested).
        """
        assert self.cfg.k is not None
        aux_k = ctx.train_cfg.aux_k or max(self.cfg.d_in // 2, 1)
        if ctx.train_cfg.fast_paths and self._sparse_pays(self.cfg.k):
            with torch.no_grad():
                # the bias is added in place, in the product's dtype: under bf16 autocast an
                # out-of-place add would promote the whole [J, B, m] tensor to fp32
                pre = torch.bmm(self.centered_input(a), self.W_enc)
                pre += self.b_enc.to(pre.dtype)[:, None, :]
                indices = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
            selected = selected_pre_activations(pre, indices, a, self.W_enc, self.b_enc, self.b_dec, self.cfg.apply_b_dec_to_input)
            values = torch.relu(selected)
            recon = sparse_decode(values, indices, self.W_dec, self.b_dec)
            residual = (a - recon).detach()
            if self._sparse_pays(min(aux_k, self.cfg.d_sae)):
                aux = sparse_auxk_loss(self, pre, a, residual, ctx.dead_mask, aux_k)
            elif ctx.dead_mask is not None and bool(ctx.dead_mask.any()):
                aux = auxk_loss(self, self.pre_activation(a), residual, ctx.dead_mask, aux_k)
            else:
                aux = torch.zeros(self.n_members, device=a.device)
        else:
            pre = self.pre_activation(a)
            topk = pre.topk(self.cfg.k, dim=-1, sorted=False)
            indices, values = topk.indices, torch.relu(topk.values)
            recon = self.decode_members(torch.zeros_like(pre).scatter(-1, indices, values))
            aux = auxk_loss(self, pre, (a - recon).detach(), ctx.dead_mask, aux_k)
        mse = squared_error(a, recon)
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
