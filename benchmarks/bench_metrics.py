"""Cost of the co-activation and dictionary metrics, and the constants of connectivity's cost model.

Sections (``--sections``, comma-separated; default ``scale``, what ``make bench`` runs):

scale: connectivity of every prefix J = 1..8 of an ensemble of J × d_sae latents (default
    8 × 16,384) whose tokens have L0 active latents each, streamed in batches of 4,096
    tokens through :class:`sae_core.metrics.CoFiring` (the algorithm the cost model picks,
    or ``--algorithm``; its state does not depend on the tokens and its time is linear in
    them, so 32,768 tokens by default, with the time per million tokens it implies); then
    relaxed stability of S runs of unit decoder rows in d = 384, in
    bf16 (the evaluation's ``bf16_cosines``) and in fp32 with ``--fp32`` (~3 min more).
    Active latents are drawn at random, spread over the members as the concatenated view
    lays them out: the worst case for the sparse algorithm (fewest repeated pairs).
model: seconds per token of both CoFiring algorithms at a few (L0, m) on fresh accumulators
    (no tile saturated yet), the constants they imply (sparse: seconds per pair and per latent
    scanned; dense: multiply-adds per second and seconds per tile entry and batch, from two
    batch sizes) against those in sae_core/metrics.py, and the crossover L0 the model gives.
default: connectivity at the default run's shapes (8 × 768 latents, 40 active per member
    and token, 30,000 test tokens in batches of 4,096; and one member, 768 latents, L0 40):
    the old path (active sets of every batch kept, one blocked count at the end,
    ``connectivity_of_prefixes``) against CoFiring's sparse, dense and chosen algorithms. Random
    codes at these shapes saturate every pair within the first batch, after which dense skips
    every tile; "dense (no skip)" computes every tile of every batch (codes that never saturate).

Prints seconds and the growth of peak RSS during each step of the scale section.

    python benchmarks/bench_metrics.py [--sections scale,model,default] [--device cpu|cuda]
        [--tokens 32768] [--members 8] [--d-sae 16384] [--l0 256] [--runs 2] [--fp32] [--fp32-dense]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from sae_core import metrics
from sae_core.devices import resolve_device, synchronize

#: tokens per evaluation batch (EvaluateConfig.batch_size's default)
BATCH_TOKENS = 4096


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_active(tokens: int, members: int, d_sae: int, l0: int, seed: int = 0,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """[tokens, members·d_sae] bool: l0 / members random latents of each member per token (drawn
    with replacement, so a token can have a few fewer)."""
    gen = torch.Generator().manual_seed(seed)
    per = max(1, l0 // members)
    lat = torch.randint(d_sae, (tokens, members, per), generator=gen) + (torch.arange(members) * d_sae)[None, :, None]
    active = torch.zeros(tokens, members * d_sae, dtype=torch.bool)
    active.scatter_(1, lat.reshape(tokens, -1), True)
    return active.to(device)


def timed(results: dict, name: str, fn) -> None:
    base = peak_rss_mb()
    start = time.perf_counter()
    value = fn()
    results[name] = {"seconds": time.perf_counter() - start, "peak_extra_mb": peak_rss_mb() - base, "value": value}
    print(f"{name:<16} {results[name]['seconds']:8.1f} s  peak +{results[name]['peak_extra_mb']:7.0f} MB", flush=True)


def cofiring_seconds(active: torch.Tensor, sizes: list[int], algorithm: str, device: torch.device,
                     count: bool = True, skip: bool = True) -> tuple[float, list[float], str]:
    """Seconds of CoFiring over ``active`` in batches of BATCH_TOKENS (the adds, and with ``count``
    the state's allocation and the final count), the connectivities and the algorithm used.
    skip: dense skips saturated tiles (False: every tile of every batch, the worst case)."""
    acc = metrics.CoFiring(active.shape[1], sizes, device=device, algorithm=algorithm)
    acc.skip_saturated = skip
    if not count:  # the state allocated outside the timing (the first batch would do it)
        if algorithm == "auto":
            raise ValueError("count=False times a named algorithm")
        acc._allocate()
    synchronize(device)
    start = time.perf_counter()
    for batch in active.split(BATCH_TOKENS):
        acc.add(batch)
    values = acc.connectivity() if count else []
    synchronize(device)
    return time.perf_counter() - start, values, acc.algorithm


def old_seconds(active: torch.Tensor, sizes: list[int]) -> tuple[float, list[float]]:
    """Seconds of the old evaluation path: each batch's (token, latent) pairs kept, one count at the end."""
    start = time.perf_counter()
    tok_parts, lat_parts, offset = [], [], 0
    for batch in active.split(BATCH_TOKENS):
        t, i = batch.nonzero(as_tuple=True)
        tok_parts.append((t + offset).int())
        lat_parts.append(i.int())
        offset += batch.shape[0]
    values = metrics.connectivity_of_prefixes(torch.cat(tok_parts), torch.cat(lat_parts), offset, sizes)
    return time.perf_counter() - start, values


def best_seconds(fn, repeats: int = 2) -> float:
    """The least of ``repeats`` timings of ``fn()`` (a shared machine's noise only adds)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def section_model(device: torch.device, results: dict) -> None:
    """Seconds per token of both algorithms at a few (L0, m) on fresh accumulators (no tile
    saturated yet: the model's worst case); the constants they imply; the crossover."""
    import numpy as np

    kind = metrics._dense_kind(device)
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    print(f"-- cost model on {device} ({kind}, {threads} torch threads); batches of {BATCH_TOKENS} tokens", flush=True)
    rows, dense_fit = [], []
    ms = (6144, 16384) if device.type == "cpu" else (16384, 65536)
    for m in ms:
        active = random_active(BATCH_TOKENS, 8, m // 8, 512, device=device)
        # the active-set scan (numpy on the CPU, nonzero on CUDA), per latent and token
        if device.type == "cpu":
            scan = best_seconds(lambda: np.flatnonzero(active.numpy())) / active.numel()
        else:
            scan = best_seconds(lambda: [v.cpu() for v in active.nonzero(as_tuple=True)]) / active.numel()
        # dense at two batch sizes: per-token matmul and per-batch tile work
        def dense(tokens: int) -> float:
            return min(cofiring_seconds(active[:tokens], [m], "dense", device, count=False)[0] for _ in range(2))

        t_big, t_small = dense(BATCH_TOKENS), dense(BATCH_TOKENS // 4)
        per_token = (t_big - t_small) / (BATCH_TOKENS - BATCH_TOKENS // 4)
        per_batch = max(t_small - per_token * (BATCH_TOKENS // 4), 0.0)
        entries = m * (m + 1) / 2
        dense_fit.append({"m": m, "muladds_per_s": entries / per_token / threads,
                          "seconds_per_entry": per_batch / entries * threads})
        print(f"m {m:6d}: scan {scan * 1e9:.2f} ns/latent; dense {t_big / BATCH_TOKENS * 1e6:8.1f} us/token at "
              f"{BATCH_TOKENS} tokens a batch = {entries / per_token / threads:.2e} mul-add/s/thread + "
              f"{per_batch / entries * threads * 1e9:.2f} ns/entry/thread a batch", flush=True)
        for l0 in (32, 128, 512):
            sample = random_active(BATCH_TOKENS, 8, m // 8, l0, device=device)
            mean_l0 = int(torch.count_nonzero(sample)) / sample.shape[0]
            n = BATCH_TOKENS if l0 <= 128 else 1024  # sparse at large L0 on fewer tokens: its cost is per token
            sparse = min(cofiring_seconds(sample[:n], [m], "sparse", device, count=False)[0] for _ in range(2)) / n
            pairs = mean_l0 * (mean_l0 + 1) / 2
            row = {"m": m, "l0": mean_l0, "sparse": sparse, "dense": t_big / BATCH_TOKENS,
                   "sparse_s_per_pair": max(sparse - m * scan, 0.0) / pairs, "scan_s_per_latent": scan}
            model = metrics.connectivity_seconds_per_token(mean_l0, m, device)
            print(f"  L0 {mean_l0:6.1f}: sparse {sparse * 1e6:9.1f} us/token ({row['sparse_s_per_pair'] * 1e9:5.1f} ns/pair "
                  f"after the scan); model: sparse {model['sparse'] * 1e6:9.1f}, dense {model['dense'] * 1e6:9.1f} us/token, "
                  f"chooses {metrics.connectivity_algorithm(mean_l0, m, device)}", flush=True)
            rows.append(row)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    pair = median([r["sparse_s_per_pair"] for r in rows if r["l0"] > 100])  # the scan dominates below
    scan = median([r["scan_s_per_latent"] for r in rows])
    rate = median([f["muladds_per_s"] for f in dense_fit])
    entry = median([f["seconds_per_entry"] for f in dense_fit])
    print(f"measured: sparse {pair:.2e} s/pair, scan {scan:.2e} s/latent; dense {rate:.2e} mul-add/s/thread, "
          f"{entry:.2e} s/entry/thread a batch")
    print(f"in metrics: SPARSE_SECONDS_PER_PAIR {metrics.SPARSE_SECONDS_PER_PAIR:.2e}, SPARSE_SECONDS_PER_LATENT "
          f"{metrics.SPARSE_SECONDS_PER_LATENT['cuda' if device.type == 'cuda' else 'cpu']:.2e}, DENSE_MULADDS_PER_SECOND[{kind!r}] "
          f"{metrics.DENSE_MULADDS_PER_SECOND[kind]:.2e}, DENSE_SECONDS_PER_ENTRY[{kind!r}] {metrics.DENSE_SECONDS_PER_ENTRY[kind]:.2e}")
    for m in ms:
        chosen = next((l0 for l0 in range(1, m + 1) if metrics.connectivity_algorithm(l0, m, device) == "dense"), m)
        print(f"crossover at m = {m}: the model chooses dense from L0 = {chosen}")
    results["model"] = {"rows": rows, "dense": dense_fit, "sparse_s_per_pair": pair, "scan_s_per_latent": scan,
                        "dense_muladds_per_s_per_thread": rate, "dense_s_per_entry_per_thread": entry}


def section_default(device: torch.device, results: dict, tokens: int = 30_000) -> None:
    """The default run's shapes: the old path against CoFiring's algorithms."""
    print(f"-- default-run shapes on {device}: {tokens} tokens in batches of {BATCH_TOKENS}", flush=True)
    out = {}
    for name, members, d_sae, k in (("bagging 8 x 768", 8, 768, 40), ("one member 768", 1, 768, 40)):
        active = random_active(tokens, members, d_sae, members * k, seed=1)
        sizes = [n * d_sae for n in range(1, members + 1)]
        old_s, old_v = old_seconds(active, sizes)
        line = {"old": old_s}
        for algorithm, skip in (("sparse", True), ("dense", False), ("dense", True), ("auto", True)):
            seconds, values, used = cofiring_seconds(active.to(device), sizes, algorithm, device, skip=skip)
            assert values == old_v, (name, algorithm, values, old_v)
            label = {"auto": f"auto ({used})", "dense": "dense" if skip else "dense (no skip)"}.get(algorithm, algorithm)
            line[label] = seconds
        print(f"{name:<16} L0 {int(torch.count_nonzero(active)) / tokens:5.1f}: " + "  ".join(f"{k} {v:6.2f} s" for k, v in line.items()), flush=True)
        out[name] = line
    results["default"] = out


def section_scale(args, device: torch.device, results: dict) -> None:
    J, d_sae = args.members, args.d_sae
    print(f"-- scale: {J} x {d_sae} latents, L0 {args.l0}, {args.tokens} tokens, on {device}", flush=True)
    sizes = [n * d_sae for n in range(1, J + 1)]

    def connectivity():
        acc = metrics.CoFiring(J * d_sae, sizes, device=device, algorithm=args.algorithm)
        for start in range(0, args.tokens, BATCH_TOKENS):
            n = min(BATCH_TOKENS, args.tokens - start)
            acc.add(random_active(n, J, d_sae, args.l0, seed=start, device=device))
        values = acc.connectivity()
        synchronize(device)
        print(f"CoFiring {acc.algorithm}, state {acc.state_bytes / 1e9:.2f} GB", flush=True)
        return values

    timed(results, "connectivity", connectivity)
    per_million = results["connectivity"]["seconds"] / args.tokens * 1e6
    print(f"connectivity: {per_million:.0f} s per million tokens (state allocation and final count included)")
    print(f"connectivity per J: {[round(v, 4) for v in results['connectivity']['value']]}")
    dicts = [metrics.random_dictionary_like(torch.empty(J * d_sae, args.d), seed).to(device) for seed in range(args.runs)]
    timed(results, "stability_bf16", lambda: metrics.stability(dicts, bf16=True))
    if args.fp32:
        timed(results, "stability_fp32", lambda: metrics.stability(dicts))
        print(f"stability bf16 {results['stability_bf16']['value'][0]:.4f} vs fp32 {results['stability_fp32']['value'][0]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="scale", help="comma-separated: scale, model, default")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--d-sae", type=int, default=16_384, help="latents per member")
    parser.add_argument("--l0", type=int, default=256)
    parser.add_argument("--algorithm", default="auto", choices=["auto", "sparse", "dense"])
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="also time fp32 stability (~3 min more)")
    parser.add_argument("--fp32-dense", action="store_true",
                        help="dense tiles in fp32, as on a CPU without bf16 (the cost model's 'cpu' row)")
    parser.add_argument("--json", default="runs/bench/metrics.json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.fp32_dense:
        metrics._dense_dtype = lambda device: torch.float32
        metrics._dense_kind = lambda device: "cuda" if device.type == "cuda" else "cpu"
    results: dict = {}
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"scale", "model", "default"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    if "model" in sections:
        section_model(device, results)
    if "default" in sections:
        section_default(device, results)
    if "scale" in sections:
        section_scale(args, device, results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
