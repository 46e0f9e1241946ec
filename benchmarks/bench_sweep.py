"""Population-based training vs a grid at equal compute (issue 20's acceptance), on the embedded MiniLM data.

Both search the learning rate of a BatchTopK SAE (k and width fixed, so explained variance
compares like with like) over the same range, with the same number of SAEs and steps each,
so both spend ``size × steps`` member-steps of training:

- grid: ``size`` learning rates log-spaced over [lr_low, lr_high], one SAE each;
- population: ``size`` members starting at log-uniform learning rates in the same range,
  scored on the validation split every ``steps / rounds`` steps, the worst quarter
  continuing from copies of the best quarter with lr × 0.8 or × 1.25.

It reports the validation EV of the population's best member, of the median and the best
grid point, and (held out from every choice) the same SAEs' EV on the test split.
Extracts configs/smoke.yaml into ``--run-dir`` first (cached when already there).

    python benchmarks/bench_sweep.py [--run-dir runs/bench/sweep] [--json runs/bench/sweep.json]

Takes ~6 minutes here (2 cores), most of it the extraction on a fresh run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/bench/sweep")
    parser.add_argument("--json", default=None)
    parser.add_argument("--size", type=int, default=8, help="grid points = population members")
    parser.add_argument("--steps", type=int, default=320, help="training steps per SAE")
    parser.add_argument("--d-sae", type=int, default=512, help="latents of every SAE (BatchTopK, k = 32)")
    parser.add_argument("--rounds", type=int, default=8, help="population evaluation rounds")
    parser.add_argument("--lr-low", type=float, default=1e-4)
    parser.add_argument("--lr-high", type=float, default=3e-2)
    parser.add_argument("--seed", type=int, default=0, help="population seed (initial values, copies, perturbations)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")

    import pandas as pd
    from prefect.testing.utilities import prefect_test_harness

    from data_contracts.sweep import read_results
    from flows.configs import load_pipeline_config
    from flows.sweep import sweep_flow
    from sae_core.io import load_ensemble
    from tasks.config_sweep import SweepConfig
    from tasks.sweep import point_dir, validation_metrics, validation_source
    from tasks.sweep_population import BEST_MODEL_DIR

    base = load_pipeline_config(ROOT / "configs" / "smoke.yaml")
    fixed = {"train.architecture": ["batchtopk"], "train.d_sae": [args.d_sae], "train.k": [32], "train.recipe.n_steps": [args.steps]}
    lrs = [math.exp(math.log(args.lr_low) + i * (math.log(args.lr_high) - math.log(args.lr_low)) / (args.size - 1)) for i in range(args.size)]
    grid = SweepConfig(base=base, grid={**fixed, "train.recipe.lr": lrs}, seeds=[0])
    population = SweepConfig(base=base, mode="population", grid={k: v for k, v in fixed.items() if k != "train.recipe.n_steps"},
                             population={"size": args.size, "interval": args.steps // args.rounds, "rounds": args.rounds,
                                         "seed": args.seed, "search": {"train.recipe.lr": {"low": args.lr_low, "high": args.lr_high}}})
    run = Path(args.run_dir)
    out: dict = {"size": args.size, "steps": args.steps, "rounds": args.rounds, "lr_range": [args.lr_low, args.lr_high],
                 "member_steps_each": args.size * args.steps}
    with prefect_test_harness(server_startup_timeout=60):
        start = time.perf_counter()
        sweep_flow(config=grid, run_dir=str(run))
        out["grid_seconds"] = time.perf_counter() - start
        grid_rows = read_results(run / "sweep" / "results.parquet")
        start = time.perf_counter()
        summary = sweep_flow(config=population, run_dir=str(run))
        out["population_seconds"] = time.perf_counter() - start
        pop_rows = read_results(run / "sweep" / "results.parquet")
    test = validation_source(run, "test", None)
    grid_rows["test_ev"] = [validation_metrics(load_ensemble(run / point_dir(int(p), 0)), test)["explained_variance"]
                            for p in grid_rows["point"]]
    last = pop_rows[pop_rows["round"] == args.rounds]
    best = last.loc[last["score"].idxmax()]
    median_grid = float(grid_rows["explained_variance"].median())
    out.update({
        "grid": grid_rows[["lr", "explained_variance", "test_ev", "l0"]].to_dict("records"),
        "grid_val_ev_median": median_grid,
        "grid_val_ev_best": float(grid_rows["explained_variance"].max()),
        "grid_test_ev_of_val_best": float(grid_rows.loc[grid_rows["explained_variance"].idxmax(), "test_ev"]),
        "grid_test_ev_median": float(grid_rows["test_ev"].median()),
        "population_val_ev_best": float(best["explained_variance"]),
        "population_val_ev_median_member": float(last["explained_variance"].median()),
        "population_best_lr_final": float(best["lr"]),
        "population_test_ev_best": validation_metrics(load_ensemble(run / BEST_MODEL_DIR), test)["explained_variance"],
        "population_replacements": len(summary["log"]),
        "population_beats_grid_median": bool(best["explained_variance"] > median_grid),
    })
    print(pd.DataFrame(out["grid"]).to_string(index=False))
    for key in ("grid_val_ev_median", "grid_val_ev_best", "grid_test_ev_median", "grid_test_ev_of_val_best", "population_val_ev_best",
                "population_val_ev_median_member", "population_test_ev_best", "population_best_lr_final", "population_beats_grid_median",
                "grid_seconds", "population_seconds"):
        print(f"{key}: {out[key]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
