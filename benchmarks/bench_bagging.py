"""Batched bagging vs a single SAE: tokens·members per second, as a ratio in one run.

The J members of a naive-bagging ensemble train as one module (stacked weights, one
batched matmul per step). Target: per-member throughput of the batched module at least
that of a single SAE of the same shape, i.e. ratio >= 1.

    python benchmarks/bench_bagging.py [--members 8] [--arch topk] [--d 384] [--d-sae 3072] [--batch 4096]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import TOPK_ACTIVE, member_tokens_per_second

from sae_core import SAEConfig
from sae_core.registry import uses_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--arch", action="append")
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--d-sae", type=int, default=3072, help="latents per member")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", default="runs/bench/bagging.json")
    args = parser.parse_args()
    results = []
    print(f"J={args.members}, d={args.d}, d_sae={args.d_sae}, batch={args.batch}/member, {'bf16' if args.bf16 else 'fp32'}")
    print(f"{'architecture':<12} {'single tok/s':>13} {'batched tok*mem/s':>18} {'ratio':>6}")
    for arch in args.arch or ["relu", "topk"]:
        cfg = SAEConfig(architecture=arch, d_in=args.d, d_sae=args.d_sae, **({"k": TOPK_ACTIVE} if uses_k(arch) else {}))
        # alternate the two and keep each one's best round: this machine's throughput
        # drifts by +-20% between runs, which would otherwise land on one side only
        single = batched = 0.0
        for _ in range(args.rounds):
            single = max(single, member_tokens_per_second(cfg, 1, args.batch, args.steps, args.bf16))
            batched = max(batched, member_tokens_per_second(cfg, args.members, args.batch, args.steps, args.bf16))
        print(f"{arch:<12} {single:>13.0f} {batched:>18.0f} {batched / single:>6.2f}", flush=True)
        results.append({"architecture": arch, "members": args.members, "single_tokens_per_s": single,
                        "batched_member_tokens_per_s": batched, "ratio": batched / single})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
