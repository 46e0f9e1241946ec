"""One-to-one matching of two dictionaries' latents: the sparse-candidate path against the
exact (Hungarian) one, the stabilities built on it, and their random floors."""

import pytest
import torch

from sae_core import metrics
from sae_core.metric_catalog import FLOORS, METRIC_NAMES, metric_spec
from tasks.config import EvaluateConfig
from tasks.evaluate import RANDOM_FLOOR_SEED_OFFSET, _stability_rows

SPARSE = {"exact_max": 0}  # always the sparse-candidate path


def _noisy_permutation(m: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dictionary [m, d], a permuted noisy copy of it, and the permutation (row i of the
    first is row perm⁻¹(i) of the copy): the optimal matching is clear."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, d, generator=gen)
    perm = torch.randperm(m, generator=gen)
    copy = (W + noise * torch.randn(m, d, generator=gen))[perm]
    return W, copy, torch.argsort(perm)


def _is_one_to_one(rows: torch.Tensor, cols: torch.Tensor, n: int, m: int) -> bool:
    p = min(n, m)
    return (len(rows) == len(cols) == p and len(set(rows.tolist())) == p and len(set(cols.tolist())) == p
            and int(rows.max()) < n and int(cols.max()) < m)


def test_match_rows_by_hand_where_greedy_would_be_worse():
    W1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    W2 = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    # one-to-one: W1[0]-W2[1] (1.0) and W1[1]-W2[0] (0.8); both paths, even with one candidate each way
    for options in ({}, {"exact_max": 0, "candidates": 1}):
        rows, cols, cos = metrics.match_rows(W1, W2, **options)
        assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
        assert cos.tolist() == pytest.approx([1.0, 0.8])


@pytest.mark.parametrize("n, m", [(300, 300), (300, 240), (240, 300)])
def test_sparse_matching_equals_hungarian_where_the_optimum_is_clear(n, m):
    W, copy, partner = _noisy_permutation(max(n, m), 32, noise=0.3, seed=n + m)
    W1, W2 = W[:n], copy
    keep = torch.arange(max(n, m))
    if m < n:  # drop rows of the copy: those rows of W1 stay unmatched
        keep = torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:m]).values
        W2 = copy[keep]
    exact = metrics.match_rows(W1, W2, exact_max=10_000)
    for bf16 in (False, True):
        sparse = metrics.match_rows(W1, W2, candidates=4, bf16=bf16, **SPARSE)
        assert _is_one_to_one(sparse[0], sparse[1], n, m)
        assert torch.equal(sparse[0], exact[0]) and torch.equal(sparse[1], exact[1])
        assert torch.allclose(sparse[2], exact[2], atol=1e-6)
    if n == m:  # and both found the planted partners
        assert torch.equal(exact[1], partner[:n])


def test_sparse_matching_reaches_hungarian_on_random_4k_dictionaries():
    """The acceptance test: random dictionaries (the hardest case: every cosine small, no
    clear partner), 4,096 latents in d = 384 (the default run's width); candidates in fp32
    and in bf16 (the matched cosines are fp32 either way)."""
    gen = torch.Generator().manual_seed(11)
    W1, W2 = torch.randn(4096, 384, generator=gen), torch.randn(4096, 384, generator=gen)
    exact = metrics.stability_matched(W1, W2, exact_max=4096)
    for bf16 in (False, True):
        rows, cols, cos = metrics.match_rows(W1, W2, bf16=bf16, **SPARSE)  # default candidates
        assert _is_one_to_one(rows, cols, 4096, 4096)
        assert torch.allclose(cos, (metrics.unit_rows(W1)[rows] * metrics.unit_rows(W2)[cols]).sum(1), atol=1e-6)
        assert exact + 1e-6 >= float(cos.double().mean()) >= 0.99 * exact  # Hungarian is the optimum


def test_identical_rows_are_still_matched_one_to_one():
    # 30 identical rows: every one has the same best columns, so without its backbone the candidate
    # graph would hold no full matching; any one-to-one matching has the same total, Σ_j cos(e1, v_j)
    gen = torch.Generator().manual_seed(12)
    W1 = torch.zeros(30, 8)
    W1[:, 0] = 1.0
    W2 = torch.randn(30, 8, generator=gen)
    rows, cols, cos = metrics.match_rows(W1, W2, exact_max=4, candidates=2)
    assert _is_one_to_one(rows, cols, 30, 30)
    assert float(cos.sum()) == pytest.approx(float(metrics.unit_rows(W2)[:, 0].sum()), abs=1e-5)
    assert metrics.stability_matched(W1, W2, exact_max=4, candidates=2) == pytest.approx(
        metrics.stability_matched(W1, W2), abs=1e-6)


