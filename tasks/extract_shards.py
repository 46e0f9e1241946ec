"""One shard of activations: its windows, its forward passes, its validated Parquet file
(the extraction stage's building blocks, also used by live splits and the downstream
stage's token cache; the stage itself is :mod:`tasks.extract`)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data_contracts.activations import LiveBlock, ShardInfo, check_shard_file, shard_path, write_shard
from data_contracts.core import file_sha256
from sae_core.extraction import ActivationBatch, Window, extract_in_order, kept_span, make_windows
from sae_core.models import LoadedModel
from tasks.config import ExtractConfig


def document_blocks(n_documents: int, documents_per_shard: int) -> list[slice]:
    """The shards' documents: consecutive blocks of ``documents_per_shard`` of ``n_documents``
    positions (the last block may be shorter); a document never spans two shards."""
    return [slice(i, min(i + documents_per_shard, n_documents)) for i in range(0, n_documents, documents_per_shard)]


def write_batch_shard(
    directory: Path, split: str, index: int, doc_ids: np.ndarray, batch: ActivationBatch, fingerprint: str,
    validate: tuple[int, float] | None, dtype: str = "float32",
) -> ShardInfo:
    """Write the rows of ``batch`` as shard ``index`` of ``split`` (checked first when
    ``validate=(vocab_size, max_norm)``), values stored as ``dtype``; ``batch.doc_index`` indexes ``doc_ids``."""
    return write_shard(
        directory, split, index, doc_ids[batch.doc_index], batch.position, batch.token_id, batch.activation, fingerprint,
        validate=validate, dtype=dtype,
    )


def write_batch_by_document(
    directory: Path, split: str, doc_ids: np.ndarray, batch: ActivationBatch, documents_per_shard: int, fingerprint: str,
    validate: tuple[int, float] | None,
) -> list[ShardInfo]:
    """Write ``batch`` (rows sorted by ``doc_index``, which indexes ``doc_ids``) as shards
    0, 1, ... of ``documents_per_shard`` documents each, like the extraction's plan; a
    block of documents without rows writes no shard. Returns the shards' manifest entries."""
    shards = []
    for block in document_blocks(len(doc_ids), documents_per_shard):
        lo, hi = np.searchsorted(batch.doc_index, [block.start, block.stop])
        if lo == hi:
            continue
        rows = ActivationBatch(batch.doc_index[lo:hi], batch.position[lo:hi], batch.token_id[lo:hi], batch.activation[lo:hi])
        shards.append(write_batch_shard(directory, split, len(shards), doc_ids, rows, fingerprint, validate))
    return shards


def existing_shard_info(directory: Path, rel: str, split: str) -> ShardInfo:
    path = directory / rel
    table = pq.read_table(path, columns=["doc_id"])
    return ShardInfo(
        file=rel, split=split, rows=table.num_rows, documents=len(table.column("doc_id").unique()), sha256=file_sha256(path)
    )


def shard_windows(loaded: LoadedModel, ids: list[list[int]], cfg: ExtractConfig) -> list[Window]:
    """One shard's windows in (document, window) order, the shard's row order (``doc_index`` indexes ``ids``)."""
    return document_windows(loaded, ids, cfg.context_length)


def document_windows(loaded: LoadedModel, ids: list[list[int]], context_length: int) -> list[Window]:
    """The windows of documents ``ids`` in (document, window) order (:func:`shard_windows` without a config)."""
    return [w for i, toks in enumerate(ids) for w in make_windows(i, toks, context_length, loaded.prefix_ids, loaded.suffix_ids)]


def extract_shard(loaded: LoadedModel, ids: list[list[int]], cfg: ExtractConfig, on_batch: Callable[[int], None] | None) -> ActivationBatch:
    """One shard's rows, ordered by document then position (``doc_index`` indexes ``ids``)."""
    return extract_in_order(loaded, shard_windows(loaded, ids, cfg), cfg.batch_size, cfg.include_special_tokens, on_batch)


def live_blocks(loaded: LoadedModel, docs: pd.DataFrame, token_ids: list[list[int]], blocks: list[np.ndarray],
                cfg: ExtractConfig) -> list[LiveBlock]:
    """A split that is not stored: its shards' documents and the rows each block yields (no forward pass)."""
    out = []
    for rows in blocks:
        windows = shard_windows(loaded, [token_ids[r] for r in rows], cfg)
        n = sum(hi - lo for lo, hi in (kept_span(w, cfg.include_special_tokens) for w in windows))
        out.append(LiveBlock(doc_ids=docs["doc_id"].to_numpy()[rows].tolist(), rows=n))
    return out


def extract_documents(loaded: LoadedModel, texts: list[str], context_length: int, batch_size: int,
                      include_special_tokens: bool) -> np.ndarray:
    """The activations [n, d] of ``texts`` in shard row order (document, then position): what
    the extract stage would have written for them as one shard (a live split's reader)."""
    ids = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return extract_in_order(loaded, document_windows(loaded, ids, context_length), batch_size, include_special_tokens).activation


@dataclass(frozen=True)
class ShardsOutcome:
    """What extracting a list of shards did: their manifest entries (in the order asked), the
    shards written and the ones reused (relative paths)."""

    shards: tuple[ShardInfo, ...]
    written: tuple[str, ...]
    reused: tuple[str, ...]


def extract_shards(loaded: LoadedModel, docs: pd.DataFrame, token_ids: list[list[int]], plan: dict[str, list[np.ndarray]],
                    cfg: ExtractConfig, out: Path, fingerprint: str, items: list[tuple[str, int]], bar) -> ShardsOutcome:
    """Extract (or reuse) the shards ``items`` ((split, index) of the plan) into ``out``."""
    # Each finished shard is validated and written by one background thread while the
    # model runs the next shard's batches; at most one write is pending, so memory holds
    # two shards at most. A failed write surfaces at the next wait and stops the stage;
    # every shard that was written is complete. (On 2 cores the writer slows the forward
    # it overlaps, but still comes out ahead of writing in line; README.)
    slots: list[ShardInfo | Future] = []
    written, reused = [], []
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        for split, index in items:
            rows = plan[split][index]
            rel = shard_path(split, index)
            if (out / rel).is_file():
                info = existing_shard_info(out, rel, split)
                # a finished shard is reused only if it still passes its contract;
                # a damaged one (NaN rows, wrong width, ...) is extracted again
                damaged = check_shard_file(out / rel, info, loaded.d_model, loaded.vocab_size, cfg.max_norm, cfg.activation_dtype)
                if not damaged:
                    slots.append(info)
                    reused.append(rel)
                    continue
                print(f"re-extracting {rel}: " + "; ".join(f.detail for f in damaged[:3]))
                (out / rel).unlink()
            doc_ids = docs["doc_id"].to_numpy()[rows]
            batch = extract_shard(loaded, [token_ids[r] for r in rows], cfg, bar.update if bar is not None else None)
            if pending is not None:
                pending.result()  # re-raises a failed write before more work is queued
            pending = writer.submit(
                write_batch_shard, out, split, index, doc_ids, batch, fingerprint, (loaded.vocab_size, cfg.max_norm),
                cfg.activation_dtype,
            )
            slots.append(pending)
            written.append(rel)
        if pending is not None:
            pending.result()
    shards = [slot.result() if isinstance(slot, Future) else slot for slot in slots]
    return ShardsOutcome(tuple(shards), tuple(written), tuple(reused))
