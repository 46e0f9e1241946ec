"""Contract of the evaluation stage's top-activating contexts, ``metrics/top_contexts.parquet``.

One row per (model, member, latent, rank): the rank-th strongest activation of one latent
of one member on the evaluation tokens, with the text around that token::

    model str        the model directory, e.g. "models/bagging/run=0"
    member int64     the member j (0-based)
    latent int64     the latent's index in that member's dictionary (0 ≤ latent < d_sae)
    frequency float64  fraction of the evaluated tokens on which the latent fires, in [0, 1]
    rank int64       1 for the latent's strongest token, 2 for the next, ...
    activation float64 the latent's code at that token, > 0
    doc_id str, position int32  where the token is (as in the activation shards)
    context str      the tokens around it, the token itself marked [[like this]]

No column is null; (model, member, latent, rank) is unique; within one (model, member,
latent) the frequency is one value and activations do not increase with rank. An empty
table is allowed: no selected latent fired on any evaluated token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts.core import ContractViolation, Failure, arrow_table, read_parquet, run_suite, write_parquet_atomic

KIND = "top_contexts"
MODEL_DIR_PATTERN = r"^models/[a-z_]+(?:_J[0-9]+)?/run=[0-9]+$"
GROUP = ["model", "member", "latent"]

SCHEMA = pa.schema(
    [("model", pa.string()), ("member", pa.int64()), ("latent", pa.int64()), ("frequency", pa.float64()),
     ("rank", pa.int64()), ("activation", pa.float64()), ("doc_id", pa.string()),
     ("position", pa.int32()), ("context", pa.string())]
)


def expectations() -> list:
    import great_expectations.expectations as gxe

    return [
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in SCHEMA.names),
        gxe.ExpectColumnValuesToMatchRegex(column="model", regex=MODEL_DIR_PATTERN),
        gxe.ExpectColumnValuesToBeBetween(column="member", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="latent", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="frequency", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="rank", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="activation", min_value=0, strict_min=True),
        gxe.ExpectColumnValuesToBeBetween(column="position", min_value=0),
        gxe.ExpectColumnValueLengthsToBeBetween(column="context", min_value=1),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=[*GROUP, "rank"]),
    ]


def _order_failures(frame: pd.DataFrame) -> list[Failure]:
    """One frequency per latent, activations non-increasing with rank (not one expectation)."""
    failures = []
    frequencies = frame.groupby(GROUP)["frequency"].nunique()
    if (frequencies > 1).any():
        bad = frequencies[frequencies > 1].index.tolist()
        failures.append(Failure("one frequency per latent", "several frequencies for one (model, member, latent)", len(bad), bad[:5]))
    ranked = frame.sort_values([*GROUP, "rank"])
    rising = ranked.groupby(GROUP)["activation"].diff() > 0
    if rising.any():
        failures.append(Failure("activation falls with rank", "a higher rank has a larger activation", int(rising.sum()),
                                ranked.loc[rising, [*GROUP, "rank"]].to_dict("records")[:5]))
    return failures


def validate_contexts(frame: pd.DataFrame, artifact: str | Path) -> None:
    """Check ``frame`` against the schema and suite; raise ContractViolation naming ``artifact``."""
    missing = [c for c in SCHEMA.names if c not in frame.columns]
    if missing:
        raise ContractViolation(artifact, [Failure("schema", f"missing columns {missing}; expected {SCHEMA.names}")])
    frame = frame[SCHEMA.names]
    failures = []
    for column in ("frequency", "activation"):
        bad = ~np.isfinite(pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float))
        if bad.any():
            failures.append(Failure("finite values", f"column {column}", int(bad.sum()), frame.loc[bad, column].tolist()[:5]))
    failures += run_suite(KIND, frame, expectations())
    if not failures:
        failures += _order_failures(frame)
    if failures:
        raise ContractViolation(artifact, failures)


def write_contexts(frame: pd.DataFrame, path: Path) -> str:
    """Validate, then write atomically (nothing is published when the contract fails); the sha256."""
    validate_contexts(frame, path)
    table = arrow_table(frame, SCHEMA, path)
    return write_parquet_atomic(table, Path(path), KIND)


def read_contexts(path: str | Path) -> pd.DataFrame:
    """Read and validate ``metrics/top_contexts.parquet``."""
    path = Path(path)
    frame = read_parquet(path, SCHEMA).to_pandas()
    validate_contexts(frame, path)
    return frame
