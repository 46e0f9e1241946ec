"""An activation directory of planted sparse-dictionary data, written shard by shard through
the real shard writer and manifest (no language model): streaming tests and
``benchmarks/bench_scale.py`` need millions of tokens without hours of extraction.

Each token is a sparse non-negative combination of a fixed random unit dictionary plus an
offset and a little noise (as :func:`sae_core.synthetic.make_sparse_dictionary_data`), drawn block by block so
memory stays at one shard whatever the number of tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_contracts.activations import ActivationManifest, write_manifest, write_shard

FINGERPRINT = "synthetic-planted-dictionary"


def write_synthetic_activations(directory: str | Path, tokens: dict[str, int], *, d: int = 64, n_features: int = 256,
                                mean_active: float = 6.0, rows_per_shard: int = 4096, seed: int = 0,
                                documents_per_shard: int = 16) -> ActivationManifest:
    """Write ``tokens[split]`` rows per split under ``directory`` (shards + manifest); returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=gen)
    offset /= offset.norm()
    shards, documents = [], {}
    for split, total in tokens.items():
        index, written, doc = 0, 0, 0
        while written < total:
            n = min(rows_per_shard, total - written)
            active = torch.rand(n, n_features, generator=gen) < mean_active / n_features
            codes = active * (0.5 + torch.rand(n, n_features, generator=gen))
            noise = 0.01 * torch.randn(n, d, generator=gen)  # no two tokens alike, as in real activations
            rows = (codes @ dictionary + offset + noise).numpy()
            per_doc = -(-n // documents_per_shard)
            doc_index = np.arange(n) // per_doc
            doc_ids = np.array([f"{split}-{doc + i}" for i in doc_index])
            position = (np.arange(n) - doc_index * per_doc).astype(np.int32)
            token_id = (np.arange(n) % 100).astype(np.int32)
            shards.append(write_shard(directory, split, index, doc_ids, position, token_id, rows, FINGERPRINT))
            doc += int(doc_index[-1]) + 1
            index += 1
            written += n
        documents[split] = doc
    manifest = ActivationManifest(
        model="synthetic", revision="planted", layer=0, d=d, tokenizer="none", vocab_size=100, context_length=128,
        include_special_tokens=False, corpus_fingerprint=FINGERPRINT, config_fingerprint=FINGERPRINT,
        tokens_per_split={s: tokens.get(s, 0) for s in ("train", "val", "test")},
        documents_per_split={s: documents.get(s, 0) for s in ("train", "val", "test")}, shards=shards, max_norm=1e4,
    )
    write_manifest(directory, manifest)
    return manifest
