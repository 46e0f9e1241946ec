"""Streaming connectivity (:class:`sae_core.metrics.CoFiring`) against its slow twin
(:func:`sae_core.metrics.connectivity_of_prefixes`), its two algorithms against each other,
the streaming evaluation over many batches against one batch, and every metric of
:mod:`sae_core.metrics` on each device against the CPU (issue 18).

Parametrized over :func:`sae_core.devices.available_devices`: the CPU always, CUDA when
torch sees it (on a CPU-only machine the device run is a second CPU run).
"""

from __future__ import annotations

import pytest
import torch

from sae_core import SAEConfig, TrainConfig, build_sae, metrics
from sae_core.devices import available_devices
from sae_core.ensemble import Ensemble
from sae_core.evaluation import prefix_reconstruction_metrics

DEVICES = available_devices()
ALGORITHMS = ["sparse", "dense"]


def random_codes(tokens: int, m: int, density: float, seed: int) -> torch.Tensor:
    """[tokens, m] codes, each entry non-zero (positive or negative) with probability ``density``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, m, generator=gen) * (torch.rand(tokens, m, generator=gen) < density)


def streamed(codes: torch.Tensor, sizes: list[int], algorithm: str, device: str, batch: int, block: int | None = None):
    acc = metrics.CoFiring(codes.shape[1], sizes, device=device, algorithm=algorithm, block=block)
    for part in codes.to(device).split(batch):
        acc.add(part)
    return acc


def old_connectivity(codes: torch.Tensor, sizes: list[int]) -> list[float]:
    tok, lat, T, _ = metrics.active_sets(codes)
    return metrics.connectivity_of_prefixes(tok, lat, T, sizes)


# ------------------------------------------------------------------------ by hand
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_connectivity_by_hand(device, algorithm):
    codes = torch.tensor([
        [0.5, 0.0, -1.0, 0.0],  # token 0: latents 0 and 2 (a negative code is active too)
        [0.0, 2.0, 3.0, 0.0],   # token 1: latents 1 and 2
        [0.0, 0.0, 0.0, 0.7],   # token 2: latent 3 alone
    ])
    # ordered pairs that co-fire (diagonal included): (0,0) (0,2) (2,0) (2,2) | (1,1) (1,2) (2,1) | (3,3)
    # s = 2, latents {0, 1}:       (0,0) (1,1)                     -> 2 of 4 -> 1 - 2/4 = 1/2
    # s = 3, latents {0, 1, 2}:    all but (3,3)                   -> 7 of 9 -> 1 - 7/9 = 2/9
    # s = 4:                       all 8                           -> 8 of 16 -> 1/2
    expected = [0.5, 2 / 9, 0.5]
    for batch in (3, 1):
        acc = streamed(codes, [2, 3, 4], algorithm, device, batch)
        assert acc.pair_counts() == [2, 7, 8]
        assert acc.connectivity() == pytest.approx(expected, abs=1e-15)
        assert acc.n_tokens == 3 and acc.algorithm == algorithm
    assert old_connectivity(codes, [2, 3, 4]) == pytest.approx(expected, abs=1e-15)
    # before any token nothing has fired together
    assert metrics.CoFiring(4, [2, 4], device=device, algorithm=algorithm).connectivity() == [1.0, 1.0]


# ------------------------------------------------------------- the two algorithms
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m, density, sizes", [
    (90, 0.05, [1, 7, 15, 30, 45, 61, 90]),  # sizes off the bytes' boundaries
    (200, 0.02, [24, 64, 200]),
    (48, 0.4, [8, 16, 48]),  # saturated: every pair fires together
])
def test_sparse_and_dense_equal_the_old_count(device, m, density, sizes):
    codes = random_codes(256, m, density, seed=m)
    want = old_connectivity(codes, sizes)
    H = (codes != 0).float()
    co_fired = torch.triu((H.T @ H) > 0)[: max(sizes), : max(sizes)]  # the dense twin, upper triangle
    for algorithm in ALGORITHMS:
        for block in (8, 24, None):
            acc = streamed(codes, sizes, algorithm, device, batch=64, block=block)
            assert acc.connectivity() == want, (algorithm, block)
            assert torch.equal(acc.co_fired(), co_fired), (algorithm, block)  # the very bits, not only the counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_batch_equals_many_batches(device, algorithm):
    codes = random_codes(120, 70, 0.06, seed=3)
    sizes = [10, 35, 70]
    whole = streamed(codes, sizes, algorithm, device, batch=120, block=16)
    state = whole.state_bytes
    for batch in (1, 17, 64):
        parts = streamed(codes, sizes, algorithm, device, batch=batch, block=16)
        assert all(torch.equal(p.cpu(), w.cpu()) for p, w in zip(parts.tiles, whole.tiles)), batch
        assert parts.connectivity() == whole.connectivity() and parts.n_tokens == 120
        # the state is the bitmap whatever the tokens: tiles of 16 rows from their diagonal on,
        # rows of whole 64-bit words (70, 54, 38, 22 and 6 columns: 16, 8, 8, 8, 8 bytes)
        assert parts.state_bytes == state == 16 * (16 + 8 + 8 + 8) + 6 * 8


@pytest.mark.parametrize("device", DEVICES)
def test_tiles_skip_saturated_blocks_without_changing_the_result(device):
    # a first batch that saturates the first 16 latents, then batches that add pairs elsewhere
    codes = random_codes(200, 64, 0.05, seed=9)
    codes[:20, :16] = 1.0
    acc = streamed(codes, [16, 40, 64], "dense", device, batch=20, block=8)
    assert acc._open_tiles()[0][:2] == [False, False] and acc._open_tiles()[1][0] is False  # latents 0..15 all set
    assert acc.connectivity() == old_connectivity(codes, [16, 40, 64])


@pytest.mark.parametrize("device", DEVICES)
def test_auto_picks_from_the_first_batch_and_the_state_lives_where_the_algorithm_works(device):
    few = torch.zeros(64, 4096, dtype=torch.bool)
    few[:, :2] = True  # L0 = 2 of 4,096: sparse
    acc = metrics.CoFiring(4096, [64, 4096], device=device)
    acc.add(few.to(device))
    assert acc.algorithm == "sparse" and acc.state_device.type == "cpu"  # scipy works on the CPU
    more = torch.zeros(8, 4096, dtype=torch.bool)
    more[:, :64] = True
    acc.add(more.to(device))  # L0 64 now, but the choice is kept
    assert acc.algorithm == "sparse" and acc.connectivity() == [0.0, 1 - 64**2 / 4096**2]
    many = metrics.CoFiring(64, [64], device=device)
    many.add(torch.ones(16, 64, dtype=torch.bool, device=device))
    assert many.algorithm == "dense" and many.state_device.type == torch.device(device).type


def test_cost_model_picks_sparse_for_tiny_l0_and_dense_near_m():
    for device in ("cpu", "cuda"):  # a model only: no CUDA device needed
        for m in (16_384, 131_072):  # (at small m, a many-threaded CPU's dense tiles can win even at L0 2)
            assert metrics.connectivity_algorithm(2, m, device) == "sparse", (device, m)
            assert metrics.connectivity_algorithm(m - 1, m, device) == "dense", (device, m)
            cost = metrics.connectivity_seconds_per_token(64, m, device)
            assert cost["sparse"] > 0 and cost["dense"] > 0
    # more tokens per batch share the dense per-batch tile work
    small, big = (metrics.connectivity_seconds_per_token(64, 6144, "cpu", tokens)["dense"] for tokens in (16, 4096))
    assert small > big
    # the default run's largest shapes (8 x 768 latents, L0 320) go dense on the CPU
    assert metrics.connectivity_algorithm(320, 6144, "cpu") == "dense"


def test_state_memory_does_not_depend_on_tokens():
    # tiles of 1,024 rows from their diagonal on: 1,024 · (768 + 640 + … + 128) bytes
    assert metrics.CoFiring(6144, [6144], block=1024).state_bytes == 1024 * 2688 == 2_752_512  # 2.8 MB
    big = metrics.CoFiring(131_072, [16_384 * n for n in range(1, 9)], block=1024)
    assert big.state_bytes == 1_082_130_432 and big.tiles is None  # 1.08 GB (≈ m²/16), allocated at the first batch
    assert metrics.CoFiring(131_072, [131_072], block=4096).state_bytes == 1_107_296_256  # CUDA's block
    assert metrics.CoFiring(100, [30, 60], block=8).m == 60  # latents past the largest prefix are ignored


def test_popcounts_agree():
    x = torch.arange(256, dtype=torch.uint8)
    want = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.uint8)
    assert torch.equal(metrics._popcount_u8(x), want) and torch.equal(metrics._popcount_u8_torch(x), want)


def test_bad_arguments():
    with pytest.raises(ValueError, match="1..10"):
        metrics.CoFiring(10, [11])
    with pytest.raises(ValueError, match="algorithm"):
        metrics.CoFiring(10, [10], algorithm="fast")
    with pytest.raises(ValueError, match=r"\[B, 10\]"):
        metrics.CoFiring(10, [10]).add(torch.ones(3, 9))


# ------------------------------------------------------------ streaming evaluation
def _ensemble(method: str, arch: str = "topk") -> tuple[Ensemble, torch.Tensor]:
    cfg = SAEConfig(architecture=arch, d_in=16, d_sae=24, k=3 if arch == "topk" else None)
    sae = build_sae(cfg, n_members=3)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    sae.initialize([torch.Generator().manual_seed(1 + j) for j in range(3)], b_dec=a.mean(0), train_cfg=TrainConfig(n_steps=10))
    return Ensemble(sae, method).eval(), a


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method, arch", [("bagging", "topk"), ("boosting", "topk"), ("bagging", "relu")])
def test_many_small_batches_equal_one_batch(device, method, arch):
    ens, a = _ensemble(method, arch)
    on_cpu = prefix_reconstruction_metrics(ens, [a], device=torch.device("cpu"))
    one = prefix_reconstruction_metrics(ens, [a], device=torch.device(device))
    for n in (1, 2, 3):  # the device against the CPU: the codes may differ in rounding only
        for name, value in on_cpu[n].as_dict().items():
            assert getattr(one[n], name) == pytest.approx(value, rel=1e-4, abs=1e-3), (n, name)
    for algorithm in ALGORITHMS:
        many = prefix_reconstruction_metrics(ens, a.split(13), device=torch.device(device), connectivity_algorithm=algorithm,
                                             connectivity_block=16)
        assert sorted(many) == [1, 2, 3]
        for n in (1, 2, 3):
            got, want = many[n], one[n]
            assert got.connectivity == want.connectivity and got.dead_fraction == want.dead_fraction, (algorithm, n)
            for name in ("mse", "explained_variance", "explained_variance_total", "l0", "shrinkage_gamma"):
                assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-6), (algorithm, n, name)
            assert all(isinstance(v, float) for v in got.as_dict().values())
    assert next(ens.parameters()).device.type == torch.device(device).type  # moved there, as Module.to does
    # connectivity and the dead fraction against the explicit prefix ensembles' codes
    ens = ens.to("cpu")
    for n in (1, 3):
        with torch.no_grad():
            codes = ens.prefix(n).encode(a)
        assert on_cpu[n].connectivity == pytest.approx(metrics.connectivity(codes), abs=1e-15)
        assert on_cpu[n].dead_fraction == metrics.dead_fraction((codes != 0).any(0))


# -------------------------------------------------- every metric on every device
@pytest.mark.parametrize("device", DEVICES)
def test_every_metric_on_the_device_equals_the_cpu(device):
    gen = torch.Generator().manual_seed(4)
    W1, W2 = torch.randn(40, 8, generator=gen), torch.randn(48, 8, generator=gen)
    a, a_hat = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
    codes = random_codes(30, 40, 0.1, seed=5)
    on = lambda t: t.to(device)  # noqa: E731

    def same(x, y):
        x, y = (v.cpu() if isinstance(v, torch.Tensor) else v for v in (x, y))
        if isinstance(x, (tuple, list)):
            assert len(x) == len(y)
            for p, q in zip(x, y):
                same(p, q)
        elif isinstance(x, torch.Tensor):
            assert torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6)
        else:
            assert x == pytest.approx(y, rel=1e-5, abs=1e-6)

    for fn in (metrics.mse, metrics.explained_variance, metrics.explained_variance_total, metrics.shrinkage_gamma):
        same(fn(on(a), on(a_hat)), fn(a, a_hat))
    t_dev, e_dev = metrics.sums_of(on(a), on(a_hat))
    assert t_dev.sum_a.device.type == e_dev.recon_sq.device.type == torch.device(device).type
    same(metrics.l0(on(codes)), metrics.l0(codes))
    same(metrics.dead_fraction(on((codes != 0).any(0))), metrics.dead_fraction((codes != 0).any(0)))
    same(metrics.c_dec(on(W1), chunk=16), metrics.c_dec(W1, chunk=16))
    same(metrics.diversity(on(W1), chunk=16), metrics.diversity(W1, chunk=16))
    same(metrics.max_cosine_to(on(W1), on(W2)), metrics.max_cosine_to(W1, W2))
    same(metrics.mutual_max_cosines(on(W1), on(W2), chunk=16), metrics.mutual_max_cosines(W1, W2, chunk=16))
    same(metrics.stability([on(W1), on(W2)]), metrics.stability([W1, W2]))
    for exact_max in (64, 16):  # Hungarian, and the sparse candidate graph
        got, want = metrics.match_rows(on(W1), on(W2), exact_max=exact_max), metrics.match_rows(W1, W2, exact_max=exact_max)
        assert all(t.device.type == "cpu" for t in got)  # indices and cosines come back to the CPU
        same(got[2].mean(), want[2].mean())  # (rounding may swap near-tied partners; not the optimum)
    same(metrics.matched_stability([on(W1), on(W2)], exact_max=16), metrics.matched_stability([W1, W2], exact_max=16))
    random = metrics.random_dictionary_like(on(W1), seed=3)
    assert random.device.type == torch.device(device).type and torch.equal(random.cpu(), metrics.random_dictionary_like(W1, 3))
    tok, lat, T, m = metrics.active_sets(on(codes))
    assert metrics.connectivity_of_prefixes(tok, lat, T, [20, 40]) == old_connectivity(codes, [20, 40])
    assert metrics.connectivity([on(c) for c in codes.split(8)]) == metrics.connectivity(codes)
