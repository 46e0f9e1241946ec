"""Training of one SAE, or of J members side by side as one batched module.

Member j is seeded by ``member_seeds[j]``: its initialisation and its batch order come
from that seed alone, so a J-member module trains each member exactly as a single SAE
with the same seed would (the loss is a sum of per-member losses, gradient clipping is
per member, Adam is element-wise).

The batches come from an activation source (:mod:`sae_core.training.sources`): a tensor in
memory, or shards streamed through a shuffle buffer. Either way the batch of a step is a
pure function of (seeds, step), so a resumed run needs no RNG state and sees the same
batches as an uninterrupted one, without replaying data.

The module trains on ``device`` (``auto``: CUDA when present); batches reach it through
pinned memory, the matmuls run in bf16 autocast on the device's type when the recipe asks
for it, and the trained module comes back on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_core.config import SAEConfig, TrainConfig
from sae_core.init import initial_b_dec
from sae_core.registry import architecture_sparsity, architectures, get_architecture
from sae_core.training.records import TrainingRecord
from sae_core.saes.base import SAE, LossContext
from sae_core.devices import autocast, resolve_device, to_device
from sae_core.training.memory import keep_freed_memory
from sae_core.training.sources import (  # noqa: F401  (BatchSampler, seeded_generator: re-exported)
    _INIT,
    ActivationSource,
    BatchSampler,
    as_source,
    seeded_generator,
)
from sae_core.training.schedules import PAnnealer, lr_multiplier, sparsity_warmup_multiplier

CHECKPOINT_FILE = "checkpoint.safetensors"

StepCallback = Callable[[int, SAE, "TrainingRecord | None"], None]


@dataclass
class TrainResult:
    """A trained module and its training record."""

    sae: SAE
    history: list[TrainingRecord] = field(default_factory=list)
    resumed_from_step: int | None = None


def _per_member(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def build_sae(cfg: SAEConfig, n_members: int = 1) -> SAE:
    """An (uninitialised) SAE of the architecture named in ``cfg``."""
    return get_architecture(cfg.architecture)(cfg, n_members=n_members)


def initialized_sae(sae_cfg: SAEConfig, activations: Tensor, train_cfg: TrainConfig, seeds: list[int]) -> SAE:
    """The module :func:`train_sae` starts from: member j seeded by ``seeds[j]``, b_dec from the data.

    activations: [N, d_in] float tensor on the CPU (the b_dec sample is drawn from it:
    the whole data, or the source's :meth:`~ActivationSource.init_sample`).
    """
    sae = build_sae(sae_cfg, n_members=len(seeds))
    b_dec = initial_b_dec(activations, train_cfg.b_dec_init, train_cfg.b_dec_init_samples)
    sae.initialize([seeded_generator(s, _INIT) for s in seeds], b_dec=b_dec, train_cfg=train_cfg)
    return sae


def _check_activations(activations: Tensor | ActivationSource, cfg: SAEConfig) -> None:
    if isinstance(activations, ActivationSource):
        d = activations.d  # a streamed source's rows were checked by their contract when written
    elif not isinstance(activations, Tensor) or activations.ndim != 2:
        shape = tuple(activations.shape) if isinstance(activations, Tensor) else type(activations).__name__
        raise ValueError(f"activations must be a 2-D tensor [tokens, d_in]; got {shape}")
    else:
        d = activations.shape[1]
    if d != cfg.d_in:
        raise ValueError(
            f"activations have d={d} but the SAE config says d_in={cfg.d_in}; "
            "use the d of the extracted layer"
        )
    if isinstance(activations, ActivationSource):
        return
    if not activations.is_floating_point():
        raise ValueError(f"activations must be floating point, got {activations.dtype}")
    bad = ~torch.isfinite(activations).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"activations contain NaN/inf in {int(bad.sum())} rows (first: {rows}); clean the data")


def _fingerprint(sae_cfg: SAEConfig, train_cfg: TrainConfig, seeds: list[int], source: ActivationSource, extra: str = "") -> str:
    """What a checkpoint must match to be resumed (the recipe, seeds, data and batch order)."""
    recipe = train_cfg.model_dump(exclude={"checkpoint_every", "log_every"})
    h = hashlib.sha256()
    h.update(json.dumps([sae_cfg.model_dump(), recipe, seeds, [source.n_rows, source.d], extra], sort_keys=True).encode())
    h.update(source.fingerprint().encode())
    return h.hexdigest()


def _clip_per_member(params: list[torch.nn.Parameter], max_norm: float, n_members: int) -> Tensor:
    """Scale each member's gradient to norm <= max_norm (like clip_grad_norm_ per member)."""
    sq = torch.zeros(n_members, dtype=torch.float32, device=params[0].device)
    for p in params:
        if p.grad is not None:
            sq += p.grad.float().pow(2).reshape(n_members, -1).sum(1)
    norms = sq.sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.view(-1, *([1] * (p.grad.ndim - 1))).to(p.grad.dtype))
    return norms


