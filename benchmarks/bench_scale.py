"""Scale (issue 18): streamed vs in-memory training throughput, peak RSS of the train and
evaluate stages at N and 8N tokens, and a projection of the paper's three settings.

1. **Throughput**, in one process, on a synthetic train split written as real shards:
   the default shape (TopK, d = 384, 8 members × 768 latents, k = 40, batch 1,024, bf16),
   trained from memory and streamed through a shuffle buffer 1/7 of the split (so windows
   are swapped every ~40 steps), alternating, best of each; the ratio streamed/in-memory.
2. **Peak RSS** (VmHWM) of ``run_training`` and ``run_evaluation`` in fresh processes on
   N and 8N tokens of d = 384 (default 1M and 8M: 1.5 and 12 GB of shards), training
   streamed through the default 1,024 MB shuffle buffer and through 256 MB (N = 1M spans
   only 1.43 windows of 1,024 MB, so there 8N holds two full windows where N does not);
   the in-memory path at N for contrast.
3. **Projection** of the paper's settings per stage (disk, RAM, GPU memory, GPU hours)
   from a FLOP model (below) and an assumed GPU efficiency, printed with its assumptions.

    python benchmarks/bench_scale.py [--tokens 1000000] [--skip-rss] [--device cuda] [--json runs/bench/scale.json]

Writes scratch shards under --scratch (default: a temp dir, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common import matmul_flops_per_second  # noqa: E402

D = 384
DEFAULT = dict(d_sae=768, k=40, members=8, batch=1024)


# ------------------------------------------------------------------------ 1. throughput
def throughput(scratch: Path, tokens: int, steps: int, rounds: int, device: str = "cpu") -> dict:
    from sae_core.config import SAEConfig, TrainConfig
    from sae_core.training.trainer import train_sae
    from tasks.common import activation_source
    from tests.synthetic_shards import write_synthetic_activations

    acts = scratch / "throughput" / "activations"
    write_synthetic_activations(acts, {"train": tokens}, d=D, n_features=4 * D, mean_active=20, rows_per_shard=32768)
    streamed = activation_source(acts, "train", None, 0, buffer_mb=tokens * D * 4 / 2**20 / 7)
    memory = activation_source(acts, "train", None, 0).in_memory()
    assert streamed.streams
    cfg = SAEConfig(architecture="topk", d_in=D, d_sae=DEFAULT["d_sae"], k=DEFAULT["k"])
    recipe = TrainConfig(n_steps=steps, batch_size=DEFAULT["batch"], lr=3e-3, autocast_bf16=True, b_dec_init="mean", log_every=10**6)
    seeds = list(range(DEFAULT["members"]))
    best = {"memory": float("inf"), "stream": float("inf")}
    for _ in range(rounds):
        for name, source in (("memory", memory), ("stream", streamed)):
            start = time.perf_counter()
            train_sae(cfg, source, recipe, member_seeds=seeds, device=device)
            best[name] = min(best[name], time.perf_counter() - start)
    per_second = {k: steps * DEFAULT["batch"] * DEFAULT["members"] / v for k, v in best.items()}
    windows = -(-streamed.n_rows // streamed.buffer_rows)
    print(f"throughput at the default shape on {device} ({tokens:,} train tokens, {steps} steps, best of {rounds}):")
    print(f"  in memory  {per_second['memory']:>10,.0f} member-tokens/s")
    print(f"  streamed   {per_second['stream']:>10,.0f} member-tokens/s  (buffer {streamed.buffer_rows:,} rows, ~{windows} windows "
          f"per epoch, a new one every {streamed.buffer_rows // DEFAULT['batch']} steps)")
    print(f"  ratio streamed / in memory: {per_second['stream'] / per_second['memory']:.3f}", flush=True)
    shutil.rmtree(acts.parent)
    return {"device": device, "tokens": tokens, "steps": steps, "member_tokens_per_s": per_second,
            "ratio": per_second["stream"] / per_second["memory"], "buffer_rows": streamed.buffer_rows}


# ----------------------------------------------------------------------------- 2. RSS
CHILD = """
import json, sys
from pathlib import Path
stage, run_dir, mode, buffer_mb = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[5])
from sae_core.config import TrainConfig
from tasks.config import EvaluateConfig, TrainStageConfig
if stage == "train":
    from tasks.train import run_training
    cfg = TrainStageConfig(architecture="topk", d_sae=768, k=40, n_members=2, n_runs=1, methods=["bagging"], device="cpu",
                           activations=mode, shuffle_buffer_mb=buffer_mb, recipe=TrainConfig(n_steps=int(sys.argv[4]), batch_size=4096, lr=3e-3,
                           autocast_bf16=True, log_every=10**6))
    result = run_training(cfg, run_dir, progress=False)
