"""Thin Prefect tasks over the stage functions.

One task, :func:`run_stage`, calls a stage function (``tasks.<stage>.run_<stage>``) and
stamps its outputs. Its cache key is computed by the flow and passed in
(:func:`tasks.stage_state.stage_cache_key`). Results and cache records live under
``<run_dir>/.prefect/results`` (not the user's home), so a new process, a new
``PREFECT_HOME`` or a running server all hit the same cache.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from prefect import task
from pydantic import BaseModel

from tasks.common import ACTIVATIONS_DIR, DOCUMENTS_FILE, MANIFEST_FILE, StageResult
from tasks.config_sections import UNIT_STAGES
from tasks.stage_state import STAGES, write_stamp
from tasks.units import UnitExecutor

# ------------------------------------------------------------------------- the task
def _key_from_parameters(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["cache_key"]


def _extraction_result(report: Any, run_dir: Path) -> StageResult:
    """tasks.extract predates StageResult: translate its ExtractionReport."""
    m = report.manifest
    tokens = pd.DataFrame(
        [{"split": s, "tokens": m.tokens_per_split.get(s, 0), "documents": m.documents_per_split.get(s, 0), "shards": len(m.shards_of(s))} for s in m.tokens_per_split]
    )
    return StageResult(
        stage="extract",
        read=[],
        written=[f"{ACTIVATIONS_DIR}/{s}" for s in report.shards_written] + ([MANIFEST_FILE, DOCUMENTS_FILE] if report.did_work else []),
        validated=[ACTIVATIONS_DIR, DOCUMENTS_FILE],
        tables={"tokens_per_split": tokens},
        notes=[
            f"read model {m.model} (revision {m.revision}) and the corpus of config extract.corpus",
            f"{m.model} layer {m.layer}, d={m.d}, context {m.context_length}",
            f"{len(report.shards_written)} shards written, {len(report.shards_reused)} reused; "
            f"{len(m.shards)} shards pass their contract and manifest checksums",
        ],
        did_work=report.did_work,
        seconds=report.seconds,
    )


class _ProgressReporter:
    """An ``on_progress(fraction, message)`` callback that keeps a Prefect progress artifact current."""

    def __init__(self, key: str, min_interval_s: float = 1.0) -> None:
        from prefect.artifacts import create_progress_artifact

        self.artifact_id = create_progress_artifact(progress=0.0, key=key, description="training: starting")
        self.min_interval_s = min_interval_s
        self.last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        from prefect.artifacts import update_progress_artifact

        now = time.monotonic()
        if fraction < 1.0 and now - self.last < self.min_interval_s:
            return
        self.last = now
        update_progress_artifact(self.artifact_id, progress=round(100.0 * min(max(fraction, 0.0), 1.0), 1), description=f"training: {message}")


def artifact_slug(run_dir: str | Path) -> str:
    """A Prefect artifact key prefix (lowercase letters, digits and dashes) naming the run dir."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", Path(run_dir).name.lower()).strip("-") or "run"


#: stage -> (module, function) of the plain stage function; imported when the stage runs
STAGE_FUNCTIONS: dict[str, tuple[str, str]] = {
    "extract": ("tasks.extract", "run_extraction"),
    "train": ("tasks.train", "run_training"),
    "evaluate": ("tasks.evaluate", "run_evaluation"),
    "downstream": ("tasks.downstream", "run_downstream"),
    "interpret": ("tasks.interpret", "run_interpret"),
    "report": ("tasks.report", "run_report"),
}


def call_stage(stage: str, section: BaseModel, run_dir: Path, *, progress: bool, on_progress: Callable[[float, str], None] | None = None,
               executor: UnitExecutor | None = None) -> StageResult:
    """Call the plain stage function; its module is imported when needed. ``executor`` runs the
    units of the stages that fan out (:data:`tasks.config.UNIT_STAGES`; default: in process)."""
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    module, name = STAGE_FUNCTIONS[stage]
    function = getattr(importlib.import_module(module), name)
    kwargs: dict[str, Any] = {"progress": progress}
    if on_progress is not None:
        kwargs["on_progress"] = on_progress
    if executor is not None and stage in UNIT_STAGES:
        kwargs["executor"] = executor
    output = function(section, run_dir, **kwargs)
    return _extraction_result(output, run_dir) if stage == "extract" else output


@task(name="run-stage", task_run_name="{stage}", persist_result=True, cache_key_fn=_key_from_parameters)
def run_stage(stage: str, section: BaseModel, run_dir: str, cache_key: str, progress: bool = False,
              executor: UnitExecutor | None = None) -> StageResult:
    """Run one stage and stamp its outputs. Cached on ``cache_key`` (see module docstring);
    ``executor`` (where its units run) is not part of the key: it never changes a result."""
    run_dir_p = Path(run_dir)
    start = time.perf_counter()
    on_progress = _ProgressReporter(f"{artifact_slug(run_dir_p)}-train-progress") if stage == "train" else None
    result = call_stage(stage, section, run_dir_p, progress=progress, on_progress=on_progress, executor=executor)
    if on_progress is not None:
        on_progress(1.0, "done")
    result.seconds = result.seconds or time.perf_counter() - start
    write_stamp(run_dir_p, stage, cache_key, list(result.written) + list(result.figures))
    return result


@dataclass
class StageOutcome:
    """What a stage flow returns: the stage's result and whether it came from the cache."""

    stage: str
    cached: bool
    cache_key: str
    result: StageResult
    seconds: float
    reason: str = ""
    deleted: list[str] = field(default_factory=list)


def progress_enabled() -> bool:
    """tqdm bars only for an interactive terminal (workers and tests log instead)."""
    return sys.stderr.isatty()
