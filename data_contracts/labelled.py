"""Contracts of the downstream stage: labelled document sets and the result tables.

Kinds (stored in each Parquet footer, so :func:`data_contracts.validate` dispatches):

- ``labelled_probing``: doc_id, dataset, text, label, split ∈ {train, test}; every class
  has the same number of documents in each split (balanced sets).
- ``labelled_scr``: the same plus document (the source document of a row: a BBC
  paragraph's article), spurious (e.g. gender), y and z (0/1) and split ∈
  {train_biased, train_balanced, test}. The intended correlations are part of the
  contract: y = z on every train_biased row; the four (y, z) cells equal in
  train_balanced and in test; y a function of label, z of spurious; splits take whole
  documents (no document in two splits).
- ``probing_results``: method, n_members, run, dataset, class, k, accuracy ∈ [0, 1].
- ``scr_results``: method, n_members, run, pair, n_ablated, acc_base, acc_ablated,
  acc_oracle ∈ [0, 1], score finite.
- ``scr_cells``: pair, label, spurious, y, z, available, train_biased, train_balanced, test.
- ``scr_pairs``: pair, acc_base, acc_oracle ∈ [0, 1], headroom = acc_oracle − acc_base,
  min_headroom, conditioned (headroom ≥ min_headroom: the pair is scored; the others
  have no headroom and are left out of every mean and figure), n_test; one row per pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.core import ARTIFACT_KEY, ContractViolation, Failure, arrow_table, check_schema, read_parquet, run_suite, write_parquet_atomic

PROBING_SPLITS = ("train", "test")
SCR_SPLITS = ("train_biased", "train_balanced", "test")

SCHEMAS: dict[str, pa.Schema] = {
    "labelled_probing": pa.schema(
        [("doc_id", pa.string()), ("dataset", pa.string()), ("text", pa.string()), ("label", pa.string()), ("split", pa.string())]
    ),
    "labelled_scr": pa.schema(
        [
            ("doc_id", pa.string()), ("document", pa.string()), ("dataset", pa.string()), ("text", pa.string()),
            ("label", pa.string()), ("spurious", pa.string()), ("y", pa.int8()), ("z", pa.int8()), ("split", pa.string()),
        ]
    ),
    "probing_results": pa.schema(
        [
            ("method", pa.string()), ("n_members", pa.int32()), ("run", pa.int32()), ("dataset", pa.string()),
            ("class", pa.string()), ("k", pa.int32()), ("accuracy", pa.float64()),
        ]
    ),
    "scr_results": pa.schema(
        [
            ("method", pa.string()), ("n_members", pa.int32()), ("run", pa.int32()), ("pair", pa.string()),
            ("n_ablated", pa.int32()), ("acc_base", pa.float64()), ("acc_ablated", pa.float64()),
            ("acc_oracle", pa.float64()), ("score", pa.float64()),
        ]
    ),
    "scr_cells": pa.schema(
        [
            ("pair", pa.string()), ("label", pa.string()), ("spurious", pa.string()), ("y", pa.int8()), ("z", pa.int8()),
            ("available", pa.int32()), ("train_biased", pa.int32()), ("train_balanced", pa.int32()), ("test", pa.int32()),
        ]
    ),
    "scr_pairs": pa.schema(
        [
            ("pair", pa.string()), ("acc_base", pa.float64()), ("acc_oracle", pa.float64()), ("headroom", pa.float64()),
            ("min_headroom", pa.float64()), ("conditioned", pa.bool_()), ("n_test", pa.int32()),
        ]
    ),
}
KINDS = tuple(SCHEMAS)


def _expectations(kind: str) -> list:
    import great_expectations.expectations as gxe

    cols = SCHEMAS[kind].names
    exps: list = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in cols]
    if kind in ("labelled_probing", "labelled_scr"):
        splits = PROBING_SPLITS if kind == "labelled_probing" else SCR_SPLITS
        exps += [
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1),
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(splits)),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["doc_id", "split"]),
            gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2),
        ]
        if kind == "labelled_scr":
            exps += [
                gxe.ExpectColumnValuesToBeInSet(column="y", value_set=[0, 1]),
                gxe.ExpectColumnValuesToBeInSet(column="z", value_set=[0, 1]),
                gxe.ExpectColumnUniqueValueCountToBeBetween(column="spurious", min_value=2, max_value=2),
            ]
    elif kind == "probing_results":
        exps += [
            gxe.ExpectColumnValuesToBeBetween(column="accuracy", min_value=0, max_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="k", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="n_members", min_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="run", min_value=0),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["method", "n_members", "run", "dataset", "class", "k"]),
        ]
    elif kind == "scr_results":
        exps += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1) for c in ("acc_base", "acc_ablated", "acc_oracle")]
        exps += [
            gxe.ExpectColumnValuesToBeBetween(column="n_ablated", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="n_members", min_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="run", min_value=0),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["method", "n_members", "run", "pair", "n_ablated"]),
        ]
    elif kind == "scr_cells":
        exps += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0) for c in ("available", "train_biased", "train_balanced", "test")]
        exps += [
            gxe.ExpectColumnValuesToBeInSet(column="y", value_set=[0, 1]),
            gxe.ExpectColumnValuesToBeInSet(column="z", value_set=[0, 1]),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["pair", "y", "z"]),
        ]
    elif kind == "scr_pairs":
        exps += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1) for c in ("acc_base", "acc_oracle")]
        exps += [
            gxe.ExpectColumnValuesToBeBetween(column="headroom", min_value=-1, max_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="n_test", min_value=1),
            gxe.ExpectColumnValuesToBeUnique(column="pair"),
        ]
    return exps


def _balance_failures(frame: pd.DataFrame, kind: str) -> list[Failure]:
    """The label structure the downstream maths relies on (not expressible as one expectation)."""
    failures: list[Failure] = []
    for dataset, d in frame.groupby("dataset"):
        if kind == "labelled_probing":
            for split, s in d.groupby("split"):
                counts = s["label"].value_counts()
                if counts.nunique() > 1:
                    failures.append(Failure("classes balanced", f"dataset {dataset}, split {split}: counts {counts.to_dict()}", int(counts.max() - counts.min())))
            missing = set(d["label"]) - set(d.loc[d["split"] == "test", "label"]) | set(d["label"]) - set(d.loc[d["split"] == "train", "label"])
            if missing:
                failures.append(Failure("every class in both splits", f"dataset {dataset}: classes {sorted(missing)} missing from a split"))
            overlap = set(d.loc[d["split"] == "train", "doc_id"]) & set(d.loc[d["split"] == "test", "doc_id"])
            if overlap:
                failures.append(Failure("train and test disjoint", f"dataset {dataset}", len(overlap), sorted(overlap)[:5]))
            continue
        biased = d[d["split"] == "train_biased"]
        bad = biased[biased["y"] != biased["z"]]
        if len(bad):
            failures.append(Failure("train_biased has y = z", f"dataset {dataset}", len(bad), bad["doc_id"].tolist()[:5]))
        for split in ("train_balanced", "test"):
            cells = d[d["split"] == split].groupby(["y", "z"]).size()
            if len(cells) != 4 or cells.nunique() != 1:
                failures.append(Failure(f"{split} balanced over (y, z)", f"dataset {dataset}: cells {cells.to_dict()}"))
        for label_col, code in (("label", "y"), ("spurious", "z")):
            mapping = d.groupby(label_col)[code].nunique()
            if (mapping > 1).any() or d.groupby(code)[label_col].nunique().gt(1).any():
                failures.append(Failure(f"{code} encodes {label_col}", f"dataset {dataset}: {label_col} ↔ {code} is not one-to-one"))
        shared = d.groupby("document")["split"].nunique()
        shared = shared[shared > 1]
        if len(shared):
            failures.append(Failure("splits share no document", f"dataset {dataset}", len(shared), sorted(shared.index)[:5]))
    return failures


def _headroom_failures(frame: pd.DataFrame) -> list[Failure]:
    """scr_pairs: headroom = acc_oracle − acc_base, and conditioned = headroom ≥ min_headroom."""
    failures = []
    wrong = ~np.isclose(frame["headroom"], frame["acc_oracle"] - frame["acc_base"], atol=1e-9)
    if wrong.any():
        failures.append(Failure("headroom = acc_oracle − acc_base", "rows disagree", int(wrong.sum()), frame.loc[wrong, "pair"].tolist()[:5]))
    flag = frame["headroom"] >= frame["min_headroom"] - 1e-12
    bad = flag != frame["conditioned"].astype(bool)
    if bad.any():
        failures.append(Failure("conditioned = headroom ≥ min_headroom", "rows disagree", int(bad.sum()), frame.loc[bad, "pair"].tolist()[:5]))
    return failures


def validate_frame(frame: pd.DataFrame, kind: str, artifact: str | Path) -> None:
    """Check ``frame`` against the schema and suite of ``kind``; raise ContractViolation."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown downstream artifact kind {kind!r}; use one of {KINDS}")
    missing = [c for c in SCHEMAS[kind].names if c not in frame.columns]
    if missing:
        raise ContractViolation(artifact, [Failure("schema", f"missing columns {missing}")])
    if len(frame) == 0:
        raise ContractViolation(artifact, [Failure("has rows", "the table is empty")])
    frame = frame[SCHEMAS[kind].names]
    failures: list[Failure] = []
    numeric = [f.name for f in SCHEMAS[kind] if pa.types.is_floating(f.type)]
    for c in numeric:
        bad = ~np.isfinite(pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float))
        if bad.any():
            failures.append(Failure("finite values", f"column {c}", int(bad.sum()), frame.loc[bad, c].tolist()[:5]))
    failures += run_suite(kind, frame, _expectations(kind))
    if kind in ("labelled_probing", "labelled_scr") and not failures:
        failures += _balance_failures(frame, kind)
    if kind == "scr_pairs" and not failures:
        failures += _headroom_failures(frame)
    if failures:
        raise ContractViolation(artifact, failures)


