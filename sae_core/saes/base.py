"""The SAE base class: J members with stacked weights, one batched matmul for all.

Every architecture stores its parameters with a leading *member* axis of size J
(``n_members``). A single SAE is the J = 1 case; a naive-bagging ensemble trains J
members side by side as one module. Shapes (d = ``d_in``, m = ``d_sae``, B = tokens; k, where it appears, is the
number of active latents of TopK-type SAEs):

    W_enc [J, d, m]   b_enc [J, m]   W_dec [J, m, d] (SAELens orientation)   b_dec [J, d]

Shape rule of every method: 2-D in, 2-D out (a single SAE: ``[B, d] -> [B, m]``, needs
J = 1); 3-D in, 3-D out (member stack: ``[J, B, d] -> [J, B, m]``). To feed one batch to
all members, pass ``a.expand(J, B, d)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from sae_core.config import SAEConfig, TrainConfig
from sae_core.numerics import NORM_EPS


@dataclass
class LossContext:
    """Step-dependent inputs of a training loss (all per member where shaped [J])."""

    train_cfg: TrainConfig
    sparsity_coefficient: Tensor  # [J] effective lambda (after warm-up / p-annealing)
    p: float = 1.0  # current sparsity exponent (p-annealing)
    p_next: float | None = None  # next exponent, to record L_p^p norms for the lambda update
    dead_mask: Tensor | None = None  # [J, m] bool, latents currently counted as dead
    update_statistics: bool = True  # let the loss update running buffers (BatchTopK threshold)
    log_statistics: bool = True  # the step is logged: a loss may skip exact per-step statistics (L0) otherwise


@dataclass
class LossOutput:
    """Result of :meth:`SAE.training_loss`.

    ``loss`` is the sum over members of each member's batch-mean loss, so each member's
    gradient is exactly what it would be if it were trained alone.
    """

    per_member: Tensor  # [J] each member's batch-mean loss (with gradient)
    terms: dict[str, Tensor]  # name -> [J] unweighted per-member batch means (detached)
    reconstruction: Tensor  # [J, B, d]
    fired: Tensor  # [J, m] bool: latents active on at least one token of the batch
    l0: Tensor  # [J] mean number of active latents per token (NaN where ctx.log_statistics was False)
    stats: dict[str, Tensor] = field(default_factory=dict)  # [J] extra statistics

    @property
    def loss(self) -> Tensor:
        """The scalar to differentiate: the sum of the members' losses."""
        return self.per_member.sum()


