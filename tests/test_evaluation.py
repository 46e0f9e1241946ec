"""The streaming prefix evaluation against its slow twin: each prefix ensemble built
explicitly, its full reconstruction and codes fed to the one-definition metrics."""

import pytest
import torch

from sae_core import SAEConfig, TrainConfig, metrics, train_bagging, train_boosting
from sae_core.evaluation import dictionary_metrics, prefix_reconstruction_metrics


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(600, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    a[:, 3] = 2.5  # a zero-variance dimension: left out of the per-dim explained variance
    return a


@pytest.fixture(scope="module", params=["bagging", "boosting"])
def ensemble(request, data):
    cfg = SAEConfig(architecture="topk", d_in=16, d_sae=24, k=3)
    tcfg = TrainConfig(n_steps=30, batch_size=64, lr=3e-3, seed=1)
    train = train_bagging if request.param == "bagging" else train_boosting
    return train(cfg, data, tcfg, n_members=3).ensemble


def test_streaming_prefix_metrics_equal_the_explicit_prefix_ensembles(ensemble, data):
    got = prefix_reconstruction_metrics(ensemble, data.split(128), connectivity_block=10)
    assert sorted(got) == [1, 2, 3]
    for n in (1, 2, 3):
        prefix = ensemble.prefix(n)
        with torch.no_grad():
            recon, codes = prefix(data), prefix.encode(data)
        assert torch.allclose(prefix.decode(codes), recon, atol=1e-5)
        fired = (codes != 0).any(0)
        expected = {
            "mse": metrics.mse(data, recon),
            "explained_variance": metrics.explained_variance(data, recon),
            "explained_variance_total": metrics.explained_variance_total(data, recon),
            "l0": metrics.l0(codes),
            "dead_fraction": metrics.dead_fraction(fired),
            "shrinkage_gamma": metrics.shrinkage_gamma(data, recon),
            "connectivity": metrics.connectivity(codes),
        }
        for name, value in expected.items():
            assert getattr(got[n], name) == pytest.approx(value, rel=1e-4, abs=1e-6), (n, name)
    # TopK members: L0 of the n-member ensemble is at most n·k, and usually exactly that
    assert got[3].l0 <= 9 + 1e-9 and got[3].l0 > got[1].l0


def test_boosting_prefixes_do_not_lose_reconstruction(data):
    cfg = SAEConfig(architecture="topk", d_in=16, d_sae=24, k=3)
    ens = train_boosting(cfg, data, TrainConfig(n_steps=60, batch_size=64, lr=3e-3), n_members=3).ensemble
    got = prefix_reconstruction_metrics(ens, [data])
    assert got[1].mse > got[2].mse > got[3].mse


def test_prefix_metrics_reject_bad_input(ensemble, data):
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        prefix_reconstruction_metrics(ensemble, [data[:, :8]])
    with pytest.raises(ValueError, match="1..3"):
        prefix_reconstruction_metrics(ensemble, [data], prefixes=[4])
    with pytest.raises(ValueError, match="no evaluation tokens"):
        prefix_reconstruction_metrics(ensemble, [])


def test_dictionary_metrics_by_hand():
    W = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    got = dictionary_metrics(W)
    assert got["diversity"] == 2 and got["diversity_fraction"] == 0.5
    assert got["c_dec"] == pytest.approx(metrics.c_dec(W))
