"""SAELens' folder format: our SAEs and bagging ensembles out, SAELens folders in (SPEC §5, §13).

A SAELens folder is what ``sae_lens.SAE.save_model`` writes and ``SAE.load_from_disk``
reads (schema read from sae_lens 6.54.12, ``saes/sae.py`` and ``loading/pretrained_sae_loaders.py``):

    cfg.json                 {d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
                              reshape_activations, metadata: {sae_lens_version, model_name, hook_name, ...},
                              [topk: k, rescale_acts_by_decoder_norm], architecture}
    sae_weights.safetensors  W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], and
                             standard/topk: b_enc [d_sae]; jumprelu: b_enc, threshold [d_sae];
                             gated: b_gate, b_mag, r_mag [d_sae] (no b_enc)

SAELens' inference SAEs compute, with x_c = x − b_dec (``apply_b_dec_to_input``) and
π = x_c W_enc + b_enc: standard ReLU(π); jumprelu ReLU(π)·1[π > θ]; topk the k largest
π, ReLU'd; gated 1[π_gate > 0]·ReLU(x_c (W_enc ⊙ exp r_mag) + b_mag); output c W_dec + b_dec.
Our architectures map onto them exactly (:data:`SAELENS_ARCHITECTURE`):

* relu → standard; topk → topk (no decoder-norm rescaling); gated → gated.
* jumprelu → jumprelu. Ours is z·1[z > θ] with z = ReLU(π): for θ ≥ 0, z > θ ⇔ π > θ; for
  θ < 0 both are ReLU(π). Equal for every θ.
* batchtopk → jumprelu with θ_i = θ for every latent: our BatchTopK infers with
  ReLU(π)·1[π > θ], one θ per SAE, which is how SAELens itself saves BatchTopK SAEs
  (``BatchTopKTrainingSAE.process_state_dict_for_saving_inference``).
* matryoshka, ordered: their nested prefixes shape only the training loss; inference is
  their code's, so they export as that code's SAE (:func:`saelens_architecture`): matryoshka
  with a batchtopk code → jumprelu like batchtopk (as SAELens saves its Matryoshka BatchTopK
  SAEs), with a topk code → topk; ordered → topk. The prefix settings are not in SAELens'
  schema; they are written under ``metadata`` so they are not lost.

No activation normalisation is applied anywhere in this project (activations are stored
as the model produced them), so exported folders say ``normalize_activations: "none"``.

A bagging ensemble (α_j = 1/J) of relu, jumprelu, batchtopk or gated members is also one
SAELens SAE of width J·m (Proposition 1): :func:`bagging_as_one_sae`. TopK members and
boosting are not (:class:`NotOneSAE` says why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_core.config import SAEConfig
from sae_core.ensemble import Ensemble
from sae_core.io import atomic_directory
from sae_core.saes.base import SAE
from sae_core.training.trainer import build_sae

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
#: the sae_lens release whose cfg.json schema the exported folders follow (and that the
#: peer check loads them with); written as metadata.sae_lens_version, which SAELens reads to
#: pick its ≥ 6.0 config path
SAELENS_SCHEMA_VERSION = "6.54.12"

#: our architecture -> the SAELens inference architecture that computes the same codes
SAELENS_ARCHITECTURE: dict[str, str] = {
    "relu": "standard",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "topk": "topk",
    "gated": "gated",
    "ordered": "topk",
}
#: SAELens architecture -> ours (what an imported folder becomes)
FROM_SAELENS: dict[str, str] = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk", "gated": "gated"}
#: tensors of each SAELens architecture's sae_weights.safetensors
SAELENS_TENSORS: dict[str, tuple[str, ...]] = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
}
#: normalize_activations values under which SAELens' inference SAE reads x as it is (the
#: others rescale each token at run time, which an SAE here cannot do)
IDENTITY_NORMALISATIONS = ("none", "expected_average_only_in", "covariance_whitening")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NotExportable(ValueError):
    """An SAE that no SAELens folder represents (the message says why)."""


class NotOneSAE(NotExportable):
    """An ensemble that no single SAELens SAE represents (the message says why)."""


class NotImportable(ValueError):
    """A SAELens folder whose SAE cannot be represented here (the message says why and where)."""


# --------------------------------------------------------------------------- export
def saelens_architecture(cfg: SAEConfig) -> str | None:
    """The SAELens inference architecture computing the same codes as an SAE of ``cfg`` (None: none does)."""
    if cfg.architecture == "matryoshka":
        return "jumprelu" if cfg.matryoshka_code == "batchtopk" else "topk"
    return SAELENS_ARCHITECTURE.get(cfg.architecture)


def _prefix_metadata(cfg: SAEConfig) -> dict[str, Any]:
    """Our architecture and its prefix settings, for a SAELens folder's metadata (empty for the others)."""
    from sae_core.config import ARCHITECTURE_FIELDS

    fields = {name: getattr(cfg, name) for name in ARCHITECTURE_FIELDS if getattr(cfg, name) is not None}
    fields = {name: list(v) if isinstance(v, tuple) else v for name, v in fields.items()}
    return {"sae_ensembles_architecture": cfg.architecture, **fields} if fields else {}


