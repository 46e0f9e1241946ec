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


def top_dead_latents(pre: Tensor, dead_mask: Tensor | None, aux_k: int) -> tuple[Tensor, Tensor] | None:
    """Per token, the dead latents AuxK uses, found among the dead columns only (no gradient).

    pre [J, B, m], dead_mask [J, m] -> (indices [J, B, k'], is_dead [J, B, k'] bool) with
    k' = min(aux_k, max_j n_dead_j): the k' dead latents of largest ReLU'd pre-activation. A
    member with fewer than k' dead latents gets padding entries (is_dead False, value 0), as
    the dense version picks live latents at value 0. None when no latent is dead. Only the
    n_dead columns are searched, so a large aux_k (d_sae / 2) with few dead latents costs little.
    """
    if dead_mask is None:
        return None
    with torch.no_grad():
        n_dead = dead_mask.sum(-1)  # [J]
        n_max = int(n_dead.max())
        if n_max == 0:
            return None
        J, B, _ = pre.shape
        dead_idx = torch.argsort((~dead_mask).to(torch.int8), dim=-1, stable=True)[:, :n_max]  # dead first
        valid = torch.arange(n_max, device=pre.device)[None, :] < n_dead[:, None]  # [J, n_max]
        candidates = torch.relu(pre.detach().gather(-1, dead_idx[:, None, :].expand(J, B, n_max)))
        candidates *= valid[:, None, :].to(candidates.dtype)
        picked = candidates.topk(min(aux_k, n_max), dim=-1, sorted=False).indices
        indices = dead_idx[:, None, :].expand(J, B, n_max).gather(-1, picked)
        is_dead = valid[:, None, :].expand(J, B, n_max).gather(-1, picked)
    return indices, is_dead


def sparse_auxk_loss(
    sae: SAE, pre: Tensor, a: Tensor, residual: Tensor, dead_mask: Tensor | None, aux_k: int,
    top: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """:func:`auxk_loss` touching only the selected dead latents per token (:func:`top_dead_latents`).

    ``pre`` is the dense pre-activation, either computed without a graph (the gradient then
    reaches W_enc, b_enc, b_dec through :func:`selected_pre_activations`) or carrying one
    (the selected entries are gathered from it); W_dec gets its gradient through
    :func:`sparse_decode`. ``top``: the selection, if already computed.
    """
    J = pre.shape[0]
    top = top if top is not None else top_dead_latents(pre, dead_mask, aux_k)
    if top is None:
        return torch.zeros(J, device=pre.device)
    assert dead_mask is not None
    indices, is_dead = top
    if pre.requires_grad:
        selected = pre.gather(-1, indices)
    else:
        selected = selected_pre_activations(pre, indices, a, sae.W_enc, sae.b_enc, sae.b_dec, sae.cfg.apply_b_dec_to_input)
    values = torch.relu(selected) * is_dead.to(selected.dtype)
    e_hat = sparse_decode(values, indices, sae.W_dec, torch.zeros_like(sae.b_dec))
    err = squared_error(residual, e_hat)
    scale, denom = _auxk_scale(residual, dead_mask, min(aux_k, pre.shape[-1]))
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

    def _fast_auxk(self, pre: Tensor, a: Tensor, residual: Tensor, dead_mask: Tensor | None, aux_k: int) -> Tensor:
        """AuxK of the fast step: sparse over the picked dead latents when they are few, else dense.

        ``pre`` [J, B, m] may carry a graph (dense main step) or not (sparse main step).
        """
        top = top_dead_latents(pre, dead_mask, aux_k)
        if top is None:
            return torch.zeros(self.n_members, device=a.device)
        if self._sparse_pays(top[0].shape[-1]):
            return sparse_auxk_loss(self, pre, a, residual, dead_mask, aux_k, top)
        return auxk_loss(self, pre if pre.requires_grad else self.pre_activation(a), residual, dead_mask, aux_k)

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        """Sparse step when ``train_cfg.fast_paths`` and k / d_sae <= ``sparse_max_fraction``.

        The dense pre-activations are computed without a graph; the k selected entries
        per token carry the gradient (:func:`selected_pre_activations`) and are decoded
        from k decoder rows (:func:`sparse_decode`). Otherwise the plain dense autograd
        step runs. With ``fast_paths``, AuxK (only on steps with dead latents) searches the
        dead columns only and decodes its picks sparsely if they are few enough, else it
        runs densely (:meth:`_fast_auxk`). ``fast_paths=False`` runs the plain dense
        autograd step and AuxK (same loss and gradients, tested).
        """
        assert self.cfg.k is not None
        aux_k = ctx.train_cfg.auxk_latents(self.cfg.d_sae)
        fast = ctx.train_cfg.fast_paths
        if fast and self._sparse_pays(self.cfg.k):
            with torch.no_grad():
                # the bias is added in place, in the product's dtype: under bf16 autocast an
                # out-of-place add would promote the whole [J, B, m] tensor to fp32
                pre = torch.bmm(self.centered_input(a), self.W_enc)
                pre += self.b_enc.to(pre.dtype)[:, None, :]
                indices = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
            selected = selected_pre_activations(pre, indices, a, self.W_enc, self.b_enc, self.b_dec, self.cfg.apply_b_dec_to_input)
            values = torch.relu(selected)
            recon = sparse_decode(values, indices, self.W_dec, self.b_dec)
        else:
            pre = self.pre_activation(a)
            topk = pre.topk(self.cfg.k, dim=-1, sorted=False)
            indices, values = topk.indices, torch.relu(topk.values)
            recon = self.decode_members(torch.zeros_like(pre).scatter(-1, indices, values))
        residual = (a - recon).detach()
        if fast:
            aux = self._fast_auxk(pre, a, residual, ctx.dead_mask, aux_k)
        else:
            aux = auxk_loss(self, pre, residual, ctx.dead_mask, aux_k)
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
