"""Training throughput per architecture vs the matmul roofline, measured in one process.

Prints, for each architecture and dtype, tokens/s of a full training step (forward,
backward, decoder projection, clipping, Adam, renormalisation) and the fraction of the
roofline: the tokens/s the same machine would reach if a step cost only its dense matmuls
(≈ 12·d·d_sae FLOP per token) at the throughput measured for a [B, d] x [d, d_sae] matmul here.
Writes the numbers as JSON too. Not part of the test suite.

    python benchmarks/bench_training.py [--d 384] [--d-sae 3072] [--batch 4096] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import TOPK_ACTIVE, matmul_flops_per_second, member_tokens_per_second

from sae_core import SAEConfig
from sae_core.registry import uses_k


def step_tokens_per_second(arch: str, d: int, d_sae: int, batch: int, steps: int, bf16: bool) -> float:
    cfg = SAEConfig(architecture=arch, d_in=d, d_sae=d_sae, **({"k": TOPK_ACTIVE} if uses_k(arch) else {}))
    return member_tokens_per_second(cfg, 1, batch, steps, bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--d-sae", type=int, default=3072, help="latents (dictionary size)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--arch", action="append")
    parser.add_argument("--json", default="runs/bench/training.json")
    args = parser.parse_args()
    archs = args.arch or ["relu", "topk", "batchtopk", "jumprelu", "gated"]
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={args.d} d_sae={args.d_sae} batch={args.batch}")
    print(f"{'architecture':<12} {'dtype':<5} {'tokens/s':>10} {'roofline':>10} {'fraction':>9}")
    for dtype, bf16 in ((torch.float32, False), (torch.bfloat16, True)):
        flops = matmul_flops_per_second(args.batch, args.d, args.d_sae, dtype)
        roofline = flops / (12 * args.d * args.d_sae)
        for arch in archs:
            tps = step_tokens_per_second(arch, args.d, args.d_sae, args.batch, args.steps, bf16)
            name = "bf16" if bf16 else "fp32"
            print(f"{arch:<12} {name:<5} {tps:>10.0f} {roofline:>10.0f} {tps / roofline:>9.2f}", flush=True)
            results.append({"architecture": arch, "dtype": name, "tokens_per_s": tps,
                            "roofline_tokens_per_s": roofline, "matmul_flops_per_s": flops})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
