"""Cost of the dictionary and co-activation metrics at ensemble scale (8 × 16,384 latents).

Connectivity on T tokens whose active sets have L0 latents each (as an 8-member TopK
ensemble with k = 32 would give: L0 = 256), and relaxed stability between S runs of
8 × 16,384 unit decoder rows in d = 384. Prints seconds and peak extra memory (RSS).
Issue 5's target: each ≤ 60 s and ≤ 2 GB extra on this machine. Stability runs
with bf16 block products (the evaluation's ``bf16_cosines``) and in fp32.

    python benchmarks/bench_metrics.py [--tokens 100000] [--latents 131072] [--l0 256] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from sae_core import metrics


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def active_chunks(tokens: int, m: int, l0: int, chunk: int = 256):
    """Codes in chunks of ``chunk`` tokens with ~l0 random active latents each (a generator:
    only one dense chunk exists at a time, as when an evaluation encodes batch by batch)."""
    gen = torch.Generator().manual_seed(0)
    active = torch.randint(m, (tokens, l0), generator=gen)
    for start in range(0, tokens, chunk):
        idx = active[start : start + chunk]
        yield torch.zeros(idx.shape[0], m).scatter_(1, idx, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--latents", type=int, default=8 * 16_384)
    parser.add_argument("--l0", type=int, default=256)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", default="runs/bench/metrics.json")
    args = parser.parse_args()
    results = {}

    base = peak_rss_mb()
    start = time.perf_counter()
    value = metrics.connectivity(active_chunks(args.tokens, args.latents, args.l0), m=args.latents)
    results["connectivity"] = {"seconds": time.perf_counter() - start, "peak_extra_mb": peak_rss_mb() - base, "value": value}

    dicts = [metrics.random_dictionary_like(torch.empty(args.latents, args.d), seed) for seed in range(args.runs)]
    for name, bf16 in (("stability_bf16", True), ("stability_fp32", False)):
        base = peak_rss_mb()
        start = time.perf_counter()
        values = metrics.stability(dicts, bf16=bf16)
        results[name] = {"seconds": time.perf_counter() - start, "peak_extra_mb": peak_rss_mb() - base, "value": values[0]}

    for name, r in results.items():
        print(f"{name:<13} {r['seconds']:8.1f} s  peak +{r['peak_extra_mb']:7.0f} MB  value {r['value']:.4f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
