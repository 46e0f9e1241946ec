"""The report stage's copy of the core metrics and sparse probing in SAEBench's output schema
(``report/saebench/{core,sparse_probing}/*_eval_results.json``), beside the Parquet tables,
so SAEBench's plotting (``graphing_utils.get_eval_results``) reads them (SPEC §13)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from sae_core.interop.saelens import SAELENS_SCHEMA_VERSION, saelens_architecture, saelens_config
from sae_core.io import ENSEMBLE_FILE, load_sae_config
from sae_core.methods import method
from tasks.common import ACTIVATIONS_DIR, DOWNSTREAM_DIR, METRICS_DIR, REPORT_DIR, ModelDir
from tasks.interop import manifest_metadata

SAEBENCH_DIR = f"{REPORT_DIR}/saebench"
#: the top-k fields of SAEBench's sparse-probing schema (others go to eval_result_unstructured)
SAEBENCH_PROBING_KS = (1, 2, 5, 10, 20, 50, 100)
SAEBENCH_COMMIT = "not run by SAEBench: written by sae-ensembles in SAEBench's output schema"


def _saebench_sae_cfg(directory: Path, n_used: int | None, method: str, J: int, manifest_meta: dict[str, Any]) -> dict[str, Any]:
    """sae_cfg_dict of one scored model: SAELens' cfg.json of its concatenated view (the first
    ``n_used`` members, None: all; width n_used·m), plus what SAEBench's plots read
    (architecture, d_sae, training_tokens) and which method and J it is. Read from the
    model's ensemble.json and member config, without loading its weights."""
    try:
        meta = json.loads((directory / ENSEMBLE_FILE).read_text())
        cfg = load_sae_config(directory / meta["members"][0])
    except (OSError, ValueError, KeyError, IndexError):
        return {"architecture": "unknown", "d_sae": 0, "ensemble_method": method, "n_members": J}
    n = len(meta["members"]) if n_used is None else min(n_used, len(meta["members"]))
    sae_cfg = saelens_config(saelens_architecture(cfg) or cfg.architecture, cfg.d_in, cfg.d_sae * n,
                             k=cfg.k * n if cfg.k is not None else None, metadata=manifest_meta)
    sae_cfg.update(ensemble_method=method, n_members=J)
    tokens = (meta.get("info") or {}).get("train_tokens")
    if tokens is not None:
        sae_cfg["training_tokens"] = tokens
    return sae_cfg


def _none_if_missing(values: dict[str, float], name: str, scale: float = 1.0) -> float | None:
    v = values.get(name)
    return None if v is None or pd.isna(v) else float(v) * scale


def core_metrics(values: dict[str, float], d: int, tokens: int | None) -> dict[str, dict[str, float | int | None]]:
    """SAEBench's core ``eval_result_metrics`` from one (method, J, run)'s metric values.

    Mappings (ours, SPEC §6 -> SAEBench core): explained_variance_total (1 − FVU) ->
    reconstruction_quality.explained_variance; mse / d -> reconstruction_quality.mse (SAEBench
    averages over dims too: ((a − â)²).mean()); shrinkage_gamma -> relative_reconstruction_bias
    (both E‖â‖² / E[a·â]); l0 -> sparsity.l0; ce_loss_recovered -> ce_loss_score;
    ce_loss_sae/clean/zero -> ce_loss_with_sae/without_sae/with_ablation; kl_divergence ->
    kl_div_with_sae; 1 − dead_fraction -> misc_metrics.frac_alive; T -> token_stats. What we do
    not measure (cossim, L2 norms, L1, the KL score) is null.
    """
    v = values
    alive = _none_if_missing(v, "dead_fraction")
    return {
        "model_behavior_preservation": {"kl_div_score": None, "kl_div_with_ablation": None,
                                        "kl_div_with_sae": _none_if_missing(v, "kl_divergence")},
        "model_performance_preservation": {"ce_loss_score": _none_if_missing(v, "ce_loss_recovered"),
                                           "ce_loss_with_ablation": _none_if_missing(v, "ce_loss_zero"),
                                           "ce_loss_with_sae": _none_if_missing(v, "ce_loss_sae"),
                                           "ce_loss_without_sae": _none_if_missing(v, "ce_loss_clean")},
        "reconstruction_quality": {"explained_variance": _none_if_missing(v, "explained_variance_total"),
                                   "mse": _none_if_missing(v, "mse", 1.0 / d), "cossim": None},
        "shrinkage": {"l2_norm_in": None, "l2_norm_out": None, "l2_ratio": None,
                      "relative_reconstruction_bias": _none_if_missing(v, "shrinkage_gamma")},
        "sparsity": {"l0": _none_if_missing(v, "l0"), "l1": None},
        "token_stats": {"total_tokens_eval_reconstruction": tokens, "total_tokens_eval_sparsity_variance": tokens},
        "misc_metrics": {"frac_alive": None if alive is None else 1.0 - alive},
    }


