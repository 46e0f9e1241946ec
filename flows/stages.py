"""The Prefect flows: one per stage and the ``pipeline`` that chains them (SPEC §9).

Every stage flow does the same thing (:func:`run_stage_flow`):

0. take the run directory's lock (:mod:`flows.rundir`): a second run into the same
   directory fails at once instead of interleaving its writes with this one's; stale
   temporaries of a killed run are swept;
1. refuse to start when an input artifact is missing, naming the stage that makes it;
2. with ``force``, delete the stage's earlier outputs;
3. compute the cache key (config section + code version + input fingerprints) and check
   that the outputs the cached run produced are still on disk, unchanged;
4. run the cached task (refreshing the cache when forced or when outputs are gone);
5. publish the UI artifacts (summary, tables, figures), also for a cached stage.

Flows only compose; the work is in ``tasks.<stage>`` and ``tasks.prefect_tasks``.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.artifacts import publish_stage_artifacts
from flows.rundir import run_directory_lock
from tasks.config import DownstreamConfig, EvaluateConfig, ExtractConfig, PipelineConfig, TrainStageConfig
from tasks.prefect_tasks import StageOutcome, progress_enabled, run_stage
from tasks.stage_state import (
    STAGES,
    STATE_DIR,
    MissingInput,
    StageName,
    clear_outputs,
    missing_inputs,
    outputs_intact,
    stage_cache_key,
)


def default_run_dir(config: PipelineConfig) -> str:
    """runs/<config name>/ (relative to the working directory)."""
    return str(Path("runs") / config.name)


def _run_name() -> str:
    """<flow>-<run dir name>, e.g. evaluate-smoke."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    cfg = params.get("config")
    name = cfg.get("name") if isinstance(cfg, dict) else getattr(cfg, "name", None)
    where = params.get("run_dir") or (Path(str(params["config_file"])).stem if params.get("config_file") else name or "default")
    return f"{flow_run.flow_name}-{Path(str(where)).name}"


def run_stage_flow(stage: str, section: BaseModel, run_dir: str | Path | None, force: bool, config_file: str | None = None) -> StageOutcome:
    """The body every stage flow shares (see the module docstring).

    config_file (a YAML config, relative to the working directory) replaces ``section`` with
    that file's section, and its name gives the default run_dir, runs/<name>/.
    """
    if config_file:
        from flows.configs import load_pipeline_config

        full = load_pipeline_config(config_file)
        section = stage_section(full, stage)
        run_dir = run_dir or default_run_dir(full)
    run_dir = run_dir or "runs/default"
    run_dir = Path(run_dir).resolve()
    with run_directory_lock(run_dir) as swept:
        if swept:
            get_run_logger().info("removed %d stale temporaries of an interrupted run: %s", len(swept), ", ".join(swept[:5]))
        return _run_stage_locked(stage, section, run_dir, force)


def _run_stage_locked(stage: str, section: BaseModel, run_dir: Path, force: bool) -> StageOutcome:
    logger = get_run_logger()
    missing = missing_inputs(run_dir, stage)
    if missing:
        rel, maker = missing[0]
        raise MissingInput(
            f"stage {stage!r} needs {run_dir / rel}, which is missing: run `sae-ensembles {maker}` "
            f"(or `sae-ensembles run`) with the same --config/--out first"
        )
    deleted = clear_outputs(run_dir, stage) if force else []
    if force:
        logger.info("--force %s: deleted %d earlier output files", stage, len(deleted))
    key = stage_cache_key(stage, section, run_dir)
    intact, why = (False, "forced") if force else outputs_intact(run_dir, stage)
    start = time.perf_counter()
    task = run_stage.with_options(result_storage=run_dir / STATE_DIR / "results", refresh_cache=not intact)
    state = task(stage, section, str(run_dir), key, progress=progress_enabled(), return_state=True)
    result = state.result()  # re-raises the stage's error
    cached = state.name == "Cached"
    reason = "cache miss: new config, code or inputs" if intact else f"cache refreshed: {why}"
    outcome = StageOutcome(stage, cached, key, result, time.perf_counter() - start, "" if cached else reason, deleted)
    logger.info("stage %s: %s in %.1f s", stage, "cached" if cached else "ran", outcome.seconds)
    publish_stage_artifacts(outcome, run_dir)
    return outcome


