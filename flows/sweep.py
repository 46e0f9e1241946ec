"""The ``sweep`` flow: a grid or a population of train settings, scored on the validation split (SPEC §13).

1. take the run directory's lock (the base config's run directory, runs/<name>/ by default);
2. run the base config's extract stage as a subflow (cached as usual: a run directory that
   already holds the activations extracts nothing);
3. hand the sweep's units to the runner the base config's ``orchestration`` section names
   (:mod:`flows.orchestration`): one per (grid point, seed) (:mod:`tasks.sweep`), or one per
   population member and round (:mod:`tasks.sweep_population`); a point or segment that is
   done is not redone on a rerun;
4. collect ``sweep/results.parquet`` (contract: :mod:`data_contracts.sweep`), choose a point
   (the L0 guide when the grid moves L0, else the best score), write ``sweep/best.yaml``,
   ``sweep/summary.json`` and ``sweep/report.md``/``.html``; on object storage publish ``sweep/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger

from data_contracts.sweep import write_results
from flows.orchestration import unit_executor
from flows.stages import default_run_dir, extract_flow, open_store
from tasks.config_sweep import SweepConfig
from tasks.report_sweep import SUMMARY_FILE, write_sweep_report
from tasks.sweep import RESULTS_FILE, SWEEP_DIR, add_stability, choose, grid_units, point_means, result_row, write_best, write_json_atomic
from tasks.progress import ProgressLog
from tasks.units import executor_or_default


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read a sweep YAML file; a relative ``base`` path is taken relative to the working directory,
    or to the sweep file's folder when it is not found there. Raises ConfigError naming the file and key."""
    from pydantic import ValidationError

    from flows.configs import ConfigError
    from tasks.config_sections import read_yaml_mapping

    file = Path(path)
    try:
        raw = read_yaml_mapping(file, "sweep config file", "settings (base, mode, grid, …)")
    except ValueError as err:
        raise ConfigError(f"error: {err}") from err
    base = raw.get("base")
    if isinstance(base, str) and not Path(base).is_file() and (file.parent / base).is_file():
        raw["base"] = str(file.parent / base)
    try:
        return SweepConfig(**raw)
    except ValidationError as err:
        lines = [f"  {file}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"error: sweep config {file} is invalid:\n" + "\n".join(lines)) from err


def _sweep_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    where = params.get("run_dir") or params.get("config_file") or "sweep"
    return f"sweep-{Path(str(where)).stem}"


def _grid(sweep: SweepConfig, base, run_dir: Path, executor, log) -> tuple[list[dict], list[str]]:
    planned = grid_units(sweep, base)
    log.info("sweep: %d grid points x %d seeds = %d SAEs, %s steps", len(sweep.grid_points()), len(sweep.seeds), len(planned),
             "/".join(sorted({str(t.recipe.n_steps) for *_, t in planned})))
    progress = ProgressLog("sweep", len(planned), "SAEs", interval_s=0)

    def done(unit, values) -> None:
        progress.advance(1, f"{unit.label}: {sweep.objective} {values[sweep.objective]:.4f}, L0 {values['l0']:.2f}, c_dec {values['c_dec']:.4f}")

    values = executor.run("train", [u for u, *_ in planned], on_done=done)
    rows = [result_row("grid", point, seed, 0, params, train, train.recipe.n_steps, v, sweep.score(v))
            for (_, point, seed, params, train), v in zip(planned, values)]
    return rows, []


@flow(name="sweep", flow_run_name=_sweep_run_name, log_prints=True)
def sweep_flow(config: SweepConfig | None = None, config_file: str | None = None, run_dir: str | None = None) -> dict:
    """Train and score one SAE per grid point and seed (or a population), choose a recipe, write sweep/.

    config: the sweep (base pipeline config, mode, grid or population); config_file (a YAML sweep
    config, relative to the working directory) replaces it. run_dir: default the base config's, runs/<name>/.
    Returns the summary written to sweep/summary.json.
    """
    if config_file:
        config = load_sweep_config(config_file)
    if config is None:
        raise ValueError("sweep_flow needs config or config_file (a sweep YAML, e.g. configs/sweep-smoke.yaml)")
    log = get_run_logger()
    base = config.pipeline()
    run_dir = run_dir or default_run_dir(base)
    store = open_store(run_dir, base.orchestration)
    with store.lock():  # re-entrant: the extract subflow takes it too
        extract_flow.with_options(flow_run_name=f"extract-{base.name}")(config=base.extract, run_dir=str(run_dir),
                                                                        orchestration=base.orchestration)
        local = store.local
        if base.orchestration.threads:
            import torch

            torch.set_num_threads(base.orchestration.threads)
        executor = executor_or_default(unit_executor(base.orchestration, store), local)
        if config.mode == "grid":
            rows, replacements = _grid(config, base, local, executor, log)
        else:
            from tasks.sweep_population import run_population

            rows, _, replacements = run_population(config, base, local, executor, report=log.info,
                                                   publish=store.push if store.remote else None)
        frame = add_stability(pd.DataFrame(rows), local)
        write_results(frame, local / RESULTS_FILE)
        point, why, guide = choose(frame, config)
        chosen = point_means(frame).set_index("point").loc[point]  # its seeds averaged (population: its last round)
        params = json.loads(chosen["params"])
        write_best(local, base, params, why)
        summary = {"point": point, "params": params, "values": ", ".join(f"{k}={v}" for k, v in params.items()) or "the base recipe",
                   "why": why, "split": config.validation_split, "mode": config.mode,
                   "guide_l0": guide.l0 if guide else None, "guide_rule": guide.rule if guide else None,
                   "guide_at_edge": guide.at_edge if guide else None, "log": replacements,
                   "chosen_metrics": {m: float(chosen[m]) for m in ("explained_variance", "mse", "l0", "c_dec", "dead_fraction")}}
        write_json_atomic(local / SUMMARY_FILE, summary)
        write_sweep_report(local, f"Sweep: {base.name}")
        log.info("sweep: chose point %d (%s) by %s; %s", point, summary["values"], why, local / SWEEP_DIR / "report.html")
        if store.remote:
            store.push([SWEEP_DIR])
    return summary



