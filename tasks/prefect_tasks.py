"""Thin Prefect tasks over the stage functions, and the bookkeeping that makes caching honest.

One task, :func:`run_stage`, calls a stage function (``tasks.<stage>.run_<stage>``). Its
cache key is computed by the flow and passed in (:func:`stage_cache_key`): a hash of

* the stage's config section (the report: the whole config),
* the code version: the sources the stage runs (``sae_core``, ``data_contracts``, the
  stage's module and the shared ``tasks`` modules),
* fingerprints of the input artifacts: the content hashes of every earlier stage's
  outputs as they are on disk now.

Results and cache records live under ``<run_dir>/.prefect/results`` (not the user's
home), so a new process, a new ``PREFECT_HOME`` or a running server all hit the same
cache. A Prefect cache record alone cannot notice that an output was deleted by hand, so
every finished stage also leaves a *stamp* (``.prefect/stamps/<stage>.json``) listing the
files it produced with their sizes and hashes; when a stamp no longer matches the disk,
the flow refreshes the cache and the stage recomputes. Changing an upstream artifact
changes every later stage's key, so those recompute too; recomputing an upstream stage
that reproduces the same bytes keeps the later stages cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import pandas as pd
from prefect import task
from pydantic import BaseModel

from tasks.common import (
    ACTIVATIONS_DIR,
    DOCUMENTS_FILE,
    DOWNSTREAM_DIR,
    FIGURES_DIR,
    METRICS_DIR,
    MODELS_DIR,
    REPORT_DIR,
    StageResult,
)

StageName = Literal["extract", "train", "evaluate", "downstream", "report"]
STAGES: tuple[str, ...] = ("extract", "train", "evaluate", "downstream", "report")
STATE_DIR = ".prefect"  # under the run directory: results/, stamps/, hashes.json

# What each stage produces (globs relative to the run directory). The stamp also keeps
# whatever the stage itself reports as written, so a figure with an unexpected name is
# still tracked.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "extract": (DOCUMENTS_FILE, f"{ACTIVATIONS_DIR}/**/*"),
    "train": (f"{MODELS_DIR}/**/*",),
    "evaluate": (f"{METRICS_DIR}/**/*", f"{FIGURES_DIR}/intrinsic*"),
    "downstream": (f"{DOWNSTREAM_DIR}/**/*", f"{FIGURES_DIR}/probing*", f"{FIGURES_DIR}/scr*"),
    "report": (f"{REPORT_DIR}/**/*",),
}

# What a stage cannot start without (checked before it runs, so the error names the
# stage to run first instead of failing deep inside it).
REQUIRED_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "extract": (),
    "train": ((f"{ACTIVATIONS_DIR}/manifest.json", "extract"),),
    "evaluate": ((f"{ACTIVATIONS_DIR}/manifest.json", "extract"), (MODELS_DIR, "train")),
    "downstream": ((DOCUMENTS_FILE, "extract"), (f"{ACTIVATIONS_DIR}/manifest.json", "extract"), (MODELS_DIR, "train")),
    "report": (),  # the report says which artifact is missing and which stage makes it
}

# The source files each stage's results depend on, besides sae_core/ and data_contracts/.
_STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "extract": ("tasks/extract.py", "tasks/sources.py"),
    "train": ("tasks/train.py",),
    "evaluate": ("tasks/evaluate.py", "tasks/figures.py"),
    "downstream": ("tasks/downstream.py", "tasks/labelled.py"),
    "report": ("tasks/report.py", "tasks/claims.py"),
}
_ROOT = Path(__file__).resolve().parent.parent


class MissingInput(RuntimeError):
    """A stage was asked to run before the stage that produces its input."""


# ------------------------------------------------------------------------ fingerprints
def code_version(stage: str) -> str:
    """sha256 over the sources ``stage`` runs: sae_core, data_contracts, tasks/{common,config}.py, its module."""
    files = sorted((_ROOT / "sae_core").rglob("*.py")) + sorted((_ROOT / "data_contracts").rglob("*.py"))
    files += [_ROOT / "tasks" / "common.py", _ROOT / "tasks" / "config.py"]
    files += [_ROOT / p for p in _STAGE_SOURCES[stage]]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


class _HashCache:
    """Content hashes of run-dir files, remembered by (size, mtime) in .prefect/hashes.json."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STATE_DIR / "hashes.json"
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.dirty = False

    def digest(self, run_dir: Path, rel: str) -> str:
        st = (run_dir / rel).stat()
        entry = self.known.get(rel)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        h = hashlib.sha256()
        with open(run_dir / rel, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        self.known[rel] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty:
            _write_json_atomic(self.path, self.known)
            self.dirty = False


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def stage_output_files(run_dir: Path, stage: str, extra: list[str] = ()) -> list[str]:
    """The files (relative paths) that ``stage`` produced, found by its globs plus ``extra``."""
    found: set[str] = set()
    for pattern in STAGE_OUTPUTS[stage]:
        for p in run_dir.glob(pattern):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts):
                found.add(p.relative_to(run_dir).as_posix())
    for rel in extra:
        p = Path(rel) if Path(rel).is_absolute() else run_dir / rel
        if p.is_file() and p.resolve().is_relative_to(run_dir.resolve()):
            found.add(p.resolve().relative_to(run_dir.resolve()).as_posix())
    return sorted(found)


