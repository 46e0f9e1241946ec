"""The metrics of the evaluation stage, declared once (SPEC §6).

Each :class:`MetricSpec` says what a metric's values may be (the contract checks that
range), which way is better (the claims and the report read it), how tables label it,
and whether it depends on the number of tokens evaluated (connectivity and the dead
fraction do: a latent pair or a latent that never fires on 10k tokens may fire on 7M,
so tables show T beside them). Tables and figures list metrics in :data:`METRICS`' order.
The formulas are in :mod:`sae_core.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae_core.catalog import Catalog


@dataclass(frozen=True)
class MetricSpec:
    """name: the ``metric`` column; low/high: its range (None: unbounded);
    better: "higher", "lower" or None (no direction, e.g. a raw CE); label: for tables;
    token_dependent: its value depends on the number of tokens evaluated; in_grid: drawn
    in the report's grid figure (the paper's Figure 2)."""

    name: str
    low: float | None
    high: float | None
    better: Literal["higher", "lower"] | None
    label: str
    token_dependent: bool = False
    in_grid: bool = False


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("mse", 0.0, None, "lower", "MSE (sum over dims, mean over tokens)", in_grid=True),
    MetricSpec("explained_variance", None, 1.0, "higher", "explained variance (mean over dims)", in_grid=True),
    MetricSpec("explained_variance_total", None, 1.0, "higher", "explained variance (1 − FVU)"),
    MetricSpec("l0", 0.0, None, None, "L0 (active latents per token)", in_grid=True),
    MetricSpec("dead_fraction", 0.0, 1.0, "lower", "dead fraction", token_dependent=True, in_grid=True),
    MetricSpec("shrinkage_gamma", None, None, None, "shrinkage γ", in_grid=True),
    MetricSpec("connectivity", 0.0, 1.0, None, "connectivity", token_dependent=True, in_grid=True),
    MetricSpec("diversity", 0.0, None, "higher", "diversity (latents)"),
    MetricSpec("diversity_fraction", 0.0, 1.0, "higher", "diversity (fraction)", in_grid=True),
    MetricSpec("stability", 0.0, 1.0, "higher", "stability (relaxed max cosine)", in_grid=True),
    MetricSpec("stability_matched", -1.0, 1.0, "higher", "stability (matched, PW-MCC)", in_grid=True),
    MetricSpec("stability_shared", 0.0, 1.0, "higher", "stability (shared: fraction matched at cosine ≥ 0.7)", in_grid=True),
    MetricSpec("stability_random", 0.0, 1.0, None, "stability of random dictionaries (floor)"),
    MetricSpec("stability_matched_random", -1.0, 1.0, None, "matched stability of random dictionaries (floor)"),
    MetricSpec("stability_shared_random", 0.0, 1.0, None, "shared fraction of random dictionaries (floor)"),
    MetricSpec("stability_corrected", -1.0, 1.0, "higher", "stability minus its random floor", in_grid=True),
    MetricSpec("stability_matched_corrected", -2.0, 2.0, "higher", "matched stability minus its random floor"),
    MetricSpec("stability_shared_corrected", -1.0, 1.0, "higher", "shared fraction minus its random floor"),
    MetricSpec("orderedness", -1.0, 1.0, "higher", "orderedness (Spearman ρ of a latent's index and its matched index in "
               "another run: 1 = the runs list their latents in the same order, ≈ 0 = unrelated orders; sae_core.ordering)"),
    MetricSpec("orderedness_random", -1.0, 1.0, None, "orderedness of random dictionaries (floor, ≈ 0 ± 1/√m)"),
    MetricSpec("orderedness_corrected", -2.0, 2.0, "higher", "orderedness minus its random floor"),
    MetricSpec("c_dec", 0.0, 1.0, None, "c_dec (mean |cos| of decoder rows)", in_grid=True),
    MetricSpec("ce_loss_recovered", None, None, "higher", "CE loss recovered"),
    MetricSpec("kl_divergence", 0.0, None, "lower", "KL divergence to the clean model"),
    MetricSpec("ce_loss_sae", 0.0, None, "lower", "CE loss with the SAE spliced in"),
    MetricSpec("ce_loss_clean", 0.0, None, None, "CE loss of the clean model"),
    MetricSpec("ce_loss_zero", 0.0, None, None, "CE loss with the layer zero-ablated"),
)

METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)

#: metric -> (its floor: the same quantity on untrained dictionaries of the same shapes, the
#: metric minus that floor, run by run). The claims compare the corrected values: the floor
#: itself moves with the dictionaries' sizes (relaxed stability of random dictionaries rises
#: with the other runs' width), so raw values across J or widths are not comparable.
FLOORS: dict[str, tuple[str, str]] = {
    "stability": ("stability_random", "stability_corrected"),
    "stability_matched": ("stability_matched_random", "stability_matched_corrected"),
    "stability_shared": ("stability_shared_random", "stability_shared_corrected"),
    "orderedness": ("orderedness_random", "orderedness_corrected"),
}
_CATALOG = Catalog(METRICS, "metric")
#: metric_spec(name) -> MetricSpec (a KeyError lists the known ones); ordered_metrics(names)
#: -> the names in table order (unknown names last)
metric_spec = _CATALOG.__getitem__
ordered_metrics = _CATALOG.ordered


def grid_metrics() -> tuple[str, ...]:
    """The metrics of the grid figure, in order."""
    return tuple(m.name for m in METRICS if m.in_grid)