def at_least_fp32(x: Tensor) -> Tensor:
    """Losses are accumulated in fp32 (or fp64 if given), never in bf16."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def squared_error(a: Tensor, a_hat: Tensor) -> Tensor:
    """Per-member mean over tokens of sum over dims of (a - a_hat)^2: [J, B, d] -> [J]."""
    return (at_least_fp32(a) - at_least_fp32(a_hat)).pow(2).sum(-1).mean(-1)


def activity(codes: Tensor) -> tuple[Tensor, Tensor]:
    """(fired [J, m], l0 [J]) of dense codes [J, B, m], without gradient."""
    with torch.no_grad():
        active = codes != 0
        return active.any(dim=1), active.sum(-1).float().mean(-1)


def activity_kwargs(codes: Tensor) -> dict[str, Tensor]:
    """``fired`` and ``l0`` keyword arguments of :class:`LossOutput` from dense codes."""
    fired, l0 = activity(codes)
    return {"fired": fired, "l0": l0}


def lp_sparsity(codes: Tensor, decoder_norms: Tensor, p: float) -> Tensor:
    """Sum over latents of (c_i * ||f_i||)^p, mean over tokens: [J, B, m], [J, m] -> [J].

    The power is taken only where the code is positive: the gradient of x^p at 0 is
    infinite for p < 1 and would turn into NaN.
    """
    if p == 1.0:
        # codes are non-negative: Σ_i c_i ||f_i|| as one batched mat-vec, no [J, B, m] temporary
        return torch.bmm(at_least_fp32(codes), at_least_fp32(decoder_norms)[:, :, None]).squeeze(-1).mean(-1)
    weighted = at_least_fp32(codes) * at_least_fp32(decoder_norms)[:, None, :]
    positive = weighted > 0
    safe = torch.where(positive, weighted, torch.ones_like(weighted))
    return torch.where(positive, safe.pow(p), torch.zeros_like(weighted)).sum(-1).mean(-1)


class SAE(nn.Module):
    """Base class of all architectures (see the module docstring for shapes)."""

    architecture: ClassVar[str]
    #: how sparsity is set: "k" (active latents per token, SAEConfig.k), "l1" (an L1 penalty
    #: of weight λ; p-annealing applies) or "l0" (an L0 penalty of weight λ)
    sparsity: ClassVar[Literal["k", "l1", "l0"]]
    #: names of parameters/buffers beyond W_enc, b_enc, W_dec, b_dec, in saved-file order
    encoder_bias_name: ClassVar[str] = "b_enc"

    def __init__(self, cfg: SAEConfig, n_members: int = 1) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} implements {self.architecture!r} but the config says "
                f"{cfg.architecture!r}; build it with sae_core.build_sae(cfg)"
            )
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        self.cfg = cfg
        self.n_members = n_members
        J, d, k = n_members, cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(J, d, k))
        self.register_parameter(self.encoder_bias_name, nn.Parameter(torch.zeros(J, k)))
        self.W_dec = nn.Parameter(torch.zeros(J, k, d))
        self.b_dec = nn.Parameter(torch.zeros(J, d))

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def initialize(
        self,
        generators: list[torch.Generator],
        b_dec: Tensor | None = None,
        train_cfg: TrainConfig | None = None,
    ) -> None:
        """Seeded init, member j from ``generators[j]``: random unit decoder rows, W_enc = s · W_decᵀ.

        s = ``train_cfg.initial_encoder_norm(self.sparsity)``: 0.1 for L1-type SAEs, 1 (tied)
        otherwise, unless set. ``b_dec`` ([d] or [J, d]) sets the decoder bias (e.g. a
        geometric median); ``train_cfg`` also supplies architecture-specific initial values
        (JumpReLU threshold).
        """
        if len(generators) != self.n_members:
            raise ValueError(f"need one generator per member ({self.n_members}), got {len(generators)}")
        train_cfg = train_cfg or TrainConfig(n_steps=1)
        encoder_norm = train_cfg.initial_encoder_norm(self.sparsity)
        for j, gen in enumerate(generators):
            # drawn on the generator's device (a seeded CPU generator gives the same init
            # whichever device the module is on), then copied into the parameters
            w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen, device=gen.device)
            w /= w.norm(dim=-1, keepdim=True)
            self.W_dec[j].copy_(w)
            self.W_enc[j].copy_(w.T * encoder_norm)  # x · 1.0 is exact: TopK-type inits are unchanged
        getattr(self, self.encoder_bias_name).zero_()
        if b_dec is not None:
            self.b_dec.copy_(b_dec.expand_as(self.b_dec))
        else:
            self.b_dec.zero_()
        self._init_extra(train_cfg)

    def _init_extra(self, train_cfg: TrainConfig) -> None:
        """Architecture-specific parameters (thresholds, gates) after the shared init."""

    # ---------------------------------------------------------------- shapes
    def _members(self, x: Tensor, what: str = "activations") -> tuple[Tensor, bool]:
        """[B, n] -> ([1, B, n], True) for a single SAE; [J, B, n] -> (itself, False)."""
        if x.ndim == 2:
            if self.n_members != 1:
                raise ValueError(
                    f"this module holds {self.n_members} members: pass {what} as [J={self.n_members}, B, n] "
                    f"(a.expand({self.n_members}, -1, -1) feeds one batch to all) or take .member(j)"
                )
            return x.unsqueeze(0), True
        if x.ndim == 3 and x.shape[0] == self.n_members:
            return x, False
        raise ValueError(
            f"{what} must be [B, n] or [J={self.n_members}, B, n]; got shape {tuple(x.shape)}"
        )

    def _check_width(self, x: Tensor, width: int, what: str) -> None:
        if x.shape[-1] != width:
            raise ValueError(
                f"{what} have width {x.shape[-1]} but this {self.architecture} SAE expects {width} "
                f"(d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae})"
            )

    # ------------------------------------------------------------- inference
    def centered_input(self, a: Tensor) -> Tensor:
        """a - b_dec (or a) for member-stacked input [J, B, d]."""
        if self.cfg.apply_b_dec_to_input:
            return a - self.b_dec[:, None, :]
        return a

    def pre_activation(self, a: Tensor) -> Tensor:
        """W_enc^T (a - b_dec) + b_enc: [J, B, d] -> [J, B, m]."""
        b_enc = getattr(self, self.encoder_bias_name)
        # bmm + add, not baddbmm: baddbmm's backward with a broadcast bias is several times slower on CPU.
        # The bias is cast to the product's dtype: under bf16 autocast an fp32 bias would
        # promote the whole [J, B, m] result (and every later pass over it) to fp32.
        xw = torch.bmm(self.centered_input(a), self.W_enc)
        return xw + b_enc.to(xw.dtype)[:, None, :]

    def activation(self, pre: Tensor) -> Tensor:
        """Inference nonlinearity h: [J, B, m] -> [J, B, m]."""
        raise NotImplementedError

    def encode_members(self, a: Tensor) -> Tensor:
        """Codes of member-stacked input: [J, B, d] -> [J, B, m]."""
        return self.activation(self.pre_activation(a))

    def decode_members(self, codes: Tensor) -> Tensor:
        """W_dec^T c + b_dec: [J, B, m] -> [J, B, d]."""
        return torch.bmm(codes, self.W_dec) + self.b_dec[:, None, :]

    def encode(self, a: Tensor) -> Tensor:
        """Codes: [B, d] -> [B, m] (J = 1) or [J, B, d] -> [J, B, m]."""
        self._check_width(a, self.cfg.d_in, "activations")
        x, single = self._members(a)
        c = self.encode_members(x)
        return c[0] if single else c

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction: [B, m] -> [B, d] (J = 1) or [J, B, m] -> [J, B, d]."""
        self._check_width(codes, self.cfg.d_sae, "codes")
        c, single = self._members(codes, "codes")
        out = self.decode_members(c)
        return out[0] if single else out

    def forward(self, a: Tensor) -> Tensor:
        """decode(encode(a)), same shape rule as :meth:`encode`."""
        return self.decode(self.encode(a))

    # -------------------------------------------------------------- training
    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        """Loss of member-stacked input [J, B, d]; see :class:`LossOutput`."""
        raise NotImplementedError

    def decoder_norms(self) -> Tensor:
        """||f_i|| for every decoder row: [J, m]."""
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def after_optimizer_step(self, train_cfg: TrainConfig) -> None:
        """Constraints applied after every step (unit-norm decoder rows by default; a frozen decoder is left alone)."""
        if train_cfg.normalize_decoder and not train_cfg.freeze_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)

    @torch.no_grad()
    def project_decoder_gradient(self) -> None:
        """Remove from each decoder row's gradient its component along the row.

        With unit rows this keeps the step tangent to the sphere; the renormalisation in
        :meth:`after_optimizer_step` removes the remaining second-order drift.
        """
        g = self.W_dec.grad
        if g is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        g -= (g * unit).sum(-1, keepdim=True) * unit

    def latent_order(self, step: int, n_steps: int) -> Tensor | None:
        """After optimizer step ``step`` (1-based) of ``n_steps``: a permutation [J, m] of the latents to apply now
        (:meth:`permute_latents`), or None. Default None: the latents' order never changes (the
        ordered SAE re-sorts its latents, whose order its loss depends on)."""
        return None

    @torch.no_grad()
    def permute_latents(self, order: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Member j's new latent i is its old latent ``order[j, i]``: W_enc columns, encoder bias and
        W_dec rows, with the optimizer's per-parameter state of the same shapes (Adam's moments).
        The code of every input is permuted the same way, its reconstruction unchanged. An
        architecture with other per-latent tensors must permute them too."""
        J, m = self.n_members, self.cfg.d_sae
        if order.shape != (J, m):
            raise ValueError(f"order must be [{J}, {m}] (one permutation of the latents per member), got {list(order.shape)}")
        for param, axis in ((self.W_enc, 2), (getattr(self, self.encoder_bias_name), 1), (self.W_dec, 1)):
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            for t in [param.data, *(v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape)]:
                index = order.to(t.device).view(J, *([1] * (axis - 1)), m, *([1] * (t.dim() - axis - 1))).expand_as(t)
                t.copy_(t.gather(axis, index))

    def training_state(self) -> dict[str, Tensor]:
        """Training-only tensors that are not in the model file but that a checkpoint must carry to resume
        bit for bit (the ordered SAE's statistics since its last sort). Default none."""
        return {}

    def load_training_state(self, tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`training_state` returned (default: nothing to restore)."""

    # --------------------------------------------------------------- members
    def saved_tensor_names(self) -> list[str]:
        """Names written to sae.safetensors (parameters and persistent buffers)."""
        return [name for name, _ in self.named_parameters()] + [name for name, _ in self.named_buffers()]

    def member_state(self, j: int) -> dict[str, Tensor]:
        """Member j's tensors without the member axis (the saved-file layout)."""
        if not 0 <= j < self.n_members:
            raise IndexError(f"member {j} out of range: this module holds {self.n_members} members")
        state = self.state_dict()
        return {name: state[name][j].detach().clone().contiguous() for name in self.saved_tensor_names()}

    def member_view(self, j: int) -> "SAE":
        """Member j as a J = 1 module sharing this module's storage (no copy, no gradient)."""
        if not 0 <= j < self.n_members:
            raise IndexError(f"member {j} out of range: this module holds {self.n_members} members")
        view = copy.copy(self)
        view._parameters = {n: nn.Parameter(p.detach()[j : j + 1], requires_grad=False) for n, p in self._parameters.items()}
        view._buffers = {n: b[j : j + 1] for n, b in self._buffers.items()}
        view._modules = {}
        view.n_members = 1
        return view

    @property
    def device(self) -> torch.device:
        """The device of the parameters (all of them live on one device)."""
        return self.W_enc.device

    def member(self, j: int) -> "SAE":
        """A standalone single SAE (J = 1) holding a copy of member j, on this module's device."""
        single = type(self)(self.cfg, n_members=1).to(self.device)
        single.load_state_dict({name: t.unsqueeze(0) for name, t in self.member_state(j).items()})
        return single

    @classmethod
    def stack(cls, members: list["SAE"]) -> "SAE":
        """One J-member module from J single SAEs of this architecture and config."""
        if not members:
            raise ValueError("stack needs at least one SAE")
        cfg = members[0].cfg
        for i, m in enumerate(members):
            if type(m) is not cls or m.cfg != cfg or m.n_members != 1:
                raise ValueError(
                    f"member {i} ({type(m).__name__}, {m.cfg}) differs from member 0 ({cls.__name__}, {cfg}); "
                    "stacked members must be single SAEs of one architecture and config"
                )
        stacked = cls(cfg, n_members=len(members)).to(members[0].device)
        states = [m.state_dict() for m in members]
        stacked.load_state_dict({k: torch.cat([s[k] for s in states]) for k in states[0]})
        return stacked

