"""Every estimator and hand-written gradient against a finite-difference or slow reference."""

from __future__ import annotations

import pytest
import torch

from sae_core import SAEConfig, TrainConfig, build_sae
from sae_core.saes.base import LossContext, lp_sparsity
from sae_core.saes.jumprelu import JumpReLUFunction, StepFunction
from sae_core.training.trainer import _clip_per_member

EPS = 0.5  # bandwidth: wide enough that many z fall inside the kernel


def smooth_step(u: torch.Tensor) -> torch.Tensor:
    """S_ε(u) = clamp(u/ε + 1/2, 0, 1): its derivative is (1/ε)·K(u/ε) with the rectangle kernel."""
    return (u / EPS + 0.5).clamp(0, 1)


def finite_difference(f, theta: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(theta)
    for i in range(theta.numel()):
        up, down = theta.clone(), theta.clone()
        up.view(-1)[i] += h
        down.view(-1)[i] -= h
        grad.view(-1)[i] = (f(up) - f(down)) / (2 * h)
    return grad


def sample(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.rand(2, 16, 5, generator=gen, dtype=torch.float64) * 2  # [J, B, k]
    theta = torch.rand(2, 1, 5, generator=gen, dtype=torch.float64) + 0.3
    w = torch.randn(2, 16, 5, generator=gen, dtype=torch.float64)  # upstream gradient
    return z, theta, w


def test_step_threshold_gradient_matches_finite_difference_of_smoothed_step():
    z, theta, w = sample()
    theta_p = theta.clone().requires_grad_(True)
    z_p = z.clone().requires_grad_(True)
    (StepFunction.apply(z_p, theta_p, EPS) * w).sum().backward()
    reference = finite_difference(lambda t: float((smooth_step(z - t) * w).sum()), theta)
    assert torch.allclose(theta_p.grad, reference, atol=1e-6)
    assert torch.equal(z_p.grad, torch.zeros_like(z))  # the L0 term does not train the encoder


def test_jumprelu_gradients_match_references():
    z, theta, w = sample(1)
    theta_p = theta.clone().requires_grad_(True)
    z_p = z.clone().requires_grad_(True)
    out = JumpReLUFunction.apply(z_p, theta_p, EPS)
    assert torch.equal(out, z * (z > theta))
    (out * w).sum().backward()
    # θ: pseudo-derivative -(θ/ε) K = d/dθ of θ0 · S_ε(z - θ) with the jump size θ0 held fixed
    reference = finite_difference(lambda t: float((theta * smooth_step(z - t) * w).sum()), theta)
    assert torch.allclose(theta_p.grad, reference, atol=1e-6)
    # z: the gradient passes where the unit is on
    assert torch.equal(z_p.grad, w * (z > theta))


def test_jumprelu_sae_l0_term_trains_only_thresholds():
    sae = build_sae(SAEConfig(architecture="jumprelu", d_in=6, d_sae=10))
    sae.initialize([torch.Generator().manual_seed(0)], train_cfg=TrainConfig(n_steps=1, jumprelu_init_threshold=0.3))
    a = torch.randn(1, 32, 6, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(n_steps=1, jumprelu_bandwidth=0.5)
    zero = LossContext(train_cfg=cfg, sparsity_coefficient=torch.zeros(1))
    one = LossContext(train_cfg=cfg, sparsity_coefficient=torch.ones(1))
    grads = []
    for c in (zero, one):
        sae.zero_grad()
        sae.training_loss(a, c).loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(grads[0][name], grads[1][name]), name
    assert not torch.equal(grads[0]["threshold"], grads[1]["threshold"])


def test_lp_sparsity_gradient_matches_finite_difference_and_is_finite_at_zero():
    gen = torch.Generator().manual_seed(2)
    codes = torch.relu(torch.randn(1, 8, 6, generator=gen, dtype=torch.float64))
    norms = torch.rand(1, 6, generator=gen, dtype=torch.float64) + 0.5
    for p in (1.0, 0.5, 0.2):
        c = codes.clone().requires_grad_(True)
        lp_sparsity(c, norms, p).sum().backward()
        assert torch.isfinite(c.grad).all()
        positive = codes > 0
        ref = finite_difference(lambda x: float(lp_sparsity(x, norms, p).sum()), codes, h=1e-7)
        assert torch.allclose(c.grad[positive], ref[positive], rtol=1e-4, atol=1e-6)
        if p < 1:  # x^p has an infinite slope at 0: those entries get no gradient, not NaN
            assert torch.equal(c.grad[~positive], torch.zeros_like(c.grad[~positive]))
        # value by hand: mean over tokens of sum_i (c_i ||f_i||)^p
        expected = torch.where(positive, (codes * norms[:, None, :]).clamp_min(1e-300) ** p, 0.0).sum(-1).mean(-1)
        assert torch.allclose(lp_sparsity(codes, norms, p), expected)


def test_gated_auxiliary_loss_does_not_reach_the_decoder():
    sae = build_sae(SAEConfig(architecture="gated", d_in=5, d_sae=7))
    sae.initialize([torch.Generator().manual_seed(3)])
    with torch.no_grad():
        sae.b_mag.fill_(0.1)
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(5))
    a = torch.randn(1, 20, 5, generator=torch.Generator().manual_seed(4))
    ctx = LossContext(train_cfg=TrainConfig(n_steps=1), sparsity_coefficient=torch.zeros(1))
    sae.training_loss(a, ctx).loss.backward()
    full = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    # the same loss without the auxiliary term, built by hand
    pi_gate, pi_mag = sae.gate_and_magnitude(a)
    codes = (pi_gate > 0).float() * torch.relu(pi_mag)
    (a - sae.decode_members(codes)).pow(2).sum(-1).mean().backward()
    assert torch.allclose(full["W_dec"], sae.W_dec.grad)
    # (b_dec still gets the auxiliary gradient through the encoder's input a - b_dec)
    assert not torch.allclose(full["W_enc"], sae.W_enc.grad)  # the aux term trains the gate


def test_decoder_gradient_projection_is_tangent_and_norm_kept():
    sae = build_sae(SAEConfig(architecture="relu", d_in=8, d_sae=12), n_members=2)
    sae.initialize([torch.Generator().manual_seed(s) for s in (0, 1)])
    sae.W_dec.grad = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(9))
    before = sae.W_dec.grad.clone()
    sae.project_decoder_gradient()
    g = sae.W_dec.grad
    assert torch.allclose((g * sae.W_dec).sum(-1), torch.zeros(2, 12), atol=1e-6)
    # the removed part is parallel to the row: before - after = (before . f) f
    removed = before - g
    assert torch.allclose(removed, (before * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec, atol=1e-6)
    with torch.no_grad():
        sae.W_dec.add_(g, alpha=-0.5)
    sae.after_optimizer_step(TrainConfig(n_steps=1))
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(2, 12), atol=1e-6)


def test_per_member_clipping_equals_torch_clip_grad_norm_for_each_member():
    gen = torch.Generator().manual_seed(0)
    stacked = [torch.nn.Parameter(torch.zeros(3, 4, 5)), torch.nn.Parameter(torch.zeros(3, 5))]
    for p in stacked:
        p.grad = torch.randn(p.shape, generator=gen) * torch.tensor([0.01, 1.0, 10.0]).view(-1, *[1] * (p.ndim - 1))
    singles = []
    for j in range(3):
        ps = [torch.nn.Parameter(torch.zeros(p.shape[1:])) for p in stacked]
        for p, s in zip(stacked, ps):
            s.grad = p.grad[j].clone()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        singles.append(ps)
    _clip_per_member(stacked, 1.0, 3)
    for j in range(3):
        for p, s in zip(stacked, singles[j]):
            assert torch.allclose(p.grad[j], s.grad, rtol=1e-6, atol=1e-8)


def _step_and_grads(sae, a: torch.Tensor, ctx: LossContext, bf16: bool):
    """One training loss (bf16 autocast optional) and every gradient: parameters and the input."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = sae.training_loss(a, ctx)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.requires_grad}
    return out, grads | {"input": a.grad.clone()}


def _topk_losses_and_grads(fast: bool, apply_b_dec_to_input: bool = True, bf16: bool = False, dead_fraction: float = 0.3,
                           sparse_max_fraction: float = 1.0, freeze_decoder: bool = False):
    """Loss output and every gradient (parameters and input) of one TopK step, fast or reference.

    k = 5 and aux_k = 6 of 40 latents: sparse_max_fraction 1.0 runs both sparse kernels;
    0.13 the sparse main step, with the sparse AuxK when at most 5 latents of a member are
    dead, else the dense AuxK; 0.1 the dense main step, with the sparse AuxK (gathered from
    the graph-carrying pre-activations) when at most 4 are dead, else the dense AuxK."""
    cfg = SAEConfig(architecture="topk", d_in=12, d_sae=40, k=5, apply_b_dec_to_input=apply_b_dec_to_input)
    sae = build_sae(cfg, n_members=3)
    sae.sparse_max_fraction = sparse_max_fraction
    sae.initialize([torch.Generator().manual_seed(s) for s in range(3)])
    sae.W_dec.requires_grad_(not freeze_decoder)
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(7))
        sae.b_enc.normal_(std=0.1, generator=torch.Generator().manual_seed(10))
    a = torch.randn(3, 64, 12, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    dead = torch.rand(3, 40, generator=torch.Generator().manual_seed(9)) < dead_fraction
    train_cfg = TrainConfig(n_steps=1, fast_paths=fast, aux_k=6)
    ctx = LossContext(train_cfg=train_cfg, sparsity_coefficient=torch.zeros(3), dead_mask=dead)
    return _step_and_grads(sae, a, ctx, bf16)


@pytest.mark.parametrize("sparse_max_fraction", [1.0, 0.13, 0.1])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("dead_fraction", [0.0, 0.05, 0.3])
def test_sparse_topk_training_step_equals_the_dense_autograd_step(apply_b_dec_to_input, dead_fraction, sparse_max_fraction):
    """The sparse TopK kernels (selected_pre_activations, sparse_decode, sparse AuxK) against
    the dense autograd step: same losses, reconstruction, activity and every gradient (fp32,
    rtol 1e-4). dead_fraction 0.05 leaves the three members 0, 2 and 4 dead latents, fewer
    than aux_k (6), so AuxK also picks live latents (dense) or padding (sparse), which must
    contribute nothing; 0.3 leaves 5, 11 and 12."""
    fast, fast_grads = _topk_losses_and_grads(True, apply_b_dec_to_input, dead_fraction=dead_fraction,
                                              sparse_max_fraction=sparse_max_fraction)
    slow, slow_grads = _topk_losses_and_grads(False, apply_b_dec_to_input, dead_fraction=dead_fraction)
    assert torch.allclose(fast.per_member, slow.per_member, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast.terms["auxk"], slow.terms["auxk"], rtol=1e-5, atol=1e-7)
    if dead_fraction > 0:
        assert bool((slow.terms["auxk"] > 0).any())  # the AuxK branch really ran
    assert torch.allclose(fast.reconstruction, slow.reconstruction, atol=1e-5)
    assert torch.equal(fast.fired, slow.fired) and torch.allclose(fast.l0, slow.l0)
    for name, g in slow_grads.items():
        assert torch.allclose(fast_grads[name], g, rtol=1e-4, atol=1e-6), name
        assert float(g.abs().max()) > 0 or name == "b_dec" and not apply_b_dec_to_input, name


def test_sparse_decode_equals_dense_decode_and_its_gradients():
    from sae_core.saes.sparse import sparse_decode

    gen = torch.Generator().manual_seed(3)
    W = torch.randn(2, 30, 7, generator=gen, requires_grad=True)
    b = torch.randn(2, 7, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(30, generator=gen)[:4] for _ in range(2 * 9)]).view(2, 9, 4)
    vals = torch.rand(2, 9, 4, generator=gen, requires_grad=True)
    w = torch.randn(2, 9, 7, generator=gen)
    (sparse_decode(vals, idx, W, b) * w).sum().backward()
    fast = [t.grad.clone() for t in (vals, W, b)]
    for t in (vals, W, b):
        t.grad = None
    dense = torch.zeros(2, 9, 30).scatter(-1, idx, vals)
    ((torch.bmm(dense, W) + b[:, None, :]) * w).sum().backward()
    for f, t in zip(fast, (vals, W, b)):
        assert torch.allclose(f, t.grad, atol=1e-5)


def _relu_losses_and_grads(fast: bool, apply_b_dec_to_input: bool = True, bf16: bool = False, freeze_decoder: bool = False):
    """Loss output and every gradient (parameters and input) of one ReLU step, fused or autograd."""
    cfg = SAEConfig(architecture="relu", d_in=12, d_sae=40, apply_b_dec_to_input=apply_b_dec_to_input)
    sae = build_sae(cfg, n_members=3)
    sae.initialize([torch.Generator().manual_seed(s) for s in range(3)])
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(7))
        sae.b_enc.normal_(std=0.3, generator=torch.Generator().manual_seed(10))
        sae.W_dec.mul_(torch.rand(3, 40, 1, generator=torch.Generator().manual_seed(11)) + 0.5)  # non-unit rows
    sae.W_dec.requires_grad_(not freeze_decoder)
    a = torch.randn(3, 64, 12, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    ctx = LossContext(train_cfg=TrainConfig(n_steps=1, fast_paths=fast), sparsity_coefficient=torch.tensor([0.5, 1.0, 2.0]))
    return _step_and_grads(sae, a, ctx, bf16)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_fused_relu_step_equals_the_autograd_step(apply_b_dec_to_input):
    """_FusedReLUStep's hand-written backward against autograd over the same loss (fp32,
    rtol 1e-4): losses, terms, reconstruction, activity and every gradient."""
    fast, fast_grads = _relu_losses_and_grads(True, apply_b_dec_to_input)
    slow, slow_grads = _relu_losses_and_grads(False, apply_b_dec_to_input)
    assert 0 < float(slow.l0.min()) < 40  # some units on, some off: the mask matters
    assert torch.allclose(fast.per_member, slow.per_member, rtol=1e-5)
    for name in ("mse", "sparsity"):
        assert torch.allclose(fast.terms[name], slow.terms[name], rtol=1e-5), name
    assert torch.allclose(fast.reconstruction, slow.reconstruction, atol=1e-5)
    assert torch.equal(fast.fired, slow.fired) and torch.allclose(fast.l0, slow.l0)
    for name, g in slow_grads.items():
        assert torch.allclose(fast_grads[name], g, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("arch, tolerance", [("topk", 5e-2), ("relu", 3e-2)])
def test_fast_steps_match_the_autograd_step_under_bf16_autocast(arch, tolerance):
    """Under bf16 autocast both fast steps add the encoder bias in bf16 (autograd promotes
    to fp32 there), so the two differ by bf16 rounding; for TopK a near-tie may also select
    another latent. Relative error of each whole gradient < 5e-2 (TopK) / 3e-2 (ReLU)."""
    losses_and_grads = {"topk": _topk_losses_and_grads, "relu": _relu_losses_and_grads}[arch]
    fast, fast_grads = losses_and_grads(True, bf16=True)
    slow, slow_grads = losses_and_grads(False, bf16=True)
    assert torch.allclose(fast.per_member, slow.per_member, rtol=2e-2)
    for name, g in slow_grads.items():
        err = float((fast_grads[name] - g).norm() / g.norm())
        assert err < tolerance, (name, err)


@pytest.mark.parametrize("step", ["relu", "topk_sparse", "topk_sparse_dense_auxk"])
def test_fast_steps_with_a_frozen_decoder_equal_the_autograd_step(step):
    """freeze_decoder: W_dec does not require a gradient. The fused ReLU step and the sparse
    TopK kernels then skip W_dec's gradient, and every other gradient equals the reference
    step's, frozen or not (freezing only drops W_dec's gradient)."""
    if step == "relu":
        run = _relu_losses_and_grads
    else:
        fraction = 1.0 if step == "topk_sparse" else 0.13

        def run(fast, freeze_decoder=False):
            return _topk_losses_and_grads(fast, sparse_max_fraction=fraction, freeze_decoder=freeze_decoder)

    fast, fast_grads = run(True, freeze_decoder=True)
    slow, slow_grads = run(False, freeze_decoder=True)
    _, unfrozen_grads = run(False)
    assert "W_dec" not in fast_grads and "W_dec" not in slow_grads and "W_dec" in unfrozen_grads
    assert torch.allclose(fast.per_member, slow.per_member, rtol=1e-5)
    for name, g in slow_grads.items():
        assert torch.allclose(fast_grads[name], g, rtol=1e-4, atol=1e-5), name
        assert torch.equal(g, unfrozen_grads[name]), name
