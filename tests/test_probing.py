"""Sparse probing: pooling and selection by hand, planted concepts found at k = 1, prefix fast path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.ensemble import Ensemble
from sae_core.probing import (
    IdentityDictionary,
    fit_probe,
    full_probe_accuracy,
    mean_pool,
    one_vs_rest_rows,
    pooled_codes,
    pooled_member_codes,
    prefix_pooled_codes,
    select_top_latents,
    sparse_probe_accuracy,
)
from sae_core.saes.relu import ReLUSAE

D = 16


def orthonormal_sae(seed: int = 0) -> tuple[Ensemble, torch.Tensor]:
    """A ReLU SAE whose dictionary is a random orthonormal basis Q: codes = relu(Q a)."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))
    sae = ReLUSAE(SAEConfig(architecture="relu", d_in=D, d_sae=D), n_members=1)
    with torch.no_grad():
        sae.W_dec.copy_(q.T[None])  # rows f_i = columns of Q
        sae.W_enc.copy_(q[None])  # W_enc [d, k] = Q, so c_i = <a, f_i>
    return Ensemble(sae, "single"), q.T


def planted_documents(planted: dict[str, int], n_per_class: int, seed: int, f: torch.Tensor):
    """Token activations of documents; class c turns latent planted[c] on in half its tokens.

    Every token also carries 3 random background latents (positive coefficients), so the
    concept is one latent among many and spread over all d raw dimensions.
    """
    g = torch.Generator().manual_seed(seed)
    acts, index, labels = [], [], []
    doc = 0
    for cls, latent in planted.items():
        for _ in range(n_per_class):
            T = 6
            c = torch.zeros(T, D)
            for t in range(T):
                c[t, torch.randperm(D, generator=g)[:3]] = torch.rand(3, generator=g) * 2
            if latent is not None:
                c[: T // 2, latent] = 1.0 + torch.rand(T // 2, generator=g)
            acts.append(c @ f)
            index += [doc] * T
            labels.append(cls)
            doc += 1
    return torch.cat(acts), torch.tensor(index), np.array(labels)


def test_mean_pool_hand_case():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    pooled = mean_pool(values, np.array([0, 0, 1]), 2)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0], [10.0, 0.0]]))
    with pytest.raises(ValueError, match="document 2 has no tokens"):
        mean_pool(values, np.array([0, 0, 1]), 3)


def test_select_top_latents_hand_case():
    x = np.array([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    y = np.array([1, 1, 0, 0])
    # |mean_pos − mean_neg| = [2, 1, 4]
    assert select_top_latents(x, y, 2).tolist() == [2, 0]
    assert select_top_latents(x, y, 10).tolist() == [2, 0, 1]


def test_one_vs_rest_rows_are_balanced():
    labels = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 4)
    rows = one_vs_rest_rows(labels, "a", seed=0)
    assert (labels[rows] == "a").sum() == 4 and (labels[rows] != "a").sum() == 4


def test_k1_probe_finds_the_planted_latent():
    sae, f = orthonormal_sae()
    planted = {"alpha": 5, "beta": 9, "gamma": 2}
    a_tr, i_tr, y_tr = planted_documents(planted, 40, seed=1, f=f)
    a_te, i_te, y_te = planted_documents(planted, 40, seed=2, f=f)
    x_tr = pooled_codes(sae, a_tr, i_tr, len(y_tr), batch_size=50)
    x_te = pooled_codes(sae, a_te, i_te, len(y_te), batch_size=50)
    results = sparse_probe_accuracy(x_tr, y_tr, x_te, y_te, [1, 2, 5], seed=0)
    by = {(r.cls, r.k): r for r in results}
    for cls, latent in planted.items():
        assert by[(cls, 1)].latents == (latent,)
        assert by[(cls, 1)].accuracy >= 0.95
    # the raw activations spread the concept over every dimension: one neuron is not enough
    raw = IdentityDictionary(D)
    r_tr = pooled_codes(raw, a_tr, i_tr, len(y_tr))
    r_te = pooled_codes(raw, a_te, i_te, len(y_te))
    raw_k1 = np.mean([r.accuracy for r in sparse_probe_accuracy(r_tr, y_tr, r_te, y_te, [1]) ])
    sae_k1 = np.mean([by[(c, 1)].accuracy for c in planted])
    assert raw_k1 < sae_k1 - 0.1
    # the dense raw probe sees every dimension and recovers the concept
    dense = full_probe_accuracy(r_tr, y_tr, r_te, y_te)
    assert all(r.k == D and r.accuracy >= 0.95 for r in dense)


def test_two_classes_probe_once():
    sae, f = orthonormal_sae()
    a, i, y = planted_documents({"pos": 4, "neg": None}, 20, seed=3, f=f)
    x = pooled_codes(sae, a, i, len(y))
    results = sparse_probe_accuracy(x, y, x, y, [1])
    assert [(r.cls, r.latents) for r in results] == [("neg", (4,))]  # classes sorted: "neg" first
    assert results[0].accuracy >= 0.95


def test_probe_direction_is_in_raw_units():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)) * np.array([1.0, 100.0])
    y = (x[:, 1] > 0).astype(int)
    probe = fit_probe(x, y)
    assert probe.accuracy(x, y) >= 0.97
    np.testing.assert_allclose(probe.decision(x), x @ probe.direction + probe.intercept - probe.mean @ probe.direction)
    # the label lives in dim 1: its contribution (weight × spread) dominates dim 0's
    contribution = np.abs(probe.direction) * x.std(0)
    assert contribution[1] > 5 * contribution[0]


