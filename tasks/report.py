"""The report stage: ``report/report.md`` and a self-contained ``report/report.html`` (SPEC §10).

It reads whatever the run directory holds and never fails on a missing optional artifact:
each absent table or figure is named, with the stage that produces it. Tables are read
through ``data_contracts.validate`` (a contract violation is an error, as everywhere). It
reads tables and figures only; it runs no model.

Sections (:mod:`tasks.report_sections`, one function each): the run, operating point
(SPEC §11), the paper's claims, intrinsic metrics (mean [95% CI] with L0 beside every
metric) and their figures, probing accuracy vs k, SCR score vs n (with cell counts), other
figures, top-activating contexts, trained models, missing artifacts, the run's config and
the package versions. The blocks they return (:mod:`tasks.report_doc`) render to both files.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd

from data_contracts import UnknownArtifact, validate
from data_contracts.activations import ActivationManifest, read_manifest
from tasks import downstream_report
from tasks import report_sections as sections
from tasks.common import (
    ACTIVATIONS_DIR,
    DOWNSTREAM_DIR,
    FIGURES_DIR,
    MANIFEST_FILE,
    REPORT_DIR,
    ModelDir,
    NoTrainedModels,
    StageResult,
    discover_models,
)
from tasks.config import PipelineConfig
from tasks.report_doc import Document
from tasks.report_training import training_frame, training_section

VERSION_PACKAGES = ["torch", "transformers", "prefect", "polars", "pandas", "numpy", "scikit-learn", "great-expectations",
                    "pyarrow", "safetensors", "sae-ensembles"]
GIT_TIMEOUT_S = 5
REPORT_MARKDOWN, REPORT_HTML = "report.md", "report.html"

# artifact -> the stage that writes it (for the "missing" notes)
PRODUCER = {
    sections.SUMMARY_FILE: "evaluate",
    sections.INTRINSIC_FILE: "evaluate",
    sections.TOP_CONTEXTS_FILE: "evaluate",
    sections.PROBING_FILE: "downstream",
    sections.SCR_FILE: "downstream",
    downstream_report.PAIRS_FILE: "downstream",
    MANIFEST_FILE: "extract",
}


@dataclass
class RunReader:
    """Reads a run directory for the report: notes in ``result`` what it read and validated,
    and in ``missing`` each absent artifact with the stage that writes it."""

    run_dir: Path
    result: StageResult
    missing: list[str] = field(default_factory=list)

    def _present(self, rel: str) -> bool:
        if (self.run_dir / rel).is_file():
            return True
        self.missing.append(f"`{rel}` is missing: run `sae-ensembles {PRODUCER.get(rel, 'run')}`")
        return False

    def table(self, rel: str) -> pd.DataFrame | None:
        """The validated frame of ``rel``, or None (noted as missing) when the file is absent.
        A kind without a contract yet is read unvalidated, and said so; a violation raises."""
        if not self._present(rel):
            return None
        path = self.run_dir / rel
        try:
            frame = validate(path)
            self.result.validated.append(rel)
        except UnknownArtifact as err:
            frame = pd.read_parquet(path)
            self.result.notes.append(f"{rel}: no contract for its kind {err.kind!r} yet; read without validation")
        self.result.read.append(rel)
        return frame

    def manifest(self) -> ActivationManifest | None:
        if not self._present(MANIFEST_FILE):
            return None
        self.result.read.append(MANIFEST_FILE)
        return read_manifest(self.run_dir / ACTIVATIONS_DIR)

    def figures(self) -> list[Path]:
        """Every PNG under figures/ (what the report embeds is recorded when it is rendered)."""
        return sorted((self.run_dir / FIGURES_DIR).glob("*.png"))

    def extra_downstream_tables(self) -> dict[str, pd.DataFrame]:
        """Downstream tables other than the ones with a section of their own, by path."""
        paths = sorted(p.relative_to(self.run_dir).as_posix() for p in (self.run_dir / DOWNSTREAM_DIR).glob("*.parquet"))
        return {rel: self.table(rel) for rel in paths if rel not in PRODUCER}

    def models(self) -> list[ModelDir]:
        try:
            return discover_models(self.run_dir)
        except NoTrainedModels:
            return []

    def training(self, models: list[ModelDir]) -> pd.DataFrame | None:
        """The members' training records of every model that saved them (None when none did)."""
        frame = training_frame(self.run_dir, models)
        if frame.empty:
            return None
        self.result.read += [m.relative for m in models]
        return frame


