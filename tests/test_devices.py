"""Every kernel runs on every device as on the CPU (issue 18; SPEC §5, §12).

Parametrized over :func:`sae_core.devices.available_devices`: the CPU always, CUDA when
torch sees it. The reference is always the CPU module; on a CPU-only machine the device
run is a second CPU run (trivially equal), on a GPU box these tests are the check that
the architectures, ensembles, pooling, the splice and extraction run there and agree.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sae_core import SAEConfig, TrainConfig, build_sae
from sae_core.config import PAnnealConfig
from sae_core.devices import DEVICE_SETTINGS, autocast, available_devices, resolve_device, supports_bf16
from sae_core.ensemble import Ensemble
from sae_core.io import load_ensemble, load_sae, save_ensemble, save_sae
from sae_core.registry import architecture_sparsity, architectures
from sae_core.saes.base import LossContext
from sae_core.training.schedules import PAnnealer

DEVICES = available_devices()
D, M, J, B = 16, 128, 2, 64
RTOL = 1e-5
BF16_RTOL = 5e-2


# ------------------------------------------------------------------- resolve_device
def test_resolve_device_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", "", "cpu:0"])
def test_resolve_device_rejects_unknown_settings_naming_the_allowed_ones(bad):
    with pytest.raises(ValueError) as err:
        resolve_device(bad)
    assert DEVICE_SETTINGS in str(err.value) and repr(bad) in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:3"])
def test_resolve_device_cuda_without_cuda_is_a_clear_error(setting):
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device(setting)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_device_names_the_cuda_devices_there_are():
    n = torch.cuda.device_count()
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=f"only {n} CUDA device"):
        resolve_device(f"cuda:{n}")


# ---------------------------------------------------------------------- SAE kernels
def _cfg(arch: str) -> SAEConfig:
    # k / d_sae = 1/32: TopK's sparse kernels run (sparse_max_fraction)
    return SAEConfig(architecture=arch, d_in=D, d_sae=M, k=4 if architecture_sparsity(arch) == "k" else None)


def _reference(arch: str, seed: int = 0):
    """A J-member SAE initialised from seeded CPU generators, and a batch [J, B, d]."""
    sae = build_sae(_cfg(arch), n_members=J)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(J, B, D, generator=gen) * 2 + 0.5
    sae.initialize([torch.Generator().manual_seed(seed + 1 + j) for j in range(J)], b_dec=a[0].mean(0),
                   train_cfg=TrainConfig(n_steps=10, jumprelu_init_threshold=0.05))
    with torch.no_grad():  # off the init's symmetry (W_enc ∝ W_decᵀ, zero biases) so every term is exercised
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return sae, a


def _context(sae, device, *, fast: bool, p: float = 1.0, p_next: float | None = None) -> LossContext:
    train_cfg = TrainConfig(n_steps=10, fast_paths=fast, sparsity_coefficient=0.3)
    dead = torch.zeros(J, M, dtype=torch.bool)
    dead[:, ::3] = True  # AuxK has dead latents to use
    return LossContext(train_cfg=train_cfg, sparsity_coefficient=torch.full((J,), 0.3, device=device), p=p, p_next=p_next,
                       dead_mask=dead.to(device))


def _step(sae, a, ctx):
    """One step's loss output and the gradients of every parameter (on the module's device)."""
    sae.zero_grad(set_to_none=True)
    out = sae.training_loss(a, ctx)
    out.loss.backward()
    return out, {n: p.grad for n, p in sae.named_parameters() if p.grad is not None}


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL, what: str = "") -> None:
    """``got`` (any device) equals ``want`` (CPU) to ``rtol`` relative to the tensor's scale."""
    got = got.detach().cpu().float()
    want = want.detach().float()
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def _cases():
    for arch in architectures():
        sparsity = architecture_sparsity(arch)
        for fast in (True, False):
            yield arch, fast, 1.0, None
        if sparsity == "l1":  # p-annealing: the autograd path with the next exponent's norms
            yield arch, True, 0.8, 0.7


