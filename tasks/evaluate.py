"""The intrinsic-evaluation stage: every metric of SPEC §6 at every J, over the S runs.

Reads ``activations/`` (the evaluation split, validated) and ``models/*/run=*/``; writes

    metrics/intrinsic.parquet   long: method, n_members, run, metric, value
    metrics/summary.parquet     mean and 95% CI over runs per (method, n_members, metric)
    figures/intrinsic_<metric>.png and figures/intrinsic.png (the paper's Figure 2)

Bagging and boosting are scored at every prefix J = 1..J_max (bagging's J-member ensemble
is its first J members, boosting's its first J stages); the single SAE at J = 1; an
expanded SAE at the J whose width it matches. Stability-type metrics compare the S runs
of one (method, J) with each other, so they need S ≥ 2.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch

from data_contracts.activations import validate_activations
from data_contracts.metrics import write_intrinsic, write_summary
from sae_core import metrics
from sae_core.evaluation import dictionary_metrics, prefix_reconstruction_metrics
from sae_core.io import load_ensemble
from sae_core.stats import mean_ci
from tasks.common import ACTIVATIONS_DIR, FIGURES_DIR, METRICS_DIR, MODELS_DIR, StageResult, split_tokens
from tasks.config import EvaluateConfig

INTRINSIC_FILE = "intrinsic.parquet"
SUMMARY_FILE = "summary.parquet"
_MODEL_DIR = re.compile(r"^(?P<method>[a-z_]+?)(?:_J(?P<J>\d+))?$")


def discover_models(run_dir: Path) -> list[tuple[str, int | None, int, Path]]:
    """(method, matched J or None, run, directory) of every saved model, sorted."""
    found = []
    for directory in sorted((run_dir / MODELS_DIR).glob("*/run=*")):
        match = _MODEL_DIR.match(directory.parent.name)
        run = directory.name.removeprefix("run=")
        if match is None or not run.isdigit():
            raise ValueError(f"unexpected model directory {directory}: expected models/<method>[_J<J>]/run=<r>")
        J = match.group("J")
        found.append((match.group("method"), int(J) if J else None, int(run), directory))
    if not found:
        raise FileNotFoundError(f"no trained models under {run_dir / MODELS_DIR}; run the train stage first")
    return found


def _stability_rows(dictionaries: dict[tuple[str, int], dict[int, torch.Tensor]], cfg: EvaluateConfig) -> tuple[list[dict], list[str]]:
    """stability, stability_random, stability_matched(_random) per (method, J, run)."""
    rows, notes = [], []
    for (method, J), by_run in sorted(dictionaries.items()):
        runs = sorted(by_run)
        if len(runs) < 2:
            continue
        dicts = [by_run[r] for r in runs]
        randoms = [metrics.random_dictionary_like(W, seed=10_000 + r) for W, r in zip(dicts, runs)]
        stab = metrics.stability(dicts, bf16=cfg.bf16_cosines)
        for name, values in (("stability", stab), ("stability_random", metrics.stability(randoms, bf16=cfg.bf16_cosines))):
            rows += [{"method": method, "n_members": J, "run": r, "metric": name, "value": v} for r, v in zip(runs, values)]
        m = dicts[0].shape[0]
        if m > cfg.matched_max_latents:
            notes.append(f"stability_matched skipped for {method} J={J}: {m} latents > matched_max_latents={cfg.matched_max_latents}")
            continue
        for name, group in (("stability_matched", dicts), ("stability_matched_random", randoms)):
            pair = {}
            for a in range(len(runs)):
                for b in range(a + 1, len(runs)):
                    pair[a, b] = metrics.stability_matched(group[a], group[b])
            for a, r in enumerate(runs):
                mine = [v for (p, q), v in pair.items() if a in (p, q)]
                rows.append({"method": method, "n_members": J, "run": r, "metric": name, "value": sum(mine) / len(mine)})
    return rows, notes


def _ce_windows(cfg: EvaluateConfig, run_dir: Path, manifest, loaded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask and splice mask [B, T] of the first ``cfg.ce_max_windows``
    windows of the evaluation split's documents (in doc-id order)."""
    from data_contracts.documents import read_documents
    from sae_core.extraction import make_windows, pad_batch
    from tasks.common import DOCUMENTS_FILE

    docs = read_documents(run_dir / DOCUMENTS_FILE)
    docs = docs[docs["split"] == cfg.split].sort_values("doc_id")
    windows = []
    for i, text in enumerate(docs["text"]):
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        windows += [w for w in make_windows(i, ids, manifest.context_length, loaded.prefix_ids, loaded.suffix_ids) if len(w.input_ids) > 2]
        if len(windows) >= cfg.ce_max_windows:
            break
    if not windows:
        raise ValueError(f"no {cfg.split} documents long enough for the CE splice in {run_dir / DOCUMENTS_FILE}")
    input_ids, attention = pad_batch(windows[: cfg.ce_max_windows], loaded.pad_id)
    special = torch.tensor(sorted(loaded.special_ids), dtype=torch.long)
    splice = attention.bool() & ~torch.isin(input_ids, special)
    return input_ids, attention, splice


