"""Reconstruction metrics against hand-computed cases."""

import math

import pytest
import torch

from sae_core import metrics


A = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])  # dim 0 varies, dims 1 and 2 are constant
A_HAT = torch.tensor([[1.5, 0.0, 2.0], [2.0, 1.0, 2.0]])


def test_mse_sums_dims_and_averages_tokens():
    # token 0: 0.25; token 1: 1 + 1 = 2 -> mean 1.125
    assert metrics.mse(A, A_HAT) == pytest.approx(1.125)


def test_explained_variance_per_dim_skips_zero_variance_dims():
    # dim 0: mu = 2, var sum = 2, err sum = 0.25 + 1 = 1.25 -> 1 - 0.625 = 0.375
    assert metrics.explained_variance(A, A_HAT) == pytest.approx(0.375)
    assert math.isnan(metrics.explained_variance(A[:, 1:], A_HAT[:, 1:]))


def test_explained_variance_per_dim_differs_from_total():
    a = torch.tensor([[0.0, 0.0], [2.0, 20.0]])
    a_hat = torch.tensor([[0.0, 0.0], [1.0, 20.0]])
    # per dim: dim0 var 2, err 1 -> 0.5; dim1 err 0 -> 1.0; mean 0.75
    assert metrics.explained_variance(a, a_hat) == pytest.approx(0.75)
    # total: err 1 / var (2 + 200) -> 1 - 1/202
    assert metrics.explained_variance_total(a, a_hat) == pytest.approx(1 - 1 / 202)


def test_perfect_and_mean_reconstructions():
    a = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert metrics.explained_variance(a, a) == 1.0
    assert metrics.explained_variance_total(a.clone(), a) == 1.0
    mean = a.mean(0, keepdim=True).expand_as(a)
    assert metrics.explained_variance(a, mean) == pytest.approx(0.0, abs=1e-12)


