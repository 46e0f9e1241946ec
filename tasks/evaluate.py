"""The intrinsic-evaluation stage: every metric of SPEC §6 at every J, over the S runs.

Reads ``activations/`` (the evaluation split, validated) and ``models/*/run=*/``; writes

    metrics/intrinsic.parquet     long: method, n_members, run, metric, value
    metrics/summary.parquet       mean and 95% CI over runs per (method, n_members, metric)
    metrics/top_contexts.parquet  top-activating test contexts of bagging run 0's first and last member
    figures/intrinsic_<metric>.png and figures/intrinsic.png (the paper's Figure 2)

Bagging and boosting are scored at every prefix J = 1..J_max (bagging's J-member ensemble
is its first J members, boosting's its first J stages); the single SAE at J = 1; an
expanded SAE at the J whose width it matches. Stability-type metrics compare the S runs
of one (method, J) with each other, so they need S ≥ 2.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch

from data_contracts.activations import read_manifest, validate_activations
from data_contracts.metrics import write_intrinsic, write_summary
from sae_core import metrics
from sae_core.evaluation import dictionary_metrics, prefix_reconstruction_metrics
from sae_core.io import load_ensemble
from sae_core.models import NotACausalLM
from sae_core.devices import resolve_device
from tasks.common import ACTIVATIONS_DIR, DOCUMENTS_FILE, FIGURES_DIR, METRICS_DIR, ModelDir, StageResult, activation_source, discover_models
from tasks.progress import ProgressLog
from tasks.config import EvaluateConfig
from tasks.summaries import summarise_over_runs
from tasks.units import Unit, UnitExecutor, executor_or_default

INTRINSIC_FILE = "intrinsic.parquet"
SUMMARY_FILE = "summary.parquet"
#: the random dictionary standing in for run r is seeded with this offset + r (disjoint from training seeds)
RANDOM_FLOOR_SEED_OFFSET = 10_000
#: seed of the token subset when evaluate.max_tokens cuts the split (train uses 0)
TOKEN_SUBSET_SEED = 1


def _rows(method: str, J: int, run: int, values: dict[str, float]) -> list[dict]:
    return [{"method": method, "n_members": J, "run": run, "metric": name, "value": float(v)} for name, v in values.items()]


def _pairwise_matched(group: list[torch.Tensor], cfg: EvaluateConfig) -> dict[str, list[float]]:
    """Per run: stability_matched, stability_shared and orderedness, each the mean over the other
    runs of its one-to-one matching with that run (Hungarian up to cfg.hungarian_max_latents)."""
    from sae_core.ordering import matched_across_runs

    return matched_across_runs(group, cfg.shared_threshold, exact_max=cfg.hungarian_max_latents,
                               candidates=cfg.matching_candidates, bf16=cfg.bf16_cosines)


def _stability_rows(dictionaries: dict[tuple[str, int], dict[int, torch.Tensor]], cfg: EvaluateConfig) -> tuple[list[dict], list[str]]:
    """Per (method, J, run): the three stabilities (relaxed, matched, shared), each one's floor
    on random dictionaries of the same shapes (``_random``) and the metric minus its floor,
    run by run (``_corrected``; :data:`sae_core.metric_catalog.FLOORS`)."""
    from sae_core.metric_catalog import FLOORS

    rows, sparse = [], []
    floors: dict[tuple, dict[str, list[float]]] = {}  # the floor depends only on the shapes and runs: computed once each
    for (method, J), by_run in sorted(dictionaries.items()):
        runs = sorted(by_run)
        if len(runs) < 2:
            continue
        dicts = [by_run[r] for r in runs]
        values = {"stability": metrics.stability(dicts, bf16=cfg.bf16_cosines), **_pairwise_matched(dicts, cfg)}
        key = tuple((r, *W.shape) for r, W in zip(runs, dicts))
        if key not in floors:
            randoms = [metrics.random_dictionary_like(W, seed=RANDOM_FLOOR_SEED_OFFSET + r) for W, r in zip(dicts, runs)]
            floors[key] = {"stability": metrics.stability(randoms, bf16=cfg.bf16_cosines), **_pairwise_matched(randoms, cfg)}
        values.update({FLOORS[name][0]: v for name, v in floors[key].items()})
        for name, (floor, corrected) in FLOORS.items():
            values[corrected] = [v - f for v, f in zip(values[name], values[floor])]
        if max(W.shape[0] for W in dicts) > cfg.hungarian_max_latents:
            sparse.append(f"{method} J={J}")
        for name, per_run in values.items():
            rows += [{"method": method, "n_members": J, "run": r, "metric": name, "value": v} for r, v in zip(runs, per_run)]
    notes = [f"stability_matched/shared: sparse-candidate matching ({cfg.matching_candidates} candidates per latent) above "
             f"hungarian_max_latents={cfg.hungarian_max_latents} for {', '.join(sparse)}; Hungarian for the rest"] if sparse else []
    return rows, notes


def _ce_windows(cfg: EvaluateConfig, run_dir: Path, manifest, loaded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask and splice mask [B, T] of the first ``cfg.ce_max_windows``
    windows of the evaluation split's documents (in doc-id order)."""
    from data_contracts.documents import read_documents
    from sae_core.extraction import make_windows, pad_batch

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


