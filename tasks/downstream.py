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
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from data_contracts.activations import (
    MANIFEST,
    SPLITS,
    ActivationManifest,
    read_manifest,
    validate_shard,
    write_manifest,
    write_shard,
)
from data_contracts.core import ContractViolation, Failure, file_sha256
from data_contracts.labelled import read_table, table_metadata, write_table
from sae_core.extraction import extract_in_order, kept_span, make_windows
from sae_core.io import load_ensemble
from sae_core.probing import (
    IdentityDictionary,
    full_probe_accuracy,
    mean_pool,
    pooled_member_codes,
    prefix_pooled_codes,
    sparse_probe_accuracy,
)
from sae_core.scr import SCRData, SCRProbes, fit_scr_probes, shift_curve
from sae_core.stats import mean_ci
from tasks.common import ACTIVATIONS_DIR, DOWNSTREAM_DIR, FIGURES_DIR, MODELS_DIR, StageResult
from tasks.config import DownstreamConfig
from tasks.labelled import bbc_paragraphs, pair_name, probing_set, scr_set

DATASETS_DIR = f"{DOWNSTREAM_DIR}/datasets"
TOKENS_DIR = f"{DOWNSTREAM_DIR}/activations"
PROBING_FILE = f"{DOWNSTREAM_DIR}/probing.parquet"
SCR_FILE = f"{DOWNSTREAM_DIR}/scr.parquet"
CELLS_FILE = f"{DOWNSTREAM_DIR}/scr_cells.parquet"
PROBING_FIGURE = f"{FIGURES_DIR}/probing_accuracy_vs_k.png"
SCR_FIGURE = f"{FIGURES_DIR}/scr_score_vs_n.png"
INPUTS_KEY = "sae_ensembles.downstream_inputs"
DOCS_PER_SHARD = 1024
METHOD_ORDER = ["raw", "single", "expanded", "expanded_compute_matched", "bagging", "boosting"]


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class TrainedModel:
    """One saved model: its method, run, directory and the J values to evaluate it at."""

    method: str
    run: int
    path: Path
    fixed_j: int | None  # expanded SAEs: their J; None: every prefix (bagging/boosting) or 1 (single)


def discover_models(run_dir: Path) -> list[TrainedModel]:
    """Every ``models/<name>/run=<r>`` directory holding an ensemble, sorted by name and run."""
    found = []
    for path in sorted((Path(run_dir) / MODELS_DIR).glob("*/run=*")):
        if not (path / "ensemble.json").is_file():
            continue
        run = int(path.name.split("=", 1)[1])
        name = path.parent.name
        match = re.fullmatch(r"(.+)_J(\d+)", name)
        if match:
            found.append(TrainedModel(match.group(1), run, path, int(match.group(2))))
        else:
            found.append(TrainedModel(name, run, path, None))
    return found


