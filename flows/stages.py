"""The Prefect flows: one per stage and the ``pipeline`` that chains them (SPEC §9).

Every stage flow does the same thing (:func:`run_stage_flow`):

0. take the run directory's lock (:mod:`flows.rundir`; a lease object on object storage,
   :mod:`flows.storage`): a second run into the same directory fails at once instead of
   interleaving its writes with this one's; stale temporaries of a killed run are swept;
   a run directory on object storage is mirrored locally (its published files fetched);
1. refuse to start when an input artifact is missing, naming the stage that makes it;
2. with ``force``, delete the stage's earlier outputs;
3. compute the cache key (config section + code version + input fingerprints) and check
   that the outputs the cached run produced are still on disk, unchanged;
4. run the cached task (refreshing the cache when forced or when outputs are gone);
5. publish the UI artifacts (summary, tables, figures), also for a cached stage;
6. on object storage, publish the stage's outputs, then its stamp (the commit point).

The stages that fan out (extract, train, evaluate) hand their units of work to the runner
of the config's ``orchestration`` section (:mod:`flows.orchestration`).

Flows only compose; the work is in ``tasks.<stage>`` and ``tasks.prefect_tasks``.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.artifacts import publish_stage_artifacts
from flows.orchestration import unit_executor
from flows.storage import RunStore
from tasks.common import ACTIVATIONS_DIR, DOCUMENTS_FILE, DOWNSTREAM_DIR, FIGURES_DIR, METRICS_DIR, MODELS_DIR, REPORT_DIR
from tasks.config_interpret import InterpretConfig
from tasks.config import DownstreamConfig, EvaluateConfig, ExtractConfig, OrchestrationConfig, PipelineConfig, TrainStageConfig
from tasks.units import UnitExecutor
from tasks.prefect_tasks import StageOutcome, progress_enabled, run_stage
from tasks.stage_state import (
    OPTIONAL_INPUTS,
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


#: what each stage publishes to an object-store run directory (flows.storage), besides the
#: stage state under .prefect/ (stamps and Prefect results), published last: a stage's stamp
#: is its commit point. Before a stage, everything published is pulled into the mirror.
PUBLISHED: dict[str, tuple[str, ...]] = {
    "extract": (DOCUMENTS_FILE, ACTIVATIONS_DIR),
    "train": (MODELS_DIR,),
    "evaluate": (METRICS_DIR, FIGURES_DIR),
    "downstream": (DOWNSTREAM_DIR, FIGURES_DIR),
    "interpret": ("interpret", "latents", FIGURES_DIR),
    "report": (REPORT_DIR,),
}
# (not hashes.json: its keys are this machine's file times)
STATE_PUBLISHED = (f"{STATE_DIR}/stamps", f"{STATE_DIR}/results")


def open_store(run_dir: str | Path, orchestration: OrchestrationConfig) -> RunStore:
    return RunStore.open(run_dir, cache_dir=orchestration.cache_dir, storage_options=orchestration.storage_options or None)


def run_stage_flow(stage: str, section: BaseModel, run_dir: str | Path | None, force: bool, config_file: str | None = None,
                   orchestration: OrchestrationConfig | None = None) -> StageOutcome:
    """The body every stage flow shares (see the module docstring).

    config_file (a YAML config, relative to the working directory) replaces ``section`` and
    ``orchestration`` with that file's sections, and its name gives the default run_dir, runs/<name>/.
    run_dir may be a path or an fsspec URL (s3://, memory://): the stage then works in a
    local mirror and publishes what it wrote (:mod:`flows.storage`).
    """
    if config_file:
        from flows.configs import load_pipeline_config

        full = load_pipeline_config(config_file)
        section = stage_section(full, stage)
        orchestration = full.orchestration
        run_dir = run_dir or default_run_dir(full)
    orchestration = orchestration or OrchestrationConfig()
    store = open_store(run_dir or "runs/default", orchestration)
    with store.lock() as swept:
        if swept:
            get_run_logger().info("removed %d stale temporaries of an interrupted run: %s", len(swept), ", ".join(swept[:5]))
        if store.remote:
            optional = [rel for rels in OPTIONAL_INPUTS.values() for rel in rels]  # a sweep's results, for the report
            pulled = store.pull([p for paths in PUBLISHED.values() for p in paths] + list(STATE_PUBLISHED) + optional)
            get_run_logger().info("run directory %s: mirrored in %s (%d files fetched)", store.url, store.local, len(pulled))
        if orchestration.threads:  # the local runner's units run here; others get the count as a parameter
            import torch

            torch.set_num_threads(orchestration.threads)
        outcome = _run_stage_locked(stage, section, store.local, force, unit_executor(orchestration, store))
        if store.remote:
            store.push(PUBLISHED[stage])
            store.push(STATE_PUBLISHED)  # the stamp last: the stage is published once it is there
        return outcome


def _run_stage_locked(stage: str, section: BaseModel, run_dir: Path, force: bool, executor: UnitExecutor | None = None) -> StageOutcome:
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
    state = task(stage, section, str(run_dir), key, progress=progress_enabled(), executor=executor, return_state=True)
    result = state.result()  # re-raises the stage's error
    cached = state.name == "Cached"
    reason = "cache miss: new config, code or inputs" if intact else f"cache refreshed: {why}"
    outcome = StageOutcome(stage, cached, key, result, time.perf_counter() - start, "" if cached else reason, deleted)
    logger.info("stage %s: %s in %.1f s", stage, "cached" if cached else "ran", outcome.seconds)
    publish_stage_artifacts(outcome, run_dir)
    return outcome


@flow(name="extract", flow_run_name=_run_name, log_prints=True)
def extract_flow(
    config: ExtractConfig = ExtractConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None,
    orchestration: OrchestrationConfig = OrchestrationConfig(),
) -> StageOutcome:
    """Extract validated activation shards of a model layer over the corpus."""
    return run_stage_flow("extract", config, run_dir, force, config_file, orchestration)


@flow(name="train", flow_run_name=_run_name, log_prints=True)
def train_flow(
    config: TrainStageConfig = TrainStageConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None,
    orchestration: OrchestrationConfig = OrchestrationConfig(),
) -> StageOutcome:
    """Train single, expanded, bagging and boosting SAEs (S runs each) on the extracted activations."""
    return run_stage_flow("train", config, run_dir, force, config_file, orchestration)


@flow(name="evaluate", flow_run_name=_run_name, log_prints=True)
def evaluate_flow(
    config: EvaluateConfig = EvaluateConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None,
    orchestration: OrchestrationConfig = OrchestrationConfig(),
) -> StageOutcome:
    """Intrinsic metrics of every method at J = 1..J_max, with confidence intervals and figures."""
    return run_stage_flow("evaluate", config, run_dir, force, config_file, orchestration)


@flow(name="downstream", flow_run_name=_run_name, log_prints=True)
def downstream_flow(
    config: DownstreamConfig = DownstreamConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None,
    orchestration: OrchestrationConfig = OrchestrationConfig(),
) -> StageOutcome:
    """Sparse probing and spurious correlation removal with every method's codes."""
    return run_stage_flow("downstream", config, run_dir, force, config_file, orchestration)


@flow(name="interpret", flow_run_name=_run_name, log_prints=True)
def interpret_flow(
    config: InterpretConfig = InterpretConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None,
    orchestration: OrchestrationConfig = OrchestrationConfig(),
) -> StageOutcome:
    """Explanations of sampled latents by an LLM, scored by detection and fuzzing, and the latent analyses."""
    return run_stage_flow("interpret", config, run_dir, force, config_file, orchestration)


@flow(name="report", flow_run_name=_run_name, log_prints=True)
def report_flow(
    config: PipelineConfig = PipelineConfig(), run_dir: str | None = None, force: bool = False, config_file: str | None = None
) -> StageOutcome:
    """report/report.md and a self-contained report/report.html from whatever the run holds."""
    return run_stage_flow("report", config, run_dir, force, config_file, config.orchestration)


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


STAGE_FLOWS = {"extract": extract_flow, "train": train_flow, "evaluate": evaluate_flow, "downstream": downstream_flow,
               "interpret": interpret_flow, "report": report_flow}


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
    store = open_store(run_dir, config.orchestration)
    with store.lock() as swept:  # held across the stages: no other run slips in between them
        if swept:
            get_run_logger().info("removed %d stale temporaries of an interrupted run: %s", len(swept), ", ".join(swept[:5]))
        for i, stage in enumerate(STAGES):
            sub = STAGE_FLOWS[stage].with_options(flow_run_name=f"{stage}-{config.name}")
            extra = {} if stage == "report" else {"orchestration": config.orchestration}
            outcomes[stage] = sub(config=stage_section(config, stage), run_dir=str(run_dir), force=i >= first_forced, **extra)
    report = store.local / "report" / "report.html"
    get_run_logger().info("report: %s%s", report, f" (published to {store.url}/report/)" if store.remote else "")
    return outcomes
