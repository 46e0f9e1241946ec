"""Sparse training kernels: work only on the latents a token actually uses.

A TopK SAE keeps m = k of d_sae latents per token (m ≪ d_sae). Its plain autograd step
still does dense work on all d_sae latents three times: the scatter into a dense code
matrix, the decoder product, and in the backward pass the dense encoder products
x^T · ∂pre and ∂pre · W_encᵀ. The two functions here do that work on the m selected
latents only:

* :func:`sparse_decode` — Σ_i v_i f_{idx_i} + b_dec with ``embedding_bag`` (reads m decoder
  rows per token; its backward touches only those rows).
* :func:`selected_pre_activations` — the pre-activations π_{t,idx} at given indices, with
  a hand-written backward that scatters the gradient into W_enc, b_enc (and b_dec) from
  the m selected entries per token: O(B·m·d) instead of O(B·d_sae·d).

The selection itself (``topk`` of the dense pre-activations) is computed once, without a
graph. Both are tested against the dense autograd twin (``tests/test_gradients.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _member_offsets(indices: Tensor, k: int) -> Tensor:
    """[J, 1, 1] offsets j·k that make per-member latent indices unique across members."""
    return (torch.arange(indices.shape[0], device=indices.device) * k)[:, None, None]


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Σ_i v_i f_{idx_i} + b_dec from only the active latents: [J, B, m] values/indices -> [J, B, d].

    The fast twin of ``decode_members(scatter(values))``: one ``embedding_bag`` over the
    member-offset rows of W_dec reads m rows per token instead of multiplying a dense
    [B, m] code matrix, in the forward pass and in both backward products (the
    gradient of W_dec is accumulated only into the rows that were used).
    """
    J, k, d = W_dec.shape
    B, m = values.shape[1], values.shape[2]
    out = F.embedding_bag(
        (indices + _member_offsets(indices, k)).reshape(J * B, m).to(torch.int32),
        W_dec.reshape(J * k, d),
        per_sample_weights=values.reshape(J * B, m).to(W_dec.dtype),
        mode="sum",
    )
    return out.view(J, B, d) + b_dec[:, None, :]


class _SelectedPreActivations(torch.autograd.Function):
    """π[j, t, idx] = (x_t − b_dec)·W_enc[:, idx] + b_enc[idx], differentiable in W_enc, b_enc, b_dec.

    Forward gathers from the dense pre-activations already computed (no second product).
    Backward, with g = ∂L/∂π at the selected entries (m per token):

    * ∂b_enc[i]  = Σ_{(t,s): idx=i} g_{t,s}                         (index_add)
    * ∂W_enc[:, i] = Σ_{(t,s): idx=i} g_{t,s} (x_t − b_dec)          (embedding_bag over tokens
      grouped by latent: B·m·d multiply-adds, not B·d_sae·d)
    * ∂b_dec     = −W_enc ∂b_enc when the input is centred (Σ_t of ∂x_c collapses to a mat-vec)
    * ∂x_t       = Σ_s g_{t,s} W_enc[:, idx_{t,s}] only if x needs a gradient.
    """

    @staticmethod
    def forward(ctx, pre: Tensor, indices: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, centre: bool):
        ctx.save_for_backward(indices, x, W_enc, b_dec)
        ctx.centre = centre
        return pre.gather(-1, indices).to(W_enc.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        indices, x, W_enc, b_dec = ctx.saved_tensors
        J, d, k = W_enc.shape
        B, m = indices.shape[1], indices.shape[2]
        g = grad.to(W_enc.dtype).reshape(-1)
        flat = (indices + _member_offsets(indices, k)).reshape(-1)  # entry (j, t, s) -> latent j·k + idx
        d_b_enc = torch.zeros(J * k, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, flat, g).view(J, k)

        d_W_enc = None
        if ctx.needs_input_grad[3]:
            xc = (x - b_dec[:, None, :]) if ctx.centre else x
            # int32 keys: torch sorts them with a radix sort, far faster than int64 keys
            order = flat.to(torch.int32).argsort()
            counts = torch.bincount(flat, minlength=J * k)
            bag_starts = (counts.cumsum(0) - counts).to(torch.int32)
            rows = F.embedding_bag(
                torch.div(order, m, rounding_mode="floor").to(torch.int32),  # token row (j·B + t) of each entry
                xc.reshape(J * B, d).to(W_enc.dtype),
                bag_starts,
                mode="sum",
                per_sample_weights=g[order],
            )  # [J·m, d]: row i = Σ g · x_c over the tokens that selected latent i
            d_W_enc = rows.view(J, k, d).transpose(1, 2)

        d_x = None
        if ctx.needs_input_grad[2]:
            d_x = F.embedding_bag(
                flat.view(J * B, m).to(torch.int32), W_enc.transpose(1, 2).reshape(J * k, d), mode="sum",
                per_sample_weights=g.view(J * B, m),
            ).view(J, B, d)
        d_b_dec = None
        if ctx.centre and ctx.needs_input_grad[5]:
            d_b_dec = -torch.bmm(W_enc, d_b_enc[:, :, None]).squeeze(-1)
        return None, None, d_x, d_W_enc, d_b_enc if ctx.needs_input_grad[4] else None, d_b_dec, None


def selected_pre_activations(
    pre: Tensor, indices: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, centre: bool
) -> Tensor:
    """The pre-activations at ``indices`` ([J, B, m]) with the sparse backward above.

    pre: the dense pre-activations [J, B, m] computed without a graph (any dtype; the
    result is in W_enc's dtype). x: the input [J, B, d]; ``centre`` says whether the
    encoder sees x − b_dec (``apply_b_dec_to_input``).
    """
    return _SelectedPreActivations.apply(pre.detach(), indices, x, W_enc, b_enc, b_dec, centre)
