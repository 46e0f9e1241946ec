"""Latent analyses (issue 21): monosemanticity, concept cones, the sparse head, steering, and
their stage wrapper, contracts and report sections. Hand-built cases, tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.cones import cone_fit, random_dictionary
from sae_core.monosemanticity import bootstrap_mean_ci, minmax_normalise, monosemanticity, monosemanticity_pairwise
from sae_core.sparse_head import fit_sparse_head
from sae_core.steering import added_to_output, greedy_generate, steered_generate
from tests.tiny_models import build_tiny_model


# --------------------------------------------------------------------------- monosemanticity
def test_minmax_normalise_by_hand():
    a = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]])
    np.testing.assert_allclose(minmax_normalise(a), [[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]])


def test_monosemanticity_hand_computed_case():
    # three contexts: e0 = e1 = x-axis, e2 = y-axis; latent fires 1, 1, 0.5 (min 0 added by a 4th context)
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    acts = np.array([[1.0], [1.0], [0.5], [0.0]])
    # ã = (1, 1, .5, 0); pairs with weight: (0,1) w=1 s=1; (0,2) w=.5 s=0; (1,2) w=.5 s=0 -> 1 / 2
    assert monosemanticity(acts, emb)[0] == pytest.approx(0.5)
    assert monosemanticity_pairwise(acts, emb)[0] == pytest.approx(0.5)


def test_monosemanticity_fast_form_equals_pairwise_sum():
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.standard_normal((40, 7)), 0)
    acts[:, 3] = 0.0                      # dead: undefined
    acts[:, 4] = 0.0
    acts[5, 4] = 2.0                      # fires once: undefined
    emb = rng.standard_normal((40, 6))
    fast, slow = monosemanticity(acts, emb), monosemanticity_pairwise(acts, emb)
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-12)
    assert np.isnan(fast[3]) and np.isnan(fast[4]) and np.isfinite(np.delete(fast, [3, 4])).all()


def test_one_topic_latent_scores_higher_than_mixed_topic_latent():
    rng = np.random.default_rng(1)
    topics = rng.standard_normal((4, 16))
    topic_of = np.repeat(np.arange(4), 10)                           # 40 contexts, 10 per topic
    emb = topics[topic_of] + 0.3 * rng.standard_normal((40, 16))
    one_topic = np.where(topic_of == 2, rng.uniform(1, 2, 40), 0.0)  # fires on topic 2 only
    mixed = np.zeros(40)
    mixed[rng.choice(40, 10, replace=False)] = rng.uniform(1, 2, 10)
    mixed[[0, 10, 20, 30]] = 1.5                                     # at least once on every topic
    scores = monosemanticity(np.stack([one_topic, mixed], 1), emb)
    assert scores[0] > 0.8 and scores[0] > scores[1] + 0.3


def test_bootstrap_mean_ci_contains_mean_and_drops_nan():
    mean, low, high = bootstrap_mean_ci(np.array([0.1, 0.2, np.nan, 0.3, 0.4]), resamples=500)
    assert mean == pytest.approx(0.25) and low < mean < high
    with pytest.raises(ValueError, match="no finite value"):
        bootstrap_mean_ci(np.array([np.nan]))


# --------------------------------------------------------------------------- cones
def test_planted_direction_in_the_cone_has_zero_residual():
    D = random_dictionary(64, 16, seed=0)
    w = 0.7 * D[3] + 0.2 * D[10] + 0.5 * D[40]
    fit = cone_fit(w, D, candidates=64)
    assert fit.residual == pytest.approx(0.0, abs=1e-8) and fit.containment == pytest.approx(1.0)
    assert set(fit.atoms.tolist()) == {3, 10, 40} and fit.n_atoms == 3


def test_direction_outside_the_cone_has_a_residual():
    D = np.eye(4)                                          # the cone is the positive orthant
    assert cone_fit(-D[0], D, candidates=4).containment == pytest.approx(0.0)
    fit = cone_fit(D[0] - D[1], D, candidates=4)           # 45° from the cone's face
    assert fit.residual**2 == pytest.approx(0.5) and fit.containment == pytest.approx(0.5)
    assert fit.atoms.tolist() == [0]
    only_two = cone_fit(D[0] + D[1] + D[2], D, candidates=2)   # s caps the atoms offered
    assert only_two.containment == pytest.approx(2 / 3) and only_two.n_atoms == 2


def test_cone_fit_clear_errors():
    with pytest.raises(ValueError, match="zero"):
        cone_fit(np.zeros(4), np.eye(4), 2)
    with pytest.raises(ValueError, match="dimensions"):
        cone_fit(np.ones(3), np.eye(4), 2)


# --------------------------------------------------------------------------- sparse head
def _planted_codes(seed: int = 0, n: int = 200, m: int = 50):
    rng = np.random.default_rng(seed)
    z = np.maximum(rng.standard_normal((n, m)), 0)
    y = (2 * z[:, 3] - 1.5 * z[:, 7] + 0.1 * rng.standard_normal(n) > 0.3).astype(int)
    return z, y


def test_sparse_head_finds_the_planted_latents():
    z, y = _planted_codes()
    head = fit_sparse_head(z, y, l1=0.05, steps=500)
    assert set(head.top(2).tolist()) == {3, 7}
    assert head.coef[3] > 0 > head.coef[7]
    assert head.n_nonzero <= 6 and head.accuracy(z, y) > 0.9


def test_sparse_head_matches_scikit_learn_l1_logistic():
    from sklearn.linear_model import LogisticRegression

    z, y = _planted_codes(seed=1, n=120, m=12)
    lam = 0.02
    head = fit_sparse_head(z, y, l1=lam, steps=5000)
    x = (z - head.mean) / head.scale
    # sklearn minimises ‖w‖₁ + C Σ loss; ours (1/N) Σ loss + λ‖w‖₁ -> C = 1/(Nλ)
    ref = LogisticRegression(l1_ratio=1.0, C=1 / (len(y) * lam), solver="saga", tol=1e-9, max_iter=100_000).fit(x, y)
    np.testing.assert_allclose(head.coef, ref.coef_[0], atol=2e-3)
    assert head.intercept == pytest.approx(float(ref.intercept_[0]), abs=2e-3)


def test_sparse_head_clear_errors():
    with pytest.raises(ValueError, match="labels 0 and 1"):
        fit_sparse_head(np.ones((4, 2)), np.ones(4), l1=0.1)


# --------------------------------------------------------------------------- steering
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from sae_core.models import load_model

    return load_model(str(build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")), 1, causal_lm=True)


def test_steering_hook_adds_exactly_alpha_d_to_the_residual_stream(tiny_llama):
    model, ids = tiny_llama.model, torch.tensor([[2, 5, 6, 7, 8]])
    captured = {}
    handle = tiny_llama.block.register_forward_hook(lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    handle.remove()
    direction, alpha = torch.randn(tiny_llama.d_model, generator=torch.Generator().manual_seed(0)), 3.0
    with torch.no_grad(), added_to_output(tiny_llama.block, alpha * direction):
        steered = model(input_ids=ids).logits
        # manual forward: block 1's output plus α·d, then blocks 2.., the final norm and the head
        x = captured["h"] + alpha * direction
        positions = torch.arange(ids.shape[1])[None]
        rotary = model.model.rotary_emb(x, positions)
        for layer in model.model.layers[tiny_llama.layer + 1:]:
            out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            x = out[0] if isinstance(out, tuple) else out
        manual = model.lm_head(model.model.norm(x))
    torch.testing.assert_close(steered, manual, rtol=1e-5, atol=1e-5)
    assert (steered - plain).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)   # the hook is gone


def test_alpha_zero_reproduces_the_plain_generation_and_a_large_alpha_changes_it(tiny_llama):
    model, prompt = tiny_llama.model, [2, 5, 6]
    plain = greedy_generate(model, prompt, 8)
    assert len(plain) == 8
    direction = torch.randn(tiny_llama.d_model, generator=torch.Generator().manual_seed(1))
    assert steered_generate(model, tiny_llama.block, direction, 0.0, prompt, 8) == plain
    assert steered_generate(model, tiny_llama.block, direction, 50.0, prompt, 8) != plain