def test_candidate_edges_are_each_rows_and_each_columns_best_partners_in_any_block_size():
    gen = torch.Generator().manual_seed(13)
    U, V = metrics.unit_rows(torch.randn(50, 6, generator=gen)), metrics.unit_rows(torch.randn(70, 6, generator=gen))
    C = U @ V.T  # the dense twin
    expected = {(int(i), int(j)) for i in range(50) for j in C[i].topk(3).indices}
    expected |= {(int(i), int(j)) for j in range(70) for i in C[:, j].topk(3).indices}
    expected |= {(i, i) for i in range(50)}  # the backbone
    for chunk in (7, 50, 512):
        rows, cols, cos = metrics.candidate_edges(U, V, 3, chunk=chunk)
        assert {(int(i), int(j)) for i, j in zip(rows, cols)} == expected and len(rows) == len(expected)  # no duplicates
        assert torch.allclose(cos, C[rows, cols], atol=1e-6)


def test_every_floor_and_corrected_metric_is_declared():
    for metric, (floor, corrected) in FLOORS.items():
        assert {metric, floor, corrected} <= set(METRIC_NAMES)
        assert metric_spec(corrected).better == metric_spec(metric).better == "higher"
        assert metric_spec(floor).better is None  # a floor is not a score
        # metric − floor spans [low − high_floor, high − low_floor]
        assert metric_spec(corrected).low == metric_spec(metric).low - metric_spec(floor).high
        assert metric_spec(corrected).high == metric_spec(metric).high - metric_spec(floor).low


def test_stability_rows_give_each_stability_its_floor_and_the_difference_run_by_run():
    gen = torch.Generator().manual_seed(14)
    base = torch.randn(40, 64, generator=gen)
    runs = {r: base + 0.2 * torch.randn(40, 64, generator=gen) for r in (0, 1, 2)}
    cfg = EvaluateConfig(hungarian_max_latents=16)  # 40 latents: the sparse path, noted
    boosting = {r: W.flip(1) for r, W in runs.items()}  # same shapes: the same floor
    groups = {("bagging", 2): runs, ("boosting", 2): boosting, ("single", 1): {0: base}}  # one run: no stability
    rows, notes = _stability_rows(groups, cfg)
    assert {(r["method"], r["n_members"]) for r in rows} == {("bagging", 2), ("boosting", 2)}
    boost = {(r["metric"], r["run"]): r["value"] for r in rows if r["method"] == "boosting"}
    rows = [r for r in rows if r["method"] == "bagging"]
    values = {(r["metric"], r["run"]): r["value"] for r in rows}
    assert all(boost[floor, r] == values[floor, r] for floor, _ in FLOORS.values() for r in (0, 1, 2))
    assert {m for m, _ in values} == {name for triple in FLOORS.items() for name in (triple[0], *triple[1])}
    dicts = [runs[r] for r in (0, 1, 2)]
    randoms = [metrics.random_dictionary_like(W, RANDOM_FLOOR_SEED_OFFSET + r) for r, W in runs.items()]
    matched, shared = metrics.matched_stability(dicts, 0.7, exact_max=16)
    matched_floor, shared_floor = metrics.matched_stability(randoms, 0.7, exact_max=16)
    for r in (0, 1, 2):
        assert values["stability", r] == pytest.approx(metrics.stability(dicts)[r])
        assert values["stability_matched", r] == pytest.approx(matched[r])
        assert values["stability_shared_random", r] == pytest.approx(shared_floor[r]) and shared_floor[r] == 0.0
        assert values["stability_matched_random", r] == pytest.approx(matched_floor[r])
        for metric, (floor, corrected) in FLOORS.items():
            assert values[corrected, r] == pytest.approx(values[metric, r] - values[floor, r])
        assert values["stability_matched_corrected", r] > 0.5  # noisy copies share far more than random dictionaries
    assert notes == ["stability_matched/shared: sparse-candidate matching (8 candidates per latent) above "
                     "hungarian_max_latents=16 for bagging J=2, boosting J=2; Hungarian for the rest"]


def test_the_relaxed_floor_rises_with_the_other_dictionarys_width():
    """Why the claims use floor-corrected values: a random dictionary's best cosine to another
    grows with that other dictionary's size, with no structure learned at all."""
    gen = torch.Generator().manual_seed(15)
    W = torch.randn(256, 32, generator=gen)
    small, wide = (metrics.random_dictionary_like(torch.empty(n, 32), seed) for n, seed in ((256, 1), (2048, 2)))
    assert metrics.stability([W, wide])[0] > metrics.stability([W, small])[0] + 0.05