def outputs_fingerprint(run_dir: Path, stage: str, hashes: _HashCache | None = None) -> str:
    """sha256 over (path, content hash) of everything ``stage`` produced; 'none' when nothing."""
    cache = hashes or _HashCache(run_dir)
    files = stage_output_files(run_dir, stage, _stamp(run_dir, stage).get("files", {}).keys())
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode())
        h.update(cache.digest(run_dir, rel).encode())
    if hashes is None:
        cache.save()
    return h.hexdigest()[:16] if files else "none"


def _section_json(section: BaseModel) -> str:
    return json.dumps(section.model_dump(mode="json"), sort_keys=True)


def stage_cache_key(stage: str, section: BaseModel, run_dir: str | Path) -> str:
    """The stage's cache key: config section + code version + earlier stages' output fingerprints."""
    run_dir = Path(run_dir).resolve()
    hashes = _HashCache(run_dir)
    upstream = {s: outputs_fingerprint(run_dir, s, hashes) for s in STAGES[: STAGES.index(stage)]}
    hashes.save()
    h = hashlib.sha256()
    h.update(json.dumps({"stage": stage, "config": _section_json(section), "code": code_version(stage), "inputs": upstream}, sort_keys=True).encode())
    return f"{stage}-{h.hexdigest()[:32]}"


# ------------------------------------------------------------------------------ stamps
def _stamp_path(run_dir: Path, stage: str) -> Path:
    return run_dir / STATE_DIR / "stamps" / f"{stage}.json"


def _stamp(run_dir: Path, stage: str) -> dict:
    try:
        return json.loads(_stamp_path(run_dir, stage).read_text())
    except (OSError, ValueError):
        return {}


