"""Contract of the evaluate stage's latent contexts, ``metrics/latent_contexts.parquet``: what
the interpret stage explains and scores latents from.

One row per (model, member, latent, kind, rank), for a seeded sample of latents per model
(run 0 of each method) and member, stratified by firing frequency::

    model str            the model directory, e.g. "models/bagging/run=0"
    method str           its method ("bagging", "expanded" for models/expanded_J8/run=0, ...)
    member int64         the member j (0-based)
    latent int64         the latent's index in that member's dictionary
    frequency float64    fraction of the searched tokens on which the latent fires, in (0, 1]
    frequency_bin int64  its equal-count frequency bin among the member's firing latents (0: rarest)
    kind str             top (strongest codes), random (a seeded sample of its other non-zero
                         codes) or negative (a token whose whole context window has code 0)
    rank int64           1, 2, ... within (model, member, latent, kind); top: by falling activation
    activation float64   the latent's code at the context's token: > 0 for top/random, 0 for negative
    doc_id str, position int32  where that token is (as in the activation shards)
    center int64         index of that token in ``pieces``
    pieces list<str>     the context window's tokens (the tokenizer's pieces), in order
    activations list<float64>  the latent's code at each of ``pieces`` (same length, ≥ 0)

No scalar column is null; (model, member, latent, kind, rank) is unique; one frequency and
frequency bin per latent; top activations do not increase with rank; a negative's window
codes are all 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts.contexts import MODEL_DIR_PATTERN
from data_contracts.core import ContractViolation, Failure, arrow_table, read_parquet, run_suite, write_parquet_atomic

KIND = "latent_contexts"
CONTEXT_KINDS = ("top", "random", "negative")
LATENT = ["model", "member", "latent"]
KEY = [*LATENT, "kind", "rank"]

SCHEMA = pa.schema(
    [("model", pa.string()), ("method", pa.string()), ("member", pa.int64()), ("latent", pa.int64()),
     ("frequency", pa.float64()), ("frequency_bin", pa.int64()), ("kind", pa.string()), ("rank", pa.int64()),
     ("activation", pa.float64()), ("doc_id", pa.string()), ("position", pa.int32()), ("center", pa.int64()),
     ("pieces", pa.list_(pa.string())), ("activations", pa.list_(pa.float64()))]
)
SCALARS = [name for name in SCHEMA.names if name not in ("pieces", "activations")]


def expectations() -> list:
    import great_expectations.expectations as gxe

    return [
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in SCALARS),
        gxe.ExpectColumnValuesToMatchRegex(column="model", regex=MODEL_DIR_PATTERN),
        gxe.ExpectColumnValuesToBeBetween(column="member", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="latent", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="frequency", min_value=0, max_value=1, strict_min=True),
        gxe.ExpectColumnValuesToBeBetween(column="frequency_bin", min_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=list(CONTEXT_KINDS)),
        gxe.ExpectColumnValuesToBeBetween(column="rank", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="activation", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="position", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="center", min_value=0),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=KEY),
    ]


def _row_failures(frame: pd.DataFrame) -> list[Failure]:
    """What one expectation cannot say: the windows, the kinds' activations, the ordering."""
    failures = []
    lengths = frame["pieces"].map(len)
    bad = (lengths != frame["activations"].map(len)) | (lengths == 0) | (frame["center"] >= lengths)
    if bad.any():
        failures.append(Failure("window shape", "pieces and activations of one length, center inside it", int(bad.sum()),
                                frame.loc[bad, KEY].to_dict("records")[:5]))
        return failures
    at_center = np.array([a[c] for a, c in zip(frame["activations"], frame["center"])], dtype=float)
    windows = [np.asarray(a, dtype=float) for a in frame["activations"]]
    checks = {
        "window codes finite and >= 0": np.array([not (np.isfinite(w).all() and (w >= 0).all()) for w in windows]),
        "activation is the center's code": ~np.isclose(at_center, frame["activation"].to_numpy(dtype=float)),
        "top/random contexts activate": (frame["kind"] != "negative").to_numpy() & (frame["activation"].to_numpy() <= 0),
        "a negative's window has code 0": (frame["kind"] == "negative").to_numpy() & np.array([w.max() > 0 for w in windows]),
    }
    for name, mask in checks.items():
        if mask.any():
            failures.append(Failure(name, f"{int(mask.sum())} rows", int(mask.sum()), frame.loc[mask, KEY].to_dict("records")[:5]))
    per_latent = frame.groupby(LATENT)[["frequency", "frequency_bin"]].nunique()
    if (per_latent > 1).any(axis=None):
        failures.append(Failure("one frequency per latent", "several frequencies or bins for one (model, member, latent)"))
    top = frame[frame["kind"] == "top"].sort_values([*LATENT, "rank"])
    rising = top.groupby(LATENT)["activation"].diff() > 0
    if rising.any():
        failures.append(Failure("top activation falls with rank", "a higher rank has a larger activation", int(rising.sum()),
                                top.loc[rising, KEY].to_dict("records")[:5]))
    return failures


def validate_latent_contexts(frame: pd.DataFrame, artifact: str | Path) -> None:
    """Check ``frame`` against the schema and suite; raise ContractViolation naming ``artifact``."""
    missing = [c for c in SCHEMA.names if c not in frame.columns]
    if missing:
        raise ContractViolation(artifact, [Failure("schema", f"missing columns {missing}; expected {SCHEMA.names}")])
    bad = ~np.isfinite(pd.to_numeric(frame["frequency"], errors="coerce").to_numpy(dtype=float))
    failures = [Failure("finite values", "column frequency", int(bad.sum()))] if bad.any() else []
    failures += run_suite(KIND, frame[SCALARS].reset_index(drop=True), expectations())
    if not failures and len(frame):
        failures += _row_failures(frame.reset_index(drop=True))
    if failures:
        raise ContractViolation(artifact, failures)


def write_latent_contexts(frame: pd.DataFrame, path: Path) -> str:
    """Validate, then write atomically (nothing is published when the contract fails); the sha256."""
    validate_latent_contexts(frame, path)
    table = arrow_table(frame, SCHEMA, path)
    return write_parquet_atomic(table, Path(path), KIND)


def read_latent_contexts(path: str | Path) -> pd.DataFrame:
    """Read and validate ``metrics/latent_contexts.parquet`` (list columns as Python lists)."""
    path = Path(path)
    frame = read_parquet(path, SCHEMA).to_pandas()
    for column in ("pieces", "activations"):
        frame[column] = frame[column].map(list)
    validate_latent_contexts(frame, path)
    return frame