@pytest.mark.parametrize("method", ["bagging", "boosting"])
def test_prefix_pooled_codes_equal_encoding_the_prefix(method):
    torch.manual_seed(0)
    J, k = 3, 8
    sae = ReLUSAE(SAEConfig(architecture="relu", d_in=D, d_sae=k), n_members=J)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn_like(p) * 0.5)
        sae.b_enc.copy_(torch.randn_like(sae.b_enc) * 0.1)
    ens = Ensemble(sae, method)
    a = torch.randn(40, D)
    index = torch.arange(40) // 5
    members = pooled_member_codes(ens, a, index, 8, batch_size=7)
    assert members.shape == (J, 8, k)
    for n in range(1, J + 1):
        fast = prefix_pooled_codes(members, ens.prefix_alpha(n))
        slow = pooled_codes(ens.prefix(n), a, index, 8, batch_size=7)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ens.prefix(n).W_dec, ens.W_dec[: n * k])


def test_probe_solver_matches_lbfgs():
    """fit_probe's newton-cholesky solver minimises the same objective as sklearn's default lbfgs."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 6)) * rng.uniform(0.1, 10, size=6)
    y = (x @ rng.normal(size=6) + rng.normal(size=150) > 0).astype(int)
    probe = fit_probe(x, y)
    ref = LogisticRegression(max_iter=10_000, tol=1e-10).fit((x - probe.mean) / probe.scale, y)
    np.testing.assert_allclose(probe.coef, ref.coef_[0], rtol=1e-4, atol=1e-5)
    assert probe.intercept == pytest.approx(float(ref.intercept_[0]), abs=1e-5)


@pytest.mark.parametrize(("n", "m", "separable", "C"), [(60, 1, False, 1.0), (60, 10, False, 1.0), (150, 6, True, 1.0),
                                                       (40, 64, False, 1.0), (200, 3, False, 0.01), (30, 5, True, 100.0)])
def test_newton_logistic_matches_scikit_learn(n, m, separable, C):
    """The fast path of fit_probe against the slow one: scikit-learn's newton-cholesky on the same
    standardised features, run to a tight tolerance; coefficients, intercept and predictions agree."""
    from sklearn.linear_model import LogisticRegression

    from sae_core.probing import newton_logistic

    rng = np.random.default_rng(n + m)
    x = rng.normal(size=(n, m))
    signal = x @ rng.normal(size=m)
    y = (signal > 0 if separable else signal + rng.normal(size=n) > 0).astype(int)
    z = (x - x.mean(0)) / x.std(0)
    coef, intercept = newton_logistic(z, y.astype(float), C)
    ref = LogisticRegression(C=C, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(z, y)
    np.testing.assert_allclose(coef, ref.coef_[0], rtol=1e-6, atol=1e-6)
    assert intercept == pytest.approx(float(ref.intercept_[0]), abs=1e-6)
    probe = fit_probe(x, y, C=C)
    np.testing.assert_array_equal(probe.predict(x), ref.predict(z))
