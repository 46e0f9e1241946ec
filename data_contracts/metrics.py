"""Contracts of the evaluation stage's tables.

``metrics/intrinsic.parquet``: long table, one row per (method, n_members, run, metric)::

    method str, n_members int64, run int64, metric str, value float64

``metrics/summary.parquet``: one row per (method, n_members, metric) over the runs::

    method str, n_members int64, metric str, mean float64, ci_low float64 (null if n_runs < 2),
    ci_high float64 (null if n_runs < 2), n_runs int64

Every value is finite and inside its metric's range; (method, n_members, run, metric) is
unique; a row count of zero is a violation (the stage evaluated nothing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts.core import ContractViolation, Failure, read_parquet, run_suite, write_parquet_atomic
from sae_core.methods import METHOD_NAMES
from sae_core.metric_catalog import METRICS

INTRINSIC = "intrinsic_metrics"
SUMMARY = "metric_summary"

METHODS = METHOD_NAMES

#: metric -> (min, max) of its values; None = unbounded on that side (declared in sae_core.metric_catalog)
METRIC_RANGES: dict[str, tuple[float | None, float | None]] = {m.name: (m.low, m.high) for m in METRICS}

INTRINSIC_SCHEMA = pa.schema(
    [("method", pa.string()), ("n_members", pa.int64()), ("run", pa.int64()), ("metric", pa.string()), ("value", pa.float64())]
)
SUMMARY_SCHEMA = pa.schema(
    [("method", pa.string()), ("n_members", pa.int64()), ("metric", pa.string()), ("mean", pa.float64()),
     ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n_runs", pa.int64())]
)


def _range_expectations(column: str) -> list:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    exps = []
    for metric, (lo, hi) in METRIC_RANGES.items():
        if lo is None and hi is None:
            continue
        exps.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=column, min_value=lo, max_value=hi, row_condition=Column("metric") == metric
            )
        )
    return exps


def intrinsic_expectations() -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="method", value_set=list(METHODS)),
        gxe.ExpectColumnValuesToBeInSet(column="metric", value_set=list(METRIC_RANGES)),
        gxe.ExpectColumnValuesToBeBetween(column="n_members", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="run", min_value=0),
        gxe.ExpectColumnValuesToNotBeNull(column="value"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["method", "n_members", "run", "metric"]),
        *_range_expectations("value"),
    ]


def summary_expectations() -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="method", value_set=list(METHODS)),
        gxe.ExpectColumnValuesToBeInSet(column="metric", value_set=list(METRIC_RANGES)),
        gxe.ExpectColumnValuesToNotBeNull(column="mean"),
        gxe.ExpectColumnValuesToBeBetween(column="n_runs", min_value=1),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["method", "n_members", "metric"]),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="mean", column_B="ci_low", or_equal=True, ignore_row_if="either_value_is_missing"),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="ci_high", column_B="mean", or_equal=True, ignore_row_if="either_value_is_missing"),
    ]


def _check_frame(frame: pd.DataFrame, schema: pa.Schema, artifact: str | Path, suite: str, expectations: list) -> None:
    missing = [c for c in schema.names if c not in frame.columns]
    if missing:
        raise ContractViolation(artifact, [Failure("schema", f"missing columns {missing}; expected {schema.names}")])
    failures = []
    numeric = [f.name for f in schema if pa.types.is_floating(f.type)]
    for col in numeric:
        values = frame[col].to_numpy(dtype=float)
        bad = np.isinf(values) | (np.isnan(values) & (col in ("value", "mean")))
        if bad.any():
            failures.append(Failure("finite values", f"column {col} has non-finite values", int(bad.sum()), frame[bad].head(5).to_dict("records")))
    failures += run_suite(suite, frame[schema.names], expectations)
    if failures:
        raise ContractViolation(artifact, failures)


def write_intrinsic(frame: pd.DataFrame, path: Path) -> str:
    """Validate, then write atomically; nothing is published if the contract fails."""
    frame = frame[INTRINSIC_SCHEMA.names].reset_index(drop=True)
    _check_frame(frame, INTRINSIC_SCHEMA, path, INTRINSIC, intrinsic_expectations())
    return write_parquet_atomic(pa.Table.from_pandas(frame, schema=INTRINSIC_SCHEMA, preserve_index=False), path, INTRINSIC)


def write_summary(frame: pd.DataFrame, path: Path) -> str:
    frame = frame[SUMMARY_SCHEMA.names].reset_index(drop=True)
    _check_frame(frame, SUMMARY_SCHEMA, path, SUMMARY, summary_expectations())
    return write_parquet_atomic(pa.Table.from_pandas(frame, schema=SUMMARY_SCHEMA, preserve_index=False), path, SUMMARY)


def _read(path: str | Path, schema: pa.Schema) -> pd.DataFrame:
    return read_parquet(Path(path), schema).to_pandas()


def read_intrinsic(path: str | Path) -> pd.DataFrame:
    frame = _read(path, INTRINSIC_SCHEMA)
    _check_frame(frame, INTRINSIC_SCHEMA, path, INTRINSIC, intrinsic_expectations())
    return frame


def read_summary(path: str | Path) -> pd.DataFrame:
    frame = _read(path, SUMMARY_SCHEMA)
    _check_frame(frame, SUMMARY_SCHEMA, path, SUMMARY, summary_expectations())
    return frame