def write_stamp(run_dir: Path, stage: str, cache_key: str, extra: list[str]) -> dict:
    """Record what ``stage`` produced (size + content hash per file) once it finished."""
    hashes = _HashCache(run_dir)
    files = {rel: [(run_dir / rel).stat().st_size, hashes.digest(run_dir, rel)] for rel in stage_output_files(run_dir, stage, extra)}
    hashes.save()
    stamp = {"stage": stage, "cache_key": cache_key, "files": files, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json_atomic(_stamp_path(run_dir, stage), stamp)
    return stamp


def outputs_intact(run_dir: str | Path, stage: str) -> tuple[bool, str]:
    """Whether the files ``stage`` last produced are all still there, unchanged; and why not."""
    run_dir = Path(run_dir).resolve()
    stamp = _stamp(run_dir, stage)
    if not stamp:
        return False, "first run in this directory (no stamp of a finished run)"
    hashes = _HashCache(run_dir)
    try:
        for rel, (size, digest) in stamp["files"].items():
            if not (run_dir / rel).is_file():
                return False, f"{rel} was deleted"
            if (run_dir / rel).stat().st_size != size or hashes.digest(run_dir, rel) != digest:
                return False, f"{rel} was changed"
    finally:
        hashes.save()
    return True, "outputs intact"


def missing_inputs(run_dir: str | Path, stage: str) -> list[tuple[str, str]]:
    """(artifact, stage that makes it) for each input ``stage`` needs that is not on disk."""
    run_dir = Path(run_dir)
    return [(rel, maker) for rel, maker in REQUIRED_INPUTS[stage] if not (run_dir / rel).exists()]


def clear_outputs(run_dir: str | Path, stage: str) -> list[str]:
    """Delete what ``stage`` produced (for --force), and its stamp; returns the deleted paths."""
    run_dir = Path(run_dir).resolve()
    files = stage_output_files(run_dir, stage, _stamp(run_dir, stage).get("files", {}).keys())
    for rel in files:
        (run_dir / rel).unlink(missing_ok=True)
    # drop the directories the stage owns entirely (e.g. models/, metrics/) once emptied
    for pattern in STAGE_OUTPUTS[stage]:
        top = pattern.split("/")[0]
        if pattern.endswith("/**/*") and (run_dir / top).is_dir():
            shutil.rmtree(run_dir / top)
    _stamp_path(run_dir, stage).unlink(missing_ok=True)
    return files


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
        read=[f"model {m.model} (revision {m.revision})", "corpus (config extract.corpus)"],
        written=[f"{ACTIVATIONS_DIR}/{s}" for s in report.shards_written] + ([f"{ACTIVATIONS_DIR}/manifest.json", DOCUMENTS_FILE] if report.did_work else []),
        validated=[f"{ACTIVATIONS_DIR} ({len(m.shards)} shards, manifest checksums)", DOCUMENTS_FILE],
        tables={"tokens_per_split": tokens},
        notes=[f"{m.model} layer {m.layer}, d={m.d}, context {m.context_length}", f"{len(report.shards_written)} shards written, {len(report.shards_reused)} reused"],
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


def call_stage(stage: str, section: BaseModel, run_dir: Path, *, progress: bool, on_progress: Callable[[float, str], None] | None = None) -> StageResult:
    """Call the plain stage function (no Prefect inside); modules are imported when needed."""
    if stage == "extract":
        from tasks.extract import run_extraction

        return _extraction_result(run_extraction(section, run_dir, progress=progress), run_dir)
    if stage == "train":
        from tasks.train import run_training

        return run_training(section, run_dir, progress=progress, on_progress=on_progress)
    if stage == "evaluate":
        from tasks.evaluate import run_evaluation

        return run_evaluation(section, run_dir, progress=progress)
    if stage == "downstream":
        from tasks.downstream import run_downstream

        return run_downstream(section, run_dir, progress=progress)
    if stage == "report":
        from tasks.report import run_report

        return run_report(section, run_dir, progress=progress)
    raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")


@task(name="run-stage", task_run_name="{stage}", persist_result=True, cache_key_fn=_key_from_parameters)
def run_stage(stage: str, section: BaseModel, run_dir: str, cache_key: str, progress: bool = False) -> StageResult:
    """Run one stage and stamp its outputs. Cached on ``cache_key`` (see module docstring)."""
    run_dir_p = Path(run_dir)
    start = time.perf_counter()
    on_progress = _ProgressReporter(f"{artifact_slug(run_dir_p)}-train-progress") if stage == "train" else None
    result = call_stage(stage, section, run_dir_p, progress=progress, on_progress=on_progress)
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