CASES = list(_cases())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,fast,p,p_next", CASES, ids=[f"{a}-{'fast' if f else 'plain'}-p{p}" for a, f, p, _ in CASES])
def test_training_step_on_the_device_equals_the_cpu(device, arch, fast, p, p_next):
    cpu, a = _reference(arch)
    dev = copy.deepcopy(cpu).to(device)
    want, want_grads = _step(cpu, a, _context(cpu, "cpu", fast=fast, p=p, p_next=p_next))
    got, got_grads = _step(dev, a.to(device), _context(dev, device, fast=fast, p=p, p_next=p_next))
    assert got.per_member.device.type == torch.device(device).type
    assert_close(got.per_member, want.per_member, what="loss")
    for name in want.terms:
        assert_close(got.terms[name], want.terms[name], what=name)
    for name in want.stats:
        assert_close(got.stats[name], want.stats[name], what=name)
    assert_close(got.reconstruction, want.reconstruction, what="reconstruction")
    assert torch.equal(got.fired.cpu(), want.fired)
    assert_close(got.l0, want.l0, what="l0")
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        assert_close(got_grads[name], g, what=f"grad {name}")
    for name, buf in cpu.named_buffers():  # running statistics (BatchTopK's threshold) moved alike
        assert_close(dict(dev.named_buffers())[name], buf, what=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", architectures())
def test_encode_decode_and_constraints_on_the_device_equal_the_cpu(device, arch):
    cpu, a = _reference(arch)
    if arch == "batchtopk":  # an estimated threshold, so inference uses it
        cpu.training_loss(a, _context(cpu, "cpu", fast=True))
    dev = copy.deepcopy(cpu).to(device)
    for name, t in [*dev.named_parameters(), *dev.named_buffers()]:
        assert t.device.type == torch.device(device).type, name
    codes = cpu.encode(a)
    assert_close(dev.encode(a.to(device)), codes, what="codes")
    assert_close(dev.decode(codes.to(device)), cpu.decode(codes), what="decode")
    single = cpu.member(1)
    assert_close(dev.member(1).encode(a[1].to(device)), single.encode(a[1]), what="member codes")
    assert dev.member(1).device == dev.device and type(dev).stack([dev.member(0), dev.member(1)]).device == dev.device
    # the step's constraints: gradient projection and renormalisation
    train_cfg = TrainConfig(n_steps=10)
    for module, x in ((cpu, a), (dev, a.to(device))):
        _step(module, x, _context(module, x.device, fast=True))
        module.project_decoder_gradient()
        with torch.no_grad():
            module.W_dec.sub_(module.W_dec.grad * 0.1)
        module.after_optimizer_step(train_cfg)
    assert_close(dev.W_dec, cpu.W_dec, what="W_dec after a projected step")


@pytest.mark.parametrize("arch", architectures())
def test_kernels_create_every_tensor_on_the_inputs_device(arch):
    """On torch's "meta" device (shapes without data) a tensor created without ``device=``
    lands on the CPU and mixing it in raises: the CPU-only machine's check of what the CUDA
    runs above check on a GPU box. Paths that read a value on the host (AuxK's dead-latent
    count) cannot run on meta and are left to those runs; an op without a meta kernel
    (``bincount`` in the sparse TopK backward) ends the check after the forward."""
    meta = torch.device("meta")
    for fast in (True, False):
        for log in (True, False):
            sae = build_sae(_cfg(arch), n_members=J).to(meta)
            train_cfg = TrainConfig(n_steps=10, fast_paths=fast)
            ctx = LossContext(train_cfg=train_cfg, sparsity_coefficient=torch.full((J,), 0.3, device=meta), log_statistics=log)
            out = sae.training_loss(torch.randn(J, B, D, device=meta), ctx)
            for t in (out.per_member, out.reconstruction, out.fired, out.l0, *out.terms.values(), *out.stats.values()):
                assert t.device == meta
            try:
                out.loss.backward()
            except NotImplementedError as err:
                assert "Meta" in str(err) and arch == "topk" and fast, err
                continue
            assert all(p.grad is None or p.grad.device == meta for p in sae.parameters())
            sae.project_decoder_gradient()
            sae.after_optimizer_step(train_cfg)
    for method in ("bagging", "boosting"):
        ens = Ensemble(build_sae(_cfg(arch), n_members=J), method).to(meta)
        x = torch.randn(5, D, device=meta)
        # (Ensemble.prefix checks its weights on the host: left to the CUDA runs)
        for t in (ens.encode(x), ens.forward(x), ens.decode(ens.encode(x)), ens.latent_member(), ens.prefix_alpha(1),
                  ens.member(0).encode(x), *ens.member_codes_and_outputs(x)):
            assert t.device == meta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_bf16_autocast_step_on_the_device_is_close_to_the_fp32_cpu_step(device, arch):
    dev_type = torch.device(device)
    if not supports_bf16(dev_type):
        pytest.skip(f"{device} has no bf16")
    cpu, a = _reference(arch)
    dev = copy.deepcopy(cpu).to(device)
    want, want_grads = _step(cpu, a, _context(cpu, "cpu", fast=True))
    with autocast(dev_type):
        got, got_grads = _step(dev, a.to(device), _context(dev, device, fast=True))
    assert_close(got.per_member, want.per_member, BF16_RTOL, "loss")
    for name, g in want_grads.items():  # the direction of every gradient survives bf16
        cos = torch.nn.functional.cosine_similarity(got_grads[name].cpu().flatten().float(), g.flatten(), dim=0)
        assert float(cos) > 0.98, (name, float(cos))
        assert got_grads[name].dtype == torch.float32  # fp32 master weights get fp32 gradients


@pytest.mark.parametrize("device", DEVICES)
def test_initialisation_is_the_same_on_every_device(device):
    from sae_core.init import initial_b_dec

    acts = torch.randn(300, D, generator=torch.Generator().manual_seed(3))
    for method in ("geometric_median", "mean", "zeros"):
        assert_close(initial_b_dec(acts.to(device), method, 100), initial_b_dec(acts, method, 100), what=method)
    cpu = build_sae(_cfg("topk"), n_members=J)
    dev = build_sae(_cfg("topk"), n_members=J).to(device)
    for module in (cpu, dev):
        module.initialize([torch.Generator().manual_seed(j) for j in range(J)], b_dec=initial_b_dec(acts, "mean", 100))
    for name, t in cpu.state_dict().items():
        assert torch.equal(dev.state_dict()[name].cpu(), t), name  # drawn on the CPU generators: bit-identical


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["bagging", "boosting"])
def test_ensemble_on_the_device_equals_the_cpu_and_saves_the_same_files(device, method, tmp_path):
    members, a = _reference("topk")
    cpu = Ensemble(members, method).eval()
    dev = copy.deepcopy(cpu).to(device)
    assert dev.alpha.device.type == torch.device(device).type
    x = a[0]
    assert_close(dev.forward(x.to(device)), cpu.forward(x), what="forward")
    codes = dev.encode(x.to(device))
    assert_close(codes, cpu.encode(x), what="codes")
    assert_close(dev.decode(codes), dev.forward(x.to(device)), what="decode(encode) == forward")
    prefix = dev.prefix(1)
    assert prefix.device == dev.device and prefix.prefix_alpha(1).device == dev.alpha.device
    assert_close(prefix.forward(x.to(device)), cpu.prefix(1).forward(x), what="prefix")
    assert dev.latent_member().device == dev.device
    # built from members already on the device: α follows them
    assert Ensemble(copy.deepcopy(members).to(device), method).alpha.device == dev.device
    # saved straight from the device, or after moving back: the same files, loaded onto the CPU
    save_ensemble(dev, tmp_path / "dev")
    save_ensemble(dev.to("cpu"), tmp_path / "cpu")
    for d in ("dev", "cpu"):
        loaded = load_ensemble(tmp_path / d)
        assert loaded.device == torch.device("cpu")
        assert_close(loaded.forward(x), cpu.forward(x), 0.0, "reloaded")
    single = copy.deepcopy(members.member(0)).to(device)
    save_sae(single, tmp_path / "single")
    assert torch.equal(load_sae(tmp_path / "single").W_enc, members.member(0).W_enc)


