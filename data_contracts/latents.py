"""Contracts of the latent analyses' tables (issue 21), under ``latents/`` in the run directory.

Kinds (stored in each Parquet footer):

- ``latent_monosemanticity`` (latents/monosemanticity.parquet): method, model, member, latent,
  n_active (evaluation contexts where the latent is above its minimum), score ∈ [−1, 1] or
  null where undefined (the latent is above its minimum on fewer than two contexts). Methods
  include the baselines ``random_directions`` and ``neurons`` (model ``activations``, member 0).
  (method, model, member, latent) is unique.
- ``concept_cones`` (latents/cones.parquet): method, model, run, n_members (J), concept,
  dictionary ∈ {sae, random}, draw (0 for the SAE; the random dictionary's index),
  candidates (s), containment ∈ [0, 1], residual ∈ [0, 1], n_atoms ≥ 0, with
  containment = 1 − residual².
- ``sparse_head`` (latents/sparse_head.parquet): method, model, task, n_features,
  n_nonzero ≤ n_features, l1 > 0, accuracy and dense_accuracy (the dense head on the raw
  activations) ∈ [0, 1], n_train, n_test > 0.
- ``sparse_head_latents`` (latents/sparse_head_latents.parquet): method, model, task, rank ≥ 1,
  member, latent, weight ≠ 0, explanation (empty when none is known).
- ``steering`` (latents/steering.parquet): model, member, latent, prompt, strength (the
  multiple of the latent's typical activation), norm (‖α d_i‖ added) ≥ 0, generation, changed
  (whether it differs from strength 0's); strength 0 has norm 0 and changed false.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts.core import ARTIFACT_KEY, ContractViolation, Failure, arrow_table, check_schema, read_parquet, run_suite, write_parquet_atomic

MODEL_PATTERN = r"^(?:models/[a-z_]+(?:_J[0-9]+)?/run=[0-9]+|activations)$"
CONTAINMENT_TOL = 1e-9

SCHEMAS: dict[str, pa.Schema] = {
    "latent_monosemanticity": pa.schema([
        ("method", pa.string()), ("model", pa.string()), ("member", pa.int64()), ("latent", pa.int64()),
        ("n_active", pa.int64()), ("score", pa.float64()),
    ]),
    "concept_cones": pa.schema([
        ("method", pa.string()), ("model", pa.string()), ("run", pa.int64()), ("n_members", pa.int64()),
        ("concept", pa.string()), ("dictionary", pa.string()), ("draw", pa.int64()), ("candidates", pa.int64()),
        ("containment", pa.float64()), ("residual", pa.float64()), ("n_atoms", pa.int64()),
    ]),
    "sparse_head": pa.schema([
        ("method", pa.string()), ("model", pa.string()), ("task", pa.string()), ("n_features", pa.int64()),
        ("n_nonzero", pa.int64()), ("l1", pa.float64()), ("accuracy", pa.float64()), ("dense_accuracy", pa.float64()),
        ("n_train", pa.int64()), ("n_test", pa.int64()),
    ]),
    "sparse_head_latents": pa.schema([
        ("method", pa.string()), ("model", pa.string()), ("task", pa.string()), ("rank", pa.int64()),
        ("member", pa.int64()), ("latent", pa.int64()), ("weight", pa.float64()), ("explanation", pa.string()),
    ]),
    "steering": pa.schema([
        ("model", pa.string()), ("member", pa.int64()), ("latent", pa.int64()), ("prompt", pa.string()),
        ("strength", pa.float64()), ("norm", pa.float64()), ("generation", pa.string()), ("changed", pa.bool_()),
    ]),
}
KINDS = tuple(SCHEMAS)
UNIQUE = {
    "latent_monosemanticity": ["method", "model", "member", "latent"],
    "concept_cones": ["model", "concept", "dictionary", "draw", "n_members"],
    "sparse_head": ["model", "task"],
    "sparse_head_latents": ["model", "task", "rank"],
    "steering": ["model", "member", "latent", "prompt", "strength"],
}
NULLABLE = {("latent_monosemanticity", "score")}


def _expectations(kind: str) -> list:
    import great_expectations.expectations as gxe

    between = gxe.ExpectColumnValuesToBeBetween
    out = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in SCHEMAS[kind].names if (kind, c) not in NULLABLE]
    out.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=UNIQUE[kind]))
    if kind != "steering":
        out.append(gxe.ExpectColumnValuesToMatchRegex(column="model", regex=MODEL_PATTERN))
    if kind == "latent_monosemanticity":
        out += [between(column="member", min_value=0), between(column="latent", min_value=0),
                between(column="n_active", min_value=0), between(column="score", min_value=-1 - 1e-9, max_value=1 + 1e-9)]
    elif kind == "concept_cones":
        out += [gxe.ExpectColumnValuesToBeInSet(column="dictionary", value_set=["sae", "random"]),
                between(column="n_members", min_value=1), between(column="candidates", min_value=1),
                between(column="containment", min_value=0, max_value=1), between(column="residual", min_value=0, max_value=1),
                between(column="n_atoms", min_value=0)]
    elif kind == "sparse_head":
        out += [between(column=c, min_value=0, max_value=1) for c in ("accuracy", "dense_accuracy")]
        out += [between(column="l1", min_value=0, strict_min=True), between(column="n_nonzero", min_value=0),
                between(column="n_train", min_value=1), between(column="n_test", min_value=1)]
    elif kind == "sparse_head_latents":
        out += [between(column="rank", min_value=1), between(column="member", min_value=0), between(column="latent", min_value=0)]
    else:
        out += [between(column="member", min_value=0), between(column="latent", min_value=0),
                between(column="norm", min_value=0), gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1)]
    return out


def _relation_failures(frame: pd.DataFrame, kind: str) -> list[Failure]:
    """Relations between columns that no single expectation states."""
    bad: pd.Series | None = None
    what = ""
    if kind == "concept_cones":
        bad = (frame["containment"] - (1 - frame["residual"] ** 2)).abs() > CONTAINMENT_TOL
        what = "containment = 1 − residual²"
    elif kind == "sparse_head":
        bad, what = frame["n_nonzero"] > frame["n_features"], "n_nonzero ≤ n_features"
    elif kind == "sparse_head_latents":
        bad, what = frame["weight"] == 0, "a shown latent has a non-zero weight"
    elif kind == "steering":
        zero = frame["strength"] == 0
        bad, what = zero & ((frame["norm"] != 0) | frame["changed"]), "strength 0 adds nothing and changes nothing"
    if bad is not None and bad.any():
        return [Failure(what, "rows break it", int(bad.sum()), frame.loc[bad].head(5).to_dict("records"))]
    return []


def validate_frame(frame: pd.DataFrame, kind: str, artifact: str | Path) -> None:
    """Check ``frame`` against the schema and suite of ``kind``; raise ContractViolation naming ``artifact``."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown latent-analysis artifact kind {kind!r}; use one of {KINDS}")
    missing = [c for c in SCHEMAS[kind].names if c not in frame.columns]
    if missing:
        raise ContractViolation(artifact, [Failure("schema", f"missing columns {missing}; expected {SCHEMAS[kind].names}")])
    frame = frame[SCHEMAS[kind].names]
    failures: list[Failure] = []
    for field in SCHEMAS[kind]:
        if pa.types.is_floating(field.type):
            values = pd.to_numeric(frame[field.name], errors="coerce").to_numpy(dtype=float)
            bad = ~np.isfinite(values) & ~((kind, field.name) in NULLABLE and frame[field.name].isna().to_numpy())
            if bad.any():
                failures.append(Failure("finite values", f"column {field.name}", int(bad.sum()), values[bad].tolist()[:5]))
    if len(frame):
        failures += run_suite(kind, frame, _expectations(kind))
    if not failures:
        failures += _relation_failures(frame, kind)
    if failures:
        raise ContractViolation(artifact, failures)


def write_latent_table(frame: pd.DataFrame, path: Path, kind: str) -> str:
    """Validate, then write atomically (nothing is published when the contract fails); the sha256."""
    validate_frame(frame, kind, path)
    table = arrow_table(frame, SCHEMAS[kind], path)
    return write_parquet_atomic(table, Path(path), kind)


def read_latent_table(path: str | Path, kind: str | None = None) -> pd.DataFrame:
    """Read and validate a latent-analysis table; ``kind`` defaults to the one in its footer."""
    path = Path(path)
    table = read_parquet(path)
    stored = (table.schema.metadata or {}).get(ARTIFACT_KEY, b"").decode()
    kind = kind or stored
    if stored != kind or kind not in SCHEMAS:
        raise ContractViolation(path, [Failure("artifact kind", f"footer says {stored!r}, expected one of {KINDS}")])
    check_schema(table, SCHEMAS[kind], path)
    frame = table.to_pandas()
    validate_frame(frame, kind, path)
    return frame
