"""Steering a causal LM with a latent's decoder direction (related.md §6, §9).

During generation a forward hook on the hooked block adds α·d_i to its output, the residual
stream at that layer, at every position: h_L ← h_L + α d_i. Greedy decoding (argmax, no
sampling) makes generations with and without the addition comparable; α = 0 reproduces the
plain generation. The keys and values of earlier positions are cached while the hook is on,
so each step feeds one token (the uncached recomputation is the tested slow twin).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def added_to_output(block: nn.Module, vector: Tensor) -> Iterator[None]:
    """While open, ``block``'s output (its hidden states, the first element when it returns a
    tuple) has ``vector`` [d] added at every position."""

    def hook(module, args, output):
        if isinstance(output, (tuple, list)):
            return type(output)((output[0] + vector.to(output[0]), *output[1:]))
        return output + vector.to(output)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                    eos_id: int | None = None, use_cache: bool = True) -> list[int]:
    """The ``max_new_tokens`` greedy continuations of ``prompt_ids`` (stops after ``eos_id``).

    With ``use_cache`` each step feeds only the new token and reuses the keys and values of
    the earlier ones (computed while a steering hook was already adding its vector, so the
    hook still reaches every position); without it every step recomputes the whole sequence:
    the slow twin, tested to give the same tokens.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    new: list[int] = []
    out = model(input_ids=ids, use_cache=use_cache)
    for step in range(max_new_tokens):
        token = int(torch.argmax(out.logits[0, -1]))
        new.append(token)
        if (eos_id is not None and token == eos_id) or step == max_new_tokens - 1:
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        if use_cache:
            out = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        else:
            out = model(input_ids=ids, use_cache=False)
    return new


def steered_generate(model: nn.Module, block: nn.Module, direction: Tensor, alpha: float,
                     prompt_ids: Sequence[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """:func:`greedy_generate` with α·direction added to ``block``'s output (α = 0: no hook at all
    would give the same tokens; the hook is still used, adding zeros)."""
    with added_to_output(block, alpha * torch.as_tensor(direction, dtype=torch.float32)):
        return greedy_generate(model, prompt_ids, max_new_tokens, eos_id)
