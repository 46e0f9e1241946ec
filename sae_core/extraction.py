"""Token windows and batched residual-stream extraction (pure torch/numpy).

A document's tokens (without special tokens) are cut into windows of at most
``context_length`` tokens, the special-token template ([CLS] … [SEP], or BOS …) added to
each. Every token gets a position unique within its document:
``window_index * context_length + offset_in_window`` (offsets count the special tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from sae_core.models import LoadedModel, residual_stream


@dataclass(frozen=True)
class Window:
    """One model input: a slice of one document's tokens with the special template."""

    doc_index: int
    input_ids: tuple[int, ...]
    positions: tuple[int, ...]
    special: tuple[bool, ...]


def make_windows(
    doc_index: int,
    token_ids: Sequence[int],
    context_length: int,
    prefix: Sequence[int],
    suffix: Sequence[int],
) -> list[Window]:
    """Cut one document into windows of at most ``context_length`` tokens (specials included)."""
    body = context_length - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(
            f"context_length={context_length} leaves no room for text after the {len(prefix) + len(suffix)} "
            "special tokens the tokenizer adds; raise context_length"
        )
    windows = []
    for w, start in enumerate(range(0, len(token_ids), body)):
        ids = list(prefix) + list(token_ids[start : start + body]) + list(suffix)
        special = [True] * len(prefix) + [False] * (len(ids) - len(prefix) - len(suffix)) + [True] * len(suffix)
        positions = [w * context_length + i for i in range(len(ids))]
        windows.append(Window(doc_index, tuple(ids), tuple(positions), tuple(special)))
    return windows


@dataclass
class ActivationBatch:
    """Flat per-token arrays of one batch of windows (only the tokens kept)."""

    doc_index: np.ndarray  # [n] int64
    position: np.ndarray  # [n] int32
    token_id: np.ndarray  # [n] int32
    activation: np.ndarray  # [n, d] float32

    @staticmethod
    def concat(parts: list["ActivationBatch"], d: int) -> "ActivationBatch":
        if not parts:
            return ActivationBatch(
                np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, d), np.float32)
            )
        return ActivationBatch(
            np.concatenate([p.doc_index for p in parts]),
            np.concatenate([p.position for p in parts]),
            np.concatenate([p.token_id for p in parts]),
            np.concatenate([p.activation for p in parts]),
        )


def pad_batch(windows: Sequence[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask: [B, T] each."""
    T = max(len(w.input_ids) for w in windows)
    ids = torch.full((len(windows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), T), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w.input_ids)] = torch.tensor(w.input_ids)
        mask[i, : len(w.input_ids)] = 1
    return ids, mask


def extract_batches(
    loaded: LoadedModel,
    windows: Sequence[Window],
    batch_size: int,
    include_special_tokens: bool = False,
) -> Iterator[ActivationBatch]:
    """Run the model over ``windows`` in batches, yielding the hooked layer's activations.

    Windows are batched in the given order (callers sort by length to limit padding).
    Padding and, unless ``include_special_tokens``, special tokens are dropped.
    """
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        ids, mask = pad_batch(chunk, loaded.pad_id)
        hidden = residual_stream(loaded, ids, mask)  # [B, T, d]
        keep = mask.bool()
        if not include_special_tokens:
            special = torch.zeros_like(keep)
            for i, w in enumerate(chunk):
                special[i, : len(w.special)] = torch.tensor(w.special)
            keep &= ~special
        rows, cols = keep.nonzero(as_tuple=True)
        doc = torch.tensor([w.doc_index for w in chunk])[rows]
        pos = torch.zeros_like(ids, dtype=torch.int32)
        for i, w in enumerate(chunk):
            pos[i, : len(w.positions)] = torch.tensor(w.positions, dtype=torch.int32)
        yield ActivationBatch(
            doc_index=doc.numpy().astype(np.int64),
            position=pos[rows, cols].numpy(),
            token_id=ids[rows, cols].numpy().astype(np.int32),
            activation=hidden[rows, cols].float().numpy(),
        )