@flow(name="extract", flow_run_name=_run_name, log_prints=True)
def extract_flow(
    config: ExtractConfig = ExtractConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None
) -> StageOutcome:
    """Extract validated activation shards of a model layer over the corpus."""
    return run_stage_flow("extract", config, run_dir, force, config_file)


@flow(name="train", flow_run_name=_run_name, log_prints=True)
def train_flow(
    config: TrainStageConfig = TrainStageConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None
) -> StageOutcome:
    """Train single, expanded, bagging and boosting SAEs (S runs each) on the extracted activations."""
    return run_stage_flow("train", config, run_dir, force, config_file)


@flow(name="evaluate", flow_run_name=_run_name, log_prints=True)
def evaluate_flow(
    config: EvaluateConfig = EvaluateConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None
) -> StageOutcome:
    """Intrinsic metrics of every method at J = 1..J_max, with confidence intervals and figures."""
    return run_stage_flow("evaluate", config, run_dir, force, config_file)


@flow(name="downstream", flow_run_name=_run_name, log_prints=True)
def downstream_flow(
    config: DownstreamConfig = DownstreamConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None
) -> StageOutcome:
    """Sparse probing and spurious correlation removal with every method's codes."""
    return run_stage_flow("downstream", config, run_dir, force, config_file)


@flow(name="report", flow_run_name=_run_name, log_prints=True)
def report_flow(
    config: PipelineConfig = PipelineConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None
) -> StageOutcome:
    """report/report.md and a self-contained report/report.html from whatever the run holds."""
    return run_stage_flow("report", config, run_dir, force, config_file)


def extraction_lines(outcome: StageOutcome, run_dir: Path) -> list[str]:
    """What the extract command prints: what it did, and where the activations and documents are."""
    from data_contracts.activations import read_manifest
    from tasks.common import ACTIVATIONS_DIR, DOCUMENTS_FILE

    m = read_manifest(run_dir / ACTIVATIONS_DIR)
    fresh = not outcome.cached and outcome.result.did_work
    written = 0 if outcome.cached else sum(1 for w in outcome.result.written if w.endswith(".parquet") and w.startswith(f"{ACTIVATIONS_DIR}/"))
    verb = "extracted" if fresh else "already up to date:"
    return [
        f"{verb} {m.model} layer {m.layer} (d={m.d}): " + ", ".join(f"{k} {v} tokens" for k, v in m.tokens_per_split.items()),
        f"activations in {run_dir / ACTIVATIONS_DIR} ({len(m.shards)} shards, {written} written), documents in {run_dir / DOCUMENTS_FILE}",
    ]


STAGE_FLOWS = {"extract": extract_flow, "train": train_flow, "evaluate": evaluate_flow, "downstream": downstream_flow, "report": report_flow}


def stage_section(config: PipelineConfig, stage: str) -> BaseModel:
    """The part of the config a stage reads (the report reads all of it)."""
    return config if stage == "report" else getattr(config, stage)


@flow(name="pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline_flow(
    config: PipelineConfig = PipelineConfig(),
    run_dir: str | None = None,
    force: StageName | None = None,
    config_file: str | None = None,
) -> dict[str, StageOutcome]:
    """Every stage in order; finished stages come from the cache.

    config: the run's configuration (one form section per stage).
    run_dir: where artifacts go; default runs/<config.name>/ under the working directory.
    force: recompute this stage and every stage after it.
    config_file: a YAML config (relative to the working directory); when set it replaces `config`.
    """
    if config_file:
        from flows.configs import load_pipeline_config

        config = load_pipeline_config(config_file)
    run_dir = run_dir or default_run_dir(config)
    first_forced = STAGES.index(force) if force else len(STAGES)
    outcomes: dict[str, StageOutcome] = {}
    with run_directory_lock(run_dir) as swept:  # held across the stages: no other run slips in between them
        if swept:
            get_run_logger().info("removed %d stale temporaries of an interrupted run: %s", len(swept), ", ".join(swept[:5]))
        for i, stage in enumerate(STAGES):
            sub = STAGE_FLOWS[stage].with_options(flow_run_name=f"{stage}-{config.name}")
            outcomes[stage] = sub(config=stage_section(config, stage), run_dir=run_dir, force=i >= first_forced)
    report = Path(run_dir).resolve() / "report" / "report.html"
    get_run_logger().info("report: %s", report)
    return outcomes
