"""Token windows and batched residual-stream extraction (pure torch/numpy).

A document's tokens (without special tokens) are cut into windows of at most
``context_length`` tokens, the special-token template ([CLS] … [SEP], or BOS …) added to
each. Every token gets a position unique within its document:
``window_index * context_length + offset_in_window`` (offsets count the special tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

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
    """Flat per-token arrays of the tokens kept from a list of windows."""

    doc_index: np.ndarray  # [n] int64
    position: np.ndarray  # [n] int32
    token_id: np.ndarray  # [n] int32
    activation: np.ndarray  # [n, d] float32


def pad_batch(windows: Sequence[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask: [B, T] each."""
    T = max(len(w.input_ids) for w in windows)
    ids = torch.full((len(windows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), T), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w.input_ids)] = torch.tensor(w.input_ids)
        mask[i, : len(w.input_ids)] = 1
    return ids, mask


def padded_batches(loaded: LoadedModel, windows: Sequence[Window], batch_size: int) -> Iterator[tuple[Sequence[Window], torch.Tensor]]:
    """The model forward over ``windows`` in batches of ``batch_size``: (the batch's windows, hidden [B, T, d]).

    The batches are built on the CPU and moved to the model's device by
    :func:`~sae_core.models.residual_stream`; the hidden states stay on that device.

    Windows are batched in the given order (callers sort by length to limit padding);
    nothing else is done, so this is also the "bare forward" the extraction benchmark
    compares against.
    """
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        ids, mask = pad_batch(chunk, loaded.pad_id)
        yield chunk, residual_stream(loaded, ids, mask)


def length_order(windows: Sequence[Window]) -> list[int]:
    """Indices of ``windows`` shortest first (stable): the batching order, less padding per batch."""
    return sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))


def kept_span(window: Window, include_special_tokens: bool) -> tuple[int, int]:
    """The window offsets [lo, hi) whose tokens are kept: all of them, or the text between the specials."""
    if include_special_tokens:
        return 0, len(window.input_ids)
    lo, hi = 0, len(window.special)
    while lo < hi and window.special[lo]:
        lo += 1
    while hi > lo and window.special[hi - 1]:
        hi -= 1
    if any(window.special[lo:hi]):
        raise ValueError(f"window of document {window.doc_index} has special tokens inside its text; windows come from make_windows")
    return lo, hi


def extract_in_order(
    loaded: LoadedModel,
    windows: Sequence[Window],
    batch_size: int,
    include_special_tokens: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> ActivationBatch:
    """The kept tokens of ``windows``, rows in the windows' order (callers pass document order).

    The forward runs sorted by length (less padding) and each window's kept tokens are
    copied once, as one slice of the hidden states, straight to their final rows of
    preallocated arrays: no per-batch gather and no reordering of the whole result (the
    two added several percent to the forward's time; README, "Measurements behind design
    choices").
    ``on_batch(tokens)`` is called after each batch (progress bars).
    """
    spans = [kept_span(w, include_special_tokens) for w in windows]
    starts = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum([hi - lo for lo, hi in spans], out=starts[1:])
    n = int(starts[-1])
    out = ActivationBatch(np.empty(n, np.int64), np.empty(n, np.int32), np.empty(n, np.int32), np.empty((n, loaded.d_model), np.float32))
    order = length_order(windows)
    for b, (chunk, hidden) in enumerate(padded_batches(loaded, [windows[i] for i in order], batch_size)):
        # numpy, not torch's copy_: into not yet touched rows, copy_ is an order of magnitude
        # slower (README, "Measurements behind design choices"). The hidden states come back
        # from the model's device once per batch, as float32 (a no-op on the CPU).
        hidden = hidden.float().cpu().numpy()
        members = order[b * batch_size : b * batch_size + len(chunk)]
        for j, i in enumerate(members):
            (lo, hi), a, z, w = spans[i], starts[i], starts[i + 1], windows[i]
            out.activation[a:z] = hidden[j, lo:hi]
            out.doc_index[a:z] = w.doc_index
            out.position[a:z] = w.positions[lo:hi]
            out.token_id[a:z] = w.input_ids[lo:hi]
        if on_batch is not None:
            on_batch(int(sum(starts[i + 1] - starts[i] for i in members)))
    return out