def _ce_rows(cfg: EvaluateConfig, run_dir: Path, manifest, models: list[ModelDir], device: torch.device) -> tuple[list[dict], str]:
    """ce_loss_recovered, kl_divergence and the raw CEs per (method, J, run), decoder models only."""
    from sae_core.models import load_model
    from sae_core.splice import ce_loss_recovered, spliced_losses, zero_replacement

    try:
        loaded = load_model(manifest.model, manifest.layer, causal_lm=True, trust_remote_code=manifest.trust_remote_code)
    except NotACausalLM:
        return [], f"ce_loss_recovered: not applicable ({manifest.model} is not a causal LM)"
    if loaded.revision != manifest.revision:
        raise ValueError(
            f"{manifest.model} now has weights {loaded.revision}, but the activations were extracted from "
            f"{manifest.revision}; rerun extraction (--force extract)"
        )
    input_ids, attention, splice = _ce_windows(cfg, run_dir, manifest, loaded)
    replacements: dict = {"zero": zero_replacement}
    keys = {}
    for model in models:
        ens = load_ensemble(model.path(run_dir))
        for n, J in model.prefixes(ens.n_members):
            name = f"{model.name}|{model.run}|{n}"
            replacements[name] = ens.prefix(n).eval()
            keys[name] = (model.method, J, model.run)
    losses = spliced_losses(loaded.model, loaded.block, input_ids, attention, splice, {"clean": None, **replacements}, device=device)
    clean, zero = losses["clean"].ce, losses["zero"].ce
    rows = []
    for name, (method, J, run) in keys.items():
        sae = losses[name]
        rows += _rows(method, J, run, {"ce_loss_recovered": ce_loss_recovered(clean, sae.ce, zero), "kl_divergence": sae.kl,
                                       "ce_loss_sae": sae.ce, "ce_loss_clean": clean, "ce_loss_zero": zero})
    n_tokens = int(splice.sum())
    return rows, f"ce_loss_recovered on {input_ids.shape[0]} {cfg.split} windows ({n_tokens} spliced tokens): CE clean {clean:.4f}, zero-ablated {zero:.4f}"


