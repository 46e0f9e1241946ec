"""The downstream stage: sparse probing and spurious correlation removal (SPEC §7).

Reads ``activations/manifest.json`` (model, layer, context length) and every trained
model under ``models/*/run=*``; writes, under the run directory::

    downstream/datasets/probe_<name>.parquet    labelled probing sets (contract labelled_probing)
    downstream/datasets/scr_<a>-<b>.parquet     labelled SCR sets (contract labelled_scr)
    downstream/activations/                     token activations of those documents (activation contract)
    downstream/probing.parquet                  method, n_members, run, dataset, class, k, accuracy
    downstream/scr.parquet                      method, n_members, run, pair, n_ablated, acc_base, acc_ablated, acc_oracle, score
    downstream/scr_cells.parquet                documents per (pair, topic, gender) cell and split
    figures/probing_accuracy_vs_k.png, figures/scr_score_vs_n.png

Bagging and boosting are evaluated at every prefix J = 1..J_max (encoded once, see
:func:`sae_core.probing.prefix_pooled_codes`), expanded SAEs at their own J, single SAEs
at J = 1, and the raw activations as method "raw" (n_members 0, run 0): top-k neurons
plus a dense probe (k = d) for probing, neuron ablation for SCR. The token activations
are cached by a fingerprint of model, layer, context and documents; the result tables
carry a fingerprint of every input, so a rerun with nothing changed does no work.

The jobs live in their own modules: the labelled sets in :mod:`tasks.labelled`, the
token activations in :mod:`tasks.downstream_tokens`, probing and SCR in
:mod:`tasks.downstream_evaluation`, the figures in :mod:`tasks.figures`. This module
decides what is up to date and what is written.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pandas as pd

from data_contracts.activations import ActivationManifest, read_manifest
from data_contracts.core import ContractViolation
from data_contracts.labelled import read_table, table_metadata, write_table
from sae_core.devices import resolve_device
from sae_core.hashing import file_sha256
from sae_core.io import ENSEMBLE_FILE
from sae_core.methods import RAW
from sae_core.probing import IdentityDictionary
from tasks.common import (
    ACTIVATIONS_DIR,
    DOWNSTREAM_DIR,
    FIGURES_DIR,
    MANIFEST_FILE,
    MODELS_DIR,
    ModelDir,
    NoTrainedModels,
    StageResult,
    discover_models,
    has_ensemble,
)
from tasks.config import DownstreamConfig
from tasks.progress import ProgressLog
from tasks.downstream_evaluation import PROBING_COLUMNS, SCR_COLUMNS, evaluate_codes, evaluate_model, make_tasks
from tasks.downstream_tokens import document_tokens, tokens_fingerprint
from tasks.figures import PROBING_FIGURE_NAME, SCR_FIGURE_NAME, plot_downstream
from tasks.labelled import LabelledSets, build_labelled_sets
from tasks.summaries import summarise_over_runs

DATASETS_DIR = f"{DOWNSTREAM_DIR}/datasets"
TOKENS_DIR = f"{DOWNSTREAM_DIR}/activations"
PROBING_FILE = f"{DOWNSTREAM_DIR}/probing.parquet"
SCR_FILE = f"{DOWNSTREAM_DIR}/scr.parquet"
CELLS_FILE = f"{DOWNSTREAM_DIR}/scr_cells.parquet"
PROBING_FIGURE = f"{FIGURES_DIR}/{PROBING_FIGURE_NAME}"
SCR_FIGURE = f"{FIGURES_DIR}/{SCR_FIGURE_NAME}"
INPUTS_KEY = "sae_ensembles.downstream_inputs"
# the raw baseline is one dictionary, not a trained model: it stands at J = 0, run 0
RAW_N_MEMBERS = 0
RAW_RUN = 0


# --------------------------------------------------------------------- fingerprints
def _model_digest(model_dir: Path) -> str:
    """A hash of every file of a saved model (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(f.relative_to(model_dir).as_posix().encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _inputs_fingerprint(
    cfg: DownstreamConfig, manifest: ActivationManifest, sets: LabelledSets, models: list[ModelDir], run_dir: Path
) -> str:
    """What the result tables depend on: the config, the extraction, the documents and
    every model's files (stored in the tables' metadata under INPUTS_KEY)."""
    h = hashlib.sha256()
    h.update(cfg.model_dump_json(exclude={"device"}).encode())  # where it ran does not change what it wrote
    h.update(json.dumps([manifest.model, manifest.revision, manifest.layer, manifest.context_length]).encode())
    docs = sets.documents()
    h.update(tokens_fingerprint(manifest, docs, cfg.max_tokens_per_document).encode())
    # this recipe is stored in every result table: any change to it recomputes all runs' tables
    for m in models:
        h.update(f"{m.method}|{m.run}|{m.matched_j}|{_model_digest(m.path(run_dir))}".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- stage
def _trained_models(run_dir: Path) -> list[ModelDir]:
    """Every saved model in path order; a directory without ensemble.json (an
    interrupted training) is skipped."""
    models = [m for m in discover_models(run_dir) if has_ensemble(run_dir, m)]
    if not models:
        raise NoTrainedModels(
            f"no trained models under {run_dir / MODELS_DIR} (models/<method>/run=<r>/ with {ENSEMBLE_FILE}); "
            "run the train stage first"
        )
    return models


def _check_widths(run_dir: Path, models: list[ModelDir], manifest: ActivationManifest) -> None:
    """Every model reads the activations' width: checked before anything is written, since
    a model of another width would fail the stage later anyway."""
    for m in models:
        path = m.path(run_dir)
        d_in = json.loads((path / ENSEMBLE_FILE).read_text()).get("d_in")
        if d_in is not None and d_in != manifest.d:
            raise ValueError(f"model {path} reads d={d_in}, but the activations have d={manifest.d}; retrain it (train stage)")


def _cell_note(pair: str, cells: pd.DataFrame) -> str:
    return f"SCR {pair}: " + ", ".join(
        f"({r.topic}, {r.gender}) {r.available} available / {r.train_biased} biased / {r.train_balanced} balanced / {r.test} test"
        for r in cells.itertuples()
    )


def _result(run_dir: Path, probing: pd.DataFrame, scr: pd.DataFrame, cells: pd.DataFrame, cfg: DownstreamConfig) -> StageResult:
    """The stage's tables (means with CIs over runs), its SCR cell notes and figures."""
    result = StageResult(stage="downstream")
    if len(probing):
        result.tables["probing"] = summarise_over_runs(probing, ["dataset", "method", "n_members", "k"], "accuracy", cfg.confidence)
    if len(scr):
        result.tables["scr"] = summarise_over_runs(scr, ["pair", "method", "n_members", "n_ablated"], "score", cfg.confidence)
    if len(cells):
        result.tables["scr_cells"] = cells
        result.notes += [_cell_note(pair, g) for pair, g in cells.groupby("pair")]
    result.figures = [f for f in (PROBING_FIGURE, SCR_FIGURE) if (run_dir / f).is_file()]
    return result


def _write_figures(probing: pd.DataFrame, scr: pd.DataFrame, run_dir: Path, confidence: float) -> list[str]:
    return [p.relative_to(run_dir).as_posix() for p in plot_downstream(probing, scr, run_dir / FIGURES_DIR, confidence)]


def _reuse(run_dir: Path, sets: LabelledSets, cfg: DownstreamConfig) -> StageResult:
    """The result of the tables already written (redrawing a missing figure).

    Raises ContractViolation when a table is damaged.
    """
    probing = read_table(run_dir / PROBING_FILE, "probing_results") if sets.probing else pd.DataFrame()
    scr = read_table(run_dir / SCR_FILE, "scr_results") if sets.scr else pd.DataFrame()
    cells = read_table(run_dir / CELLS_FILE, "scr_cells") if sets.scr else pd.DataFrame()
    expected = ([PROBING_FIGURE] if sets.probing else []) + ([SCR_FIGURE] if sets.scr else [])
    if not all((run_dir / f).is_file() for f in expected):
        _write_figures(probing, scr, run_dir, cfg.confidence)
    return _result(run_dir, probing, scr, cells, cfg)


def _write_labelled_sets(run_dir: Path, sets: LabelledSets) -> list[str]:
    written = []
    for name, frame in sets.probing.items():
        rel = f"{DATASETS_DIR}/probe_{name}.parquet"
        write_table(frame, run_dir / rel, "labelled_probing")
        written.append(rel)
    for pair, frame in sets.scr.items():
        rel = f"{DATASETS_DIR}/scr_{pair}.parquet"
        write_table(frame, run_dir / rel, "labelled_scr")
        written.append(rel)
    return written


def run_downstream(cfg: DownstreamConfig, run_dir: Path, *, progress: bool = True) -> StageResult:
    """Probe and SHIFT every trained model (every J) and the raw activations; see the module doc."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir / ACTIVATIONS_DIR)
    models = _trained_models(run_dir)
    if not cfg.probing_datasets and not cfg.scr_pairs:
        raise ValueError("nothing to do: probing_datasets and scr_pairs are both empty")
    _check_widths(run_dir, models, manifest)
    sets = build_labelled_sets(cfg)
    fingerprint = _inputs_fingerprint(cfg, manifest, sets, models, run_dir)
    read = [MANIFEST_FILE, *[m.relative for m in models]]
    outputs = ([PROBING_FILE] if sets.probing else []) + ([SCR_FILE, CELLS_FILE] if sets.scr else [])

    if all(table_metadata(run_dir / f, INPUTS_KEY) == fingerprint for f in outputs):
        try:
            result = _reuse(run_dir, sets, cfg)
            result.read, result.validated, result.did_work = read, list(outputs), False
            result.seconds = time.perf_counter() - start
            return result
        except ContractViolation:
            pass  # damaged: recompute

    resolve_device(cfg.device)  # a CUDA device this machine lacks fails here, before anything is written
    written = _write_labelled_sets(run_dir, sets)
    validated = list(written)
    tokens, extracted = document_tokens(sets.documents(), manifest, cfg, run_dir / TOKENS_DIR, progress)
    (written if extracted else read).append(TOKENS_DIR)
    validated.append(TOKENS_DIR)
    pooled = tokens.pooled().numpy()
    probing_tasks, scr_tasks = make_tasks(sets, tokens.doc_ids, pooled)

    # the raw-activation baseline: top-k neurons (and the dense probe, k = d); neuron ablation
    prows, srows = evaluate_codes(RAW.name, RAW_N_MEMBERS, RAW_RUN, pooled, IdentityDictionary(pooled.shape[1]).W_dec.numpy(),
                                  probing_tasks, scr_tasks, cfg, dense_probe=True)
    iterator = models
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(models, desc="downstream models", unit="model")
    log = ProgressLog("downstream", len(models), "models", enabled=not progress)
    for model in iterator:
        p, s = evaluate_model(model, run_dir, tokens, probing_tasks, scr_tasks, cfg)
        prows += p
        srows += s
        log.advance(1, model.relative)
    if models:
        log.finish()

    probing = pd.DataFrame(prows, columns=PROBING_COLUMNS)
    scr = pd.DataFrame(srows, columns=SCR_COLUMNS)
    meta = {INPUTS_KEY: fingerprint}
    if len(probing):
        write_table(probing, run_dir / PROBING_FILE, "probing_results", meta)
        written.append(PROBING_FILE)
    if len(scr):
        write_table(scr, run_dir / SCR_FILE, "scr_results", meta)
        write_table(sets.cells, run_dir / CELLS_FILE, "scr_cells", meta)
        written += [SCR_FILE, CELLS_FILE]
    validated += [f for f in (PROBING_FILE, SCR_FILE, CELLS_FILE) if f in written]
    figures = _write_figures(probing, scr, run_dir, cfg.confidence)

    result = _result(run_dir, probing, scr, sets.cells, cfg)
    result.read, result.written, result.validated = read, written + figures, validated
    result.seconds = time.perf_counter() - start
    if progress:
        print(f"downstream: {len(models)} models, {len(tokens.doc_ids)} documents, {int(tokens.acts.shape[0])} tokens "
              f"in {result.seconds:.1f} s")
    return result
