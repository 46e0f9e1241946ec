"""JumpReLU SAE (Rajamanoharan et al. 2024) trained with straight-through estimators.

Forward: c = JumpReLU_θ(z) = z · H(z − θ) with one threshold θ_i > 0 per latent, where
z = ReLU(π) is the ReLU'd pre-activation. The step function H has no useful gradient, so
the backward pass uses pseudo-derivatives with the rectangle kernel K(u) = 1[|u| < 1/2]
and bandwidth ε:

    ∂/∂θ JumpReLU_θ(z) := −(θ/ε) K((z − θ)/ε)      ∂/∂z JumpReLU_θ(z) := H(z − θ)
    ∂/∂θ H(z − θ)      := −(1/ε) K((z − θ)/ε)      ∂/∂z H(z − θ)      := 0

so the L0 penalty λ Σ_i H(z_i − θ_i) trains only the thresholds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Function

from sae_core.config import SAEConfig, TrainConfig
from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, activity_kwargs, squared_error


def rectangle_kernel(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of the tensor it came from."""
    while grad.ndim > len(shape):
        grad = grad.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim, keepdim=True)
    return grad


class JumpReLUFunction(Function):
    """z · H(z − θ) with the rectangle-kernel pseudo-derivative for θ."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_out * (z > threshold).to(grad_out.dtype)
        grad_theta = -(threshold / eps) * rectangle_kernel((z - threshold) / eps) * grad_out
        return grad_z, _reduce_to(grad_theta, threshold.shape), None


class StepFunction(Function):
    """H(z − θ) with the rectangle-kernel pseudo-derivative for θ and none for z."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle_kernel((z - threshold) / eps) * grad_out
        return torch.zeros_like(z), _reduce_to(grad_theta, threshold.shape), None


@register_architecture("jumprelu")
class JumpReLUSAE(SAE):
    """Loss per token: ||a − â||² + λ Σ_i H(z_i − θ_i) (λ = ``sparsity_coefficient``).

    The threshold is a parameter ``threshold`` [J, m] (saved as SAELens does).
    """

    sparsity = "l0"

    def __init__(self, cfg: SAEConfig, n_members: int = 1) -> None:
        super().__init__(cfg, n_members)
        self.threshold = nn.Parameter(torch.zeros(n_members, cfg.d_sae))

    @torch.no_grad()
    def _init_extra(self, train_cfg: TrainConfig) -> None:
        self.threshold.fill_(train_cfg.jumprelu_init_threshold)

    def activation(self, pre: Tensor) -> Tensor:
        z = torch.relu(pre)
        return z * (z > self.threshold[:, None, :].to(z.dtype)).to(z.dtype)

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        eps = ctx.train_cfg.jumprelu_bandwidth
        z = torch.relu(self.pre_activation(a))
        theta = self.threshold[:, None, :].to(z.dtype)
        codes = JumpReLUFunction.apply(z, theta, eps)
        recon = self.decode_members(codes)
        mse = squared_error(a, recon)
        l0 = StepFunction.apply(z, theta, eps).float().sum(-1).mean(-1)
        per_member = mse + ctx.sparsity_coefficient * l0
        return LossOutput(
            per_member=per_member,
            terms={"mse": mse.detach(), "l0": l0.detach()},
            reconstruction=recon,
            **activity_kwargs(codes),
        )
