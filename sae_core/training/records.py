"""The training history: one typed record per logged step."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

PerMember = tuple[float, ...]


@dataclass(frozen=True)
class TrainingRecord:
    """What the trainer logged at one step; every per-member field has one value per member.

    step: optimizer steps done; lr: the learning rate of that step; loss: total loss;
    terms: the loss terms by name (mse, l1, auxk, ...); l0: active latents per token;
    dead_fraction: latents that have not fired within the dead-latent window;
    grad_norm: before clipping (None without clipping); p, sparsity_coefficient: the
    p-annealing state (None without p-annealing); explained_variance: 1 − mse / the batch's
    variance (None in histories written before it was logged).
    """

    step: int
    lr: float
    loss: PerMember
    l0: PerMember
    dead_fraction: PerMember
    terms: dict[str, PerMember] = field(default_factory=dict)
    grad_norm: PerMember | None = None
    p: float | None = None
    sparsity_coefficient: PerMember | None = None
    explained_variance: PerMember | None = None

    @property
    def n_members(self) -> int:
        return len(self.loss)

    def member(self, j: int) -> "TrainingRecord":
        """Member j's record alone (every per-member field of length 1)."""
        pick = lambda v: None if v is None else (v[j],)  # noqa: E731
        return TrainingRecord(
            step=self.step, lr=self.lr, loss=pick(self.loss), l0=pick(self.l0), dead_fraction=pick(self.dead_fraction),
            terms={name: pick(v) for name, v in self.terms.items()}, grad_norm=pick(self.grad_norm), p=self.p,
            sparsity_coefficient=pick(self.sparsity_coefficient), explained_variance=pick(self.explained_variance),
        )

    def mean_loss(self) -> float:
        """The loss averaged over members (what progress lines show)."""
        return sum(self.loss) / len(self.loss)

    def mean_explained_variance(self) -> float | None:
        """The batch explained variance averaged over members (None when not logged)."""
        return None if self.explained_variance is None else sum(self.explained_variance) / len(self.explained_variance)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = {k: list(v) for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainingRecord":
        def tup(v):
            return None if v is None else tuple(float(x) for x in v)

        return cls(
            step=int(data["step"]), lr=float(data["lr"]), loss=tup(data["loss"]), l0=tup(data["l0"]),
            dead_fraction=tup(data["dead_fraction"]), terms={k: tup(v) for k, v in data.get("terms", {}).items()},
            grad_norm=tup(data.get("grad_norm")), p=data.get("p"), sparsity_coefficient=tup(data.get("sparsity_coefficient")),
            explained_variance=tup(data.get("explained_variance")),
        )
