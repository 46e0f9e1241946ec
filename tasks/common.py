"""What every stage shares: the run-directory layout, the model directories and the result
a stage returns.

A stage is a plain function ``run_<stage>(cfg, run_dir, *, progress=True) -> StageResult``.
Flows turn a StageResult into Prefect artifacts: the markdown summary, the tables and
figures.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from sae_core.io import ENSEMBLE_FILE
from sae_core.methods import METHOD_NAMES, method
from sae_core.training.sources import ChunkedSource, subset_per_chunk

# run-directory layout (SPEC §8): each stage reads only what earlier stages wrote
ACTIVATIONS_DIR = "activations"           # extract: split=<s>/shard-*.parquet + manifest.json
MANIFEST_FILE = f"{ACTIVATIONS_DIR}/manifest.json"
DOCUMENTS_FILE = "documents.parquet"      # extract
MODELS_DIR = "models"                     # train: models/<method>[_J<J>]/run=<r>/ (ensemble.json + member_*/)
METRICS_DIR = "metrics"                   # evaluate: intrinsic.parquet, summary.parquet, top_contexts.parquet
FIGURES_DIR = "figures"                   # evaluate/downstream: PNG figures
DOWNSTREAM_DIR = "downstream"             # downstream: probing.parquet, scr.parquet
REPORT_DIR = "report"                     # report: report.md, report.html


class NoTrainedModels(FileNotFoundError):
    """The run directory holds no trained model (the train stage has not run)."""


@dataclass(frozen=True, order=True)
class ModelDir:
    """One saved model: ``models/<method>[_J<J>]/run=<run>/`` (SPEC §8).

    method: the method's name (:mod:`sae_core.methods`).
    run: the run index r (seed block).
    matched_j: for methods of matched width (expanded SAEs), the J whose width J·d_sae
        the SAE has; None for the others.
    """

    method: str
    run: int
    matched_j: int | None = None

    _NAME = re.compile(r"^(?P<method>[a-z_]+?)(?:_J(?P<J>\d+))?$")

    def __post_init__(self) -> None:
        spec = method(self.method)  # raises on an unknown method
        if spec.matched_width != (self.matched_j is not None):
            need = "needs" if spec.matched_width else "takes no"
            raise ValueError(f"method {self.method!r} {need} a matched J (got {self.matched_j})")

    @property
    def name(self) -> str:
        """The directory under models/: the method, plus _J<J> for matched-width methods."""
        return self.method if self.matched_j is None else f"{self.method}_J{self.matched_j}"

    @property
    def relative(self) -> str:
        """``models/<name>/run=<r>`` (POSIX, relative to the run directory)."""
        return f"{MODELS_DIR}/{self.name}/run={self.run}"

    def path(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / MODELS_DIR / self.name / f"run={self.run}"

    def prefixes(self, n_members: int) -> list[tuple[int, int]]:
        """(members used, J it stands at) of every point this model is scored at: each
        prefix of bagging/boosting, the matched J of an expanded SAE, J = 1 of the single SAE."""
        if self.matched_j is not None:
            return [(n_members, self.matched_j)]
        if method(self.method).prefixes:
            return [(n, n) for n in range(1, n_members + 1)]
        return [(n_members, n_members)]

    @classmethod
    def parse(cls, directory: str | Path) -> "ModelDir":
        """The model of ``.../models/<name>/run=<r>``; a clear error for any other path."""
        directory = Path(directory)
        match = cls._NAME.match(directory.parent.name)
        run = directory.name.removeprefix("run=")
        if match is None or not directory.name.startswith("run=") or not run.isdigit() or match.group("method") not in METHOD_NAMES:
            raise ValueError(
                f"unexpected model directory {directory}: expected models/<method>[_J<J>]/run=<r> "
                f"with a method among {', '.join(METHOD_NAMES)}"
            )
        J = match.group("J")
        return cls(match.group("method"), int(run), int(J) if J else None)


def discover_models(run_dir: str | Path) -> list[ModelDir]:
    """Every saved model of the run directory, in path order.

    Raises NoTrainedModels when there is none, ValueError for a directory under models/
    that is not a model directory. A directory without ``ensemble.json`` is listed too:
    loading it then says what is missing.
    """
    root = Path(run_dir) / MODELS_DIR
    found = [ModelDir.parse(p) for p in sorted(root.glob("*/run=*"))]
    if not found:
        raise NoTrainedModels(f"no trained models under {root} (models/<method>/run=<r>/); run the train stage first")
    return found


def has_ensemble(run_dir: str | Path, model: ModelDir) -> bool:
    return (model.path(run_dir) / ENSEMBLE_FILE).is_file()


def activation_source(directory: Path, split: str, max_tokens: int | None, seed: int, *, buffer_mb: float | None = None,
                      manifest=None, device="cpu") -> ChunkedSource:
    """One split's activations as a source read shard by shard (the caller validated the
    directory): a seeded subset of ``max_tokens`` rows if the split is larger
    (:func:`~sae_core.training.sources.subset_per_chunk`). ``buffer_mb``: the shuffle buffer
    of streamed training; None holds the whole split (read once, in memory). A split that
    is not stored (``extract.store_train: false``) is read by running the model on ``device``
    (:mod:`tasks.live_activations`)."""
    from data_contracts.activations import chunk_reader, read_manifest, split_chunks

    manifest = manifest or read_manifest(directory)
    rows = sys.maxsize if buffer_mb is None else max(1, int(buffer_mb * 2**20) // (4 * manifest.d))
    if manifest.is_live(split):
        from tasks.live_activations import live_source

        return live_source(Path(directory).parent, manifest, split, max_tokens, seed, buffer_rows=rows, device=device)
    chunks = subset_per_chunk(split_chunks(directory, split, manifest), max_tokens, seed)
    identity = hashlib.sha256(
        json.dumps([[s.file, s.sha256] for s in manifest.shards_of(split)] + [max_tokens, seed]).encode()
    ).hexdigest()
    return ChunkedSource(chunks, chunk_reader(directory, manifest.d), manifest.d, identity, rows)


def split_tokens(directory: Path, split: str, max_tokens: int | None, seed: int) -> torch.Tensor:
    """One split's activations [N, d] in memory: the rows of :func:`activation_source`, in file order."""
    return activation_source(directory, split, max_tokens, seed).in_memory().rows


@dataclass
class StageResult:
    """What a stage read and wrote, for the UI and the CLI.

    read / written: paths relative to the run directory (files or directories).
    validated: paths of artifacts that passed their contract (read or written).
    tables: named frames to show (metric summaries and the like).
    figures: PNG files written (relative paths).
    notes: free text for the summary (sizes, skipped work, warnings).
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
