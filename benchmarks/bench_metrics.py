"""Cost of the co-activation and dictionary metrics at ensemble scale (8 × 16,384 latents).

Connectivity: T tokens whose active sets hold L0 latents each (an 8-member TopK ensemble
with k = 32 gives L0 = 256), spread over the members as the concatenated view lays them
out, scored for every prefix J = 1..8 in one pass, as the evaluation stage does. Active
latents are drawn at random, the worst case: real codes repeat co-firing pairs, which
costs the same work but fewer distinct pairs.
Stability: S runs of 8 × 16,384 unit decoder rows in d = 384, relaxed stability in bf16
(the evaluation's ``bf16_cosines``), and in fp32 with ``--fp32`` (~3 min more).

Prints seconds and the growth of peak RSS during each step. Issue 5's target: each
≤ 60 s and ≤ 2 GB extra on this machine.

    python benchmarks/bench_metrics.py [--tokens 100000] [--members 8] [--latents-per-member 16384] [--l0 256] [--runs 2] [--fp32]
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


def random_active_sets(tokens: int, members: int, d_sae: int, l0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, latent) of l0 / members random active latents per member and token."""
    gen = torch.Generator().manual_seed(0)
    per = l0 // members
    lat = torch.randint(d_sae, (tokens, members, per), generator=gen) + (torch.arange(members) * d_sae)[None, :, None]
    tok = torch.arange(tokens).repeat_interleave(members * per)
    return tok.int(), lat.reshape(-1).int()


def timed(results: dict, name: str, fn) -> None:
    base = peak_rss_mb()
    start = time.perf_counter()
    value = fn()
    results[name] = {"seconds": time.perf_counter() - start, "peak_extra_mb": peak_rss_mb() - base, "value": value}
    print(f"{name:<16} {results[name]['seconds']:8.1f} s  peak +{results[name]['peak_extra_mb']:7.0f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--latents-per-member", type=int, default=16_384)
    parser.add_argument("--l0", type=int, default=256)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="also time fp32 stability (~3 min more)")
    parser.add_argument("--json", default="runs/bench/metrics.json")
    args = parser.parse_args()
    J, d_sae = args.members, args.latents_per_member
    results: dict = {}

    tok, lat = random_active_sets(args.tokens, J, k, args.l0)
    timed(results, "connectivity", lambda: metrics.connectivity_of_prefixes(tok, lat, args.tokens, [n * d_sae for n in range(1, J + 1)]))
    del tok, lat
    dicts = [metrics.random_dictionary_like(torch.empty(J * d_sae, args.d), seed) for seed in range(args.runs)]
    timed(results, "stability_bf16", lambda: metrics.stability(dicts, bf16=True))
    print(f"connectivity per J: {[round(v, 4) for v in results['connectivity']['value']]}")
    if args.fp32:
        timed(results, "stability_fp32", lambda: metrics.stability(dicts))
        print(f"stability bf16 {results['stability_bf16']['value'][0]:.4f} vs fp32 {results['stability_fp32']['value'][0]:.4f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
