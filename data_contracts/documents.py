"""The labelled-documents contract: one row per document with its text, label and split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from data_contracts.core import read_parquet, ContractViolation, Failure, run_suite, write_parquet_atomic

ARTIFACT = "documents"
SPLITS = ("train", "val", "test")

SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string()), ("label", pa.string()),
     ("split", pa.string())]
)


def document_expectations(min_classes: int = 1) -> list:
    import great_expectations.expectations as gxe

    exps = [
        gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
        gxe.ExpectColumnValuesToBeUnique(column="doc_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
    ]
    if min_classes > 1:
        exps.append(gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=min_classes))
    return exps


def validate_documents_frame(frame: pd.DataFrame, artifact: str | Path, min_classes: int = 1) -> None:
    missing = [c for c in SCHEMA.names if c not in frame.columns]
    if missing:
        raise ContractViolation(artifact, [Failure("schema", f"missing columns {missing}")])
    if len(frame) == 0:
        raise ContractViolation(artifact, [Failure("has documents", "the document set is empty")])
    failures = run_suite("documents", frame[SCHEMA.names], document_expectations(min_classes))
    if failures:
        raise ContractViolation(artifact, failures)


def write_documents(frame: pd.DataFrame, path: Path, min_classes: int = 1) -> str:
    """Validate, then write atomically (nothing is published if the contract fails)."""
    validate_documents_frame(frame, path, min_classes)
    table = pa.Table.from_pandas(frame[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    return write_parquet_atomic(table, path, ARTIFACT)


def read_documents(path: str | Path, min_classes: int = 1) -> pd.DataFrame:
    path = Path(path)
    frame = read_parquet(path).to_pandas()
    validate_documents_frame(frame, path, min_classes)
    return frame
