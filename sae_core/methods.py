"""The methods compared in the paper, declared once (SPEC §5).

Every module that needs a method's name, its order in tables, how its members are
weighted, at which J it is scored, its label or its plot style imports it from here:
the ensemble class, the metric contracts, the stage configs, the figures and the report.

A *method* is what a saved model directory ``models/<method>[_J<J>]/run=<r>/`` holds and
what the tables' ``method`` column says. Its *ensemble kind* is what the
:class:`~sae_core.ensemble.Ensemble` object is (the step-matched expanded SAE is an
ordinary expanded SAE trained for longer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from sae_core.catalog import Catalog


@dataclass(frozen=True)
class Method:
    """One method of the comparison.

    name: the ``method`` column of every table and the model directory's name.
    kind: the Ensemble it is saved as (single, expanded, bagging or boosting).
    alpha: member weights: "mean" (α_j = 1/J, bagging) or "one" (α_j = 1).
    prefixes: scored at every prefix J = 1..J_max (bagging, boosting).
    matched_width: one SAE scored at the J whose width J·d_sae it matches; its model
        directory carries that J (``expanded_J8``).
    label, color, linestyle: how tables and figures show it.
    """

    name: str
    kind: Literal["single", "expanded", "bagging", "boosting"]
    alpha: Literal["mean", "one"]
    prefixes: bool
    matched_width: bool
    label: str
    color: str
    linestyle: str = "-"


#: every trained method, in the order tables and figures list them
METHODS: tuple[Method, ...] = (
    Method("single", "single", "one", prefixes=False, matched_width=False, label="single SAE", color="black", linestyle="--"),
    Method("expanded", "expanded", "one", prefixes=False, matched_width=True, label="expanded SAE", color="tab:green", linestyle=":"),
    Method(
        "expanded_compute_matched", "expanded", "one", prefixes=False, matched_width=True,
        label="expanded SAE, J× steps", color="tab:red", linestyle=":",
    ),
    Method("bagging", "bagging", "mean", prefixes=True, matched_width=False, label="bagging", color="tab:blue"),
    Method("boosting", "boosting", "one", prefixes=True, matched_width=False, label="boosting", color="tab:orange"),
    # the sanity check of the 2026 SAE literature: a frozen random unit-norm decoder with a
    # trained encoder, at the width (and sparsity) of a member (J = 1) or of J members
    Method(
        "random_decoder", "expanded", "one", prefixes=False, matched_width=True,
        label="random decoder (frozen)", color="tab:purple", linestyle="-.",
    ),
    # SAELens-format SAEs imported by the train stage (train.imported), not trained here:
    # one SAE per run, or a bagging ensemble of the members listed for a run
    Method("imported", "single", "one", prefixes=False, matched_width=False, label="imported SAE (SAELens)", color="tab:brown",
           linestyle="--"),
    Method("imported_bagging", "bagging", "mean", prefixes=True, matched_width=False, label="imported SAEs, bagged",
           color="tab:olive"),
)

#: the raw-activation baseline of the downstream tables (not a trained model)
RAW = Method("raw", "single", "one", prefixes=False, matched_width=False, label="raw activations", color="gray", linestyle="--")

MethodName = Literal["single", "expanded", "expanded_compute_matched", "bagging", "boosting", "random_decoder"]
METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
#: the methods the train stage trains (train.methods); the others are imported
TRAINED_METHOD_NAMES: tuple[str, ...] = get_args(MethodName)
ENSEMBLE_KINDS: tuple[str, ...] = ("single", "expanded", "bagging", "boosting")
#: the raw baseline first (downstream tables), then the trained methods
_TABLE_ORDER = Catalog((RAW, *METHODS), "method")
#: method(name) -> Method (a KeyError lists the known ones); method_rank(name) -> its
#: position in tables (raw first, unknown names last); ordered_methods(names) -> table order
method = _TABLE_ORDER.__getitem__
method_rank = _TABLE_ORDER.rank
ordered_methods = _TABLE_ORDER.ordered
