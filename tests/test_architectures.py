"""Hand-set weights: each architecture's nonlinearity does exactly what SPEC §5 says."""

from __future__ import annotations

import pytest
import torch

from sae_core import SAEConfig, TrainConfig, build_sae
from sae_core.saes.base import LossContext
from sae_core.saes.batchtopk import batch_topk_codes
from sae_core.saes.topk import topk_codes


def identity_sae(arch: str, d: int = 4, **cfg_kwargs):
    """An SAE with W_enc = I, W_dec = I and zero biases, so pre-activations equal the input."""
    sae = build_sae(SAEConfig(architecture=arch, d_in=d, d_sae=d, **cfg_kwargs))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d)[None])
        sae.W_dec.copy_(torch.eye(d)[None])
    return sae


def ctx(J: int = 1, **train_kwargs) -> LossContext:
    cfg = TrainConfig(n_steps=10, **train_kwargs)
    return LossContext(train_cfg=cfg, sparsity_coefficient=torch.full((J,), cfg.sparsity_coefficient))


def test_relu_codes_and_loss_by_hand():
    sae = identity_sae("relu")
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([[0.0, -1.0, 0.5, 0.0]]))
    a = torch.tensor([[1.0, 2.0, -3.0, 0.25]])
    codes = sae.encode(a)
    # pre = a + b_enc = [1, 1, -2.5, 0.25] -> ReLU
    assert torch.equal(codes, torch.tensor([[1.0, 1.0, 0.0, 0.25]]))
    out = sae.training_loss(a[None], ctx(sparsity_coefficient=0.5))
    recon = torch.tensor([1.0, 1.0, 0.0, 0.25])
    mse = float((a[0] - recon).pow(2).sum())  # 0 + 1 + 9 + 0 = 10
    assert mse == 10.0
    assert out.per_member.item() == pytest.approx(mse + 0.5 * 2.25)


def test_relu_l1_is_weighted_by_decoder_norms():
    sae = identity_sae("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None])  # row norms 1..4
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    out = sae.training_loss(a[None], ctx(sparsity_coefficient=1.0))
    assert out.terms["sparsity"].item() == pytest.approx(1 + 2 + 3 + 4)


def test_topk_keeps_exactly_the_k_largest():
    torch.manual_seed(0)
    pre = torch.randn(3, 50, 40) + 5.0  # all positive: exactly k non-zeros per token
    codes = topk_codes(pre, 7)
    assert torch.equal((codes != 0).sum(-1), torch.full((3, 50), 7))
    kth = pre.topk(7, dim=-1).values[..., -1:]
    assert torch.equal(codes != 0, pre >= kth)
    assert torch.equal(codes[codes != 0], pre[codes != 0])


def test_topk_sae_gives_k_active_latents_per_token():
    sae = identity_sae("topk", d=6, k=2)
    a = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.05], [5.0, 1.0, 4.0, 3.0, 2.0, 0.0]])
    codes = sae.encode(a)
    assert torch.equal(codes, torch.tensor([[0, 0.9, 0, 0.8, 0, 0], [5.0, 0, 4.0, 0, 0, 0]]))


def test_topk_drops_negative_winners():
    # if fewer than k pre-activations are positive, the negative winners are ReLU'd to 0
    sae = identity_sae("topk", d=3, k=2)
    codes = sae.encode(torch.tensor([[1.0, -1.0, -2.0]]))
    assert torch.equal(codes, torch.tensor([[1.0, 0.0, 0.0]]))


def test_batchtopk_keeps_top_batch_times_k_across_the_batch():
    pre = torch.tensor([[[5.0, 4.0, 0.1], [0.2, 0.3, 0.05]]])  # J=1, B=2, m=3, k=1 -> keep 2 overall
    codes = batch_topk_codes(pre, 1)
    assert torch.equal(codes, torch.tensor([[[5.0, 4.0, 0.0], [0.0, 0.0, 0.0]]]))


def test_batchtopk_threshold_first_estimate_then_ema_then_inference():
    sae = identity_sae("batchtopk", d=3, k=1)
    c = ctx(batchtopk_threshold_rate=0.5)
    a1 = torch.tensor([[[5.0, 4.0, 0.1], [0.2, 0.3, 0.05]]])
    sae.training_loss(a1, c)
    assert sae.threshold.item() == pytest.approx(4.0)  # smallest kept positive activation
    a2 = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    sae.training_loss(a2, c)
    assert sae.threshold.item() == pytest.approx(0.5 * 4.0 + 0.5 * 1.0)
    # inference: ReLU(pre) * 1[pre > theta], independent of the rest of the batch
    codes = sae.encode(torch.tensor([[2.6, 2.4, -1.0], [3.0, 0.0, 10.0]]))
    assert torch.equal(codes, torch.tensor([[2.6, 0.0, 0.0], [3.0, 0.0, 10.0]]))