else:
    from tasks.evaluate import run_evaluation
    result = run_evaluation(EvaluateConfig(device="cpu", ce_loss=False, top_contexts=0), run_dir, progress=False)
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(json.dumps({"peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024, "seconds": result.seconds, "notes": result.notes[:2]}))
"""


def rss_of(stage: str, run_dir: Path, mode: str = "stream", steps: int = 0, buffer_mb: float = 1024) -> dict:
    shutil.rmtree(run_dir / "models", ignore_errors=True) if stage == "train" else None
    out = subprocess.run([sys.executable, "-c", CHILD, stage, str(run_dir), mode, str(steps), str(buffer_mb)], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{stage} at {run_dir} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss(scratch: Path, tokens: int, buffers: tuple[float, ...] = (1024, 256)) -> list[dict]:
    """Peak RSS of train (streamed through each buffer size; in memory at N) and evaluate at N and 8N tokens.

    Streamed training holds about two windows of the buffer: N must span at least two full
    windows for the comparison to show the bound (1M tokens of d = 384 are 1.43 windows of
    the default 1,024 MB, 5.7 of 256 MB)."""
    from tests.synthetic_shards import write_synthetic_activations

    rows = []
    for n in (tokens, 8 * tokens):
        run = scratch / f"rss_{n}"
        start = time.perf_counter()
        write_synthetic_activations(run / "activations", {"train": n, "test": n}, d=D, n_features=4 * D, mean_active=20,
                                    rows_per_shard=65536)
        print(f"wrote {n:,} train + {n:,} test tokens of d = {D} ({2 * n * D * 4 / 2**30:.1f} GB) in {time.perf_counter() - start:.0f} s",
              flush=True)
        runs = [("train", "stream", mb) for mb in buffers] + [("evaluate", "stream", 0)]
        runs += [("train", "memory", 0)] if n == tokens else []
        for stage, mode, mb in runs:
            window_rows = int(mb * 2**20) // (4 * D) if mb else 0
            steps = 3 * window_rows // 4096 + 1 if mb else 3 * ((1024 << 20) // (4 * D)) // 4096 + 1  # through three windows
            measured = rss_of(stage, run, mode, steps, mb or 1024)
            rows.append({"tokens": n, "stage": stage, "mode": mode, "buffer_mb": mb or None, **measured})
            label = f"{mode} {int(mb)} MB" if stage == "train" and mode == "stream" else mode
            print(f"  {stage:<8} {label:<14} {n:>11,} tokens: peak RSS {measured['peak_rss_mb']:>7,.0f} MB, {measured['seconds']:.0f} s",
                  flush=True)
        shutil.rmtree(run)
    for stage, mb in [("train", mb) for mb in buffers] + [("evaluate", None)]:
        small, large = (next(r["peak_rss_mb"] for r in rows if r["tokens"] == n and r["stage"] == stage and r["mode"] == "stream"
                             and r["buffer_mb"] == mb) for n in (tokens, 8 * tokens))
        what = f"{stage} (buffer {int(mb)} MB)" if mb else stage
        print(f"{what}: peak RSS at 8N / N = {large / small:.3f} ({large:,.0f} vs {small:,.0f} MB)")
    return rows


# ----------------------------------------------------------------------- 3. projection
#: the paper's settings (reference/paper.md §6; configs/*.yaml): d, latents per member, sparsity, members,
#: runs, tokens per SAE, test tokens, methods' member-trainings per run
PAPER = {
    "Pythia-160M TopK (pythia160m-topk.yaml)": dict(d=768, m=16128, k=128, J=8, S=3, train=800e6, test=7e6, dense=False),
    "Gemma-2-2B JumpReLU (gemma2-2b-jumprelu.yaml)": dict(d=2304, m=16128, k=None, J=8, S=3, train=800e6, test=7e6, dense=True),
    "GELU-1L ReLU (gelu1l-relu.yaml)": dict(d=512, m=16384, k=None, J=8, S=3, train=800e6, test=7e6, dense=True),
}
H200_BF16_DENSE = 989e12   # FLOP/s, NVIDIA's datasheet figure (dense, no sparsity)
GPU_EFFICIENCY = 0.35      # assumed fraction of it an SAE step reaches (not measured: no GPU in this session)


def step_flop_per_token(d: int, m: int, k: int | None, dense: bool) -> float:
    """Training FLOP per token and member: encoder forward 2dm, its backward 4dm; the decoder
    6dm dense (ReLU/JumpReLU), 6dk sparse (TopK's sparse decoder)."""
    decoder = 6 * d * m if dense or k is None else 6 * d * k
    return 6 * d * m + decoder


def projection() -> list[dict]:
    rows = []
    print(f"\nprojection (FLOP model: training 6·d·m + decoder (6·d·m dense, 6·d·k TopK) per token and member; evaluation "
          f"4·d·m per token and member + connectivity 2·T·(J·m)² per J·m-wide model; GPU: {H200_BF16_DENSE / 1e12:.0f} TFLOP/s bf16 × an assumed efficiency of {GPU_EFFICIENCY})")
    print(f"{'setting':<46} {'stage':<9} {'disk':>9} {'RAM':>8} {'GPU mem':>8} {'GPU h':>7}")
    rate = H200_BF16_DENSE * GPU_EFFICIENCY
    for name, p in PAPER.items():
        d, m, J, S = p["d"], p["m"], p["J"], p["S"]
        # member-trainings per run: bagging J, boosting J (+ J(J-1)/2 residual forwards), expanded (J members' width),
        # expanded J× steps (J² member-widths), random decoder at J = 1 and J (1 + J)
        member_trainings = J + J + J + J * J + (1 + J)
        train_flop = S * member_trainings * p["train"] * step_flop_per_token(d, m, p["k"], p["dense"])
        eval_flop = S * (J + J + J + J + 1 + J) * p["test"] * 4 * d * m
        # connectivity of the five J·m-wide models per run as a dense product of binary codes: 2·T·(J·m)²
        eval_flop += S * 5 * 2 * p["test"] * (J * m) ** 2
        disk = (p["train"] + 2 * p["test"]) * d * 4
        gpu_train = 4 * (2 * J * d * m) * 4 + 10_000 * J * m * 2 * 3  # weights, grads, Adam (fp32) + bf16 codes of a 10k batch
        stages = [
            ("extract", disk, 2 * 2**30, None, None),
            ("train", 0, 2 * (1024 << 20) + 2**30, gpu_train, train_flop / rate / 3600),
            ("evaluate", 0, 2**30, (J * m) ** 2 // 8 + 4 * (2 * J * d * m), eval_flop / rate / 3600),
        ]
        for stage, disk_b, ram, gpu, hours in stages:
            rows.append({"setting": name, "stage": stage, "disk_gb": disk_b / 1e9, "ram_gb": ram / 2**30,
                         "gpu_gb": None if gpu is None else gpu / 2**30, "gpu_hours": hours})
            print(f"{name:<46} {stage:<9} {disk_b / 1e12:>7.2f}TB {ram / 2**30:>6.1f}GB "
                  f"{'' if gpu is None else f'{gpu / 2**30:.1f}GB':>8} {'' if hours is None else f'{hours:.1f}':>7}")
    print("extraction time is the language model's forward passes (not modelled); RAM: two windows of the default 1 GB "
          "shuffle buffer plus 1 GB; evaluation GPU memory: the co-firing bitmap of J·m latents plus the ensemble.")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="N of the RSS measurement (8N is measured too)")
    parser.add_argument("--throughput-tokens", type=int, default=300_000)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--device", default="cpu", help="device of the throughput comparison (cpu, cuda, ...)")
    parser.add_argument("--scratch", type=Path)
    parser.add_argument("--json", default="runs/bench/scale.json")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bf16 matmul "
          f"{matmul_flops_per_second(4096, D, 768, torch.bfloat16) / 1e9:.0f} GFLOP/s at [4096, {D}] x [{D}, 768]")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="sae-bench-scale-"))
    try:
        results = {"throughput": throughput(scratch, args.throughput_tokens, args.steps, args.rounds, args.device)}
        if not args.skip_rss:
            results["peak_rss"] = peak_rss(scratch, args.tokens)
        results["projection"] = projection()
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