def test_l0_counts_nonzeros_including_negative_codes():
    codes = torch.tensor([[0.0, 1.0, -2.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    assert metrics.l0(codes) == pytest.approx(5 / 3)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 2\)"):
        metrics.mse(A, A_HAT[:, :2])


def test_sufficient_statistics_by_hand_and_merged_batches_equal_one_batch():
    targets, errors = metrics.sums_of(A, A_HAT)
    # T = 2; Σa = [4, 0, 4], Σa² = [10, 0, 8]; errors per dim [0.25 + 1, 0 + 1, 0]
    assert targets.n_tokens == 2
    assert targets.sum_a.tolist() == [4.0, 0.0, 4.0] and targets.sum_a2.tolist() == [10.0, 0.0, 8.0]
    assert targets.variance_sums().tolist() == [2.0, 0.0, 0.0]  # 10 - 16/2, 0, 8 - 16/2
    assert errors.err.tolist() == [1.25, 1.0, 0.0]
    # Σ‖â‖² = (2.25 + 4) + (4 + 1 + 4) = 15.25; Σ a·â = (1.5 + 4) + (6 + 4) = 15.5
    assert errors.recon_sq == 15.25 and errors.cross == 15.5
    # batch by batch, then merged: the same sums, hence the same metrics
    (t0, e0), (t1, e1) = metrics.sums_of(A[:1], A_HAT[:1]), metrics.sums_of(A[1:], A_HAT[1:])
    t, e = t0.merge(t1), e0.merge(e1)
    assert t.n_tokens == 2 and torch.equal(t.sum_a, targets.sum_a) and torch.equal(t.sum_a2, targets.sum_a2)
    assert torch.equal(e.err, errors.err) and (e.recon_sq, e.cross) == (errors.recon_sq, errors.cross)
    assert metrics.mse_from(t, e) == 1.125 and metrics.explained_variance_from(t, e) == 0.375
    assert metrics.shrinkage_gamma_from(e) == 15.25 / 15.5
    # L0 from accumulated active counts: 3 and 5 active codes over 2 tokens
    e.add(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64), active=8.0)
    assert metrics.l0_from(t, e) == 4.0


# ----------------------------------------------------- bias, dead latents, dictionaries
def test_shrinkage_gamma_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    a_hat = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    # E||â||² : E[a·â] = 1.25 : 2.5
    assert metrics.shrinkage_gamma(a, a_hat) == pytest.approx(0.5)
    assert metrics.shrinkage_gamma(a, a) == pytest.approx(1.0)


def test_dead_fraction_by_hand():
    assert metrics.dead_fraction(torch.tensor([True, False, False, True])) == 0.5


def test_c_dec_by_hand_and_chunked_equals_dense():
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # norms do not matter
    expected = (0 + 2 ** -0.5 + 2 ** -0.5) / 3
    assert metrics.c_dec(W) == pytest.approx(expected)
    assert metrics.c_dec(W, chunk=1) == pytest.approx(expected)
    R = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    U = R / R.norm(dim=1, keepdim=True)
    C = (U @ U.T).abs()
    dense = float((C.sum() - C.diagonal().sum()) / (50 * 49))
    assert metrics.c_dec(R, chunk=7) == pytest.approx(dense, rel=1e-5)


def test_diversity_by_hand_and_chunked_equals_dense():
    W = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    # rows 0 and 1 share cosine 0.8 >= 0.7; row 2's best is 0.6; row 3's best is 0.0
    assert metrics.diversity(W) == (2, 0.5)
    assert metrics.diversity(W, chunk=1) == (2, 0.5)
    assert metrics.diversity(torch.cat([W, W]))[0] == 0  # duplicated latents are never diverse
    R = torch.randn(60, 4, generator=torch.Generator().manual_seed(1))
    U = R / R.norm(dim=1, keepdim=True)
    C = U @ U.T
    C.fill_diagonal_(-2)
    assert metrics.diversity(R, 0.9, chunk=8)[0] == int((C.max(1).values < 0.9).sum())


def test_stability_by_hand_self_random_and_chunked():
    D1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    D2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    # e2 of run 1 has cosine 0 with (1, 0) and -1 with (0, -1): max(0, ·) = 0
    assert metrics.stability([D1, D2]) == pytest.approx([0.5, 0.5])
    R = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    assert metrics.stability([R, R.clone()]) == pytest.approx([1.0, 1.0])
    # a third run counts as "any other run"
    assert metrics.stability([D1, D2, D1]) == pytest.approx([1.0, 0.5, 1.0])
    r1, r2 = metrics.random_dictionary_like(R, 1), metrics.random_dictionary_like(R, 2)
    rand = metrics.stability([r1, r2])
    baseline = float(metrics.max_cosine_to(r1, r2).mean())
    assert rand[0] == pytest.approx(baseline) and rand[0] < 0.8
    assert metrics.stability([R, r1], chunk=5) == pytest.approx(metrics.stability([R, r1]), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.stability([R])


def test_stability_matched_by_hand_and_on_a_permutation():
    W1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    W2 = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    # one-to-one: W1[0]-W2[1] (1.0) and W1[1]-W2[0] (0.8); greedy on W1[1] first would be worse
    assert metrics.stability_matched(W1, W2) == pytest.approx(0.9)
    R = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(4))
    assert metrics.stability_matched(R, 3.0 * R[perm]) == pytest.approx(1.0)


def test_matched_and_shared_stability_by_hand():
    e = torch.eye(3)
    W1 = e.clone()
    W2 = torch.stack([e[0], 0.6 * e[1] + 0.8 * e[2], 0.8 * e[1] - 0.6 * e[2]])
    # cosines: e1·[1, 0, 0], e2·[0, 0.6, 0.8], e3·[0, 0.8, -0.6]; best one-to-one: e1-0 (1), e2-2 (0.8),
    # e3-1 (0.8): total 2.6 (the other choice, e2-1 and e3-2, totals 1 + 0.6 - 0.6 = 1)
    assert metrics.stability_matched(W1, W2) == pytest.approx(2.6 / 3)
    assert metrics.stability_shared(W1, W2) == pytest.approx(1.0)  # 1, 0.8, 0.8 all ≥ 0.7
    assert metrics.stability_shared(W1, W2, threshold=0.9) == pytest.approx(1 / 3)  # only the 1.0
    # a fourth latent in W1, at cosine ≤ 0 with all of W2, is left unmatched: 3 of its 4 latents are shared
    W1_plus = torch.cat([W1, torch.tensor([[-1.0, -1.0, -1.0]])])
    assert metrics.stability_shared(W1_plus, W2) == pytest.approx(3 / 4)
    assert metrics.stability_matched(W1_plus, W2) == pytest.approx(2.6 / 3)  # min(n, m) = 3 pairs
    # per run over three runs: run 0 is matched with runs 1 and 2, and so on
    runs = [W1, W2, W1.clone()]
    matched, shared = metrics.matched_stability(runs, threshold=0.9)
    assert matched == pytest.approx([(2.6 / 3 + 1.0) / 2, 2.6 / 3, (1.0 + 2.6 / 3) / 2])
    assert shared == pytest.approx([(1 / 3 + 1) / 2, 1 / 3, (1 + 1 / 3) / 2])
    with pytest.raises(ValueError, match="at least 2"):
        metrics.matched_stability([W1])


# -------------------------------------------------------------------- connectivity
def test_connectivity_by_hand_with_a_dead_latent():
    codes = torch.tensor([[0.5, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # pairs that co-fire (diagonal included): (0,0) (0,1) (1,0) (1,1) -> 4 of 9
    assert metrics.connectivity(codes) == pytest.approx(5 / 9)
    assert metrics.connectivity([codes[:1], codes[1:]]) == pytest.approx(5 / 9)
    tok, lat, T, m = metrics.active_sets(codes)
    assert metrics.connectivity_of_prefixes(tok, lat, T, [1, 2, 3], block=1) == pytest.approx([0.0, 0.0, 5 / 9])


def test_blockwise_connectivity_equals_dense_h_transpose_h():
    gen = torch.Generator().manual_seed(5)
    codes = torch.rand(300, 90, generator=gen) * (torch.rand(300, 90, generator=gen) < 0.05)
    H = (codes != 0).float()
    dense = 1 - float(((H.T @ H) > 0).sum()) / 90**2
    assert metrics.connectivity(list(codes.split(64))) == pytest.approx(dense)
    tok, lat, T, m = metrics.active_sets(codes)
    for block in (90, 7, 1):
        assert metrics.connectivity_of_prefixes(tok, lat, T, [90], block=block) == pytest.approx([dense])


def test_connectivity_of_prefixes_equals_connectivity_of_each_prefix():
    gen = torch.Generator().manual_seed(6)
    codes = torch.rand(200, 60, generator=gen) * (torch.rand(200, 60, generator=gen) < 0.08)
    tok, lat, T, m = metrics.active_sets(list(codes.split(50)))
    sizes = [15, 30, 45, 60]
    got = metrics.connectivity_of_prefixes(tok, lat, T, sizes, block=7)
    for s, value in zip(sizes, got):
        H = (codes[:, :s] != 0).float()  # the dense twin: HᵀH of the prefix
        assert value == pytest.approx(1 - float(((H.T @ H) > 0).sum()) / s**2)


def test_mean_ci_by_hand():
    from sae_core.stats import mean_ci

    # values 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302653 -> half width 4.302653 / sqrt(3)
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.302653 / 3**0.5, rel=1e-6) and mean - lo == pytest.approx(hi - mean)
    assert mean_ci([5.0]) == (5.0, None, None)
    assert mean_ci([1.0, float("nan"), 3.0])[0] == 2.0
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_mutual_max_cosines_equal_the_dense_twin_and_bf16_stays_within_rounding():
    gen = torch.Generator().manual_seed(7)
    W, V = torch.randn(70, 12, generator=gen), torch.randn(50, 12, generator=gen)
    C = metrics.unit_rows(W) @ metrics.unit_rows(V).T
    rows, cols = metrics.mutual_max_cosines(W, V, chunk=16)
    assert torch.allclose(rows, C.max(1).values, atol=1e-6) and torch.allclose(cols, C.max(0).values, atol=1e-6)
    rows16, cols16 = metrics.mutual_max_cosines(W, V, chunk=16, bf16=True)
    assert (rows16 - C.max(1).values).abs().max() < 1e-2 and (cols16 - C.max(0).values).abs().max() < 1e-2
    runs = [torch.randn(40, 12, generator=gen) for _ in range(3)]
    assert metrics.stability(runs, bf16=True) == pytest.approx(metrics.stability(runs), abs=1e-2)