def _model_digest(model: TrainedModel) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in model.path.rglob("*") if p.is_file()):
        h.update(f.relative_to(model.path).as_posix().encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------- datasets
@dataclass
class LabelledSets:
    probing: dict[str, pd.DataFrame]  # dataset -> labelled_probing frame
    scr: dict[str, pd.DataFrame]  # pair name -> labelled_scr frame
    cells: pd.DataFrame  # scr_cells

    def documents(self) -> pd.DataFrame:
        """Every distinct document (doc_id, text), sorted by id."""
        frames = [f[["doc_id", "text"]] for f in [*self.probing.values(), *self.scr.values()]]
        docs = pd.concat(frames, ignore_index=True).drop_duplicates("doc_id").sort_values("doc_id").reset_index(drop=True)
        clash = pd.concat(frames).drop_duplicates().groupby("doc_id")["text"].nunique()
        if (clash > 1).any():
            raise ValueError(f"document ids reused for different texts across datasets: {clash[clash > 1].index[:3].tolist()}")
        return docs


def build_labelled_sets(cfg: DownstreamConfig) -> LabelledSets:
    """The probing sets and the SCR sets of ``cfg`` (deterministic for a given seed)."""
    probing = {}
    for name in cfg.probing_datasets:
        frame = probing_set(name, cfg.max_documents_per_class, cfg.seed)
        probing[frame["dataset"].iloc[0]] = frame
    scr, cells = {}, []
    if cfg.scr_pairs:
        paragraphs = bbc_paragraphs()
        for i, pair in enumerate(cfg.scr_pairs):
            frame, counts = scr_set(pair, paragraphs, max_per_cell=cfg.scr_max_documents_per_cell,
                                    min_cell=cfg.scr_min_cell, seed=cfg.seed + i)
            scr[pair_name(pair)] = frame
            cells.append(counts)
    return LabelledSets(probing, scr, pd.concat(cells, ignore_index=True) if cells else pd.DataFrame())


# ---------------------------------------------------------------- token activations
@dataclass
class DocumentTokens:
    """Token activations of the documents: acts [T, d], doc_index [T] into doc_ids."""

    doc_ids: list[str]
    acts: torch.Tensor
    doc_index: torch.Tensor

    def pooled(self) -> torch.Tensor:
        """Mean-pooled activations per document: [N, d]."""
        return mean_pool(self.acts, self.doc_index, len(self.doc_ids))


def _tokens_fingerprint(manifest: ActivationManifest, docs: pd.DataFrame, max_tokens: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([manifest.model, manifest.revision, manifest.layer, manifest.context_length, max_tokens]).encode())
    for doc_id, text in docs[["doc_id", "text"]].itertuples(index=False):
        h.update(doc_id.encode() + b"\x00" + text.encode() + b"\x00")
    return h.hexdigest()


def _read_tokens(directory: Path, docs: pd.DataFrame) -> DocumentTokens:
    """Load the cached token activations, every shard checked against its contract and checksum."""
    manifest = read_manifest(directory)
    parts, ids, failures = [], [], []
    for info in manifest.shards_of("train"):
        values, shard_failures = validate_shard(directory, info, manifest)
        failures += shard_failures
        if values is not None:
            parts.append(values)
            ids.append(pq.read_table(directory / info.file, columns=["doc_id"]).column("doc_id").to_numpy(zero_copy_only=False))
    doc_ids = docs["doc_id"].tolist()
    row_ids = np.concatenate(ids) if ids else np.array([], dtype=object)
    missing = sorted(set(doc_ids) - set(row_ids.tolist()))
    if missing:
        failures.append(Failure("every document has tokens", f"{len(missing)} documents are missing", len(missing), missing[:5]))
    if failures:
        raise ContractViolation(directory, failures)
    position = {d: i for i, d in enumerate(doc_ids)}
    index = torch.as_tensor(np.array([position[d] for d in row_ids]), dtype=torch.long)
    return DocumentTokens(doc_ids, torch.from_numpy(np.concatenate(parts)), index)


def document_tokens(
    docs: pd.DataFrame, manifest: ActivationManifest, cfg: DownstreamConfig, directory: Path, progress: bool
) -> tuple[DocumentTokens, bool]:
    """Token activations of ``docs`` at the manifest's model and layer, cached in ``directory``.

    Each document keeps its first min(max_tokens_per_document, context − specials) tokens
    (one window); special tokens are not pooled. Returns (tokens, extracted_now).
    """
    fingerprint = _tokens_fingerprint(manifest, docs, cfg.max_tokens_per_document)
    if (directory / MANIFEST).is_file():
        try:
            cached = read_manifest(directory)
            if cached.config_fingerprint == fingerprint:
                return _read_tokens(directory, docs), False
        except ContractViolation:
            pass  # damaged: extract again below
    from sae_core.models import _resolve_source, load_model

    source, _ = _resolve_source(manifest.model)
    revision = None if isinstance(source, Path) or manifest.revision == "unknown" else manifest.revision
    loaded = load_model(manifest.model, manifest.layer, revision=revision, trust_remote_code=manifest.trust_remote_code)
    if loaded.revision != manifest.revision:
        raise ValueError(
            f"model {manifest.model!r} now has revision {loaded.revision}, but the activations were extracted from "
            f"{manifest.revision}; re-run the extract stage (and the stages after it)"
        )
    body = min(cfg.max_tokens_per_document, manifest.context_length - len(loaded.prefix_ids) - len(loaded.suffix_ids))
    token_ids = loaded.tokenizer(docs["text"].tolist(), add_special_tokens=False)["input_ids"]
    empty = [docs["doc_id"].iloc[i] for i, t in enumerate(token_ids) if not t]
    if empty:
        raise ValueError(f"documents {empty[:5]} have no tokens under {manifest.model}'s tokenizer; remove them from the dataset")
    windows = [make_windows(i, ids[:body], manifest.context_length, loaded.prefix_ids, loaded.suffix_ids)[0] for i, ids in enumerate(token_ids)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(hi - lo for lo, hi in (kept_span(w, False) for w in windows)), unit="tok", unit_scale=True, desc="downstream activations")
    try:  # rows come out in (document, position) order
        allb = extract_in_order(loaded, windows, cfg.batch_size, include_special_tokens=False, on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    doc_index = allb.doc_index
    doc_ids = docs["doc_id"].to_numpy()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("split=*/*.parquet"):
        stale.unlink()
    shards = []
    bounds = np.searchsorted(doc_index, np.arange(0, len(docs) + DOCS_PER_SHARD, DOCS_PER_SHARD))
    for i in range(len(bounds) - 1):
        sel = slice(bounds[i], bounds[i + 1])
        if bounds[i] == bounds[i + 1]:
            continue
        shards.append(
            write_shard(directory, "train", len(shards), doc_ids[allb.doc_index[sel]], allb.position[sel], allb.token_id[sel],
                        allb.activation[sel], fingerprint, validate=(loaded.vocab_size, manifest.max_norm))
        )
    n_tokens = len(doc_index)
    write_manifest(
        directory,
        manifest.model_copy(update={
            "config_fingerprint": fingerprint, "corpus_fingerprint": fingerprint, "shards": shards,
            "tokens_per_split": {s: (n_tokens if s == "train" else 0) for s in SPLITS},
            "documents_per_split": {s: (len(docs) if s == "train" else 0) for s in SPLITS},
            "include_special_tokens": False,
        }),
    )
    tokens = DocumentTokens(doc_ids.tolist(), torch.from_numpy(allb.activation), torch.as_tensor(doc_index, dtype=torch.long))
    return tokens, True


# ----------------------------------------------------------------------- evaluation
@dataclass
class ProbingTask:
    train_rows: np.ndarray  # indices into the pooled documents
    test_rows: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


@dataclass
class SCRTask:
    data: SCRData
    balanced_rows: np.ndarray
    test_rows: np.ndarray
    probes: SCRProbes


def _rows(frame: pd.DataFrame, split: str, position: dict[str, int]) -> np.ndarray:
    return np.array([position[d] for d in frame.loc[frame["split"] == split, "doc_id"]], dtype=np.int64)


def make_tasks(sets: LabelledSets, doc_ids: list[str], pooled_acts: np.ndarray) -> tuple[dict[str, ProbingTask], dict[str, SCRTask]]:
    """Row indices and labels of every probing task, and the fitted SCR probes per pair."""
    position = {d: i for i, d in enumerate(doc_ids)}
    probing = {}
    for name, f in sets.probing.items():
        probing[name] = ProbingTask(
            _rows(f, "train", position), _rows(f, "test", position),
            f.loc[f["split"] == "train", "label"].to_numpy(), f.loc[f["split"] == "test", "label"].to_numpy(),
            sorted(f["label"].unique().tolist()),
        )
    scr = {}
    for pair, f in sets.scr.items():
        b, o, t = (f[f["split"] == s] for s in ("train_biased", "train_balanced", "test"))
        rb, ro, rt = (_rows(f, s, position) for s in ("train_biased", "train_balanced", "test"))
        data = SCRData(
            pooled_acts[rb], b["y"].to_numpy(), pooled_acts[ro], o["y"].to_numpy(), o["z"].to_numpy(), pooled_acts[rt], t["y"].to_numpy()
        )
        scr[pair] = SCRTask(data, ro, rt, fit_scr_probes(data))
    return probing, scr


def evaluate_codes(
    method: str, n_members: int, run: int, codes: np.ndarray, W_dec: np.ndarray,
    probing: dict[str, ProbingTask], scr: dict[str, SCRTask], cfg: DownstreamConfig, dense_probe: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Probing and SCR rows of one dictionary given its pooled codes [N, m] and W_dec [m, d]."""
    key = {"method": method, "n_members": n_members, "run": run}
    prows, srows = [], []
    for name, task in probing.items():
        results = sparse_probe_accuracy(codes[task.train_rows], task.train_labels, codes[task.test_rows], task.test_labels,
                                        cfg.probing_ks, classes=task.classes, seed=cfg.seed)
        if dense_probe:
            results += full_probe_accuracy(codes[task.train_rows], task.train_labels, codes[task.test_rows], task.test_labels,
                                           classes=task.classes, seed=cfg.seed)
        prows += [{**key, "dataset": name, "class": r.cls, "k": r.k, "accuracy": r.accuracy} for r in results]
    for pair, task in scr.items():
        curve = shift_curve(task.probes, task.data, codes[task.balanced_rows], codes[task.test_rows], W_dec, cfg.scr_n_ablated)
        srows += [
            {**key, "pair": pair, "n_ablated": r.n_ablated, "acc_base": r.acc_base, "acc_ablated": r.acc_ablated,
             "acc_oracle": r.acc_oracle, "score": r.score}
            for r in curve
        ]
    return prows, srows


@torch.no_grad()
def evaluate_model(model: TrainedModel, tokens: DocumentTokens, probing, scr, cfg: DownstreamConfig) -> tuple[list[dict], list[dict]]:
    """Every J this model is compared at: prefixes of bagging/boosting, its own J otherwise."""
    ens = load_ensemble(model.path)
    if ens.d_in != tokens.acts.shape[1]:
        raise ValueError(f"model {model.path} reads d={ens.d_in}, but the activations have d={tokens.acts.shape[1]}")
    members = pooled_member_codes(ens, tokens.acts, tokens.doc_index, len(tokens.doc_ids), cfg.encode_batch_size)
    k = ens.member_cfg.d_sae
    W_all = ens.W_dec.detach().float().numpy()
    if model.fixed_j is not None:
        prefixes = [(ens.n_members, model.fixed_j)]
    elif ens.method in ("bagging", "boosting"):
        prefixes = [(n, n) for n in range(1, ens.n_members + 1)]
    else:
        prefixes = [(ens.n_members, ens.n_members)]
    prows, srows = [], []
    for n, label_j in prefixes:
        codes = prefix_pooled_codes(members, ens.prefix_alpha(n)).numpy()
        p, s = evaluate_codes(model.method, label_j, model.run, codes, W_all[: n * k], probing, scr, cfg)
        prows += p
        srows += s
    return prows, srows


# -------------------------------------------------------------------------- figures
def _mean_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Mean and half-width of the t-interval over runs (sae_core.stats.mean_ci; 0 for a single run)."""
    mean, lo, hi = mean_ci(values, confidence)
    return mean, 0.0 if lo is None or hi is None else (hi - lo) / 2


def _largest_j(frame: pd.DataFrame) -> pd.DataFrame:
    """Each method at its largest J (the comparison the paper makes)."""
    top = frame.groupby("method")["n_members"].transform("max")
    return frame[frame["n_members"] == top]


def summarise(frame: pd.DataFrame, x: str, y: str, groups: list[str], confidence: float) -> pd.DataFrame:
    """Mean over the rows of each run first, then mean and CI over runs."""
    per_run = frame.groupby([*groups, "method", "n_members", "run", x], as_index=False)[y].mean()
    rows = []
    for key, g in per_run.groupby([*groups, "method", "n_members", x]):
        mean, half = _mean_ci(g[y].to_numpy(), confidence)
        rows.append({**dict(zip([*groups, "method", "n_members", x], key)), "mean": mean, "ci_low": mean - half,
                     "ci_high": mean + half, "n_runs": len(g)})
    return pd.DataFrame(rows)


def _plot(summary: pd.DataFrame, panel: str, x: str, ylabel: str, path: Path, logx: bool, title: str,
          ylim: tuple[float, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    panels = sorted(summary[panel].unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 4.5 * len(panels)), 3.8), squeeze=False)
    for ax, name in zip(axes[0], panels):
        sub = summary[summary[panel] == name]
        for method in sorted(sub["method"].unique(), key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99):
            g = sub[sub["method"] == method].sort_values(x)
            j = int(g["n_members"].iloc[0])
            label = "raw activations" if method == "raw" else f"{method} (J={j})"
            style = {"linestyle": "--", "color": "gray"} if method == "raw" else {}
            (line,) = ax.plot(g[x], g["mean"], marker="o", ms=3, label=label, **style)
            ax.fill_between(g[x], g["ci_low"], g["ci_high"], alpha=0.15, color=line.get_color(), linewidth=0)
        ticks = sorted(sub[x].unique())
        if logx:
            ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(str(name))
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_figures(probing: pd.DataFrame, scr: pd.DataFrame, run_dir: Path, confidence: float) -> list[str]:
    written = []
    if len(probing):
        sparse = probing[~((probing["method"] == "raw") & (probing["k"] > max(probing.loc[probing["method"] != "raw", "k"], default=10)))]
        s = summarise(_largest_j(sparse), "k", "accuracy", ["dataset"], confidence)
        _plot(s, "dataset", "k", "test accuracy (mean over classes)", run_dir / PROBING_FIGURE, False,
              f"Sparse probing, each method at its largest J; {confidence:.0%} CI over runs", ylim=(0.0, 1.02))
        written.append(PROBING_FIGURE)
    if len(scr):
        s = summarise(_largest_j(scr), "n_ablated", "score", ["pair"], confidence)
        _plot(s, "pair", "n_ablated", "SCR score S", run_dir / SCR_FIGURE, True,
              f"SCR (SHIFT), each method at its largest J; {confidence:.0%} CI over runs")
        written.append(SCR_FIGURE)
    return written


# ----------------------------------------------------------------------------- stage
def _inputs_fingerprint(cfg: DownstreamConfig, manifest: ActivationManifest, sets: LabelledSets, models: list[TrainedModel]) -> str:
    h = hashlib.sha256()
    h.update(cfg.model_dump_json().encode())
    h.update(json.dumps([manifest.model, manifest.revision, manifest.layer, manifest.context_length]).encode())
    docs = sets.documents()
    h.update(_tokens_fingerprint(manifest, docs, cfg.max_tokens_per_document).encode())
    for m in models:
        h.update(f"{m.method}|{m.run}|{m.fixed_j}|{_model_digest(m)}".encode())
    return h.hexdigest()


def _result(run_dir: Path, probing: pd.DataFrame, scr: pd.DataFrame, cells: pd.DataFrame, cfg: DownstreamConfig) -> StageResult:
    result = StageResult(stage="downstream")
    if len(probing):
        result.tables["probing"] = summarise(probing, "k", "accuracy", ["dataset"], cfg.confidence)
    if len(scr):
        result.tables["scr"] = summarise(scr, "n_ablated", "score", ["pair"], cfg.confidence)
    if len(cells):
        result.tables["scr_cells"] = cells
        for pair, g in cells.groupby("pair"):
            result.notes.append(
                f"SCR {pair}: " + ", ".join(
                    f"({r.topic}, {r.gender}) {r.available} available / {r.train_biased} biased / {r.train_balanced} balanced / {r.test} test"
                    for r in g.itertuples()
                )
            )
    result.figures = [f for f in (PROBING_FIGURE, SCR_FIGURE) if (run_dir / f).is_file()]
    return result


def run_downstream(cfg: DownstreamConfig, run_dir: Path, *, progress: bool = True) -> StageResult:
    """Probe and SHIFT every trained model (every J) and the raw activations; see the module doc."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir / ACTIVATIONS_DIR)
    models = discover_models(run_dir)
    if not models:
        raise FileNotFoundError(f"no trained models under {run_dir / MODELS_DIR} (models/<method>/run=<r>/); run the train stage first")
    if not cfg.probing_datasets and not cfg.scr_pairs:
        raise ValueError("nothing to do: probing_datasets and scr_pairs are both empty")
    for m in models:  # before anything is written: a model of another width fails the stage anyway
        d_in = json.loads((m.path / "ensemble.json").read_text()).get("d_in")
        if d_in is not None and d_in != manifest.d:
            raise ValueError(f"model {m.path} reads d={d_in}, but the activations have d={manifest.d}; retrain it (train stage)")
    sets = build_labelled_sets(cfg)
    fingerprint = _inputs_fingerprint(cfg, manifest, sets, models)
    read = [f"{ACTIVATIONS_DIR}/{MANIFEST}", *[m.path.relative_to(run_dir).as_posix() for m in models]]
    outputs = ([PROBING_FILE] if sets.probing else []) + ([SCR_FILE, CELLS_FILE] if sets.scr else [])

    if all(table_metadata(run_dir / f, INPUTS_KEY) == fingerprint for f in outputs):
        try:
            probing = read_table(run_dir / PROBING_FILE, "probing_results") if sets.probing else pd.DataFrame()
            scr = read_table(run_dir / SCR_FILE, "scr_results") if sets.scr else pd.DataFrame()
            cells = read_table(run_dir / CELLS_FILE, "scr_cells") if sets.scr else pd.DataFrame()
            if not all((run_dir / f).is_file() for f in ([PROBING_FIGURE] if sets.probing else []) + ([SCR_FIGURE] if sets.scr else [])):
                write_figures(probing, scr, run_dir, cfg.confidence)
            result = _result(run_dir, probing, scr, cells, cfg)
            result.read, result.validated, result.did_work = read, list(outputs), False
            result.seconds = time.perf_counter() - start
            return result
        except ContractViolation:
            pass  # damaged: recompute

    written, validated = [], []
    for name, frame in sets.probing.items():
        rel = f"{DATASETS_DIR}/probe_{name}.parquet"
        write_table(frame, run_dir / rel, "labelled_probing")
        written.append(rel)
    for pair, frame in sets.scr.items():
        rel = f"{DATASETS_DIR}/scr_{pair}.parquet"
        write_table(frame, run_dir / rel, "labelled_scr")
        written.append(rel)
    validated += written

    docs = sets.documents()
    tokens, extracted = document_tokens(docs, manifest, cfg, run_dir / TOKENS_DIR, progress)
    (written if extracted else read).append(TOKENS_DIR)
    validated.append(TOKENS_DIR)
    pooled = tokens.pooled().numpy()
    probing_tasks, scr_tasks = make_tasks(sets, tokens.doc_ids, pooled)

    # the raw-activation baseline: top-k neurons (and the dense probe, k = d); neuron ablation
    prows, srows = evaluate_codes("raw", 0, 0, pooled, IdentityDictionary(pooled.shape[1]).W_dec.numpy(),
                                  probing_tasks, scr_tasks, cfg, dense_probe=True)
    iterator = models
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(models, desc="downstream models", unit="model")
    for model in iterator:
        p, s = evaluate_model(model, tokens, probing_tasks, scr_tasks, cfg)
        prows += p
        srows += s

    probing = pd.DataFrame(prows, columns=["method", "n_members", "run", "dataset", "class", "k", "accuracy"])
    scr = pd.DataFrame(srows, columns=["method", "n_members", "run", "pair", "n_ablated", "acc_base", "acc_ablated", "acc_oracle", "score"])
    meta = {INPUTS_KEY: fingerprint}
    if len(probing):
        write_table(probing, run_dir / PROBING_FILE, "probing_results", meta)
        written.append(PROBING_FILE)
    if len(scr):
        write_table(scr, run_dir / SCR_FILE, "scr_results", meta)
        write_table(sets.cells, run_dir / CELLS_FILE, "scr_cells", meta)
        written += [SCR_FILE, CELLS_FILE]
    validated += [f for f in (PROBING_FILE, SCR_FILE, CELLS_FILE) if f in written]
    figures = write_figures(probing, scr, run_dir, cfg.confidence)

    result = _result(run_dir, probing, scr, sets.cells, cfg)
    result.read, result.written, result.validated = read, written + figures, validated
    result.seconds = time.perf_counter() - start
    if progress:
        print(f"downstream: {len(models)} models, {len(tokens.doc_ids)} documents, {int(tokens.acts.shape[0])} tokens "
              f"in {result.seconds:.1f} s")
    return result