def test_batchtopk_threshold_is_per_member():
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=2, d_sae=2, k=1), n_members=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2).expand(2, 2, 2))
        sae.W_dec.copy_(torch.eye(2).expand(2, 2, 2))
    a = torch.tensor([[[3.0, 1.0]], [[0.5, 0.25]]])  # B=1 per member, keep 1
    sae.training_loss(a, ctx(J=2))
    assert sae.threshold.tolist() == [3.0, 0.5]


def test_jumprelu_passes_only_above_threshold():
    sae = identity_sae("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([[0.5, 0.5, 2.0, 0.1]]))
    a = torch.tensor([[0.6, 0.5, 1.9, -3.0]])
    assert torch.equal(sae.encode(a), torch.tensor([[0.6, 0.0, 0.0, 0.0]]))
    out = sae.training_loss(a[None], ctx(sparsity_coefficient=2.0))
    assert out.terms["l0"].item() == 1.0
    recon_err = 0.5**2 + 1.9**2 + 3.0**2
    assert out.per_member.item() == pytest.approx(recon_err + 2.0 * 1.0)


def test_gated_gate_decides_support_magnitude_decides_value():
    sae = identity_sae("gated")
    with torch.no_grad():
        sae.b_gate.copy_(torch.tensor([[0.0, -1.0, 0.0, 0.0]]))
        sae.r_mag.copy_(torch.log(torch.tensor([[2.0, 2.0, 1.0, 1.0]])))
        sae.b_mag.copy_(torch.tensor([[0.0, 0.0, -5.0, 0.5]]))
    a = torch.tensor([[1.0, 0.5, 1.0, -0.2]])
    # gate: [1, -0.5, 1, -0.2] > 0 -> [1, 0, 1, 0]; magnitude: ReLU([2, 1, -4, 0.3])
    assert torch.allclose(sae.encode(a), torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    # the gated SAE is a JumpReLU with threshold b_mag - exp(r_mag) * b_gate (App. E)
    pi_gate, pi_mag = sae.gate_and_magnitude(a[None])
    theta = sae.b_mag - torch.exp(sae.r_mag) * sae.b_gate
    assert torch.equal(pi_gate > 0, pi_mag > theta[:, None, :])


def test_gated_loss_by_hand():
    sae = identity_sae("gated", d=2)
    a = torch.tensor([[[1.0, -2.0]]])
    out = sae.training_loss(a, ctx(sparsity_coefficient=0.5))
    # codes = [1, 0]; recon error 4; L1 of ReLU(gate) = 1; aux recon = [1, 0] -> error 4
    assert out.terms["mse"].item() == 4.0
    assert out.terms["sparsity"].item() == 1.0
    assert out.terms["aux"].item() == 4.0
    assert out.per_member.item() == pytest.approx(4.0 + 0.5 + 4.0)


def test_member_shape_rule_and_errors():
    sae = build_sae(SAEConfig(architecture="relu", d_in=4, d_sae=8), n_members=3)
    assert sae.encode(torch.zeros(3, 5, 4)).shape == (3, 5, 8)
    with pytest.raises(ValueError, match="holds 3 members"):
        sae.encode(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="width 5"):
        sae.encode(torch.zeros(3, 5, 5))
    single = build_sae(SAEConfig(architecture="relu", d_in=4, d_sae=8))
    assert single.encode(torch.zeros(5, 4)).shape == (5, 8)
    assert single.decode(torch.zeros(5, 8)).shape == (5, 4)


def test_auxk_loss_by_hand():
    from sae_core.saes.topk import auxk_loss

    sae = identity_sae("topk", d=3, k=1)
    pre = torch.tensor([[[2.0, 0.5, -1.0], [0.1, 3.0, 0.2]]])  # J=1, B=2
    residual = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    dead = torch.tensor([[False, True, True]])
    # aux_k = 1: token 0 keeps latent 1 (0.5), token 1 keeps latent 1 (3.0); ê = those codes on e_1
    # errors: ||(0, 0.5, 0)||² = 0.25, ||(0, -3, 1)||² = 10 -> mean 5.125
    # residual variance: mean e = (0, .5, .5); centred rows (0, .5, -.5), (0, -.5, .5) -> 0.5
    # scale = min(n_dead / aux_k, 1) = 1
    assert auxk_loss(sae, pre, residual, dead, aux_k=1).item() == pytest.approx(5.125 / 0.5)
    assert auxk_loss(sae, pre, residual, torch.zeros(1, 3, dtype=torch.bool), aux_k=1).item() == 0.0
    # with aux_k = 4 > n_dead = 2 the term is scaled by 2/3 (aux_k is capped at d_sae = 3)
    both = auxk_loss(sae, pre, residual, dead, aux_k=4).item()
    # token 0 keeps 0.5 on latent 1 (latent 2 is negative); token 1 keeps 3.0 and 0.2
    # errors: 0.25 and ||(0, -3, 0.8)||² = 9.64 -> mean 4.945
    assert both == pytest.approx((2 / 3) * 4.945 / 0.5)
