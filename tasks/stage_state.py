"""Where a stage stands in its run directory: cache keys, stamps and what it needs.

A stage's cache key is a hash of

* the stage's config section (the report: the whole config),
* the code version: the sources the stage runs (``sae_core``, ``data_contracts``, the
  stage's modules and the shared ``tasks`` modules),
* fingerprints of the input artifacts: the content hashes of every earlier stage's
  outputs as they are on disk now.

A Prefect cache record alone cannot notice that an output was deleted by hand, so every
finished stage also leaves a *stamp* (``.prefect/stamps/<stage>.json``) listing the files
it produced with their sizes and hashes; when a stamp no longer matches the disk, the
flow refreshes the cache and the stage recomputes. Changing an upstream artifact changes
every later stage's key, so those recompute too; recomputing an upstream stage that
reproduces the same bytes keeps the later stages cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from tasks.common import (
    ACTIVATIONS_DIR,
    DOCUMENTS_FILE,
    DOWNSTREAM_DIR,
    FIGURES_DIR,
    MANIFEST_FILE,
    METRICS_DIR,
    MODELS_DIR,
    REPORT_DIR,
)

StageName = Literal["extract", "train", "evaluate", "downstream", "interpret", "report"]
STAGES: tuple[str, ...] = ("extract", "train", "evaluate", "downstream", "interpret", "report")
STATE_DIR = ".prefect"  # under the run directory: results/, stamps/, hashes.json

# What each stage produces (globs relative to the run directory). The stamp also keeps
# whatever the stage itself reports as written, so a figure with an unexpected name is
# still tracked.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "extract": (DOCUMENTS_FILE, f"{ACTIVATIONS_DIR}/**/*"),
    "train": (f"{MODELS_DIR}/**/*",),
    "evaluate": (f"{METRICS_DIR}/**/*", f"{FIGURES_DIR}/intrinsic*"),
    "downstream": (f"{DOWNSTREAM_DIR}/**/*", f"{FIGURES_DIR}/probing*", f"{FIGURES_DIR}/scr*"),
    "interpret": ("interpret/**/*", "latents/**/*"),  # explanations; the latent analyses (tasks.latent_analyses)
    "report": (f"{REPORT_DIR}/**/*",),
}

# What a stage cannot start without (checked before it runs, so the error names the
# stage to run first instead of failing deep inside it).
REQUIRED_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "extract": (),
    "train": ((MANIFEST_FILE, "extract"),),
    "evaluate": ((MANIFEST_FILE, "extract"), (MODELS_DIR, "train")),
    "downstream": ((DOCUMENTS_FILE, "extract"), (MANIFEST_FILE, "extract"), (MODELS_DIR, "train")),
    "interpret": ((MANIFEST_FILE, "extract"), (MODELS_DIR, "train"), (f"{METRICS_DIR}/summary.parquet", "evaluate")),
    "report": (),  # the report says which artifact is missing and which stage makes it
}

# Files no stage makes that a stage reads when they are there: a sweep run into this run
# directory (`sae-ensembles sweep --out`) gives the report its sweep section.
OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {"report": ("sweep/results.parquet", "sweep/summary.json")}

# The source files each stage's results depend on (globs), besides sae_core/, data_contracts/
# and the shared tasks modules.
_SHARED_SOURCES: tuple[str, ...] = ("tasks/common.py", "tasks/config.py", "tasks/config_sections.py", "tasks/config_downstream.py", "tasks/summaries.py", "tasks/progress.py", "tasks/units.py")
_STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "extract": ("tasks/extract*.py", "tasks/sources.py"),
    "train": ("tasks/train*.py", "tasks/live_activations.py", "tasks/extract*.py", "tasks/interop.py"),
    "evaluate": ("tasks/evaluate.py", "tasks/figures.py", "tasks/top_contexts.py", "tasks/interpret_contexts.py", "tasks/config_interpret.py", "tasks/config_latent.py"),
    "downstream": ("tasks/downstream*.py", "tasks/labelled.py", "tasks/sources.py", "tasks/extract*.py", "tasks/figures.py"),
    "interpret": ("tasks/interpret*.py", "tasks/config_interpret.py", "tasks/config_latent.py", "tasks/latent_*.py"),
    "report": ("tasks/report*.py", "tasks/claims.py", "tasks/interop.py", "tasks/saebench.py", "tasks/sweep_results.py"),
}
_ROOT = Path(__file__).resolve().parent.parent


class MissingInput(RuntimeError):
    """A stage was asked to run before the stage that produces its input."""


# ------------------------------------------------------------------------ fingerprints
def code_version(stage: str) -> str:
    """sha256 over the sources ``stage`` runs: sae_core, data_contracts, the shared tasks modules, its own."""
    files = sorted((_ROOT / "sae_core").rglob("*.py")) + sorted((_ROOT / "data_contracts").rglob("*.py"))
    files += [_ROOT / p for p in _SHARED_SOURCES]
    files += [f for pattern in _STAGE_SOURCES[stage] for f in sorted(_ROOT.glob(pattern))]
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
    root = run_dir.resolve()
    for rel in extra:
        p = Path(rel) if Path(rel).is_absolute() else run_dir / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:  # a written directory (a model) stands for every file in it
            if f.resolve().is_relative_to(root) and not any(part.startswith(".") for part in f.resolve().relative_to(root).parts):
                found.add(f.resolve().relative_to(root).as_posix())
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
    # where units run never changes a result (the report's section is the whole config)
    exclude = {"orchestration"} if "orchestration" in type(section).model_fields else None
    return json.dumps(section.model_dump(mode="json", exclude=exclude), sort_keys=True)


def stage_cache_key(stage: str, section: BaseModel, run_dir: str | Path) -> str:
    """The stage's cache key: config section + code version + earlier stages' output fingerprints."""
    run_dir = Path(run_dir).resolve()
    hashes = _HashCache(run_dir)
    upstream = {s: outputs_fingerprint(run_dir, s, hashes) for s in STAGES[: STAGES.index(stage)]}
    optional = {rel: hashes.digest(run_dir, rel) for rel in OPTIONAL_INPUTS.get(stage, ()) if (run_dir / rel).is_file()}
    hashes.save()
    h = hashlib.sha256()
    key = {"stage": stage, "config": _section_json(section), "code": code_version(stage), "inputs": upstream}
    if optional:  # only when present: a run directory without a sweep keeps the key it had
        key["optional_inputs"] = optional
    h.update(json.dumps(key, sort_keys=True).encode())
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
