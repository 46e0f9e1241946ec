"""ReLU SAE with an L1 (or annealed L_p^p) penalty weighted by decoder row norms."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from sae_core.numerics import NORM_EPS
from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, activity_kwargs, lp_sparsity, squared_error


def _compute_dtype(device_type: str = "cpu") -> torch.dtype:
    """bf16 inside a bf16 autocast region of ``device_type`` (the input's device: "cpu", "cuda"), else fp32."""
    if not torch.amp.is_autocast_available(device_type):
        return torch.float32
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def _count_active(codes: Tensor, block: int = 256) -> Tensor:
    """Per member and latent, the number of tokens with a positive code: [J, B, m] -> [J, m] fp32.

    Summed in blocks of 256 tokens so that each partial count is exact even in bf16
    (integers up to 256 are representable), then accumulated in fp32.
    """
    signs = codes.ceil().clamp_max_(1)  # codes >= 0: 1 where positive; faster than sign() on bf16
    counts = torch.zeros(codes.shape[0], codes.shape[2], device=codes.device)
    for start in range(0, codes.shape[1], block):
        counts += signs[:, start : start + block].sum(1).float()
    return counts


class _FusedReLUStep(torch.autograd.Function):
    """The whole ReLU-SAE loss (p = 1) with a hand-written backward: the lean training step.

    Outputs per member [J]: mse = mean_t ||x_t − x̂_t||² and sparsity = mean_t Σ_i c_ti ||f_i||,
    plus (not differentiable) the reconstruction, the fired mask and the L0.

    What makes it lean, compared with autograd over the same formulas:

    * dtypes are chosen, not promoted: the five products and every pass over the [J, B, m]
      codes run in the compute dtype (bf16 under autocast; the encoder bias is added in
      that dtype, where autograd would promote the whole code matrix to fp32), while
      everything of width d (the error, the loss, b_dec) and all reductions stay fp32;
      parameters and their gradients stay fp32 (fp32 master weights, see below).
    * five products instead of six: the gradient of b_dec through the centred input needs
      Σ_t ∂x_c,t = W_enc ∂b_enc (a mat-vec), not the product ∂π · W_encᵀ.
    * the sparsity term needs only the column sums of the codes: Σ_t c_t · ||f|| (one pass).
    * ReLU's mask is read from the codes themselves (c > 0 ⇔ π > 0); no mask is stored.

    Why fp32 master weights with bf16 compute rather than bf16 parameters: Adam's updates
    at lr ~1e-4 are below bf16's resolution for weights of size ~0.05, so bf16 parameters
    would silently stop training; the casts of W_enc and W_dec cost 2·d·k elements per
    step, negligible next to the B·d·k products.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, centre: bool, dtype: torch.dtype,
                log_statistics: bool):
        J, B, _ = x.shape
        # autocast off on the input's device (CPU or CUDA): the dtypes below are chosen by
        # hand (``dtype``), and the backward is written for exactly these dtypes
        no_autocast = torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type) else nullcontext()
        with no_autocast:
            xc = (x - b_dec[:, None, :]) if centre else x
            xc_c = xc.to(dtype)
            W_enc_c, W_dec_c = W_enc.to(dtype), W_dec.to(dtype)
            codes = torch.baddbmm(b_enc.to(dtype)[:, None, :], xc_c, W_enc_c).relu_()  # [J, B, m]
            recon = torch.bmm(codes, W_dec_c).float().add_(b_dec[:, None, :])
            err = recon - x
            mse = err.pow(2).sum(-1).mean(-1)
            # reductions over the batch in the codes' dtype (fp32 accumulation inside, one
            # rounding at the end): sum(..., dtype=float32) would first copy the whole
            # [J, B, m] matrix to fp32, and count_nonzero is much slower than this
            col_sums = codes.sum(1).float()  # [J, m]
            norms = W_dec.norm(dim=-1)  # [J, m]
            sparsity = (col_sums * norms).sum(-1) / B
            # exact L0 costs a pass over the codes: only on logged steps
            l0 = _count_active(codes).sum(-1) / B if log_statistics else torch.full((J,), float("nan"), device=x.device)
        ctx.save_for_backward(x, xc_c, codes, W_enc, W_enc_c, W_dec, W_dec_c, err, col_sums, norms)
        ctx.centre = centre
        ctx.mark_non_differentiable(recon, l0)
        return mse, sparsity, recon, col_sums > 0, l0

    @staticmethod
    def backward(ctx, g_mse: Tensor, g_sparsity: Tensor, _recon, _fired, _l0):
        x, xc_c, codes, W_enc, W_enc_c, W_dec, W_dec_c, err, col_sums, norms = ctx.saved_tensors
        J, B, _ = x.shape
        dtype = codes.dtype
        g_mse = torch.zeros(J, device=x.device) if g_mse is None else g_mse.float()
        g_sparsity = torch.zeros(J, device=x.device) if g_sparsity is None else g_sparsity.float()
        d_recon = err * (2.0 / B * g_mse)[:, None, None]  # [J, B, d] fp32
        d_recon_c = d_recon.to(dtype)
        d_W_dec = None
        if ctx.needs_input_grad[3]:  # not for a frozen decoder (TrainConfig.freeze_decoder)
            d_W_dec = torch.bmm(codes.transpose(1, 2), d_recon_c).float()  # [J, m, d]
            # ||f_i|| term of the sparsity: d/dW_dec[i] of (Σ_t c_ti / B) ||f_i||
            safe = norms.clamp_min(NORM_EPS)
            d_W_dec += (g_sparsity[:, None] * col_sums / B / safe)[:, :, None] * W_dec
        d_codes = torch.bmm(d_recon_c, W_dec_c.transpose(1, 2))  # [J, B, m]
        d_codes += (g_sparsity[:, None] * norms / B).to(dtype)[:, None, :]
        d_pre = torch.ops.aten.threshold_backward(d_codes, codes, 0)  # zero where the unit is off
        d_b_enc = d_pre.sum(1).float()
        d_W_enc = torch.bmm(xc_c.transpose(1, 2), d_pre).float()  # [J, d, m]
        d_b_dec = d_recon.sum(1)
        if ctx.centre:
            d_b_dec -= torch.bmm(W_enc, d_b_enc[:, :, None]).squeeze(-1)
        d_x = None
        if ctx.needs_input_grad[0]:
            d_xc = torch.bmm(d_pre, W_enc_c.transpose(1, 2)).float()
            d_x = d_xc - d_recon
        return d_x, d_W_enc, d_b_enc, d_W_dec, d_b_dec, None, None, None


@register_architecture("relu")
class ReLUSAE(SAE):
    """c = ReLU(W_enc^T (a - b_dec) + b_enc).

    Loss per token: ||a - â||² + λ Σ_i (c_i ||f_i||)^p, with p = 1 unless p-annealing is on.
    Weighting by ||f_i|| keeps the penalty meaningful when decoder rows are not unit norm.
    """

    sparsity = "l1"

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        """The fused step (:class:`_FusedReLUStep`) when ``fast_paths`` and p = 1; else plain autograd."""
        if ctx.train_cfg.fast_paths and ctx.p == 1.0 and ctx.p_next is None:
            mse, sparsity, recon, fired, l0 = _FusedReLUStep.apply(
                a, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.cfg.apply_b_dec_to_input, _compute_dtype(a.device.type),
                ctx.log_statistics,
            )
            return LossOutput(
                per_member=mse + ctx.sparsity_coefficient * sparsity,
                terms={"mse": mse.detach(), "sparsity": sparsity.detach()},
                reconstruction=recon,
                fired=fired,
                l0=l0,
                stats={"sparsity_current_p": sparsity.detach()},
            )
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
