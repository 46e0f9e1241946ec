"""Ensembles: batched bagging == separate SAEs, Proposition 1, boosting, expanded, save/load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sae_core import (
    Ensemble,
    SAEConfig,
    TrainConfig,
    build_sae,
    expanded_config,
    load_ensemble,
    save_ensemble,
    train_bagging,
    train_boosting,
    train_expanded,
    train_sae,
    train_single,
)
from sae_core.synthetic import make_sparse_dictionary_data
from sae_core.registry import architectures, uses_k

ARCHS = architectures()  # every registered architecture: a new file in sae_core/saes/ is tested here too


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return make_sparse_dictionary_data(n_features=64, d=16, n_samples=4096, seed=2).activations


def cfg_for(arch: str, d_sae: int = 48) -> SAEConfig:
    return SAEConfig(architecture=arch, d_in=16, d_sae=d_sae, **({"k": 3} if uses_k(arch) else {}))


def tcfg(**kw) -> TrainConfig:
    base = dict(n_steps=30, batch_size=128, lr=3e-3, sparsity_coefficient=0.1, warmup_steps=3,
                dead_tokens_threshold=512, b_dec_init_samples=512, log_every=10)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def ensembles(data) -> dict[tuple[str, str], Ensemble]:
    out = {}
    for arch in ARCHS:
        out[(arch, "bagging")] = train_bagging(cfg_for(arch), data, tcfg(), 3).ensemble
        out[(arch, "boosting")] = train_boosting(cfg_for(arch), data, tcfg(), 3).ensemble
    return out


# ------------------------------------------------------------------ bagging = singles
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bootstrap", [False, True])
def test_batched_bagging_equals_separately_trained_saes(arch, bootstrap, data):
    cfg, train_cfg = cfg_for(arch), tcfg(bootstrap=bootstrap, seed=1)
    ens = train_bagging(cfg, data, train_cfg, 3).ensemble
    assert ens.info.seeds == (3, 4, 5)  # run 1 of J=3: seeds {3, 4, 5}
    for j, seed in enumerate(ens.info.seeds):
        alone = train_sae(cfg, data, train_cfg, member_seeds=[seed]).sae
        member = ens.member(j)
        for name, tensor in alone.state_dict().items():
            assert torch.allclose(member.state_dict()[name], tensor, rtol=1e-4, atol=1e-5), (name, j)


def test_bootstrap_members_see_different_resamples(data):
    plain = train_bagging(cfg_for("relu"), data, tcfg(seed=0), 2).ensemble
    boot = train_bagging(cfg_for("relu"), data, tcfg(seed=0, bootstrap=True), 2).ensemble
    assert not torch.allclose(plain.members.W_dec, boot.members.W_dec)
    assert boot.info.bootstrap is True


# -------------------------------------------------------------------- Proposition 1
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["bagging", "boosting"])
def test_decode_of_encode_equals_forward(arch, method, ensembles, data):
    ens = ensembles[(arch, method)]
    a = data[:256]
    with torch.no_grad():
        codes = ens.encode(a)
        assert codes.shape == (256, 3 * 48) and ens.cfg.d_sae == 3 * 48
        if arch == "topk":  # every member activates k = 3, so the ensemble at most k·J = 9
            assert ens.cfg.k == 9 and bool(((codes != 0).sum(1) <= 9).all())
        assert torch.allclose(ens.decode(codes), ens(a), atol=1e-5)
        # forward is the α-weighted sum of the members' own outputs
        if method == "bagging":
            manual = sum(ens.member(j)(a) for j in range(3)) / 3
        else:
            manual, residual = torch.zeros_like(a), a
            for j in range(3):
                out = ens.member(j)(residual)
                manual, residual = manual + out, residual - out
        assert torch.allclose(ens(a), manual, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["bagging", "boosting"])
def test_concatenated_view_is_a_wide_decoder(arch, method, ensembles, data):
    ens = ensembles[(arch, method)]
    alpha = ens.alpha
    W = torch.cat([ens.member(j).W_dec[0] for j in range(3)])  # [3k, d]
    b = sum(alpha[j] * ens.member(j).b_dec[0] for j in range(3))
    assert torch.equal(ens.W_dec, W)
    assert torch.allclose(ens.b_dec, b)
    codes = torch.relu(torch.randn(10, 3 * 48, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(ens.decode(codes), codes @ W + b, atol=1e-5)
    # codes are the members' codes scaled by α, in member order
    with torch.no_grad():
        c = ens.encode(data[:8]).view(8, 3, 48)
        assert torch.allclose(c[:, 1], alpha[1] * ens.member_codes(data[:8])[1])


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_bagging_equals_one_wide_sae_built_from_concatenated_weights(arch, ensembles, data):
    """ReLU and JumpReLU are positively homogeneous, so α can be folded into one wide SAE."""
    ens = ensembles[(arch, "bagging")]
    J, k, alpha = 3, 48, 1 / 3
    wide = build_sae(SAEConfig(architecture=arch, d_in=16, d_sae=J * k, apply_b_dec_to_input=False))
    m = ens.members
    with torch.no_grad():
        wide.W_enc.copy_((alpha * m.W_enc).permute(1, 0, 2).reshape(1, 16, J * k))
        # member j encodes a - b_dec^(j): fold that centring into the encoder bias
        folded = m.b_enc - torch.einsum("jd,jdk->jk", m.b_dec, m.W_enc)
        wide.b_enc.copy_((alpha * folded).reshape(1, J * k))
        wide.W_dec.copy_(m.W_dec.reshape(1, J * k, 16))
        wide.b_dec.copy_(ens.b_dec[None])
        if arch == "jumprelu":
            wide.threshold.copy_((alpha * m.threshold).reshape(1, J * k))
        a = data[:256]
        assert torch.allclose(wide.encode(a), ens.encode(a), atol=1e-5)
        assert torch.allclose(wide(a), ens(a), atol=1e-5)


# ------------------------------------------------------------- the paper's claims
def test_boosting_error_does_not_increase_with_stages(data):
    train_cfg = tcfg(n_steps=300, lr=3e-3)
    ens = train_boosting(cfg_for("topk", d_sae=64), data, train_cfg, 4).ensemble
    with torch.no_grad():
        errors = [float((data - ens.prefix(j)(data)).pow(2).sum(1).mean()) for j in range(1, 5)]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.7 * errors[0], errors


def test_bagging_beats_its_average_member():
    big = make_sparse_dictionary_data(n_features=128, d=32, n_samples=16_384, seed=5).activations
    cfg = SAEConfig(architecture="relu", d_in=32, d_sae=96)
    ens = train_bagging(cfg, big, tcfg(n_steps=200, batch_size=256, sparsity_coefficient=0.3), 8).ensemble
    test = make_sparse_dictionary_data(n_features=128, d=32, n_samples=16_384, seed=5).activations[-2048:]
    with torch.no_grad():
        ens_mse = float((test - ens(test)).pow(2).sum(1).mean())
        member_mse = [float((test - ens.member(j)(test)).pow(2).sum(1).mean()) for j in range(8)]
    assert ens_mse < sum(member_mse) / 8, (ens_mse, member_mse)


# ---------------------------------------------------------------------- baselines
def test_expanded_baseline_matches_sparsity_and_records_it(data):
    assert expanded_config(cfg_for("topk"), 4).d_sae == 192 and expanded_config(cfg_for("topk"), 4).k == 12
    assert expanded_config(cfg_for("relu"), 4).k is None
    res = train_expanded(cfg_for("topk"), data, tcfg(n_steps=10), 4)
    ens = res.ensemble
    assert ens.method == "expanded" and ens.n_members == 1 and ens.d_sae == 192
    assert ens.info.to_json() == {"n_members_matched": 4, "d_sae": 192, "k": 12, "sparsity": "k x J",
                                  "compute_matched": False, "n_steps": 10}
    with torch.no_grad():
        assert torch.equal((ens.encode(data[:20] + 5) != 0).sum(1), torch.full((20,), 12))
    matched = train_expanded(cfg_for("relu"), data, tcfg(n_steps=10), 4, compute_matched=True)
    assert matched.ensemble.info.expanded.n_steps == 40 and matched.ensemble.info.expanded.sparsity == "same lambda (0.1)"
    assert len(matched.histories[0]) == 4  # logged at steps 10, 20, 30, 40


def test_single_is_an_ensemble_of_one(data):
    res = train_single(cfg_for("gated"), data, tcfg(n_steps=10))
    sae = train_sae(cfg_for("gated"), data, tcfg(n_steps=10)).sae
    with torch.no_grad():
        assert torch.equal(res.ensemble(data[:50]), sae(data[:50]))
        assert torch.equal(res.ensemble.encode(data[:50]), sae.encode(data[:50]))
    with pytest.raises(ValueError, match="exactly one member"):
        Ensemble(build_sae(cfg_for("relu"), n_members=2), "single")


def test_prefix_of_bagging_reweights_and_of_boosting_keeps_first_stages(ensembles, data):
    bag = ensembles[("relu", "bagging")].prefix(2)
    assert bag.alpha.tolist() == pytest.approx([0.5, 0.5])
    with torch.no_grad():
        expected = (ensembles[("relu", "bagging")].member(0)(data[:30]) + ensembles[("relu", "bagging")].member(1)(data[:30])) / 2
        assert torch.allclose(bag(data[:30]), expected, atol=1e-6)
    boost = ensembles[("topk", "boosting")]
    assert torch.equal(boost.prefix(2).W_dec, boost.W_dec[: 2 * 48])


# ------------------------------------------------------------------------ save/load
@pytest.mark.parametrize("method", ["bagging", "boosting"])
@pytest.mark.parametrize("arch", ARCHS)
def test_ensemble_round_trip_restores_identical_outputs(arch, method, ensembles, data, tmp_path):
    ens = ensembles[(arch, method)]
    save_ensemble(ens, tmp_path / "ens")
    meta = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert meta["method"] == method and meta["architecture"] == arch
    assert meta["members"] == ["member_00", "member_01", "member_02"]
    assert meta["alpha"] == pytest.approx(ens.alpha.tolist())
    loaded = load_ensemble(tmp_path / "ens")
    with torch.no_grad():
        assert torch.equal(loaded.encode(data[:64]), ens.encode(data[:64]))
        assert torch.equal(loaded(data[:64]), ens(data[:64]))


def test_ensemble_load_errors(ensembles, tmp_path):
    save_ensemble(ensembles[("relu", "bagging")], tmp_path / "ens")
    shutil.rmtree(tmp_path / "ens" / "member_01")
    with pytest.raises(FileNotFoundError, match=r"missing member directory \['member_01'\]"):
        load_ensemble(tmp_path / "ens")
    (tmp_path / "ens" / "ensemble.json").write_text("{}")
    with pytest.raises(ValueError, match="needs method, alpha and members"):
        load_ensemble(tmp_path / "ens")
    with pytest.raises(FileNotFoundError, match="not an ensemble directory"):
        load_ensemble(tmp_path)


def test_shape_errors(ensembles):
    ens = ensembles[("relu", "bagging")]
    with pytest.raises(ValueError, match=r"activations must be \[B, 16\]"):
        ens.encode(torch.zeros(3, 15))
    with pytest.raises(ValueError, match=r"codes must be \[B, 144\]"):
        ens.decode(torch.zeros(3, 48))
