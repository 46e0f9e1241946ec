"""Splicing an SAE's reconstruction into a causal LM: ce_loss_recovered and KL (SPEC §6).

At the hooked block's output (the residual stream the SAE was trained on), the hidden
state of every spliced position is replaced by f(h) (the SAE's reconstruction, or zeros
for the zero-ablation baseline), the rest of the model runs unchanged, and the next-token
cross-entropy is measured on the same positions as the clean run:

    ce_loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)
    kl = mean over predicted positions of KL(p_clean ‖ p_sae)

Special tokens (BOS) and padding are never spliced, as they were never in the SAE's
training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_core.devices import resolve_device, to_device

Replacement = Callable[[Tensor], Tensor]  # [N, d] hidden states -> [N, d]


@dataclass
class SpliceLosses:
    """Mean next-token CE of one replacement, and its KL to the clean distribution."""

    ce: float
    kl: float


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean): 1 = as good as clean, 0 = as bad as zeros."""
    if ce_zero == ce_clean:
        raise ValueError(f"CE with zero ablation equals the clean CE ({ce_clean}); the fraction is undefined")
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def _next_token_targets(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Targets [B, T-1] and which of them count (both positions real tokens)."""
    targets = input_ids[:, 1:]
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return targets, valid


@torch.no_grad()
def spliced_losses(
    model: nn.Module,
    block: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    splice_mask: Tensor,
    replacements: dict[str, Replacement | None],
    *,
    device: str | torch.device | None = None,
) -> dict[str, SpliceLosses]:
    """CE and KL of the causal LM ``model`` with each replacement spliced after ``block``.

    input_ids, attention_mask, splice_mask: [B, T]; splice_mask marks the positions whose
    hidden state is replaced. ``replacements``: name -> f or None (None = the clean run,
    which is always computed as the KL reference). Returns name -> SpliceLosses.

    ``device``: where the forward passes run (a device setting, ``auto | cpu | cuda |
    cuda:N``, or a torch device); None: the model's own. The model and every replacement
    that is a module (an SAE, an ensemble) are moved there, in place; the inputs too. A
    replacement's output is brought to the hidden state's device and dtype.
    """
    target = _model_device(model) if device is None else resolve_device(device)
    if _model_device(model) != target:
        model.to(target)
    for f in replacements.values():
        if isinstance(f, nn.Module):
            f.to(target)
    input_ids, attention_mask, splice_mask = (to_device(t, target) for t in (input_ids, attention_mask, splice_mask))
    targets, valid = _next_token_targets(input_ids, attention_mask)
    if not bool(valid.any()):
        raise ValueError("no next-token targets: every sequence is shorter than 2 real tokens")
    current: dict[str, Replacement | None] = {"f": None}

    def hook(module, args, output):
        f = current["f"]
        if f is None:
            return output
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        patched = hidden.clone()
        rows = splice_mask.bool()
        patched[rows] = f(hidden[rows].float()).to(hidden.device, hidden.dtype)
        if isinstance(output, tuple):
            return (patched, *output[1:])
        if isinstance(output, list):
            return [patched, *output[1:]]
        return patched

    def run(f: Replacement | None) -> Tensor:
        current["f"] = f
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.log_softmax(logits[:, :-1].float(), dim=-1)[valid]  # [N, V]

    handle = block.register_forward_hook(hook)
    try:
        clean = run(None)
        flat_targets = targets[valid]
        out = {}
        for name, f in replacements.items():
            logp = clean if f is None else run(f)
            ce = float(F.nll_loss(logp, flat_targets))
            kl = float((clean.exp() * (clean - logp)).sum(-1).mean())
            out[name] = SpliceLosses(ce=ce, kl=kl)
    finally:
        handle.remove()
    return out


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def zero_replacement(h: Tensor) -> Tensor:
    """The zero-ablation baseline."""
    return torch.zeros_like(h)
