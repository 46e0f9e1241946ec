"""SHIFT: hand-computed scores and ablations, and a planted spurious latent whose ablation repairs the probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_core.probing import IdentityDictionary, mean_pool, pooled_codes
from sae_core.scr import (
    SCRData,
    ablate_pooled,
    fit_scr_probes,
    latent_scores,
    shift_score,
    spurious_correlation_removal,
    top_latents,
)
from tests.test_probing import D, orthonormal_sae

# z is pronoun-like: one latent for each value (he / she), as real gender features are
Y_LATENT, Z_MALE, Z_FEMALE = 3, 7, 11


def test_latent_scores_hand_case():
    codes = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [0.0, 4.0, 2.0], [0.0, 2.0, 2.0]])
    z = np.array([1, 1, 0, 0])  # mean_diff_z = [2, −3, 0]
    W_dec = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w_z = np.array([0.5, 2.0])  # <w_z, f_i> = [0.5, 2, 2.5]
    np.testing.assert_allclose(latent_scores(codes, z, W_dec, w_z), [1.0, 6.0, 0.0])
    assert top_latents(np.array([1.0, 6.0, 0.0, 6.0]), 3).tolist() == [1, 3, 0]


def test_ablation_of_pooled_codes_equals_ablating_every_token():
    sae, _ = orthonormal_sae()
    torch.manual_seed(0)
    a = torch.randn(30, D)
    index = torch.arange(30) // 6
    with torch.no_grad():
        codes = sae.encode(a)
    top = np.array([2, 11, 5])
    # per token: a' = a − Σ_{i∈top} c_i f_i, then pool
    per_token = a - codes[:, top] @ sae.W_dec.detach()[top]
    expected = mean_pool(per_token, index, 5).double().numpy()
    got = ablate_pooled(mean_pool(a, index, 5), pooled_codes(sae, a, index, 5), sae.W_dec.detach(), top)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_shift_score_hand_case():
    assert shift_score(0.9, 0.6, 0.9, 0.01) == pytest.approx(1.0)
    assert shift_score(0.7, 0.6, 1.0, 0.01) == pytest.approx(0.25)
    assert shift_score(0.7, 0.6, 0.6, 0.05) == pytest.approx(2.0)  # gap floored at 0.05


def scr_documents(cells: dict[tuple[int, int], int], seed: int, f: torch.Tensor):
    """Documents per (y, z) cell of 8 tokens: y turns on a noisy latent in half the tokens;
    z turns on its pronoun-like latent (he or she) strongly in 2 tokens, a clean signal."""
    g = torch.Generator().manual_seed(seed)
    background = [i for i in range(D) if i not in (Y_LATENT, Z_MALE, Z_FEMALE)]
    acts, index, ys, zs = [], [], [], []
    doc = 0
    for (y, z), n in cells.items():
        for _ in range(n):
            T = 8
            c = torch.zeros(T, D)
            for t in range(T):
                c[t, [background[i] for i in torch.randperm(len(background), generator=g)[:3]]] = torch.rand(3, generator=g)
            c[:, Y_LATENT] = 0.3 * torch.rand(T, generator=g)  # background level of the target concept
            if y:
                c[: T // 2, Y_LATENT] += 0.6 + 0.4 * torch.rand(T // 2, generator=g)
            c[torch.randperm(T, generator=g)[:2], Z_FEMALE if z else Z_MALE] = 2.0
            acts.append(c @ f)
            index += [doc] * T
            ys.append(y)
            zs.append(z)
            doc += 1
    return torch.cat(acts), torch.tensor(index), np.array(ys), np.array(zs)


def test_ablating_the_planted_spurious_latent_recovers_the_oracle():
    sae, f = orthonormal_sae(seed=1)
    b_a, b_i, b_y, _ = scr_documents({(0, 0): 60, (1, 1): 60}, seed=1, f=f)
    o_a, o_i, o_y, o_z = scr_documents({(0, 0): 30, (0, 1): 30, (1, 0): 30, (1, 1): 30}, seed=2, f=f)
    t_a, t_i, t_y, t_z = scr_documents({(0, 0): 30, (0, 1): 30, (1, 0): 30, (1, 1): 30}, seed=3, f=f)
    # the intended correlations: y = z on the biased rows, y ⟂ z on the balanced ones
    assert np.corrcoef(o_y, o_z)[0, 1] == pytest.approx(0.0)
    data = SCRData(
        biased_acts=mean_pool(b_a, b_i, len(b_y)).numpy(), biased_y=b_y,
        balanced_acts=mean_pool(o_a, o_i, len(o_y)).numpy(), balanced_y=o_y, balanced_z=o_z,
        test_acts=mean_pool(t_a, t_i, len(t_y)).numpy(), test_y=t_y,
    )
    probes = fit_scr_probes(data)
    assert probes.acc_oracle >= 0.95
    assert probes.acc_base <= 0.8  # the biased probe leans on z
    results = spurious_correlation_removal(sae, data, (o_a, o_i), (t_a, t_i), [1, 2, 5], probes=probes)
    two = results[1]
    assert two.n_ablated == 2 and set(two.latents) == {Z_MALE, Z_FEMALE}
    assert two.acc_ablated >= probes.acc_base + 0.3
    assert two.score >= 0.9
    np.testing.assert_allclose(two.score, (two.acc_ablated - two.acc_base) / (two.acc_oracle - two.acc_base))
    # the target latent carries no z signal: it is ablated last
    assert Y_LATENT not in results[2].latents

    # the neuron baseline through the same interface: z is spread over all neurons,
    # so ablating two neurons repairs much less than ablating the two SAE latents
    raw = spurious_correlation_removal(IdentityDictionary(D), data, (o_a, o_i), (t_a, t_i), [2], probes=probes)
    assert raw[0].acc_ablated < two.acc_ablated - 0.1