@pytest.mark.parametrize("device", DEVICES)
def test_p_annealer_reads_norms_on_the_device(device):
    cfg = PAnnealConfig(p_start=1.0, p_end=0.5, start_step=1, end_step=3, n_updates=2, queue_length=3)
    results = []
    for where in ("cpu", device):
        annealer = PAnnealer(cfg, n_steps=5, base_coefficient=0.1, n_members=J)
        for step in range(5):
            cur = torch.tensor([1.0 + step, 2.0], device=where)
            annealer.record(cur, cur * 0.5 if annealer.p_next is not None else None)
            annealer.advance(step)
        scalars, tensors = annealer.state()
        assert all(t.device.type == "cpu" for t in tensors.values())
        results.append((annealer.p, annealer.coefficient))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


# ----------------------------------------------------------- pooling, SCR, the splice
@pytest.mark.parametrize("device", DEVICES)
def test_pooled_codes_on_the_device_equal_the_cpu(device):
    from sae_core.probing import IdentityDictionary, pooled_codes, pooled_member_codes, prefix_pooled_codes
    from sae_core.scr import ablate_pooled, latent_scores

    members, a = _reference("relu")
    ens = Ensemble(members, "bagging").eval()
    acts = a.reshape(-1, D)
    index = torch.arange(acts.shape[0]) % 7
    want = pooled_codes(ens, acts, index, 7, batch_size=50)
    dev = copy.deepcopy(ens).to(device)
    got = pooled_codes(dev, acts, index, 7, batch_size=50)
    assert got.device.type == "cpu"
    assert_close(got, want, what="pooled codes")
    moved = copy.deepcopy(ens)
    assert_close(pooled_codes(moved, acts, index, 7, batch_size=50, device=device), want, what="explicit device")
    assert moved.device.type == torch.device(device).type  # an explicit device moves the SAE there
    got_members = pooled_member_codes(dev, acts.numpy(), index.numpy(), 7, batch_size=50)
    assert_close(prefix_pooled_codes(got_members, dev.prefix_alpha(2)), want, what="prefix codes")
    raw = pooled_codes(IdentityDictionary(D), acts, index, 7, device=device)
    assert_close(raw, pooled_codes(IdentityDictionary(D), acts, index, 7), what="identity")
    # the SCR helpers take tensors on any device
    z = np.arange(7) % 2
    scores = latent_scores(want.to(device), z, dev.W_dec, np.ones(D))
    np.testing.assert_allclose(scores, latent_scores(want, z, ens.W_dec.detach(), np.ones(D)), rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(ablate_pooled(raw.to(device), want.to(device), dev.W_dec, np.array([0, 3])),
                               ablate_pooled(raw, want, ens.W_dec.detach(), np.array([0, 3])), rtol=RTOL, atol=1e-6)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("device", DEVICES)
def test_spliced_losses_on_the_device_equal_the_cpu(device, llama_dir):
    from sae_core.models import load_model
    from sae_core.splice import spliced_losses, zero_replacement

    ids = torch.tensor([[2, 10, 11, 12, 13, 14], [2, 20, 21, 22, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    splice = mask.bool() & (ids != 2)
    sae = build_sae(SAEConfig(architecture="relu", d_in=32, d_sae=64))
    sae.initialize([torch.Generator().manual_seed(0)])
    ens = Ensemble(sae, "single").eval()
    out = {}
    for where in ("cpu", device):
        loaded = load_model(str(llama_dir), 1, causal_lm=True)
        reps = {"clean": None, "zero": zero_replacement, "sae": copy.deepcopy(ens)}
        out[where] = spliced_losses(loaded.model, loaded.block, ids, mask, splice, reps, device=where)
        assert next(loaded.model.parameters()).device.type == torch.device(where).type
        assert reps["sae"].device.type == torch.device(where).type
    for name, want in out["cpu"].items():
        assert out[device][name].ce == pytest.approx(want.ce, rel=RTOL)
        assert out[device][name].kl == pytest.approx(want.kl, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_extraction_on_the_device_equals_the_cpu(device, llama_dir):
    from sae_core.extraction import extract_in_order, make_windows
    from sae_core.models import load_model
    from tests.tiny_models import TEXTS

    batches = []
    for where in ("cpu", device):
        loaded = load_model(str(llama_dir), 1, device=where)
        assert loaded.device.type == torch.device(where).type
        assert next(loaded.model.parameters()).device.type == loaded.device.type
        docs = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:5]]
        windows = [w for i, ids in enumerate(docs) for w in make_windows(i, ids, 8, loaded.prefix_ids, loaded.suffix_ids)]
        batches.append(extract_in_order(loaded, windows, 3))
    cpu, dev = batches
    assert dev.activation.dtype == np.float32 and isinstance(dev.activation, np.ndarray)
    assert np.array_equal(dev.token_id, cpu.token_id) and np.array_equal(dev.position, cpu.position)
    np.testing.assert_allclose(dev.activation, cpu.activation, rtol=1e-4, atol=1e-5)
