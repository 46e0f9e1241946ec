"""What every stage shares: the run-directory layout and the result a stage returns.

A stage is a plain function ``run_<stage>(cfg, run_dir, *, progress=True) -> StageResult``
(``tasks.extract.run_extraction`` predates this type and returns its own report). Flows
turn a StageResult into Prefect artifacts: the markdown summary, the tables and figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

# run-directory layout (SPEC §8): each stage reads only what earlier stages wrote
ACTIVATIONS_DIR = "activations"           # extract: split=<s>/shard-*.parquet + manifest.json
DOCUMENTS_FILE = "documents.parquet"      # extract
MODELS_DIR = "models"                     # train: models/<method>/run=<r>/ (ensemble.json + member_*/)
METRICS_DIR = "metrics"                   # evaluate: intrinsic.parquet, summary.parquet
FIGURES_DIR = "figures"                   # evaluate/downstream: PNG figures
DOWNSTREAM_DIR = "downstream"             # downstream: probing.parquet, scr.parquet
REPORT_DIR = "report"                     # report: report.md, report.html


def model_dir(run_dir: Path, method: str, run: int, n_members: int | None = None) -> Path:
    """Where run ``run`` of ``method`` is saved; expanded SAEs also carry their J."""
    name = method if n_members is None else f"{method}_J{n_members}"
    return Path(run_dir) / MODELS_DIR / name / f"run={run}"


def split_tokens(directory: Path, split: str, max_tokens: int | None, seed: int) -> torch.Tensor:
    """One split's activations [N, d] (the caller validated the directory); a seeded subset
    of ``max_tokens`` rows, kept in file order, if the split is larger."""
    from data_contracts.activations import load_split

    acts = torch.from_numpy(load_split(directory, split, validate=False))
    if max_tokens is not None and acts.shape[0] > max_tokens:
        keep = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
        acts = acts[keep.sort().values]
    return acts


@dataclass
class StageResult:
    """What a stage read and wrote, for the UI and the CLI.

    read / written: paths (relative to the run dir where possible).
    validated: artifacts that passed their contract (read or written).
    tables: named frames to show (metric summaries and the like).
    figures: PNG files written.
    did_work: False when everything was already up to date.
    """

    stage: str
    read: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    validated: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    did_work: bool = True
    seconds: float = 0.0