def saelens_tensors(sae: SAE, member: int = 0) -> tuple[str, dict[str, Tensor]]:
    """(SAELens architecture, tensors of sae_weights.safetensors) of member ``member`` of ``sae``.

    The tensors are copies on the CPU in SAELens' names and shapes (see the module docstring).
    """
    arch = sae.cfg.architecture
    out = saelens_architecture(sae.cfg)
    if out is None:
        raise NotExportable(
            f"architecture {arch!r} has no SAELens counterpart (exportable: {', '.join(sorted([*SAELENS_ARCHITECTURE, 'matryoshka']))})"
        )
    state = {name: t.detach().cpu().contiguous() for name, t in sae.member_state(member).items()}
    if "threshold" in state and state["threshold"].ndim == 0:
        # batchtopk (and a matryoshka batchtopk code): one θ for the SAE -> SAELens' per-latent JumpReLU threshold
        state["threshold"] = state["threshold"].expand(sae.cfg.d_sae).clone()
    return out, state


def fold_bagging(ensemble: Ensemble) -> tuple[str, dict[str, Tensor]]:
    """Proposition 1: the bagging ensemble as one SAELens SAE of width J·m (tensors on the CPU).

    With B = Σ_j α_j b_dec^(j) the one SAE's b_dec and x_c = a − B its centred input, member
    j's pre-activation is W_encᵀ(a − b_dec^(j)) + b_enc = W_encᵀ x_c + b_enc + W_encᵀ(B − b_dec^(j)):
    each member's b_dec folds into its encoder bias. Its codes enter the output scaled by
    α_j; for α_j > 0 the nonlinearities here are positively homogeneous once the threshold
    scales too (ReLU(απ) = α ReLU(π); απ·1[απ > αθ] = α·π·1[π > θ]; a gate 1[απ > 0] is
    unchanged), so α_j folds into the encoder: W_enc ← α_j W_enc, b_enc ← α_j b_enc,
    θ ← α_j θ, gated b_mag ← α_j b_mag (r_mag unchanged). The decoder rows are the members'
    own (unit norm as trained), concatenated. Then encode(a) = [α_1 c^(1); …; α_J c^(J)]
    (the ensemble's concatenated codes) and decode(encode(a)) = Σ_j α_j g_j(a) exactly in
    real arithmetic. In float32 the folded pre-activations differ from the members' by
    rounding (~1e-7 relative), so a JumpReLU/BatchTopK code whose pre-activation lies within
    about one ulp of its threshold may switch (measured on MiniLM activations: 1 code in 8.4M).
    """
    arch = ensemble.member_cfg.architecture
    if ensemble.method == "boosting":
        raise NotOneSAE(
            "a boosting ensemble is not one SAE: stage j encodes the residual a − Σ_{l<j} g_l(r_l) left by the "
            "earlier stages, a sequential computation, while a SAELens SAE encodes a once with one encoder; "
            "export its stages (members) instead"
        )
    if saelens_architecture(ensemble.member_cfg) == "topk":
        raise NotOneSAE(
            f"an ensemble of TopK members{'' if arch == 'topk' else f' ({arch} encodes with TopK)'} is not one SAELens SAE: "
            "each member keeps its own k largest latents, while "
            f"one TopK SAE of width J·m keeps the J·k largest of all J·m latents (a different set), and SAELens has no "
            "per-block TopK; export the members instead (BatchTopK, JumpReLU, ReLU and gated members do fold into one SAE)"
        )
    if saelens_architecture(ensemble.member_cfg) is None:
        raise NotOneSAE(f"architecture {arch!r} has no SAELens counterpart")
    alpha = ensemble.alpha.detach().cpu().to(torch.float32)
    if bool((alpha <= 0).any()):
        raise NotOneSAE(f"weights α = {alpha.tolist()}: a latent with α_j ≤ 0 cannot fold into a ReLU-type encoder")
    J = ensemble.n_members
    out_arch, _ = saelens_tensors(ensemble.members, 0)
    members = [saelens_tensors(ensemble.members, j)[1] for j in range(J)]
    B = (alpha[:, None] * torch.stack([m["b_dec"] for m in members])).sum(0)
    centre = ensemble.member_cfg.apply_b_dec_to_input
    bias_name = "b_gate" if out_arch == "gated" else "b_enc"
    parts: dict[str, list[Tensor]] = {}
    for a_j, m in zip(alpha, members):
        # what member j's encoder sees beyond W_encᵀ x_c: W_encᵀ(B − b_dec^(j)) (centred input) or W_encᵀ B
        shift = (B - m["b_dec"]) if centre else B
        proj = shift @ m["W_enc"]  # [m]
        folded = {"W_enc": a_j * m["W_enc"], bias_name: a_j * (m[bias_name] + proj), "W_dec": m["W_dec"]}
        if out_arch == "jumprelu":
            folded["threshold"] = a_j * m["threshold"]
        if out_arch == "gated":
            folded["r_mag"] = m["r_mag"]
            folded["b_mag"] = a_j * (m["b_mag"] + torch.exp(m["r_mag"]) * proj)
        for name, t in folded.items():
            parts.setdefault(name, []).append(t)
    tensors = {name: torch.cat(ts, dim=1 if name == "W_enc" else 0).contiguous() for name, ts in parts.items()}
    tensors["b_dec"] = B.contiguous()
    return out_arch, tensors


