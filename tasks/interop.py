"""SAELens and SAEBench at the level of a run directory (SPEC §13).

* :func:`export_model` — a saved model (``models/<name>/run=<r>/``) as SAELens folders: every
  member, and a bagging ensemble also as one SAE (Proposition 1). The CLI's ``export``.
* :func:`import_saelens_models` — the train stage's import of ``train.imported``: SAELens
  folders become ``models/imported/run=<r>/`` (one SAE) and ``models/imported_bagging/run=<r>/``
  (the members listed for run r), read by evaluate, downstream and report like any model.
* :func:`write_saebench_results` — the report stage's copy of the core metrics and sparse
  probing in SAEBench's output schema (``report/saebench/{core,sparse_probing}/*_eval_results.json``),
  beside the Parquet tables, so SAEBench's plotting (``graphing_utils.get_eval_results``) reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sae_core.ensemble import Ensemble, EnsembleInfo
from sae_core.interop.saelens import (
    SAELENS_ARCHITECTURE,
    SAELENS_CONFIG_FILE,
    SAELENS_SCHEMA_VERSION,
    SAELENS_WEIGHTS_FILE,
    NotOneSAE,
    export_bagging_as_one_sae,
    export_member,
    read_saelens_folder,
    saelens_config,
)
from sae_core.io import ENSEMBLE_FILE, load_ensemble, load_sae_config, member_dirname, save_ensemble
from sae_core.methods import method
from tasks.common import ACTIVATIONS_DIR, METRICS_DIR, MODELS_DIR, DOWNSTREAM_DIR, REPORT_DIR, ModelDir

#: beside each imported member: the cfg.json of the SAELens folder it came from (provenance,
#: and what the export writes back, so import -> export reproduces the folder)
SOURCE_CFG_FILE = "saelens_cfg.json"
EXPORT_FILE = "export.json"
ONE_SAE_DIR = "ensemble"
SAEBENCH_DIR = f"{REPORT_DIR}/saebench"
#: the top-k fields of SAEBench's sparse-probing schema (others go to eval_result_unstructured)
SAEBENCH_PROBING_KS = (1, 2, 5, 10, 20, 50, 100)
SAEBENCH_COMMIT = "not run by SAEBench: written by sae-ensembles in SAEBench's output schema"


# ---------------------------------------------------------------------------- export
def _manifest_metadata(run_dir: Path) -> dict[str, Any]:
    """SAELens metadata of the activations the run's SAEs read (model, hook, context), if recorded."""
    from data_contracts.activations import read_manifest

    if not (run_dir / ACTIVATIONS_DIR / "manifest.json").is_file():
        return {}
    m = read_manifest(run_dir / ACTIVATIONS_DIR)
    # the extraction records block `layer`'s output, the residual stream after it: TransformerLens' hook_resid_post
    return {"model_name": m.model, "hook_name": f"blocks.{m.layer}.hook_resid_post", "context_size": m.context_length,
            "exclude_special_tokens": not m.include_special_tokens}


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: folder -> description, and why no one-SAE folder (if not)."""

    out: Path
    folders: dict[str, str] = field(default_factory=dict)
    not_one_sae: str | None = None


def export_model(run_dir: str | Path, model: str, run: int, out: str | Path, *, member: int | None = None,
                 one_sae_only: bool = False) -> ExportResult:
    """Write ``models/<model>/run=<run>/`` of ``run_dir`` as SAELens folders under ``out``.

    model: the directory name under models/ (bagging, boosting, single, expanded_J8, imported, ...).
    member: only that member, written to ``out`` itself. Otherwise every member goes to
    ``out/member_<jj>/``, and a bagging ensemble of more than one member also to
    ``out/ensemble/`` as one SAE of width J·m (Proposition 1); ``out/export.json`` lists
    the folders (or why there is no one-SAE folder). one_sae_only: only ``out/ensemble/``
    (a J = 1 model: its member); raises :class:`~sae_core.interop.NotOneSAE`, saying why,
    for TopK members and boosting.
    """
    run_dir, out = Path(run_dir), Path(out)
    directory = run_dir / MODELS_DIR / model / f"run={run}"
    ModelDir.parse(directory)  # a clear error for a name that is no model directory
    if not (directory / ENSEMBLE_FILE).is_file():
        raise FileNotFoundError(f"no saved model at {directory}; run the train stage first, or check --method and --run")
    ens = load_ensemble(directory)
    base = _manifest_metadata(run_dir)
    result = ExportResult(out)

    def member_metadata(j: int) -> dict[str, Any]:
        return {**base, "sae_ensembles": {"model": model, "run": run, "method": ens.method, "member": j,
                                          "n_members": ens.n_members, "alpha": float(ens.alpha[j])}}

    def source_cfg(j: int) -> dict[str, Any] | None:
        path = directory / member_dirname(j) / SOURCE_CFG_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    if member is not None:
        if not 0 <= member < ens.n_members:
            raise ValueError(f"--member {member} is out of range: {directory} holds {ens.n_members} members (0..{ens.n_members - 1})")
        export_member(ens.members, member, out, member_metadata(member), source_cfg(member))
        result.folders["."] = f"member {member} of {model} run {run}"
        return result
    one_sae = ens.n_members > 1 or one_sae_only
    if one_sae:
        meta = {**base, "sae_ensembles": {"model": model, "run": run, "method": ens.method, "n_members": ens.n_members,
                                          "alpha": [float(a) for a in ens.alpha], "folded": "Proposition 1"}}
        try:
            if ens.n_members == 1:
                export_member(ens.members, 0, out / ONE_SAE_DIR, member_metadata(0), source_cfg(0))
            else:  # bagging folds (Proposition 1); boosting and TopK members are refused, saying why
                export_bagging_as_one_sae(ens, out / ONE_SAE_DIR, meta)
            result.folders[ONE_SAE_DIR] = f"{model} run {run}: all {ens.n_members} members as one SAE"
        except NotOneSAE as err:
            if one_sae_only:
                raise NotOneSAE(f"{model} run {run} cannot be exported as one SAELens SAE: {err}") from None
            result.not_one_sae = str(err)
    if not one_sae_only:
        for j in range(ens.n_members):
            export_member(ens.members, j, out / member_dirname(j), member_metadata(j), source_cfg(j))
            result.folders[member_dirname(j)] = f"member {j} of {model} run {run} (α = {float(ens.alpha[j]):.6g})"
    out.mkdir(parents=True, exist_ok=True)
    description = {"model": model, "run": run, "method": ens.method, "architecture": ens.member_cfg.architecture,
                   "saelens_architecture": SAELENS_ARCHITECTURE.get(ens.member_cfg.architecture), "folders": result.folders,
                   "not_one_sae": result.not_one_sae, "saelens_schema": SAELENS_SCHEMA_VERSION}
    (out / EXPORT_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------- import
def _folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for name in (SAELENS_CONFIG_FILE, SAELENS_WEIGHTS_FILE):
        with open(path / name, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def plan_imports(entries: list) -> dict[tuple[str, int], list]:
    """(method, run) -> the ImportedSAE entries of that model, in the order listed.

    role single -> ("imported", run): exactly one entry per run; role bagging ->
    ("imported_bagging", run): every member listed for that run.
    """
    models: dict[tuple[str, int], list] = {}
    for entry in entries:
        key = ("imported" if entry.role == "single" else "imported_bagging", entry.run)
        models.setdefault(key, []).append(entry)
    doubled = [(run, [e.path for e in group]) for (name, run), group in models.items() if name == "imported" and len(group) > 1]
    if doubled:
        raise ValueError(
            f"train.imported lists several role: single SAEs for one run {doubled}: give each its own run, or role: bagging "
            "to bag them"
        )
    return models


def import_saelens_models(entries: list, run_dir: str | Path, manifest) -> tuple[list[str], list[str]]:
    """Import ``train.imported`` (tasks.config.ImportedSAE entries) into ``run_dir/models``.

    Checks each folder against the extraction (``manifest``): its d_in must be the
    activations' d, its hook the given ``hook_name``, the extraction's layer the given
    ``layer``. Returns (models written, notes). A model whose folders are unchanged since
    its last import (same files, same entries) is kept as it is.
    """
    run_dir = Path(run_dir)
    written, notes = [], []
    for (name, run), group in plan_imports(entries).items():
        model = ModelDir(name, run)
        directory = model.path(run_dir)
        paths = [Path(e.path).expanduser() for e in group]
        for e in group:
            if e.layer is not None and e.layer != manifest.layer:
                raise ValueError(
                    f"train.imported {e.path}: layer {e.layer} was asked for, but the activations were extracted at layer "
                    f"{manifest.layer} (extract.layer); import an SAE of layer {manifest.layer} or change extract.layer"
                )
        digests = [_folder_digest(p) if (p / SAELENS_WEIGHTS_FILE).is_file() and (p / SAELENS_CONFIG_FILE).is_file() else "missing"
                   for p in paths]
        fingerprint = hashlib.sha256(json.dumps([[e.model_dump(mode="json") for e in group], digests, manifest.d]).encode()).hexdigest()
        if (directory / ENSEMBLE_FILE).is_file():
            try:
                if load_ensemble(directory).info.fingerprint == fingerprint:
                    notes.append(f"{model.relative}: imported folders unchanged, reused")
                    continue
            except (ValueError, FileNotFoundError):
                pass
        folders = []
        for e, p in zip(group, paths):
            folder = read_saelens_folder(p)
            if folder.sae.cfg.d_in != manifest.d:
                raise ValueError(
                    f"train.imported {p}: the SAE reads d_in={folder.sae.cfg.d_in} activations, but the extraction "
                    f"({manifest.model}, layer {manifest.layer}) records d={manifest.d}; import an SAE trained on this "
                    "model's residual stream, or change extract.model"
                )
            if e.hook_name is not None and folder.hook_name != e.hook_name:
                raise ValueError(
                    f"train.imported {p}: its cfg.json names hook {folder.hook_name!r}, not the {e.hook_name!r} asked for "
                    "(train.imported[].hook_name)"
                )
            folders.append(folder)
        first = folders[0].sae
        unlike = [str(f.path) for f in folders if type(f.sae) is not type(first) or f.sae.cfg != first.cfg]
        if unlike:
            raise ValueError(
                f"the bagging members of imported run {run} must share one architecture and config: {folders[0].path} is "
                f"{first.cfg.model_dump()}, but {unlike} differ"
            )
        stacked = type(first).stack([f.sae for f in folders])
        ens = Ensemble(stacked, "single" if name == "imported" else "bagging")
        ens.info = EnsembleInfo(source="SAELens folder" + ("s " if len(paths) > 1 else " ") + ", ".join(str(p) for p in paths),
                                fingerprint=fingerprint, run=run, method=name)
        save_ensemble(ens, directory)
        for j, f in enumerate(folders):
            (directory / member_dirname(j) / SOURCE_CFG_FILE).write_text(json.dumps(f.cfg))
        written.append(model.relative)
        changed = "; ".join(f"{f.path.name}: {', '.join(f.notes)}" for f in folders if f.notes)
        notes.append(f"{model.relative}: imported {len(folders)} SAELens folder(s) ({first.cfg.architecture}, d_sae={first.cfg.d_sae})"
                     + (f"; {changed}" if changed else ""))
    return written, notes


# --------------------------------------------------------------------------- SAEBench
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
    sae_cfg = saelens_config(SAELENS_ARCHITECTURE.get(cfg.architecture, cfg.architecture), cfg.d_in, cfg.d_sae * n,
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
    meta = _manifest_metadata(run_dir)
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
