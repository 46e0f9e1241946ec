"""Contract of the sweep flow's table, ``sweep/results.parquet`` (:mod:`flows.sweep`).

One row per scored SAE: a grid point's seed (round 0), or a population member after each
round (round 1..rounds)::

    mode str (grid | population), point int64 (grid point or population member), seed int64,
    round int64, params str (JSON of the swept keys' values), architecture str, d_sae int64,
    k int64 (0: the architecture has no k), lr float64, sparsity_coefficient float64,
    steps int64 (optimizer steps the SAE has had), tokens int64 (steps × batch size),
    explained_variance float64, explained_variance_total float64, mse float64, l0 float64,
    dead_fraction float64, c_dec float64, stability float64 (null with fewer than 2 seeds),
    score float64 (the sweep's objective, higher is better)

Every value but stability is present and finite; (mode, point, seed, round) is unique;
fractions and cosines lie in [0, 1]; a table without rows is a violation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts.core import ContractViolation, Failure, read_parquet, run_suite, write_parquet_atomic

SWEEP_RESULTS = "sweep_results"

SCHEMA = pa.schema([
    ("mode", pa.string()), ("point", pa.int64()), ("seed", pa.int64()), ("round", pa.int64()), ("params", pa.string()),
    ("architecture", pa.string()), ("d_sae", pa.int64()), ("k", pa.int64()), ("lr", pa.float64()),
    ("sparsity_coefficient", pa.float64()), ("steps", pa.int64()), ("tokens", pa.int64()),
    ("explained_variance", pa.float64()), ("explained_variance_total", pa.float64()), ("mse", pa.float64()),
    ("l0", pa.float64()), ("dead_fraction", pa.float64()), ("c_dec", pa.float64()), ("stability", pa.float64()),
    ("score", pa.float64()),
])
#: the one column that may be null (a point with one seed has no stability across seeds)
NULLABLE = ("stability",)


def expectations() -> list:
    import great_expectations.expectations as gxe

    exps = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=["grid", "population"]),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["mode", "point", "seed", "round"]),
        gxe.ExpectColumnValuesToBeBetween(column="point", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="round", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="d_sae", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="k", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="lr", min_value=0, strict_min=True),
        gxe.ExpectColumnValuesToBeBetween(column="sparsity_coefficient", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="steps", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="tokens", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="mse", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="l0", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="explained_variance", max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="explained_variance_total", max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="dead_fraction", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="c_dec", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="stability", min_value=0, max_value=1),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="tokens", column_B="steps", or_equal=True),
    ]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in SCHEMA.names if c not in NULLABLE]
    return exps


def check_results(frame: pd.DataFrame, artifact: str | Path) -> None:
    """Raise ContractViolation naming ``artifact``, the failed expectations and sample rows."""
    missing = [c for c in SCHEMA.names if c not in frame.columns]
    if missing:
        raise ContractViolation(artifact, [Failure("schema", f"missing columns {missing}; expected {SCHEMA.names}")])
    failures = []
    for field in SCHEMA:
        if pa.types.is_floating(field.type):
            values = frame[field.name].to_numpy(dtype=float)
            bad = np.isinf(values) | (np.isnan(values) & (field.name not in NULLABLE))
            if bad.any():
                failures.append(Failure("finite values", f"column {field.name} has non-finite values", int(bad.sum()),
                                        frame[bad].head(5).to_dict("records")))
    failures += run_suite(SWEEP_RESULTS, frame[SCHEMA.names], expectations())
    if failures:
        raise ContractViolation(artifact, failures)


def write_results(frame: pd.DataFrame, path: Path) -> str:
    """Validate, then write atomically (nothing is written if the contract fails); returns the sha256."""
    frame = frame[SCHEMA.names].reset_index(drop=True)
    check_results(frame, path)
    return write_parquet_atomic(pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False), Path(path), SWEEP_RESULTS)


def read_results(path: str | Path) -> pd.DataFrame:
    """Read and validate ``sweep/results.parquet``."""
    frame = read_parquet(Path(path), SCHEMA).to_pandas()
    check_results(frame, path)
    return frame