def saelens_config(architecture: str, d_in: int, d_sae: int, *, k: int | None = None, apply_b_dec_to_input: bool = True,
                   dtype: str = "float32", metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """cfg.json of a SAELens folder, keys in the order ``SAEConfig.to_dict`` writes them."""
    cfg: dict[str, Any] = {
        "d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_SCHEMA_VERSION, "sae_lens_training_version": SAELENS_SCHEMA_VERSION,
                     **(metadata or {})},
    }
    if architecture == "topk":
        cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    cfg["architecture"] = architecture
    return cfg


def write_saelens_folder(directory: str | Path, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write cfg.json + sae_weights.safetensors atomically, tensors cast to ``cfg["dtype"]``.

    Written as ``SAE.save_model`` writes them (``save_file`` without metadata, ``json.dump``
    without indentation), so a folder read by :func:`read_saelens_folder` and written back
    is the same bytes.
    """
    dtype = cfg.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one SAELens writes ({', '.join(_DTYPES)})")
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file({n: t.to(_DTYPES[dtype]).contiguous() for n, t in tensors.items()}, str(tmp / SAELENS_WEIGHTS_FILE))
        (tmp / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg))
    return directory


def export_member(sae: SAE, member: int, directory: str | Path, metadata: dict[str, Any] | None = None,
                  source_cfg: dict[str, Any] | None = None) -> Path:
    """Member ``member`` of ``sae`` as a SAELens folder at ``directory``.

    source_cfg: the cfg.json of the SAELens folder this member was imported from, if any;
    it is written back as it was (same keys, metadata and dtype), so import → export
    reproduces the folder.
    """
    arch, tensors = saelens_tensors(sae, member)
    if source_cfg is not None:
        cfg = dict(source_cfg)
        if cfg.get("rescale_acts_by_decoder_norm"):
            cfg["rescale_acts_by_decoder_norm"] = False  # the decoder norms were folded in on import
    else:
        cfg = saelens_config(arch, sae.cfg.d_in, sae.cfg.d_sae, k=sae.cfg.k, apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
                             metadata={**_prefix_metadata(sae.cfg), **(metadata or {})})
    return write_saelens_folder(directory, cfg, tensors)


def export_bagging_as_one_sae(ensemble: Ensemble, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """The bagging ensemble folded into one SAELens SAE (:func:`fold_bagging`) at ``directory``."""
    arch, tensors = fold_bagging(ensemble)
    cfg = saelens_config(arch, ensemble.d_in, ensemble.d_sae, apply_b_dec_to_input=True, metadata=metadata)
    return write_saelens_folder(directory, cfg, tensors)


# --------------------------------------------------------------------------- import
@dataclass
class SAELensFolder:
    """A SAELens folder loaded as one of our SAEs.

    sae: the SAE (J = 1, float32, eval mode). cfg: the folder's cfg.json as read.
    hook_name, model_name: from its metadata (None when it does not say).
    notes: what the import changed (folded decoder norms, cast dtype).
    """

    path: Path
    sae: SAE
    cfg: dict[str, Any]
    hook_name: str | None
    model_name: str | None
    notes: list[str] = field(default_factory=list)


def _cfg_value(cfg: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` found at the top level or in ``metadata`` (SAELens moved keys into metadata in 6.0)."""
    meta = cfg.get("metadata") or {}
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
        if meta.get(name) is not None:
            return meta[name]
    return None


def read_saelens_folder(directory: str | Path) -> SAELensFolder:
    """Load a SAELens-format folder (cfg.json + sae_weights.safetensors) as one of our SAEs.

    Reads what ``SAE.load_from_disk`` reads, configs from before SAELens 6 included
    (architecture "standard" by default; ``activation_fn: topk`` with ``activation_fn_kwargs.k``
    is TopK; ``hook_point`` is the hook name). A TopK SAE with ``rescale_acts_by_decoder_norm``
    gets its decoder norms n_i folded in (W_enc[:, i]·n_i, b_enc[i]·n_i, W_dec[i]/n_i: the
    same codes and output). Raises :class:`NotImportable` for what SAELens computes and no
    SAE here can (per-token activation normalisation, a fine-tuning scaling factor, an
    architecture without a counterpart), FileNotFoundError / ValueError for a broken folder.
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / SAELENS_CONFIG_FILE, directory / SAELENS_WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{directory} is not a SAELens folder: {p.name} is missing (expected {SAELENS_CONFIG_FILE} + {SAELENS_WEIGHTS_FILE}, "
                "as sae_lens' SAE.save_model writes them)"
            )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
    arch = cfg.get("architecture") or "standard"
    if _cfg_value(cfg, "activation_fn", "activation_fn_str") == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k"):
        arch, cfg_k = "topk", cfg["activation_fn_kwargs"]["k"]
    else:
        cfg_k = cfg.get("k")
    if arch not in FROM_SAELENS:
        raise NotImportable(
            f"{cfg_path}: SAELens architecture {arch!r} has no counterpart here (importable: {', '.join(FROM_SAELENS)})"
        )
    norm = cfg.get("normalize_activations")
    norm = "none" if norm in (None, False) else "expected_average_only_in" if norm is True else norm
    if norm not in IDENTITY_NORMALISATIONS:
        raise NotImportable(
            f"{cfg_path}: normalize_activations={norm!r} rescales every token at run time inside SAELens; an SAE here "
            f"reads activations as they are (importable: {', '.join(IDENTITY_NORMALISATIONS)})"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({err})") from err
    notes = []
    if "scaling_factor" in tensors:
        if not torch.all(tensors["scaling_factor"] == 1):
            raise NotImportable(f"{weights_path}: a fine-tuning scaling_factor other than 1 is not supported here")
        del tensors["scaling_factor"]
    expected = SAELENS_TENSORS[arch]
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not hold a SAELens {arch} SAE: missing tensors {missing}, unexpected {unexpected}")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path} needs integer d_in and d_sae ({err!r})") from err
    source_dtype = {t.dtype for t in tensors.values()}
    if source_dtype != {torch.float32}:
        notes.append(f"cast {sorted(str(d) for d in source_dtype)} to float32")
    tensors = {name: t.to(torch.float32) for name, t in tensors.items()}
    ours = FROM_SAELENS[arch]
    try:
        sae_cfg = SAEConfig(architecture=ours, d_in=d_in, d_sae=d_sae, k=int(cfg_k) if ours == "topk" else None,
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))
    except ValueError as err:
        raise ValueError(f"{cfg_path} does not describe a valid {arch} SAE:\n{err}") from err
    if ours == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].norm(dim=-1)
        tensors["W_enc"] = tensors["W_enc"] * norms
        tensors["b_enc"] = tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
        notes.append("folded the decoder norms into the encoder (rescale_acts_by_decoder_norm)")
    sae = build_sae(sae_cfg, n_members=1)
    shapes = {name: tuple(t.shape[1:]) for name, t in sae.state_dict().items()}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{weights_path}: tensor {name} has shape {tuple(tensors[name].shape)} but cfg.json (d_in={d_in}, "
                f"d_sae={d_sae}) implies {shape}"
            )
    sae.load_state_dict({name: tensors[name].unsqueeze(0) for name in shapes})
    sae.eval()
    return SAELensFolder(directory, sae, cfg, _cfg_value(cfg, "hook_name", "hook_point"), _cfg_value(cfg, "model_name"), notes)
