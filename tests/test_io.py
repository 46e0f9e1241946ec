"""Save -> load round-trips bit for bit; bad files give errors that say what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_core import SAEConfig, TrainConfig, build_sae, load_sae, save_sae, train_sae
from sae_core.synthetic import make_sparse_dictionary_data
from sae_core.registry import architectures, uses_k

ARCHS = architectures()  # every registered architecture: a new file in sae_core/saes/ is tested here too


def trained(arch: str, n_members: int = 1):
    data = make_sparse_dictionary_data(n_features=32, d=8, n_samples=512, seed=0).activations
    cfg = SAEConfig(architecture=arch, d_in=8, d_sae=24, **({"k": 2} if uses_k(arch) else {}))
    tcfg = TrainConfig(n_steps=10, batch_size=64, lr=1e-2, sparsity_coefficient=0.1)
    return train_sae(cfg, data, tcfg, member_seeds=list(range(n_members))).sae, data


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_exact(arch, tmp_path):
    sae, data = trained(arch)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    with torch.no_grad():
        assert torch.equal(loaded.encode(data), sae.encode(data))
        assert torch.equal(loaded(data), sae(data))


def test_saved_layout_is_saelens_style(tmp_path):
    sae, _ = trained("topk")
    save_sae(sae, tmp_path / "sae")
    tensors = load_file(str(tmp_path / "sae" / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (8, 24), "b_enc": (24,), "W_dec": (24, 8), "b_dec": (8,)
    }
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 8 and cfg["d_sae"] == 24 and cfg["k"] == 2
    # training-only settings never leak into the saved config
    assert "lr" not in cfg and "sparsity_coefficient" not in cfg


def test_members_are_saved_one_by_one(tmp_path):
    stack, data = trained("gated", n_members=3)
    with pytest.raises(ValueError, match="holds 3 members; pass member=j"):
        save_sae(stack, tmp_path / "x")
    save_sae(stack, tmp_path / "m1", member=1)
    loaded = load_sae(tmp_path / "m1")
    with torch.no_grad():
        assert torch.equal(loaded.encode(data), stack.encode(data.expand(3, -1, -1))[1])
    restacked = type(stack).stack([stack.member(j) for j in range(3)])
    assert all(torch.equal(restacked.state_dict()[k], v) for k, v in stack.state_dict().items())


def test_overwrite_replaces_atomically_and_failed_write_leaves_old(tmp_path, monkeypatch):
    a, _ = trained("relu")
    save_sae(a, tmp_path / "sae")
    b = a.member(0)
    with torch.no_grad():
        b.W_dec.mul_(2)

    import sae_core.io as io

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_sae(b, tmp_path / "sae")
    monkeypatch.undo()
    assert torch.equal(load_sae(tmp_path / "sae").W_dec, a.W_dec)  # old SAE intact
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temp directory left behind
    save_sae(b, tmp_path / "sae")
    assert torch.equal(load_sae(tmp_path / "sae").W_dec, b.W_dec)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load_sae(tmp_path)
    sae, _ = trained("relu")
    save_sae(sae, tmp_path / "s")
    (tmp_path / "s" / "sae.safetensors").write_bytes(b"\x80\x04pickle!")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_sae(tmp_path / "s")

    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "mystery"}))
    with pytest.raises(ValueError, match="mystery"):
        load_sae(tmp_path / "s")

    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 30}))
    with pytest.raises(ValueError, match=r"W_enc has shape \(8, 24\) but cfg.json \(d_in=8, d_sae=30\)"):
        load_sae(tmp_path / "s")

    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    tensors = load_file(str(tmp_path / "s" / "sae.safetensors"))
    del tensors["b_enc"]
    save_file(tensors, str(tmp_path / "s" / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['b_enc'\]"):
        load_sae(tmp_path / "s")


def test_unknown_architecture_lists_known_ones():
    from sae_core import get_architecture

    with pytest.raises(KeyError, match="known architectures: batchtopk, gated, jumprelu, matryoshka, ordered, relu, topk"):
        get_architecture("vanilla")


def test_config_rejects_unknown_keys_and_bad_k():
    with pytest.raises(ValueError, match="needs k"):
        SAEConfig(architecture="topk", d_in=4, d_sae=8)
    with pytest.raises(ValueError, match="only meaningful for architectures that keep k active latents"):
        SAEConfig(architecture="relu", d_in=4, d_sae=8, k=2)
    with pytest.raises(ValueError, match="exceeds d_sae"):
        SAEConfig(architecture="topk", d_in=4, d_sae=8, k=9)
    with pytest.raises(ValueError, match="extra"):
        SAEConfig(architecture="relu", d_in=4, d_sae=8, width=3)
    with pytest.raises(ValueError, match="warmup_steps=10 must be smaller than n_steps=10"):
        TrainConfig(n_steps=10, warmup_steps=10)
    assert build_sae(SAEConfig(architecture="relu", d_in=4, d_sae=8)).W_enc.shape == (1, 4, 8)
