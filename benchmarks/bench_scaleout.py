"""Scale-out (issue 19): the smoke-sized training stage on 1 vs 2 worker processes, and the
speed-up the paper's settings can expect from their number of independent units.

1. Extracts configs/smoke.yaml into a temporary run directory (local runner), then times the
   train stage at ``--steps`` steps (default 400) (``--force``) four ways in this one process, on the same activations:
   ``local`` (every unit in the flow's process, torch on all cores, today's default), the
   same with one torch thread, and ``process`` with 1 worker and with 2 workers (Prefect's
   ProcessPoolTaskRunner, ``orchestration.threads = 1``). The models of the three one-thread
   runs are checked to be byte-identical (another thread count changes the float rounding of
   some matmuls: whether local on all cores matches is recorded).
2. For each paper-scale config, the training units (:func:`tasks.train.training_units`)
   with their cost in member-steps, and the makespan of a longest-first schedule on W
   workers: the speed-up W workers can give (total cost / makespan), bounded by the
   longest unit (a boosting chain of J stages, or the step-matched expanded SAE).

    python benchmarks/bench_scaleout.py [--json runs/bench/scaleout.json] [--skip-timing]

Takes ~10 minutes on this machine (2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAPER_CONFIGS = ("pythia160m-topk.yaml", "gemma2-2b-jumprelu.yaml", "gelu1l-relu.yaml", "default.yaml")
WORKERS = (1, 2, 4, 8, 16, 32)


def _models_digest(run: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((run / "models").rglob("*.safetensors")):
        h.update(p.relative_to(run).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def makespan(costs: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of ``costs`` on ``workers`` identical workers."""
    loads = [0.0] * workers
    heapq.heapify(loads)
    for c in sorted(costs, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + c)
    return max(loads)


def projection(config_name: str) -> dict:
    from flows.configs import load_pipeline_config
    from tasks.train import plan_jobs, training_units

    cfg = load_pipeline_config(ROOT / "configs" / config_name).train
    units = training_units(plan_jobs(cfg))
    # member-steps per recipe step x optimizer steps: J for bagging, J stages of one for boosting, ...
    costs = [float(sum(job.cost for job in unit)) for unit in units]
    total = sum(costs)
    return {
        "config": config_name,
        "units": [" + ".join(f"{j.model.name}/run={j.run}" for j in unit) for unit in units],
        "unit_member_steps_per_step": costs,
        "speedup": {w: round(total / makespan(costs, w), 2) for w in WORKERS},
        "bound": round(total / max(costs), 2),
    }


def timing(tmp: Path, steps: int) -> dict:
    from flows.configs import load_pipeline_config
    from flows.stages import extract_flow, train_flow
    from tasks.config_sections import OrchestrationConfig

    cfg = load_pipeline_config(ROOT / "configs" / "smoke.yaml")
    # the smoke recipe's 40 steps are ~8 s of compute on one thread: less than starting two worker
    # processes (torch, Prefect); --steps makes the work worth spreading
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"recipe": cfg.train.recipe.model_copy(update={"n_steps": steps})})})
    base = tmp / "base"
    extract_flow(config=cfg.extract, run_dir=str(base))
    rows = {}
    digests = {}
    for name, orch in [
        ("local", OrchestrationConfig()),
        ("local, 1 thread", OrchestrationConfig(threads=1)),
        ("process x1", OrchestrationConfig(runner="process", workers=1, threads=1)),
        ("process x2", OrchestrationConfig(runner="process", workers=2, threads=1)),
    ]:
        run = tmp / name.replace(" ", "-")
        shutil.copytree(base, run, ignore=shutil.ignore_patterns(".lock"))
        start = time.perf_counter()
        train_flow(config=cfg.train, run_dir=str(run), force=True, orchestration=orch)
        rows[name] = time.perf_counter() - start
        digests[name] = _models_digest(run)
        print(f"train stage, smoke config, {name}: {rows[name]:.1f} s", flush=True)
    one_thread = {digests[k] for k in ("local, 1 thread", "process x1", "process x2")}
    if len(one_thread) != 1:
        raise SystemExit(f"error: the runners trained different models with the same torch threads: {digests}")
    return {"steps": steps, "train_seconds": rows, "speedup_2_vs_1_workers": rows["process x1"] / rows["process x2"],
            "models_identical_at_equal_threads": True, "local_2_threads_identical_to_1_thread": digests["local"] in one_thread,
            "cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=str(ROOT / "runs" / "bench" / "scaleout.json"))
    parser.add_argument("--skip-timing", action="store_true", help="only the paper-settings projection")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the smoke recipe (default 400; the config says 40)")
    args = parser.parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict = {"projection": [projection(c) for c in PAPER_CONFIGS]}
    for p in result["projection"]:
        print(f"{p['config']}: {len(p['units'])} training units; speed-up on W workers "
              + ", ".join(f"W={w}: {s}x" for w, s in p["speedup"].items()) + f" (bound {p['bound']}x: the longest unit)")
    if not args.skip_timing:
        tmp = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
        os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
        try:
            result["timing"] = timing(tmp, args.steps)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        t = result["timing"]
        print(f"smoke train stage ({t['steps']} steps): 2 vs 1 worker processes {t['speedup_2_vs_1_workers']:.2f}x on {t['cores']} cores; "
              f"models byte-identical at 1 thread (local / process x1 / process x2); local on all cores identical too: "
              f"{t['local_2_threads_identical_to_1_thread']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