def probing_metrics(rows: pd.DataFrame, raw: pd.DataFrame, d: int) -> tuple[dict, list[dict], dict]:
    """SAEBench's sparse-probing (metrics, per-dataset details, unstructured) for one (method, J, run).

    rows / raw: probing_results rows of the model / of the raw baseline (dataset, class, k,
    accuracy). Per dataset, a k's accuracy is the mean over its one-vs-rest classes; the
    top level is the mean over datasets. sae_top_{k}_test_accuracy from the model,
    llm_top_{k}_test_accuracy from raw activations' top-k neurons, llm_test_accuracy from
    the raw dense probe (k = d); sae_test_accuracy (a dense probe on all latents) is not
    measured (null). k outside SAEBench's {1, 2, 5, 10, 20, 50, 100} goes to the unstructured part.
    """
    def per_dataset(frame: pd.DataFrame) -> dict[str, dict[int, float]]:
        means = frame.groupby(["dataset", "k"])["accuracy"].mean()
        out: dict[str, dict[int, float]] = {}
        for (dataset, k), acc in means.items():
            out.setdefault(str(dataset), {})[int(k)] = float(acc)
        return out

    sae, llm = per_dataset(rows), per_dataset(raw)
    details, extra = [], {}
    for dataset in sorted(sae):
        detail: dict[str, Any] = {"dataset_name": dataset, "llm_test_accuracy": llm.get(dataset, {}).get(d)}
        for k in SAEBENCH_PROBING_KS:
            detail[f"llm_top_{k}_test_accuracy"] = llm.get(dataset, {}).get(k)
        detail["sae_test_accuracy"] = None
        for k in SAEBENCH_PROBING_KS:
            detail[f"sae_top_{k}_test_accuracy"] = sae[dataset].get(k)
        details.append(detail)
        other = {k: a for k, a in sae[dataset].items() if k not in SAEBENCH_PROBING_KS}
        if other:
            extra[dataset] = {f"sae_top_{k}_test_accuracy": a for k, a in sorted(other.items())}

    def mean_of(key: str) -> float | None:
        values = [det[key] for det in details if det[key] is not None]
        return sum(values) / len(values) if values else None

    metrics = {
        "llm": {"llm_test_accuracy": mean_of("llm_test_accuracy"),
                **{f"llm_top_{k}_test_accuracy": mean_of(f"llm_top_{k}_test_accuracy") for k in SAEBENCH_PROBING_KS}},
        "sae": {"sae_test_accuracy": None, **{f"sae_top_{k}_test_accuracy": mean_of(f"sae_top_{k}_test_accuracy") for k in SAEBENCH_PROBING_KS}},
    }
    return metrics, details, extra


