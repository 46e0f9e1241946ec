"""Ensembles of SAEs (SPEC §5): naive bagging, boosting, and their concatenated view.

An :class:`Ensemble` of J members with weights α reconstructs ĝ(a) = Σ_j α_j g_j(a_j),
where a_j is member j's input (a for bagging; the residual left by the earlier stages for
boosting). It is itself an SAE with J·m latents (m = d_sae per member) (the paper's Proposition 1):

    codes    c = [α_1 c^(1); …; α_J c^(J)]                    [B, mJ]
    W_dec      = rows of W_dec^(1), …, W_dec^(J) stacked       [mJ, d]
    b_dec      = Σ_j α_j b_dec^(j)                              [d]
    decode(encode(a)) == forward(a)

``W_dec`` keeps the SAELens orientation (one row per latent, [mJ, d]); the paper writes
the same matrix as d × mJ. A single SAE is an ensemble with J = 1 and α = 1, so every
consumer (metrics, probing, SCR, export) takes an :class:`Ensemble`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from sae_core.config import SAEConfig
from sae_core.methods import ENSEMBLE_KINDS
from sae_core.saes.base import SAE

EnsembleKind = Literal["single", "expanded", "bagging", "boosting"]


@dataclass(frozen=True)
class ExpandedMatch:
    """How an expanded SAE matches a J-member ensemble: width J·d_sae, sparsity, steps."""

    n_members_matched: int
    d_sae: int
    k: int | None
    sparsity: str
    compute_matched: bool
    n_steps: int


@dataclass(frozen=True)
class EnsembleInfo:
    """How an ensemble was made; saved in ``ensemble.json`` under "info".

    The trainer fills what it knows (seeds, bootstrap, the expanded match); the training
    stage adds where the model comes from (source), the fingerprint of what it was trained
    from, its run, method and the number of train tokens. Unset fields are not written.
    """

    expanded: ExpandedMatch | None = None
    seeds: tuple[int, ...] | None = None
    bootstrap: bool | None = None
    source: str | None = None
    fingerprint: str | None = None
    run: int | None = None
    method: str | None = None
    train_tokens: int | None = None
    prefix_of: int | None = None

    def updated(self, **changes: Any) -> "EnsembleInfo":
        """A copy with ``changes`` applied (the record itself is immutable)."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ensemble.json: the expanded match's fields inline, then the set fields in order."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, ExpandedMatch):
                out.update(asdict(value))
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EnsembleInfo":
        """Parse what :meth:`to_json` wrote; an unknown key is an error naming it."""
        data = dict(data)
        expanded_keys = [f.name for f in fields(ExpandedMatch)]
        expanded = None
        if any(k in data for k in expanded_keys):
            missing = [k for k in expanded_keys if k not in data]
            if missing:
                raise ValueError(f"ensemble info has an incomplete expanded match: {missing} missing")
            expanded = ExpandedMatch(**{k: data.pop(k) for k in expanded_keys})
        known = {f.name for f in fields(cls)} - {"expanded"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ensemble info has unknown keys {unknown}; known: {sorted(known | set(expanded_keys))}")
        if data.get("seeds") is not None:
            data["seeds"] = tuple(data["seeds"])
        return cls(expanded=expanded, **data)


class Ensemble(torch.nn.Module):
    """J members of one architecture (stacked in one module) with weights α.

    members: an SAE module holding J members (``members.n_members == J``).
    method: "bagging" (members all read a, α = 1/J), "boosting" (member j reads the
        residual of members < j, α = 1), "single" or "expanded" (J = 1, α = 1).
    alpha: [J] weights; default from the method.
    """

    def __init__(self, members: SAE, method: EnsembleKind, alpha: Tensor | None = None) -> None:
        super().__init__()
        if method not in ENSEMBLE_KINDS:
            raise ValueError(f"unknown ensemble method {method!r}; use one of {', '.join(ENSEMBLE_KINDS)}")
        J = members.n_members
        if method in ("single", "expanded") and J != 1:
            raise ValueError(f"a {method} SAE has exactly one member, got {J}")
        if alpha is None:
            alpha = torch.full((J,), 1.0 / J) if method == "bagging" else torch.ones(J)
        # α lives with the members (a buffer: .to(device) moves both)
        alpha = torch.as_tensor(alpha, dtype=torch.float32).to(members.W_enc.device)
        if alpha.shape != (J,) or bool((alpha < 0).any()):
            raise ValueError(f"alpha must be {J} non-negative weights, got {alpha.tolist()}")
        self.members = members
        self.method = method
        self.register_buffer("alpha", alpha.clone())
        #: how it was trained (seeds, sparsity matching, ...); saved in ensemble.json
        self.info = EnsembleInfo()

    # ------------------------------------------------------------- properties
    @property
    def n_members(self) -> int:
        return self.members.n_members

    @property
    def member_cfg(self) -> SAEConfig:
        """Config shared by all members."""
        return self.members.cfg

    @property
    def cfg(self) -> SAEConfig:
        """Config of the concatenated view: d_sae·J latents; for TopK-type members k·J,
        the most latents the ensemble can activate per token (its L0 is the members' sum)."""
        c = self.members.cfg
        update: dict = {"d_sae": c.d_sae * self.n_members}
        if c.k is not None:
            update["k"] = c.k * self.n_members
        return c.model_copy(update=update)

    @property
    def d_in(self) -> int:
        return self.members.cfg.d_in

    @property
    def d_sae(self) -> int:
        """Number of latents of the concatenated view (k·J)."""
        return self.members.cfg.d_sae * self.n_members

    @property
    def W_dec(self) -> Tensor:
        """Concatenated dictionary, one row per latent in member order: [mJ, d]."""
        return self.members.W_dec.reshape(self.d_sae, self.d_in)

    @property
    def b_dec(self) -> Tensor:
        """Σ_j α_j b_dec^(j): [d]."""
        return (self.alpha[:, None] * self.members.b_dec).sum(0)

    @property
    def device(self) -> torch.device:
        """The device of the members' parameters."""
        return self.members.W_enc.device

    def member(self, j: int) -> SAE:
        """Member j as a standalone single SAE (on the ensemble's device)."""
        return self.members.member(j)

    def latent_member(self) -> Tensor:
        """Member index of each latent of the concatenated view: [mJ]."""
        return torch.arange(self.n_members, device=self.device).repeat_interleave(self.members.cfg.d_sae)

    # -------------------------------------------------------------- inference
    def _check(self, x: Tensor, width: int, what: str) -> None:
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"{what} must be [B, {width}] for this ensemble; got shape {tuple(x.shape)}")

    def member_codes(self, a: Tensor) -> Tensor:
        """Each member's own codes (without α): [B, d] -> [J, B, m].

        Bagging: every member encodes a. Boosting: member j encodes the residual
        r_j = a − Σ_{l<j} g_l(r_l), computed sequentially.
        """
        self._check(a, self.d_in, "activations")
        if self.method != "boosting":
            return self.members.encode_members(a.unsqueeze(0).expand(self.n_members, -1, -1))
        return self.member_codes_and_outputs(a)[0]

    def member_codes_and_outputs(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """Each member's codes and output g_j(a_j) (without α): [B, d] -> ([J, B, m], [J, B, d]).

        The reconstruction of the first-n-member ensemble is Σ_{j<n} prefix_alpha(n)_j out_j,
        so one call serves every prefix (what the evaluation does).
        """
        self._check(a, self.d_in, "activations")
        J = self.n_members
        if self.method != "boosting":
            codes = self.members.encode_members(a.unsqueeze(0).expand(J, -1, -1))
            return codes, self.members.decode_members(codes)
        codes, outs = [], []
        residual = a
        for j in range(J):
            c_j, out_j = self._stage(j, residual)
            codes.append(c_j)
            outs.append(out_j)
            residual = residual - out_j
        return torch.stack(codes), torch.stack(outs)

    def _stage(self, j: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """(codes [B, m], output [B, d]) of member j alone on input x [B, d]."""
        view = self.members.member_view(j)
        c = view.encode_members(x.unsqueeze(0))
        return c[0], view.decode_members(c)[0]

    def encode(self, a: Tensor) -> Tensor:
        """Concatenated codes [α_1 c^(1); …; α_J c^(J)]: [B, d] -> [B, mJ]."""
        codes = self.member_codes(a) * self.alpha[:, None, None].to(a.dtype)
        return codes.permute(1, 0, 2).reshape(a.shape[0], self.d_sae)

    def decode(self, codes: Tensor) -> Tensor:
        """codes W_dec + b_dec: [B, mJ] -> [B, d]."""
        self._check(codes, self.d_sae, "codes")
        return codes @ self.W_dec + self.b_dec

    def forward(self, a: Tensor) -> Tensor:
        """Σ_j α_j g_j(a_j), computed from the members' own outputs: [B, d] -> [B, d]."""
        self._check(a, self.d_in, "activations")
        if self.method != "boosting":
            outs = self.members.forward(a.unsqueeze(0).expand(self.n_members, -1, -1))
            return (self.alpha[:, None, None].to(outs.dtype) * outs).sum(0)
        total = torch.zeros_like(a)
        residual = a
        for j in range(self.n_members):
            _, out_j = self._stage(j, residual)
            total = total + self.alpha[j] * out_j
            residual = residual - out_j
        return total

    def prefix_alpha(self, n: int) -> Tensor:
        """Weights of the first-n-member ensemble: 1/n each for bagging, α[:n] otherwise."""
        if not 1 <= n <= self.n_members:
            raise ValueError(f"prefix size must be in 1..{self.n_members}, got {n}")
        if self.method == "bagging":
            return torch.full((n,), 1.0 / n, device=self.alpha.device)
        return self.alpha[:n].clone()

    def prefix(self, n: int) -> "Ensemble":
        """The ensemble of the first n members (bagging re-weighted to α = 1/n)."""
        if not 1 <= n <= self.n_members:
            raise ValueError(f"prefix size must be in 1..{self.n_members}, got {n}")
        stacked = type(self.members).stack([self.members.member(j) for j in range(n)])
        out = Ensemble(stacked, self.method, self.prefix_alpha(n))
        out.info = self.info.updated(prefix_of=self.n_members)
        return out
