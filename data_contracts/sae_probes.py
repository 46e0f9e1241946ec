"""Contracts of the sae-probes benchmark files (Kantamneni et al., *Are Sparse Autoencoders Useful?*).

The PyPI package ``sae-probes`` ships its datasets as zstd-compressed CSV files; they are
inputs of the downstream stage, read by :mod:`tasks.sae_probes`. Two kinds:

- ``sae_probes_listing``: the binary-classification rows of
  ``data/probing_datasets_MASTER.csv.zst``: tag (``Dataset Tag``), file (``Dataset save
  name`` + ``.zst``, under ``data/``), number (the file's numeric prefix). Tags and files
  unique; every file named ``cleaned_data/<number>_<...>.csv.zst``.
- ``sae_probes_tasks``: the rows of the selected tasks after cleaning (one frame, so one
  great-expectations run covers every task): task, row (the row in the file), prompt,
  target (as text). No nulls, non-empty prompts, (task, row) and (task, prompt) unique
  (the loader drops repeated prompts: the files repeat many, which would put one text in
  train and test), and exactly two target values per task (binary tasks).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data_contracts.core import ContractViolation, Failure, run_suite

LISTING_COLUMNS = ("tag", "file", "number")
TASK_COLUMNS = ("task", "row", "prompt", "target")
#: a file of the listing: cleaned_data/<number>_<tag>.csv.zst
FILE_PATTERN = r"^cleaned_data/[0-9]+_.+\.csv\.zst$"
KINDS = ("sae_probes_listing", "sae_probes_tasks")


def _expectations(kind: str) -> list:
    import great_expectations.expectations as gxe

    if kind == "sae_probes_listing":
        return [
            *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in LISTING_COLUMNS),
            gxe.ExpectColumnValuesToBeUnique(column="tag"),
            gxe.ExpectColumnValuesToBeUnique(column="file"),
            gxe.ExpectColumnValuesToMatchRegex(column="file", regex=FILE_PATTERN),
            gxe.ExpectColumnValuesToBeBetween(column="number", min_value=1),
        ]
    return [
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in TASK_COLUMNS),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["task", "row"]),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["task", "prompt"]),
        gxe.ExpectColumnValuesToBeBetween(column="row", min_value=0),
    ]


def _binary_failures(frame: pd.DataFrame) -> list[Failure]:
    """Every task has exactly two target values (not expressible as one expectation)."""
    counts = frame.groupby("task")["target"].nunique()
    bad = counts[counts != 2]
    if bad.empty:
        return []
    return [Failure("two target values per task", "tasks with another number of classes", len(bad),
                    [f"{t}: {n}" for t, n in bad.items()])]


def validate_sae_probes(frame: pd.DataFrame, kind: str, artifact: str | Path) -> None:
    """Check ``frame`` against the columns and suite of ``kind``; raise ContractViolation naming ``artifact``."""
    if kind not in KINDS:
        raise ValueError(f"unknown sae-probes kind {kind!r}; use one of {KINDS}")
    columns = LISTING_COLUMNS if kind == "sae_probes_listing" else TASK_COLUMNS
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ContractViolation(artifact, [Failure("schema", f"missing columns {missing}")])
    if len(frame) == 0:
        raise ContractViolation(artifact, [Failure("has rows", "the table is empty")])
    frame = frame[list(columns)]
    failures = run_suite(kind, frame, _expectations(kind))
    if kind == "sae_probes_tasks" and not failures:
        failures += _binary_failures(frame)
    if failures:
        raise ContractViolation(artifact, failures)
