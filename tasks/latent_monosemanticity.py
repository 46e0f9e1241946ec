"""Monosemanticity of every latent (related.md §7): the job of :mod:`tasks.latent_analyses`
that writes ``latents/monosemanticity.parquet``.

The evaluation set is a seeded sample of ``eval_contexts`` test tokens (from the first
``max_tokens``); each is embedded as the text of the tokens around it (CONTEXT_BEFORE before,
CONTEXT_AFTER after) by a sentence embedder (mean-pooled last layer). Every latent of every
member of the run-0 models is scored on that one set (:func:`sae_core.monosemanticity.monosemanticity`),
and so are the baselines on the same contexts: the raw neurons and ``baseline_directions``
random unit directions in the activation space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_contracts.latents import write_latent_table
from sae_core.monosemanticity import monosemanticity, minmax_normalise
from tasks.config_latent import MonosemanticityConfig
from tasks.latent_data import MONOSEMANTICITY_FILE, TEST_SPLIT, Models, first_tokens
from tasks.progress import ProgressLog, run_logger

CONTEXT_BEFORE = 8
CONTEXT_AFTER = 2
EMBED_BATCH = 64
EMBED_MAX_TOKENS = 64
BASELINE_MODEL = "activations"


@torch.no_grad()
def sentence_embeddings(model_name: str, texts: list[str], batch_size: int = EMBED_BATCH) -> np.ndarray:
    """Mean-pooled last hidden states of ``model_name`` (embedded name, local path or hub id):
    [len(texts), e] float64 (the all-MiniLM-L6-v2 recipe, before its normalisation)."""
    from transformers import AutoModel, AutoTokenizer

    from sae_core.models import require_safetensors, resolve_source

    source, _ = resolve_source(model_name)
    if isinstance(source, Path):
        require_safetensors(source, model_name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(source, use_safetensors=True).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                          max_length=EMBED_MAX_TOKENS, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def context_texts(where: pd.DataFrame, rows: np.ndarray, tokenizer) -> list[str]:
    """The text of the tokens around each of ``rows`` of ``where`` (doc_id, position, token_id;
    documents contiguous, positions ascending), from the same document only."""
    doc = where["doc_id"].to_numpy()
    ids = where["token_id"].to_numpy()
    texts = []
    for r in rows:
        lo, hi = r, r
        while lo > 0 and r - lo < CONTEXT_BEFORE and doc[lo - 1] == doc[r]:
            lo -= 1
        while hi + 1 < len(doc) and hi - r < CONTEXT_AFTER and doc[hi + 1] == doc[r]:
            hi += 1
        texts.append(tokenizer.decode([int(t) for t in ids[lo : hi + 1]]).strip() or "[empty]")
    return texts


def _rows(method: str, model: str, scores: np.ndarray, active: np.ndarray, member: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"method": method, "model": model, "member": member, "latent": np.arange(scores.size),
                         "n_active": active.astype(np.int64), "score": scores})


def run_monosemanticity(run_dir: Path, models: Models, cfg: MonosemanticityConfig, seed: int, model_name: str,
                        progress: bool = True) -> list[str]:
    """Score every latent of the run-0 models and the baselines; the paths written."""
    from sae_core.models import load_tokenizer

    tokens = first_tokens(run_dir, TEST_SPLIT, cfg.max_tokens)
    if tokens is None or len(tokens.where) < 2:
        raise ValueError(f"monosemanticity needs the {TEST_SPLIT} split's activations (at least 2 tokens); run the extract "
                         "stage with a test split, or set interpret.analyses.monosemanticity.enabled: false")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(tokens.where), size=min(cfg.eval_contexts, len(tokens.where)), replace=False))
    try:
        tokenizer = load_tokenizer(model_name)
    except (OSError, ValueError) as err:   # activations not from a loadable model (synthetic data): no text to embed
        run_logger().info(f"interpret: monosemanticity skipped: the tokenizer of {model_name!r} cannot be loaded ({err}), "
                          "so the contexts have no text to embed")
        return []
    texts = context_texts(tokens.where, rows, tokenizer)
    embeddings = sentence_embeddings(cfg.embedding_model, texts)
    x = tokens.acts[torch.as_tensor(rows)].float()
    models = [(m, e) for m, e in models if m.run == 0]
    log = ProgressLog("interpret: monosemanticity", len(models) + 1, "models", enabled=progress)
    frames = []
    for model_dir, ensemble in models:
        with torch.no_grad():
            codes = ensemble.member_codes(x.to(ensemble.device)).cpu().double().numpy()   # [J, N, m]
        for j in range(codes.shape[0]):
            active = (minmax_normalise(codes[j]) > 0).sum(0)
            frames.append(_rows(model_dir.method, model_dir.relative, monosemanticity(codes[j], embeddings), active, j))
        log.advance(1, model_dir.relative)
    raw = x.double().numpy()
    baselines = [("neurons", raw)]
    if cfg.baseline_directions:
        directions = rng.standard_normal((cfg.baseline_directions, raw.shape[1]))
        baselines.append(("random_directions", raw @ (directions / np.linalg.norm(directions, axis=1, keepdims=True)).T))
    for method, values in baselines:
        frames.append(_rows(method, BASELINE_MODEL, monosemanticity(values, embeddings), (minmax_normalise(values) > 0).sum(0)))
    log.advance(1, "baselines")
    log.finish(f"{len(rows)} contexts embedded by {cfg.embedding_model}")
    frame = pd.concat(frames, ignore_index=True)
    write_latent_table(frame, Path(run_dir) / MONOSEMANTICITY_FILE, "latent_monosemanticity")
    return [MONOSEMANTICITY_FILE]
