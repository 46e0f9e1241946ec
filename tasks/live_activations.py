"""A split that is not stored (``extract.store_train: false``), read by running the model.

The extract stage records the split's documents in blocks (the shards it would have
written) with the number of rows each yields; reading a block runs the language model of
the manifest over its documents (on the reading stage's device) and returns exactly the
rows the shard would have held, in the same order: same windows, same batches, so on the
CPU the values are the stored ones bit for bit (tested). A block is one chunk of a
:class:`~sae_core.training.sources.ChunkedSource`, so streaming, windows, seeds, resume
and subsets work as for shards; every epoch and window runs the forward pass again (as
SAELens does when it trains from the model).

Memory: the shuffle buffer's windows plus the model, and the split's text (about 4 bytes
a token, ~1/800 of its fp32 activations at d = 768), which the reader keeps to look
documents up by id.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import torch

from data_contracts.activations import ActivationManifest
from data_contracts.documents import read_documents
from sae_core.training.sources import Chunk, ChunkedSource, subset_per_chunk


class LiveReader:
    """Fills a window's rows by running the manifest's model over the blocks' documents."""

    def __init__(self, run_dir: Path, manifest: ActivationManifest, split: str, device: torch.device | str) -> None:
        from tasks.common import DOCUMENTS_FILE

        self.manifest, self.split, self.device = manifest, split, device
        docs = read_documents(Path(run_dir) / DOCUMENTS_FILE)
        docs = docs[docs["split"] == split]
        self.texts = dict(zip(docs["doc_id"], docs["text"]))
        self.blocks = manifest.live_splits[split]
        self._loaded = None
        self._lock = threading.Lock()

    def model(self):
        with self._lock:
            if self._loaded is None:
                from sae_core.models import load_model

                m = self.manifest
                loaded = load_model(m.model, m.layer, trust_remote_code=m.trust_remote_code, device=self.device)
                if loaded.revision != m.revision:
                    raise ValueError(
                        f"{m.model} now has weights {loaded.revision}, but the {self.split} split was planned with "
                        f"{m.revision}; rerun extraction (--force extract)"
                    )
                self._loaded = loaded
            return self._loaded

    def __call__(self, chunks, out: np.ndarray) -> None:
        from tasks.extract_shards import extract_documents

        at = 0
        for chunk in chunks:
            block = self.blocks[chunk.key[0]]
            values = extract_documents(self.model(), [self.texts[d] for d in block.doc_ids], self.manifest.context_length,
                                       self.manifest.live_batch_size or 8, self.manifest.include_special_tokens)
            if values.shape[0] != block.rows:
                raise ValueError(
                    f"block {chunk.key[0]} of the live {self.split} split yields {values.shape[0]} rows where the manifest "
                    f"planned {block.rows}: the model or tokenizer changed since extraction; rerun extraction (--force extract)"
                )
            if chunk.keep is not None:
                values = values[np.asarray(chunk.keep, dtype=np.int64)]
            out[at : at + values.shape[0]] = values
            at += values.shape[0]


def live_source(run_dir: Path, manifest: ActivationManifest, split: str, max_tokens: int | None, seed: int, *,
                buffer_rows: int, device: torch.device | str = "cpu") -> ChunkedSource:
    """The live ``split`` as an activation source (see the module docstring)."""
    chunks = subset_per_chunk([Chunk((i,), b.rows) for i, b in enumerate(manifest.live_splits[split])], max_tokens, seed)
    identity = hashlib.sha256(f"live:{manifest.config_fingerprint}:{split}:{max_tokens}:{seed}".encode()).hexdigest()
    return ChunkedSource(chunks, LiveReader(run_dir, manifest, split, device), manifest.d, identity, buffer_rows)