def write_table(frame: pd.DataFrame, path: Path, kind: str, metadata: dict[str, str] | None = None) -> str:
    """Validate, then write atomically (nothing is published when the contract fails)."""
    validate_frame(frame, kind, path)
    table = arrow_table(frame, SCHEMAS[kind], path)
    return write_parquet_atomic(table, Path(path), kind, metadata)


def read_table(path: str | Path, kind: str | None = None) -> pd.DataFrame:
    """Read and validate a downstream table; ``kind`` defaults to the one in its footer."""
    path = Path(path)
    table = read_parquet(path)
    stored = (table.schema.metadata or {}).get(ARTIFACT_KEY, b"").decode()
    kind = kind or stored
    if stored != kind:
        raise ContractViolation(path, [Failure("artifact kind", f"footer says {stored!r}, expected {kind!r}")])
    expected = SCHEMAS.get(kind)
    if expected is None:
        raise ContractViolation(path, [Failure("known artifact kind", f"no downstream contract for {kind!r}")])
    check_schema(table, expected, path)
    frame = table.to_pandas()
    validate_frame(frame, kind, path)
    return frame


def table_metadata(path: str | Path, key: str) -> str | None:
    """A value stored in the footer by :func:`write_table` (None when absent or unreadable)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = meta.get(key.encode())
    return value.decode() if value is not None else None
