"""Gated SAE (Rajamanoharan et al. 2024) with weight-shared gate and magnitude paths."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_core.config import SAEConfig, TrainConfig
from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, activity_kwargs, lp_sparsity, squared_error


@register_architecture("gated")
class GatedSAE(SAE):
    """Gate and magnitude share W_enc (saved names follow SAELens):

        π_gate = W_enc^T (a − b_dec) + b_gate          f_gate = 1[π_gate > 0]
        π_mag  = exp(r_mag) ⊙ W_enc^T (a − b_dec) + b_mag   f_mag = ReLU(π_mag)
        c = f_gate ⊙ f_mag,   â = W_dec^T c + b_dec

    Loss per token: ||a − â||² + λ Σ_i (ReLU(π_gate)_i ||f_i||)^p
    + ||a − (W_dec^T ReLU(π_gate) + b_dec)_frozen||², where the auxiliary reconstruction
    uses a detached copy of W_dec and b_dec, so it trains only the gate path.
    """

    sparsity = "l1"

    encoder_bias_name = "b_gate"

    def __init__(self, cfg: SAEConfig, n_members: int = 1) -> None:
        super().__init__(cfg, n_members)
        self.r_mag = nn.Parameter(torch.zeros(n_members, cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(n_members, cfg.d_sae))

    @torch.no_grad()
    def _init_extra(self, train_cfg: TrainConfig) -> None:
        self.r_mag.zero_()
        self.b_mag.zero_()

    def gate_and_magnitude(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """(π_gate, π_mag), both [J, B, m], from one shared matmul."""
        xw = torch.bmm(self.centered_input(a), self.W_enc)
        dt = xw.dtype  # keep bf16 under autocast (see SAE.pre_activation)
        pi_gate = xw + self.b_gate.to(dt)[:, None, :]
        pi_mag = xw * torch.exp(self.r_mag).to(dt)[:, None, :] + self.b_mag.to(dt)[:, None, :]
        return pi_gate, pi_mag

    def pre_activation(self, a: Tensor) -> Tensor:
        """The gate pre-activation π_gate (what decides which latents are active)."""
        return self.gate_and_magnitude(a)[0]

    def encode_members(self, a: Tensor) -> Tensor:
        pi_gate, pi_mag = self.gate_and_magnitude(a)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError("a gated SAE's codes need both paths: call encode / encode_members")

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        pi_gate, pi_mag = self.gate_and_magnitude(a)
        codes = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        recon = self.decode_members(codes)
        mse = squared_error(a, recon)
        gate_acts = torch.relu(pi_gate)
        norms = self.decoder_norms()
        sparsity = lp_sparsity(gate_acts, norms, ctx.p)
        W_frozen, b_frozen = self.W_dec.detach(), self.b_dec.detach()
        aux_recon = torch.bmm(gate_acts, W_frozen) + b_frozen[:, None, :]
        aux = squared_error(a, aux_recon)
        per_member = mse + ctx.sparsity_coefficient * sparsity + aux
        stats = {"sparsity_current_p": sparsity.detach()}
        if ctx.p_next is not None:
            with torch.no_grad():
                stats["sparsity_next_p"] = lp_sparsity(gate_acts, norms, ctx.p_next)
        return LossOutput(
            per_member=per_member,
            terms={"mse": mse.detach(), "sparsity": sparsity.detach(), "aux": aux.detach()},
            reconstruction=recon,
            **activity_kwargs(codes),
            stats=stats,
        )