def tokens_evaluated(cfg: PipelineConfig, manifest: ActivationManifest | None) -> int | None:
    """T, the tokens the evaluation stage scored: its split's tokens, at most its max_tokens."""
    if manifest is None or cfg.evaluate.split not in manifest.tokens_per_split:
        return None
    tokens = manifest.tokens_per_split[cfg.evaluate.split]
    return tokens if cfg.evaluate.max_tokens is None else min(tokens, cfg.evaluate.max_tokens)


def package_versions() -> dict[str, str]:
    """Python, each of VERSION_PACKAGES and the git commit of this checkout."""
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    here = Path(__file__).resolve().parent
    git = dict(capture_output=True, text=True, timeout=GIT_TIMEOUT_S, cwd=here)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git).stdout.strip()
        versions["git commit"] = (commit + (" (modified)" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        versions["git commit"] = "unknown"
    return versions


def build_report(cfg: PipelineConfig, run_dir: Path, result: StageResult) -> Document:
    """Read the run directory and assemble the report's sections (nothing is written here)."""
    read = RunReader(run_dir, result)
    manifest = read.manifest()
    summary = read.table(sections.SUMMARY_FILE)
    read.table(sections.INTRINSIC_FILE)  # validated: the summary is computed from it
    figures = read.figures()
    confidence = cfg.evaluate.confidence
    doc = Document(f"SAE ensembles: {cfg.name}")
    doc.blocks += sections.header(cfg.name, run_dir, time.strftime("%Y-%m-%d %H:%M:%S"), manifest, cfg.train)
    doc.blocks += sections.operating_point_section(summary)
    doc.blocks += sections.claims_section(summary, confidence, d=manifest.d if manifest is not None else None)
    doc.blocks += sections.intrinsic_section(summary, figures, confidence, tokens_evaluated(cfg, manifest))
    doc.blocks += downstream_report.probing_sections(read.table(sections.PROBING_FILE), confidence)
    pairs = read.table(downstream_report.PAIRS_FILE) if (run_dir / downstream_report.PAIRS_FILE).is_file() else None
    scr = read.table(sections.SCR_FILE) if downstream_report.has_scored_pairs(pairs) else None
    doc.blocks += downstream_report.scr_section(scr, pairs, confidence)
    doc.blocks += sections.extra_downstream_tables(read.extra_downstream_tables())
    doc.blocks += sections.downstream_figures_section(figures)
    doc.blocks += sections.top_contexts_section(read.table(sections.TOP_CONTEXTS_FILE))
    from tasks.report_interpret import interpretation_section
    from tasks.report_latents import latent_sections

    doc.blocks += interpretation_section(run_dir) + latent_sections(run_dir)  # the interpret stage's tables
    models = read.models()
    doc.blocks += training_section(read.training(models), cfg.train.recipe.dead_window_description())
    doc.blocks += sections.models_section([m.relative for m in models])
    from tasks.report_sweep import sweep_blocks

    doc.blocks += sweep_blocks(run_dir)  # sweep/results.parquet from `sae-ensembles sweep` into this run directory, if any
    doc.blocks += sections.missing_section(read.missing)
    doc.blocks += sections.configuration_section(cfg)
    doc.blocks += sections.versions_section(package_versions())
    result.notes += [m.replace("`", "") for m in read.missing]
    result.read += [image.path.relative_to(run_dir).as_posix() for image in doc.images()]
    result.tables.update(doc.named_tables())
    return doc


def run_report(cfg: PipelineConfig, run_dir: str | Path, *, progress: bool = True) -> StageResult:
    """Write report/report.md and report/report.html from whatever ``run_dir`` holds."""
    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    result = StageResult(stage="report")
    doc = build_report(cfg, run_dir, result)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name, render in ((REPORT_MARKDOWN, doc.to_markdown), (REPORT_HTML, doc.to_html)):
        text = render(out)
        tmp = out / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
        result.written.append(f"{REPORT_DIR}/{name}")
    from tasks.saebench import write_saebench_results

    # the core metrics and sparse probing again, in SAEBench's output schema (report/saebench/)
    result.written += write_saebench_results(cfg, run_dir)
    result.seconds = time.perf_counter() - start
    return result