def _ce_rows(cfg: EvaluateConfig, run_dir: Path, manifest, models) -> tuple[list[dict], str]:
    """ce_loss_recovered, kl_divergence and the raw CEs per (method, J, run), decoder models only."""
    from sae_core.models import load_model
    from sae_core.splice import ce_loss_recovered, spliced_losses, zero_replacement

    try:
        loaded = load_model(manifest.model, manifest.layer, causal_lm=True, trust_remote_code=manifest.trust_remote_code)
    except ValueError as err:
        if "not a causal LM" in str(err):
            return [], f"ce_loss_recovered: not applicable ({manifest.model} is not a causal LM)"
        raise
    if loaded.revision != manifest.revision:
        raise ValueError(
            f"{manifest.model} now has weights {loaded.revision}, but the activations were extracted from "
            f"{manifest.revision}; rerun extraction (--force extract)"
        )
    input_ids, attention, splice = _ce_windows(cfg, run_dir, manifest, loaded)
    replacements: dict = {"zero": zero_replacement}
    keys = {}
    for method, matched_J, run, directory in models:
        ens = load_ensemble(directory)
        for n in range(1, ens.n_members + 1):
            name = f"{method}|{run}|{n}"
            replacements[name] = ens.prefix(n).eval()
            keys[name] = (method, matched_J if matched_J is not None else n, run)
    losses = spliced_losses(loaded.model, loaded.block, input_ids, attention, splice, {"clean": None, **replacements})
    clean, zero = losses["clean"].ce, losses["zero"].ce
    rows = []
    for name, (method, J, run) in keys.items():
        sae = losses[name]
        values = {"ce_loss_recovered": ce_loss_recovered(clean, sae.ce, zero), "kl_divergence": sae.kl,
                  "ce_loss_sae": sae.ce, "ce_loss_clean": clean, "ce_loss_zero": zero}
        rows += [{"method": method, "n_members": J, "run": run, "metric": k, "value": v} for k, v in values.items()]
    n_tokens = int(splice.sum())
    return rows, f"ce_loss_recovered on {input_ids.shape[0]} {cfg.split} windows ({n_tokens} spliced tokens): CE clean {clean:.4f}, zero-ablated {zero:.4f}"


def summarise(frame: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Mean and CI over runs of every (method, n_members, metric)."""
    out = []
    for (method, J, metric), group in frame.groupby(["method", "n_members", "metric"], sort=True):
        mean, lo, hi = mean_ci(group["value"].to_numpy(), confidence)
        out.append({"method": method, "n_members": int(J), "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi, "n_runs": len(group)})
    return pd.DataFrame(out).astype({"ci_low": float, "ci_high": float})


def run_evaluation(cfg: EvaluateConfig, run_dir: str | Path, *, progress: bool = True) -> StageResult:
    """Score every saved model on ``cfg.split``; see the module docstring."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    acts_dir = run_dir / ACTIVATIONS_DIR
    manifest = validate_activations(acts_dir, splits=(cfg.split,))
    acts = split_tokens(acts_dir, cfg.split, cfg.max_tokens, seed=1)
    models = discover_models(run_dir)
    result = StageResult(stage="evaluate", read=[f"{ACTIVATIONS_DIR} ({cfg.split} split, {acts.shape[0]} tokens)"])
    result.validated.append(f"{ACTIVATIONS_DIR} ({cfg.split} split)")

    rows: list[dict] = []
    dictionaries: dict[tuple[str, int], dict[int, torch.Tensor]] = defaultdict(dict)
    iterator = models
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(models, desc="evaluate", unit="model")
    for method, matched_J, run, directory in iterator:
        ens = load_ensemble(directory)
        if ens.d_in != manifest.d:
            raise ValueError(f"{directory} was trained on d={ens.d_in} activations but {acts_dir} has d={manifest.d}; retrain (train stage)")
        result.read.append(str(directory.relative_to(run_dir)))
        with torch.no_grad():
            recon = prefix_reconstruction_metrics(ens, acts.split(cfg.batch_size))
        k = ens.member_cfg.d_sae
        for n, values in recon.items():
            J = matched_J if matched_J is not None else n  # an expanded SAE stands at the J it matches
            W = ens.W_dec[: n * k].detach()
            dictionaries[method, J][run] = W
            values = {**values, **dictionary_metrics(W, cfg.diversity_threshold)}
            rows += [{"method": method, "n_members": J, "run": run, "metric": name, "value": float(v)} for name, v in values.items()]
    stab_rows, notes = _stability_rows(dictionaries, cfg)
    rows += stab_rows
    result.notes += notes
    if cfg.ce_loss:
        ce_rows, note = _ce_rows(cfg, run_dir, manifest, models)
        rows += ce_rows
        result.notes.append(note)

    frame = pd.DataFrame(rows)
    dropped = frame[frame["value"].isna()]
    if len(dropped):
        result.notes.append(f"{len(dropped)} undefined values left out (e.g. {dropped.iloc[0].to_dict()})")
        frame = frame.dropna(subset=["value"])
    frame = frame.astype({"n_members": "int64", "run": "int64"}).sort_values(["method", "n_members", "run", "metric"]).reset_index(drop=True)
    summary = summarise(frame, cfg.confidence)
    out_dir = run_dir / METRICS_DIR
    write_intrinsic(frame, out_dir / INTRINSIC_FILE)
    write_summary(summary, out_dir / SUMMARY_FILE)
    result.written += [f"{METRICS_DIR}/{INTRINSIC_FILE} ({len(frame)} rows)", f"{METRICS_DIR}/{SUMMARY_FILE} ({len(summary)} rows)"]
    result.validated += [f"{METRICS_DIR}/{INTRINSIC_FILE}", f"{METRICS_DIR}/{SUMMARY_FILE}"]

    from tasks.figures import plot_intrinsic

    figures = plot_intrinsic(summary, run_dir / FIGURES_DIR, confidence=cfg.confidence)
    result.figures += [str(p.relative_to(run_dir)) for p in figures]
    result.tables["intrinsic_summary"] = summary
    result.seconds = time.perf_counter() - start
    return result
