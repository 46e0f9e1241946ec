"""Token activations of the downstream stage's labelled documents, cached on disk.

The documents go through the model and layer of the extract stage (read from its
manifest), one window each, and are written with the extract stage's shard writer under
``downstream/activations/`` (the activation contract: shards plus manifest, one split
"train"). The cache is keyed by a fingerprint of model, revision, layer, context, token
cap and documents; a later run with the same fingerprint reads the shards back, each
checked against its contract and checksum.
"""

from __future__ import annotations

import hashlib
import json
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
)
from data_contracts.core import ContractViolation, Failure
from sae_core.extraction import extract_in_order, kept_span, make_windows
from sae_core.probing import mean_pool
from tasks.config import DownstreamConfig
from tasks.extract_shards import write_batch_by_document

#: the cache holds every document in split "train"; the other splits stay empty
TOKENS_SPLIT = "train"
DOCUMENTS_PER_SHARD = 1024


@dataclass
class DocumentTokens:
    """Token activations of the documents: acts [T, d], doc_index [T] into doc_ids."""

    doc_ids: list[str]
    acts: torch.Tensor
    doc_index: torch.Tensor

    def pooled(self) -> torch.Tensor:
        """Mean-pooled activations per document: [N, d]."""
        return mean_pool(self.acts, self.doc_index, len(self.doc_ids))


def document_caps(docs: pd.DataFrame, cfg: DownstreamConfig) -> np.ndarray:
    """Each document's token cap: ``sae_probes_max_tokens`` for a sae-probes text (its id
    starts with 'sae_probes.'), ``max_tokens_per_document`` for the others. [N] int64."""
    from tasks.sae_probes import DATASET_PREFIX

    benchmark = docs["doc_id"].str.startswith(DATASET_PREFIX).to_numpy()
    return np.where(benchmark, cfg.sae_probes_max_tokens, cfg.max_tokens_per_document).astype(np.int64)


def tokens_fingerprint(manifest: ActivationManifest, docs: pd.DataFrame, caps: np.ndarray) -> str:
    """What the cached token activations depend on: model, revision, layer, context and
    every (doc_id, text, token cap)."""
    h = hashlib.sha256()
    h.update(json.dumps([manifest.model, manifest.revision, manifest.layer, manifest.context_length]).encode())
    for (doc_id, text), cap in zip(docs[["doc_id", "text"]].itertuples(index=False), caps):
        h.update(doc_id.encode() + b"\x00" + text.encode() + b"\x00" + str(int(cap)).encode() + b"\x00")
    return h.hexdigest()


def read_tokens(directory: Path, docs: pd.DataFrame) -> DocumentTokens:
    """Load the cached token activations, every shard checked against its contract and checksum.

    Raises ContractViolation for a damaged shard or a document without tokens.
    """
    manifest = read_manifest(directory)
    parts, ids, failures = [], [], []
    for info in manifest.shards_of(TOKENS_SPLIT):
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

    Each document keeps its first min(cap, context − specials) tokens (one window; cap:
    :func:`document_caps`); special tokens are not pooled. Returns (tokens, extracted_now).
    """
    caps = document_caps(docs, cfg)
    fingerprint = tokens_fingerprint(manifest, docs, caps)
    if (directory / MANIFEST).is_file():
        try:
            cached = read_manifest(directory)
            if cached.config_fingerprint == fingerprint:
                return read_tokens(directory, docs), False
        except ContractViolation:
            pass  # damaged: extract again below
    from sae_core.models import load_model, resolve_source

    source, _ = resolve_source(manifest.model)
    # a local or embedded model is read from disk, not by hub revision: its manifest revision
    # is the weights' sha256, which the check below compares
    revision = None if isinstance(source, Path) or manifest.revision == "unknown" else manifest.revision
    loaded = load_model(
        manifest.model, manifest.layer, revision=revision, trust_remote_code=manifest.trust_remote_code, device=cfg.device
    )
    if loaded.revision != manifest.revision:
        raise ValueError(
            f"model {manifest.model!r} now has revision {loaded.revision}, but the activations were extracted from "
            f"{manifest.revision}; re-run the extract stage (and the stages after it)"
        )
    body = manifest.context_length - len(loaded.prefix_ids) - len(loaded.suffix_ids)
    token_ids = loaded.tokenizer(docs["text"].tolist(), add_special_tokens=False)["input_ids"]
    empty = [docs["doc_id"].iloc[i] for i, t in enumerate(token_ids) if not t]
    if empty:
        raise ValueError(f"documents {empty[:5]} have no tokens under {manifest.model}'s tokenizer; remove them from the dataset")
    windows = [make_windows(i, ids[: min(body, int(cap))], manifest.context_length, loaded.prefix_ids, loaded.suffix_ids)[0]
               for i, (ids, cap) in enumerate(zip(token_ids, caps))]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(hi - lo for lo, hi in (kept_span(w, False) for w in windows)), unit="tok", unit_scale=True, desc="downstream activations")
    try:  # rows come out in (document, position) order
        batch = extract_in_order(loaded, windows, cfg.batch_size, include_special_tokens=False, on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    doc_ids = docs["doc_id"].to_numpy()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("split=*/*.parquet"):
        stale.unlink()
    shards = write_batch_by_document(
        directory, TOKENS_SPLIT, doc_ids, batch, DOCUMENTS_PER_SHARD, fingerprint, validate=(loaded.vocab_size, manifest.max_norm)
    )
    n_tokens = len(batch.doc_index)
    write_manifest(
        directory,
        manifest.model_copy(update={
            "config_fingerprint": fingerprint, "corpus_fingerprint": fingerprint, "shards": shards,
            "tokens_per_split": {s: (n_tokens if s == TOKENS_SPLIT else 0) for s in SPLITS},
            "documents_per_split": {s: (len(docs) if s == TOKENS_SPLIT else 0) for s in SPLITS},
            "include_special_tokens": False,
        }),
    )
    tokens = DocumentTokens(doc_ids.tolist(), torch.from_numpy(batch.activation), torch.as_tensor(batch.doc_index, dtype=torch.long))
    return tokens, True
