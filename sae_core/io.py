"""Saving and loading SAEs: ``sae.safetensors`` + ``cfg.json`` per SAE (SPEC §5), no pickle.

Tensors are stored without the member axis, in SAELens orientation: W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], plus the architecture's extra tensors
(threshold, r_mag, b_mag; gated SAEs name their encoder bias b_gate).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_core.config import SAEConfig
from sae_core.saes.base import SAE
from sae_core.training.trainer import build_sae

if TYPE_CHECKING:
    from sae_core.ensemble import Ensemble
    from sae_core.training.records import TrainingRecord

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
FORMAT_VERSION = 1


def sae_config_dict(cfg: SAEConfig) -> dict:
    """cfg.json content: our config plus the keys SAELens-style loaders look for."""
    return {
        **cfg.model_dump(),
        "dtype": "float32",
        "normalize_activations": "none",
        "format_version": FORMAT_VERSION,
    }


def atomic_directory(target: Path) -> "_AtomicDirectory":
    """Context manager: write into a temp dir beside ``target``, then swap it in."""
    return _AtomicDirectory(target)


class _AtomicDirectory:
    def __init__(self, target: Path) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU (a module trained on CUDA saves the same file as one trained on the CPU)."""
    return {name: t.cpu() for name, t in tensors.items()}


def save_sae(sae: SAE, directory: str | Path, member: int | None = None) -> Path:
    """Write one SAE (or member ``member`` of a stack) to ``directory`` atomically."""
    if member is None:
        if sae.n_members != 1:
            raise ValueError(
                f"this module holds {sae.n_members} members; pass member=j to save one "
                "(ensembles are saved with their own function)"
            )
        member = 0
    directory = Path(directory)
    tensors = _host(sae.member_state(member))
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(sae_config_dict(sae.cfg), indent=2) + "\n")
    return directory


def load_sae_config(directory: str | Path) -> SAEConfig:
    """Read and validate ``cfg.json``; errors name the file and the problem."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not an SAE directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    fields = {k: v for k, v in raw.items() if k in SAEConfig.model_fields}
    try:
        return SAEConfig(**fields)
    except ValidationError as err:
        raise ValueError(f"{path} is not a valid SAE config:\n{err}") from err


def load_sae(directory: str | Path) -> SAE:
    """Load a single SAE saved by :func:`save_sae` (or a compatible SAELens directory)."""
    directory = Path(directory)
    cfg = load_sae_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}; the SAE's weights are missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); re-save or retrain the SAE") from err
    sae = build_sae(cfg, n_members=1)
    expected = {name: t.shape[1:] for name, t in sae.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match a {cfg.architecture} SAE: missing tensors {missing}, unexpected {unexpected}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(
                f"{weights}: tensor {name} has shape {tuple(tensors[name].shape)} but cfg.json "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {tuple(shape)}"
            )
    sae.load_state_dict({name: t.unsqueeze(0).to(torch.float32) for name, t in tensors.items()})
    sae.eval()
    return sae


ENSEMBLE_FILE = "ensemble.json"
HISTORY_FILE = "training_history.json"


def member_dirname(j: int) -> str:
    return f"member_{j:02d}"


def save_ensemble(ensemble: "Ensemble", directory: str | Path, histories: "list[list[TrainingRecord]] | None" = None) -> Path:
    """Members as SPEC §5 directories plus ``ensemble.json`` (method, α, member order), atomically.

    histories: each member's (or boosting stage's) training records, written beside the
    members as ``training_history.json`` (read back with :func:`load_training_history`).
    """
    directory = Path(directory)
    if histories is not None and len(histories) != ensemble.n_members:
        raise ValueError(f"{len(histories)} training histories for an ensemble of {ensemble.n_members} members")
    names = [member_dirname(j) for j in range(ensemble.n_members)]
    meta = {
        "method": ensemble.method,
        "alpha": [float(a) for a in ensemble.alpha],
        "members": names,
        "architecture": ensemble.member_cfg.architecture,
        "d_in": ensemble.d_in,
        "d_sae_per_member": ensemble.member_cfg.d_sae,
        "info": ensemble.info.to_json(),
        "format_version": FORMAT_VERSION,
    }
    with atomic_directory(directory) as tmp:
        for j, name in enumerate(names):
            (tmp / name).mkdir()
            save_file(_host(ensemble.members.member_state(j)), str(tmp / name / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / name / CONFIG_FILE).write_text(json.dumps(sae_config_dict(ensemble.member_cfg), indent=2) + "\n")
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if histories is not None:
            records = [[r.to_json() for r in member] for member in histories]
            (tmp / HISTORY_FILE).write_text(json.dumps({"members": records}) + "\n")
    return directory


def load_training_history(directory: str | Path) -> "list[list[TrainingRecord]] | None":
    """Each member's training records saved with the ensemble at ``directory``; None if none were saved."""
    from sae_core.training.records import TrainingRecord

    path = Path(directory) / HISTORY_FILE
    if not path.is_file():
        return None
    try:
        return [[TrainingRecord.from_json(r) for r in member] for member in json.loads(path.read_text())["members"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid training history ({err!r}); retrain the model") from err


def load_ensemble(directory: str | Path) -> "Ensemble":
    """Load an ensemble saved by :func:`save_ensemble`; outputs are identical to the saved one."""
    from sae_core.ensemble import Ensemble

    directory = Path(directory)
    path = directory / ENSEMBLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {ENSEMBLE_FILE} in {directory}: not an ensemble directory")
    try:
        meta = json.loads(path.read_text())
        names, method, alpha = meta["members"], meta["method"], meta["alpha"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid ensemble description ({err!r}); it needs method, alpha and members") from err
    if len(names) != len(alpha):
        raise ValueError(f"{path} lists {len(names)} members but {len(alpha)} weights alpha")
    # members are subdirectories of the ensemble: a name may not lead elsewhere ('../x', '/abs')
    escaping = [n for n in names if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n]
    if escaping:
        raise ValueError(f"{path} lists member names {escaping} that are not plain subdirectory names of {directory}")
    missing = [n for n in names if not (directory / n).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"ensemble {directory} is missing member director{'y' if len(missing) == 1 else 'ies'} {missing}; "
            "re-save or retrain the ensemble"
        )
    members = [load_sae(directory / n) for n in names]
    for n, m in zip(names, members):
        if m.cfg != members[0].cfg:
            raise ValueError(f"member {n} of {directory} has config {m.cfg}, unlike {names[0]} ({members[0].cfg})")
    stacked = type(members[0]).stack(members)
    ensemble = Ensemble(stacked, method, torch.tensor(alpha, dtype=torch.float32))
    from sae_core.ensemble import EnsembleInfo

    try:
        ensemble.info = EnsembleInfo.from_json(meta.get("info", {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid 'info' ({err}); re-save or retrain the ensemble") from err
    ensemble.eval()
    return ensemble