def _batch_ev(x: Tensor, mse: Tensor | None) -> tuple[float, ...] | None:
    """Per member: 1 − mse / the batch's total variance (mean over tokens of Σ_d (x − x̄)²)."""
    if mse is None:
        return None
    x = x.float()
    variance = (x - x.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)
    return _per_member(1.0 - mse.float() / variance.clamp_min(1e-12))


class _Checkpoint:
    """Everything needed to continue a run bit for bit, in one safetensors file."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / CHECKPOINT_FILE

    def save(
        self,
        step: int,
        fingerprint: str,
        sae: SAE,
        optimizer: torch.optim.Optimizer,
        tokens_since_fired: Tensor,
        annealer: PAnnealer | None,
        history: list[TrainingRecord],
    ) -> None:
        tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in sae.state_dict().items()}
        names = {id(p): n for n, p in sae.named_parameters()}
        for p, state in optimizer.state.items():
            for key, value in state.items():
                tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().clone().contiguous()
        tensors["tokens_since_fired"] = tokens_since_fired.cpu().clone()
        tensors.update({f"train.{k}": v.detach().cpu().clone().contiguous() for k, v in sae.training_state().items()})
        meta: dict = {"step": step, "fingerprint": fingerprint, "history": [r.to_json() for r in history]}
        if annealer is not None:
            scalars, anneal_tensors = annealer.state()
            meta["p_anneal"] = scalars
            tensors.update({k: v.detach().cpu().contiguous() for k, v in anneal_tensors.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        os.replace(tmp, self.path)

    def load(self) -> tuple[dict, dict[str, Tensor]] | None:
        if not self.path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads(f.metadata()["state"])
            return meta, load_file(str(self.path))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            raise ValueError(
                f"checkpoint {self.path} is unreadable ({err}); delete it to restart training from step 0"
            ) from err


def _restore(sae: SAE, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    """Load module and Adam state saved by :class:`_Checkpoint`."""
    sae.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = {}
    for i, (name, _) in enumerate(sae.named_parameters()):
        prefix = f"optim.{name}."
        entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            opt_state[i] = entry
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    sae.load_training_state({k[len("train.") :]: v for k, v in tensors.items() if k.startswith("train.")})


def train_sae(
    sae_cfg: SAEConfig,
    activations: Tensor | ActivationSource,
    train_cfg: TrainConfig,
    *,
    member_seeds: list[int] | None = None,
    checkpoint_dir: str | Path | None = None,
    callback: StepCallback | None = None,
    device: str | torch.device = "cpu",
    transform: Callable[[Tensor], Tensor] | None = None,
    transform_id: str = "",
) -> TrainResult:
    """Train ``len(member_seeds)`` members of ``sae_cfg`` side by side on ``activations``.

    activations: [N, d_in] float tensor (held in memory) or an :class:`ActivationSource`
        (e.g. shards streamed through a shuffle buffer).
    member_seeds: one seed per member; default ``[train_cfg.seed]`` (a single SAE).
    checkpoint_dir: with ``train_cfg.checkpoint_every``, a resumable checkpoint is kept
        there; a later call with the same recipe, seeds and data resumes from it (a
        finished run returns at once).
    callback: called as ``callback(step, sae, record)`` after every step (1-based step);
        record is the step's TrainingRecord on logged steps (every log_every), None otherwise.
    device: where the module trains (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` or a
        torch.device); the returned module is on the CPU.
    transform: applied to every batch [J·B, d] on the device before the step, and to
        b_dec's initialisation sample (boosting's residual of the earlier stages when the
        data is streamed); ``transform_id`` names it in the checkpoint fingerprint.
    """
    _check_activations(activations, sae_cfg)
    source = as_source(activations)
    device = resolve_device(device)
    if device.type == "cpu":
        keep_freed_memory()  # the step's large tensors reuse pages instead of mmap + zero-fill each step
    if train_cfg.p_annealing is not None and architecture_sparsity(sae_cfg.architecture) != "l1":
        l1_type = [a for a in architectures() if architecture_sparsity(a) == "l1"]
        raise ValueError(
            f"p_annealing applies to L1-type SAEs ({', '.join(l1_type)}), "
            f"not {sae_cfg.architecture!r}; remove p_annealing from the training config"
        )
    seeds = list(member_seeds) if member_seeds is not None else [train_cfg.seed]
    if not seeds:
        raise ValueError("member_seeds is empty: give one seed per member")
    J = len(seeds)
    B = train_cfg.batch_size
    stream = source.stream(seeds, B, bootstrap=train_cfg.bootstrap)
    try:
        return _train(sae_cfg, source, stream, train_cfg, seeds, checkpoint_dir, callback, device, transform, transform_id)
    finally:
        stream.close()


def _apply(transform: Callable[[Tensor], Tensor] | None, x: Tensor, device: torch.device) -> Tensor:
    if transform is None:
        return x
    with torch.no_grad():
        return transform(x.to(device)).cpu()


def _train(sae_cfg, source, stream, train_cfg: TrainConfig, seeds, checkpoint_dir, callback, device, transform, transform_id) -> TrainResult:
    J, B = len(seeds), train_cfg.batch_size
    sae = initialized_sae(sae_cfg, _apply(transform, source.init_sample(train_cfg.b_dec_init_samples), device), train_cfg, seeds)
    sae.to(device)
    # A frozen decoder gets no gradient: every step (fused and sparse kernels included) skips
    # its gradient, Adam skips it (no state), clipping ignores it, nothing renormalises it.
    sae.W_dec.requires_grad_(not train_cfg.freeze_decoder)
    params = list(sae.parameters())
    optimizer = torch.optim.Adam(
        params, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.adam_eps
    )
    tokens_since_fired = torch.zeros(J, sae_cfg.d_sae, dtype=torch.int64, device=device)
    annealer = (
        PAnnealer(train_cfg.p_annealing, train_cfg.n_steps, train_cfg.sparsity_coefficient, J)
        if train_cfg.p_annealing is not None
        else None
    )
    history: list[TrainingRecord] = []
    fingerprint = _fingerprint(sae_cfg, train_cfg, seeds, source, transform_id)
    checkpoint = _Checkpoint(Path(checkpoint_dir)) if checkpoint_dir is not None else None

    start_step, resumed_from = 0, None
    if checkpoint is not None and (saved := checkpoint.load()) is not None:
        meta, tensors = saved
        if meta["fingerprint"] != fingerprint:
            raise ValueError(
                f"checkpoint {checkpoint.path} was written for a different config, seeds or data; "
                "delete it or choose another checkpoint directory"
            )
        _restore(sae, optimizer, tensors)
        tokens_since_fired = tensors["tokens_since_fired"].to(device)
        if annealer is not None:
            annealer.load_state(meta["p_anneal"], tensors)
        history = [TrainingRecord.from_json(r) for r in meta["history"]]
        start_step = resumed_from = int(meta["step"])

    dead_threshold = train_cfg.dead_window_tokens
    upcoming = to_device(stream.batch(start_step), device) if start_step < train_cfg.n_steps else None
    for step in range(start_step, train_cfg.n_steps):
        x = upcoming
        if transform is not None:
            with torch.no_grad():
                x = transform(x.view(J * B, sae_cfg.d_in)).view(J, B, sae_cfg.d_in)
        base = annealer.coefficient.float() if annealer is not None else torch.full((J,), train_cfg.sparsity_coefficient)
        ctx = LossContext(
            train_cfg=train_cfg,
            sparsity_coefficient=(base * sparsity_warmup_multiplier(step, train_cfg)).to(device),
            p=annealer.p if annealer is not None else 1.0,
            p_next=annealer.p_next if annealer is not None else None,
            dead_mask=tokens_since_fired >= dead_threshold,
            log_statistics=(step + 1) % train_cfg.log_every == 0 or step + 1 == train_cfg.n_steps,
        )
        with autocast(device, enabled=train_cfg.autocast_bf16):
            out = sae.training_loss(x, ctx)
        out.loss.backward()
        # the next batch is gathered on the host and its copy to the device queued while the
        # device still works through this step's kernels (on the CPU: the same batches, in order)
        upcoming = to_device(stream.batch(step + 1), device) if step + 1 < train_cfg.n_steps else None
        if train_cfg.normalize_decoder:
            sae.project_decoder_gradient()
        grad_norms = _clip_per_member(params, train_cfg.grad_clip, J) if train_cfg.grad_clip else None
        lr = train_cfg.lr * lr_multiplier(step, train_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.after_optimizer_step(train_cfg)

        tokens_since_fired = torch.where(out.fired, torch.zeros_like(tokens_since_fired), tokens_since_fired + B)
        # the ordered SAE re-sorts its latents; a frozen decoder (the random-decoder baseline) stays its seeded init
        if not train_cfg.freeze_decoder and (order := sae.latent_order(step + 1, train_cfg.n_steps)) is not None:
            sae.permute_latents(order, optimizer)
            tokens_since_fired = tokens_since_fired.gather(1, order.to(tokens_since_fired.device))
        if annealer is not None:
            annealer.record(out.stats["sparsity_current_p"], out.stats.get("sparsity_next_p"))
            annealer.advance(step)

        done = step + 1
        record: TrainingRecord | None = None
        if done % train_cfg.log_every == 0 or done == train_cfg.n_steps:
            record = TrainingRecord(
                step=done,
                lr=lr,
                loss=_per_member(out.per_member.detach()),
                terms={name: _per_member(values) for name, values in out.terms.items()},
                l0=_per_member(out.l0),
                dead_fraction=_per_member((tokens_since_fired >= dead_threshold).float().mean(-1)),
                grad_norm=_per_member(grad_norms) if grad_norms is not None else None,
                p=annealer.p if annealer is not None else None,
                sparsity_coefficient=_per_member(annealer.coefficient) if annealer is not None else None,
                explained_variance=_batch_ev(x, out.terms.get("mse")),
            )
            history.append(record)
        if checkpoint is not None and train_cfg.checkpoint_every and (
            done % train_cfg.checkpoint_every == 0 or done == train_cfg.n_steps
        ):
            checkpoint.save(done, fingerprint, sae, optimizer, tokens_since_fired, annealer, history)
        if callback is not None:
            callback(done, sae, record)

    sae.W_dec.requires_grad_(True)
    sae.eval()
    return TrainResult(sae=sae.cpu(), history=history, resumed_from_step=resumed_from)
