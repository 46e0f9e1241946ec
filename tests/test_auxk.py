"""AuxK acts in every shipped config: a dead-latent window that scales with the run and
aux_k = d_sae / 2 of the SAE being trained (the expanded SAE's own d_sae included)."""

from __future__ import annotations

import pytest
import torch

from sae_core import SAEConfig, TrainConfig, build_sae, train_sae
from sae_core.saes.base import LossContext
from sae_core.saes.topk import TopKSAE
from sae_core.synthetic import make_sparse_dictionary_data
from sae_core.training.ensembles import expanded_config


def test_dead_window_is_a_fraction_of_the_run_unless_set_in_tokens():
    # default config: 150 steps of 1,024 tokens -> round(0.1 * 150) = 15 steps = 15,360 tokens,
    # a tenth of the 153,600 tokens the run sees (the old fixed 1,000,000 was never reached)
    assert TrainConfig(n_steps=150, batch_size=1024).dead_window_tokens == 15 * 1024
    assert TrainConfig(n_steps=40, batch_size=256).dead_window_tokens == 4 * 256  # smoke
    assert TrainConfig(n_steps=250, batch_size=1024).dead_window_tokens == 25 * 1024  # SmolLM2
    assert TrainConfig(n_steps=2000, batch_size=10_000).dead_window_tokens == 200 * 10_000  # Pythia, paper scale
    # at least one step, even for a tiny run: round(0.1 * 4) = 0 -> 1 step
    assert TrainConfig(n_steps=4, batch_size=64).dead_window_tokens == 64
    assert TrainConfig(n_steps=150, batch_size=1024, dead_window_fraction=0.5).dead_window_tokens == 75 * 1024
    # the absolute override wins
    assert TrainConfig(n_steps=150, batch_size=1024, dead_tokens_threshold=10_000_000).dead_window_tokens == 10_000_000
    # in words, for the report
    assert TrainConfig(n_steps=150, batch_size=1024).dead_window_description() == (
        "15,360 tokens (15 steps of 1,024; 0.1 of the run)")
    assert TrainConfig(n_steps=150, dead_tokens_threshold=10_000_000).dead_window_description() == "10,000,000 tokens"


def test_aux_k_defaults_to_half_of_each_saes_own_d_sae():
    cfg = TrainConfig(n_steps=10)
    member = SAEConfig(architecture="topk", d_in=384, d_sae=768, k=64)
    assert cfg.auxk_latents(member.d_sae) == 384
    assert cfg.auxk_latents(expanded_config(member, 8).d_sae) == 3072  # 6,144 latents -> 3,072
    assert TrainConfig(n_steps=10, aux_k=100).auxk_latents(6144) == 100


@pytest.mark.parametrize("fast_paths", [True, False])
def test_the_loss_uses_the_default_aux_k_of_d_sae_over_2(fast_paths):
    """36 of 40 latents dead: AuxK with aux_k unset equals aux_k = 20 (d_sae / 2), not 6 (d_in / 2)."""
    sae = build_sae(SAEConfig(architecture="topk", d_in=12, d_sae=40, k=5))
    sae.initialize([torch.Generator().manual_seed(0)])
    a = torch.randn(1, 64, 12, generator=torch.Generator().manual_seed(1))
    dead = torch.ones(1, 40, dtype=torch.bool)
    dead[0, :4] = False

    def auxk(aux_k: int | None) -> float:
        ctx = LossContext(train_cfg=TrainConfig(n_steps=1, aux_k=aux_k, fast_paths=fast_paths),
                          sparsity_coefficient=torch.zeros(1), dead_mask=dead)
        return sae.training_loss(a, ctx).terms["auxk"].item()

    assert auxk(None) == auxk(20)
    assert auxk(None) != auxk(6)


@pytest.mark.parametrize("fast_paths", [True, False])
def test_a_planted_dead_latent_gets_auxk_gradient_within_a_150_step_run_at_the_default_settings(fast_paths, monkeypatch):
    """Latent 0 of a TopK SAE (64 latents, k = 4, d = 16, batch 128) is planted dead: its encoder
    column is 0 and its bias 1e-4, so its pre-activation is a constant 1e-4, never among the top
    4 of a token. Default dead window (0.1 · 150 = 15 steps) and aux_k (32): its encoder column
    gets no gradient in steps 1-15, is dead after step 15, and step 16's AuxK gives it one.
    Logged dead fraction and AuxK term are non-zero from then on."""
    grads: list[float] = []
    plain_init = TopKSAE._init_extra

    def plant(self, train_cfg):
        plain_init(self, train_cfg)
        self.W_enc[:, :, 0] = 0.0
        self.b_enc[:, 0] = 1e-4
        self.W_enc.register_hook(lambda g: grads.append(float(g[0, :, 0].abs().sum())))

    monkeypatch.setattr(TopKSAE, "_init_extra", plant)
    data = make_sparse_dictionary_data(n_features=64, d=16, n_samples=4096, seed=1).activations
    cfg = SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4)
    tcfg = TrainConfig(n_steps=150, batch_size=128, lr=3e-3, log_every=1, fast_paths=fast_paths)
    assert tcfg.dead_window_tokens == 15 * 128 and tcfg.auxk_latents(64) == 32
    history = train_sae(cfg, data, tcfg).history

    assert len(grads) == 150
    assert grads[:15] == [0.0] * 15  # alive by the window's count: TopK gives it no gradient
    assert grads[15] > 0  # step 16: dead, and AuxK reaches its encoder
    assert history[14].dead_fraction[0] >= 1 / 64  # dead after 15 steps of 128 tokens
    assert history[15].terms["auxk"][0] > 0
    assert max(h.dead_fraction[0] for h in history) < 0.5