def summarise(frame: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Mean and CI over runs of every (method, n_members, metric)."""
    return summarise_over_runs(frame, ["method", "n_members", "metric"], "value", confidence)


def _load_checked(model: ModelDir, run_dir: Path, d: int, device: torch.device):
    directory = model.path(run_dir)
    ens = load_ensemble(directory).to(device)
    if ens.d_in != d:
        raise ValueError(
            f"{directory} was trained on d={ens.d_in} activations but {run_dir / ACTIVATIONS_DIR} has d={d}; retrain (train stage)"
        )
    return ens


def _open_split(cfg: EvaluateConfig, run_dir: Path, *, validate: bool = True):
    """The evaluation split's manifest and source; a unit on a worker skips the contract (see
    :func:`tasks.train.train_unit`)."""
    acts_dir = run_dir / ACTIVATIONS_DIR
    manifest = validate_activations(acts_dir, splits=(cfg.split,)) if validate else read_manifest(acts_dir)
    # streamed shard by shard for every model: memory independent of the number of tokens
    return manifest, activation_source(acts_dir, cfg.split, cfg.max_tokens, seed=TOKEN_SUBSET_SEED, manifest=manifest)


def evaluate_unit(run_dir: Path, cfg: EvaluateConfig, model: ModelDir, *, data=None) -> list[dict]:
    """One model's unit of work: every prefix's reconstruction and dictionary metrics, on
    ``cfg.device``, as metric rows. data: (manifest, source) already opened in process."""
    run_dir = Path(run_dir)
    manifest, acts = data if data is not None else _open_split(cfg, run_dir, validate=False)
    ens = _load_checked(model, run_dir, manifest.d, resolve_device(cfg.device))
    with torch.no_grad():
        recon = prefix_reconstruction_metrics(ens, acts.iter_batches(cfg.batch_size))
    d_sae = ens.member_cfg.d_sae
    rows = []
    for n, J in model.prefixes(ens.n_members):
        W = ens.W_dec[: n * d_sae].detach()
        rows += _rows(model.method, J, model.run, {**recon[n].as_dict(), **dictionary_metrics(W, cfg.diversity_threshold)})
    return rows


def _dictionaries(models: list[ModelDir], run_dir: Path, d: int, device: torch.device) -> dict[tuple[str, int], dict[int, torch.Tensor]]:
    """(method, J) -> run -> the decoder of that prefix: what the stability metrics compare across runs."""
    dictionaries: dict[tuple[str, int], dict[int, torch.Tensor]] = defaultdict(dict)
    for model in models:
        ens = _load_checked(model, run_dir, d, device)
        d_sae = ens.member_cfg.d_sae
        for n, J in model.prefixes(ens.n_members):
            dictionaries[model.method, J][model.run] = ens.W_dec[: n * d_sae].detach()
    return dictionaries


def run_evaluation(cfg: EvaluateConfig, run_dir: str | Path, *, progress: bool = True, executor: UnitExecutor | None = None) -> StageResult:
    """Score every saved model on ``cfg.split``; see the module docstring."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    executor = executor_or_default(executor, run_dir)
    manifest, acts = _open_split(cfg, run_dir)
    models = discover_models(run_dir)
    device = resolve_device(cfg.device)
    result = StageResult(stage="evaluate", read=[ACTIVATIONS_DIR], validated=[ACTIVATIONS_DIR])
    result.notes.append(f"evaluated on the {cfg.split} split: T = {acts.n_rows} tokens, streamed from its shards, on {device}")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(models), desc="evaluate", unit="model")
    log = ProgressLog("evaluate", len(models), "models", tokens_per_unit=acts.n_rows, enabled=not progress)

    def finished(unit: Unit, _rows: list[dict]) -> None:
        if bar is not None:
            bar.update(1)
        log.advance(1, unit.label)

    data = {"data": (manifest, acts)} if executor.in_process else {}
    units = [Unit(evaluate_unit, {"cfg": cfg, "model": model, **data}, f"evaluate {model.name}/run={model.run}",
                  reads=(ACTIVATIONS_DIR, model.relative)) for model in models]
    rows: list[dict] = [row for model_rows in executor.run("evaluate", units, on_done=finished) for row in model_rows]
    result.read += [model.relative for model in models]
    if bar is not None:
        bar.close()
    log.finish()
    # metrics that compare runs, once every model of a method exists
    stab_rows, notes = _stability_rows(_dictionaries(models, run_dir, manifest.d, device), cfg)
    rows += stab_rows
    result.notes += notes
    if cfg.ce_loss:
        ce_rows, note = _ce_rows(cfg, run_dir, manifest, models, device)
        rows += ce_rows
        result.notes.append(note)

    frame = pd.DataFrame(rows)
    dropped = frame[frame["value"].isna()]
    if len(dropped):
        result.notes.append(f"{len(dropped)} undefined values left out (e.g. {dropped.iloc[0].to_dict()})")
        frame = frame.dropna(subset=["value"])
    frame = frame.astype({"n_members": "int64", "run": "int64"}).sort_values(["method", "n_members", "run", "metric"]).reset_index(drop=True)
    summary = summarise(frame, cfg.confidence)
    write_intrinsic(frame, run_dir / METRICS_DIR / INTRINSIC_FILE)
    write_summary(summary, run_dir / METRICS_DIR / SUMMARY_FILE)
    tables = [f"{METRICS_DIR}/{INTRINSIC_FILE}", f"{METRICS_DIR}/{SUMMARY_FILE}"]
    result.notes.append(f"{len(frame)} metric values, {len(summary)} summary rows")

    from tasks.top_contexts import write_top_contexts

    if cfg.latents_per_member and cfg.top_contexts:
        contexts = write_top_contexts(run_dir, manifest.model, cfg.latents_per_member, cfg.top_contexts)
        if contexts is None:
            result.notes.append("top contexts: no bagging run 0 or no test split; none written")
        else:
            tables.append(contexts)
    from tasks.interpret_contexts import write_latent_contexts_table

    latent_contexts = write_latent_contexts_table(run_dir, manifest.model, cfg.latent_contexts)
    tables += [latent_contexts] if latent_contexts else []
    result.written += tables
    result.validated += tables

    from tasks.figures import plot_intrinsic

    figures = plot_intrinsic(summary, run_dir / FIGURES_DIR, confidence=cfg.confidence)
    result.figures += [str(p.relative_to(run_dir)) for p in figures]
    result.tables["intrinsic_summary"] = summary
    result.seconds = time.perf_counter() - start
    return result