def _eval_output(eval_type: str, release: str, sae_id: str, config: dict, metrics: dict, details: list, sae_cfg: dict,
                 millis: int, unstructured: Any) -> dict[str, Any]:
    """One SAEBench ``BaseEvalOutput`` as JSON (fields in its declaration order)."""
    return {
        "eval_type_id": eval_type,
        "eval_config": config,
        "eval_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sae-ensembles/{eval_type}/{release}/{sae_id}")),
        "datetime_epoch_millis": millis,
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": SAEBENCH_COMMIT,
        "sae_lens_id": sae_id,
        "sae_lens_release_id": release,
        "sae_lens_version": SAELENS_SCHEMA_VERSION,
        "sae_cfg_dict": sae_cfg,
        "eval_result_unstructured": unstructured,
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def saebench_key(release: str, method: str, J: int, run: int) -> tuple[str, str]:
    """(sae_lens_release_id, sae_lens_id) of one scored model; its file is ``<release>_<id>_eval_results.json``."""
    return release, f"{method}_J{J}_run{run}"


def write_saebench_results(cfg, run_dir: str | Path) -> list[str]:
    """Write the core metrics (from metrics/intrinsic.parquet) and sparse probing (from
    downstream/probing.parquet) of every scored (method, J, run) in SAEBench's output schema
    under report/saebench/; returns the files written (relative). A table that is missing
    is skipped (the report says what is missing)."""
    from data_contracts.activations import read_manifest
    from data_contracts.labelled import read_table
    from data_contracts.metrics import read_intrinsic

    run_dir = Path(run_dir)
    if not (run_dir / ACTIVATIONS_DIR / "manifest.json").is_file():
        return []
    manifest = read_manifest(run_dir / ACTIVATIONS_DIR)
    meta = manifest_metadata(run_dir)
    release = f"sae_ensembles_{cfg.name}"
    tokens = manifest.tokens_per_split.get(cfg.evaluate.split, 0)
    tokens = tokens if cfg.evaluate.max_tokens is None else min(tokens, cfg.evaluate.max_tokens)
    def sae_cfg(name: str, J: int, run: int) -> dict[str, Any]:
        spec = method(name)
        directory = ModelDir(name, run, J if spec.matched_width else None).path(run_dir)
        return _saebench_sae_cfg(directory, J if spec.prefixes else None, name, J, meta)

    written: list[str] = []
    intrinsic_path = run_dir / METRICS_DIR / "intrinsic.parquet"
    if intrinsic_path.is_file():
        frame = read_intrinsic(intrinsic_path)
        millis = int(intrinsic_path.stat().st_mtime * 1000)
        config = {"model_name": manifest.model, **cfg.evaluate.model_dump(mode="json")}
        for (name, J, run), group in frame.groupby(["method", "n_members", "run"]):
            values = dict(zip(group["metric"], group["value"]))
            rel, sae_id = saebench_key(release, name, int(J), int(run))
            path = run_dir / SAEBENCH_DIR / "core" / f"{rel}_{sae_id}_eval_results.json"
            _write_json(path, _eval_output("core", rel, sae_id, config, core_metrics(values, manifest.d, tokens), [],
                                           sae_cfg(name, int(J), int(run)), millis, {"sae_ensembles_metrics": values}))
            written.append(path.relative_to(run_dir).as_posix())
    probing_path = run_dir / DOWNSTREAM_DIR / "probing.parquet"
    if probing_path.is_file():
        frame = read_table(probing_path, "probing_results")
        millis = int(probing_path.stat().st_mtime * 1000)
        raw = frame[frame["method"] == "raw"]
        config = {"model_name": manifest.model, **cfg.downstream.model_dump(mode="json")}
        for (name, J, run), group in frame[frame["method"] != "raw"].groupby(["method", "n_members", "run"]):
            metrics, details, extra = probing_metrics(group, raw, manifest.d)
            rel, sae_id = saebench_key(release, name, int(J), int(run))
            path = run_dir / SAEBENCH_DIR / "sparse_probing" / f"{rel}_{sae_id}_eval_results.json"
            _write_json(path, _eval_output("sparse_probing", rel, sae_id, config, metrics, details, sae_cfg(name, int(J), int(run)),
                                           millis, {"other_k": extra} if extra else None))
            written.append(path.relative_to(run_dir).as_posix())
    return written
