"""The downstream stage: sparse probing and spurious correlation removal (SPEC §7).

Reads ``activations/manifest.json`` (model, layer, context length) and every trained
model under ``models/*/run=*``; writes, under the run directory::

    downstream/datasets/probe_<name>.parquet    labelled probing sets (contract labelled_probing); the sae-probes
                                                tasks all in probe_sae_probes.parquet
    downstream/datasets/scr_<pair>.parquet      labelled SCR sets (contract labelled_scr)
    downstream/activations/                     token activations of those documents (activation contract)
    downstream/probing.parquet                  method, n_members, run, dataset, class, k, accuracy
    downstream/scr_pairs.parquet                every SCR pair's A_base, A_oracle, headroom and whether it is scored
    downstream/scr.parquet                      method, n_members, run, pair, n_ablated, acc_base, acc_ablated, acc_oracle, score
                                                (pairs with headroom only; absent when none has)
    downstream/scr_cells.parquet                rows per (pair, y, z) cell and split
    figures/probing_accuracy_vs_k.png           BBC / tweets / file sets, one panel each
    figures/probing_benchmark.png               the sae-probes benchmark: mean over tasks vs k and vs J (CI over tasks)
    figures/scr_score_vs_n.png                  pairs with headroom

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
from tasks.downstream_tokens import document_caps, document_tokens, tokens_fingerprint
from tasks.figures import BENCHMARK_FIGURE_NAME, PROBING_FIGURE_NAME, SCR_FIGURE_NAME, benchmark_figure, plot_downstream, save_figure
from tasks.labelled import LabelledSets, build_labelled_sets
from tasks.probing_benchmark import benchmark_rows, mean_over_tasks
from tasks.sae_probes import is_benchmark_dataset
from tasks.summaries import summarise_over_runs

DATASETS_DIR = f"{DOWNSTREAM_DIR}/datasets"
TOKENS_DIR = f"{DOWNSTREAM_DIR}/activations"
PROBING_FILE = f"{DOWNSTREAM_DIR}/probing.parquet"
SCR_FILE = f"{DOWNSTREAM_DIR}/scr.parquet"
CELLS_FILE = f"{DOWNSTREAM_DIR}/scr_cells.parquet"
PAIRS_FILE = f"{DOWNSTREAM_DIR}/scr_pairs.parquet"
BENCHMARK_SETS_FILE = f"{DATASETS_DIR}/probe_sae_probes.parquet"  # every sae-probes task, column dataset
PROBING_FIGURE = f"{FIGURES_DIR}/{PROBING_FIGURE_NAME}"
BENCHMARK_FIGURE = f"{FIGURES_DIR}/{BENCHMARK_FIGURE_NAME}"
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
    h.update(tokens_fingerprint(manifest, docs, document_caps(docs, cfg)).encode())
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
        f"({r.label}, {r.spurious}) {r.available} available / {r.train_biased} biased / {r.train_balanced} balanced / {r.test} test"
        for r in cells.itertuples()
    )


def _pair_note(r) -> str:
    verdict = "scored" if r.conditioned else f"no headroom (below {r.min_headroom:g}): left out of every mean and figure"
    return f"SCR {r.pair}: A_base {r.acc_base:.3f}, A_oracle {r.acc_oracle:.3f}, headroom {r.headroom:+.3f} on {r.n_test} test documents; {verdict}"


def _result(run_dir: Path, probing: pd.DataFrame, scr: pd.DataFrame, cells: pd.DataFrame, pairs: pd.DataFrame,
            cfg: DownstreamConfig) -> StageResult:
    """The stage's tables (means with CIs over runs; the benchmark's over tasks), its SCR notes and figures."""
    result = StageResult(stage="downstream")
    sets = probing[~probing["dataset"].map(is_benchmark_dataset)] if len(probing) else probing
    if len(sets):
        result.tables["probing"] = summarise_over_runs(sets, ["dataset", "method", "n_members", "k"], "accuracy", cfg.confidence)
    if len(probing) and len(benchmark_rows(probing)):
        result.tables["probing_benchmark"] = mean_over_tasks(probing, cfg.confidence)
    if len(scr):
        result.tables["scr"] = summarise_over_runs(scr, ["pair", "method", "n_members", "n_ablated"], "score", cfg.confidence)
    if len(pairs):
        result.tables["scr_pairs"] = pairs
        result.notes += [_pair_note(r) for r in pairs.itertuples()]
    if len(cells):
        result.tables["scr_cells"] = cells
        result.notes += [_cell_note(pair, g) for pair, g in cells.groupby("pair")]
    result.figures = [f for f in (PROBING_FIGURE, BENCHMARK_FIGURE, SCR_FIGURE) if (run_dir / f).is_file()]
    return result


def _expected_figures(probing: pd.DataFrame, scr: pd.DataFrame) -> list[str]:
    benchmark = probing["dataset"].map(is_benchmark_dataset) if len(probing) else pd.Series([], dtype=bool)
    return (([PROBING_FIGURE] if (~benchmark).any() else []) + ([BENCHMARK_FIGURE] if benchmark.any() else [])
            + ([SCR_FIGURE] if len(scr) else []))


def _write_figures(probing: pd.DataFrame, scr: pd.DataFrame, run_dir: Path, confidence: float) -> list[str]:
    """The per-set probing figure (BBC, tweets, files), the benchmark's figure and the SCR figure
    (each only when it has rows); a stale figure of an absent table is removed."""
    benchmark = probing["dataset"].map(is_benchmark_dataset) if len(probing) else pd.Series([], dtype=bool)
    for stale in set((PROBING_FIGURE, BENCHMARK_FIGURE, SCR_FIGURE)) - set(_expected_figures(probing, scr)):
        (run_dir / stale).unlink(missing_ok=True)
    sets = probing[~benchmark] if len(probing) else probing
    written = plot_downstream(sets, scr, run_dir / FIGURES_DIR, confidence)
    if benchmark.any():
        written.append(save_figure(benchmark_figure(mean_over_tasks(probing, confidence), confidence), run_dir / BENCHMARK_FIGURE))
    return [p.relative_to(run_dir).as_posix() for p in written]


def _outputs(sets: LabelledSets, run_dir: Path) -> list[str]:
    """The tables a finished run of ``sets`` has written: scr.parquet only when the pair
    table (already written) says a pair has headroom."""
    outputs = ([PROBING_FILE] if sets.probing else []) + ([PAIRS_FILE, CELLS_FILE] if sets.scr else [])
    if sets.scr and (run_dir / PAIRS_FILE).is_file():
        try:
            if read_table(run_dir / PAIRS_FILE, "scr_pairs")["conditioned"].any():
                outputs.append(SCR_FILE)
        except ContractViolation:
            outputs.append(SCR_FILE)  # damaged: the fingerprint check below fails and the stage recomputes
    return outputs


def _reuse(run_dir: Path, sets: LabelledSets, outputs: list[str], cfg: DownstreamConfig) -> StageResult:
    """The result of the tables already written (redrawing a missing figure).

    Raises ContractViolation when a table is damaged.
    """
    probing = read_table(run_dir / PROBING_FILE, "probing_results") if sets.probing else pd.DataFrame()
    scr = read_table(run_dir / SCR_FILE, "scr_results") if SCR_FILE in outputs else pd.DataFrame()
    cells = read_table(run_dir / CELLS_FILE, "scr_cells") if sets.scr else pd.DataFrame()
    pairs = read_table(run_dir / PAIRS_FILE, "scr_pairs") if sets.scr else pd.DataFrame()
    if not all((run_dir / f).is_file() for f in _expected_figures(probing, scr)):
        _write_figures(probing, scr, run_dir, cfg.confidence)
    return _result(run_dir, probing, scr, cells, pairs, cfg)


def _write_labelled_sets(run_dir: Path, sets: LabelledSets) -> list[str]:
    """One file per probing set, the sae-probes tasks together in one (one contract run for
    all of them: each run of the suite has a fixed cost), one per SCR pair."""
    written = []
    benchmark = [f for name, f in sets.probing.items() if is_benchmark_dataset(name)]
    if benchmark:
        write_table(pd.concat(benchmark, ignore_index=True), run_dir / BENCHMARK_SETS_FILE, "labelled_probing")
        written.append(BENCHMARK_SETS_FILE)
    for name, frame in sets.probing.items():
        if is_benchmark_dataset(name):
            continue
        rel = f"{DATASETS_DIR}/probe_{name}.parquet"
        write_table(frame, run_dir / rel, "labelled_probing")
        written.append(rel)
    for pair, frame in sets.scr.items():
        rel = f"{DATASETS_DIR}/scr_{pair}.parquet"  # pair names are file-safe (tasks.labelled)
        write_table(frame, run_dir / rel, "labelled_scr")
        written.append(rel)
    return written


def run_downstream(cfg: DownstreamConfig, run_dir: Path, *, progress: bool = True) -> StageResult:
    """Probe and SHIFT every trained model (every J) and the raw activations; see the module doc."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir / ACTIVATIONS_DIR)
    models = _trained_models(run_dir)
    if not (cfg.probing_datasets or cfg.sae_probes_tasks or cfg.scr_pairs or cfg.scr_sae_probes or cfg.scr_planted):
        raise ValueError("nothing to do: probing_datasets, sae_probes_tasks, scr_pairs, scr_sae_probes and scr_planted are all empty")
    _check_widths(run_dir, models, manifest)
    sets = build_labelled_sets(cfg)
    fingerprint = _inputs_fingerprint(cfg, manifest, sets, models, run_dir)
    read = [MANIFEST_FILE, *[m.relative for m in models]]
    outputs = _outputs(sets, run_dir)

    if all(table_metadata(run_dir / f, INPUTS_KEY) == fingerprint for f in outputs):
        try:
            result = _reuse(run_dir, sets, outputs, cfg)
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
    probing_tasks, scr_tasks, pairs = make_tasks(sets, tokens.doc_ids, pooled, cfg.scr_min_headroom)

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
    if sets.scr:
        write_table(pairs, run_dir / PAIRS_FILE, "scr_pairs", meta)
        write_table(sets.cells, run_dir / CELLS_FILE, "scr_cells", meta)
        written += [PAIRS_FILE, CELLS_FILE]
    if len(scr):
        write_table(scr, run_dir / SCR_FILE, "scr_results", meta)
        written.append(SCR_FILE)
    else:
        (run_dir / SCR_FILE).unlink(missing_ok=True)  # no pair has headroom: no scores, none stale either
    validated += [f for f in (PROBING_FILE, SCR_FILE, PAIRS_FILE, CELLS_FILE) if f in written]
    figures = _write_figures(probing, scr, run_dir, cfg.confidence)

    result = _result(run_dir, probing, scr, sets.cells, pairs, cfg)
    result.read, result.written, result.validated = read, written + figures, validated
    result.seconds = time.perf_counter() - start
    if progress:
        print(f"downstream: {len(models)} models, {len(tokens.doc_ids)} documents, {int(tokens.acts.shape[0])} tokens "
              f"in {result.seconds:.1f} s")
    return result
