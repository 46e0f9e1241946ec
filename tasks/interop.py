"""SAELens and SAEBench at the level of a run directory (SPEC §13).

* :func:`export_model` — a saved model (``models/<name>/run=<r>/``) as SAELens folders: every
  member, and a bagging ensemble also as one SAE (Proposition 1). The CLI's ``export``.
* :func:`import_saelens_models` — the train stage's import of ``train.imported``: SAELens
  folders become ``models/imported/run=<r>/`` (one SAE) and ``models/imported_bagging/run=<r>/``
  (the members listed for run r), read by evaluate, downstream and report like any model.
* SAEBench's output schema: :mod:`tasks.saebench`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_core.ensemble import Ensemble, EnsembleInfo
from sae_core.interop.saelens import (
    SAELENS_CONFIG_FILE,
    SAELENS_SCHEMA_VERSION,
    SAELENS_WEIGHTS_FILE,
    NotOneSAE,
    saelens_architecture,
    export_bagging_as_one_sae,
    export_member,
    read_saelens_folder,
)
from sae_core.io import ENSEMBLE_FILE, load_ensemble, member_dirname, save_ensemble
from tasks.common import ACTIVATIONS_DIR, MODELS_DIR, ModelDir

#: beside each imported member: the cfg.json of the SAELens folder it came from (provenance,
#: and what the export writes back, so import -> export reproduces the folder)
SOURCE_CFG_FILE = "saelens_cfg.json"
EXPORT_FILE = "export.json"
ONE_SAE_DIR = "ensemble"


# ---------------------------------------------------------------------------- export
def manifest_metadata(run_dir: Path) -> dict[str, Any]:
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
    base = manifest_metadata(run_dir)
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
                   "saelens_architecture": saelens_architecture(ens.member_cfg), "folders": result.folders,
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
