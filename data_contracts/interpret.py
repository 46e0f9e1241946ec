"""Contracts of the interpret stage's tables (``interpret/``).

``interpret/transcript.parquet`` (kind ``interpret_transcript``): every LLM call, so a run is
auditable and re-scorable::

    model str, method str, member int64, latent int64   the latent the call is about
    step str        explain, propose, revise (SAGE refinement), detect or fuzz
    item int64      index within the step (refinement: the round)
    kind str        generate or judge;  max_new_tokens int64  the call's token budget
    prompt_key str  sae_core.llm.prompt_key(kind, prompt, max_new_tokens): what `recorded` replays by
    prompt str, answer str;  p_yes float64  P(yes) of a judgement (null: not given by the backend)
    truth bool      detect: the context activates; fuzz: the marks are right (null for generate)
    backend str     the LLM that answered

``interpret/explanations.parquet`` (kind ``interpret_explanations``): one row per explained
latent: model, method, member, latent, frequency, frequency_bin, explanation, backend,
detection_accuracy / fuzzing_accuracy (balanced, in [0, 1]; null without items),
detection_auroc / fuzzing_auroc (null without P(yes) or without both classes), n_detection,
n_fuzzing, refine_rounds (rounds run).

``interpret/summary.parquet`` (kind ``interpret_summary``): per method, member position
(first, last, all) and score: n latents, mean and t-interval [ci_low, ci_high] at
``confidence`` (null with fewer than 2 latents).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts.contexts import MODEL_DIR_PATTERN
from data_contracts.core import ContractViolation, Failure, arrow_table, read_parquet, run_suite, write_parquet_atomic

LATENT = [("model", pa.string()), ("method", pa.string()), ("member", pa.int64()), ("latent", pa.int64())]
SCORES = ("detection_accuracy", "detection_auroc", "fuzzing_accuracy", "fuzzing_auroc")
STEPS = ("explain", "propose", "revise", "detect", "fuzz")
POSITIONS = ("first", "last", "all")

TRANSCRIPT = pa.schema(LATENT + [
    ("step", pa.string()), ("item", pa.int64()), ("kind", pa.string()), ("max_new_tokens", pa.int64()), ("prompt_key", pa.string()),
    ("prompt", pa.string()), ("answer", pa.string()), ("p_yes", pa.float64()), ("truth", pa.bool_()), ("backend", pa.string())])
EXPLANATIONS = pa.schema(LATENT + [
    ("frequency", pa.float64()), ("frequency_bin", pa.int64()), ("explanation", pa.string()), ("backend", pa.string()),
    *((s, pa.float64()) for s in SCORES), ("n_detection", pa.int64()), ("n_fuzzing", pa.int64()), ("refine_rounds", pa.int64())])
SUMMARY = pa.schema([("method", pa.string()), ("position", pa.string()), ("score", pa.string()), ("n_latents", pa.int64()),
                     ("mean", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("confidence", pa.float64())])

#: kind -> (schema, columns that may be null, unique key)
KINDS: dict[str, tuple[pa.Schema, tuple[str, ...], list[str]]] = {
    "interpret_transcript": (TRANSCRIPT, ("p_yes", "truth"), ["model", "member", "latent", "step", "item"]),
    "interpret_explanations": (EXPLANATIONS, SCORES, ["model", "member", "latent"]),
    "interpret_summary": (SUMMARY, ("ci_low", "ci_high"), ["method", "position", "score"]),
}


def expectations(kind: str) -> list:
    import great_expectations.expectations as gxe

    schema, nullable, key = KINDS[kind]
    found = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in schema.names if c not in nullable]
    found.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=key))
    if "model" in schema.names:
        found += [gxe.ExpectColumnValuesToMatchRegex(column="model", regex=MODEL_DIR_PATTERN),
                  gxe.ExpectColumnValuesToBeBetween(column="member", min_value=0),
                  gxe.ExpectColumnValuesToBeBetween(column="latent", min_value=0)]
    if kind == "interpret_transcript":
        found += [gxe.ExpectColumnValuesToBeInSet(column="step", value_set=list(STEPS)),
                  gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=["generate", "judge"]),
                  gxe.ExpectColumnValuesToBeBetween(column="p_yes", min_value=0, max_value=1),
                  gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1)]
    if kind == "interpret_explanations":
        found += [gxe.ExpectColumnValuesToBeBetween(column=s, min_value=0, max_value=1) for s in SCORES]
        found += [gxe.ExpectColumnValueLengthsToBeBetween(column="explanation", min_value=1),
                  gxe.ExpectColumnValuesToBeBetween(column="frequency", min_value=0, max_value=1, strict_min=True)]
    if kind == "interpret_summary":
        found += [gxe.ExpectColumnValuesToBeInSet(column="score", value_set=list(SCORES)),
                  gxe.ExpectColumnValuesToBeInSet(column="position", value_set=list(POSITIONS)),
                  gxe.ExpectColumnValuesToBeBetween(column="n_latents", min_value=1)]
    return found


def _extra_failures(kind: str, frame: pd.DataFrame) -> list[Failure]:
    failures = []
    if kind == "interpret_transcript":
        judged = frame["kind"] == "judge"
        bad = judged == frame["truth"].isna()  # a judgement has a truth, a generation none
        if bad.any():
            failures.append(Failure("truth exactly for judgements", "", int(bad.sum())))
    if kind == "interpret_summary":
        low, mean, high = (frame[c].astype(float) for c in ("ci_low", "mean", "ci_high"))
        bad = (low > mean + 1e-12) | (high < mean - 1e-12)
        if bad.any():
            failures.append(Failure("ci_low <= mean <= ci_high", "", int(bad.sum()), frame.loc[bad, ["method", "score"]].to_dict("records")[:5]))
    return failures


def validate_interpret(frame: pd.DataFrame, kind: str, artifact: str | Path) -> None:
    """Check ``frame`` against the ``kind``'s schema and suite; raise ContractViolation naming ``artifact``."""
    schema = KINDS[kind][0]
    missing = [c for c in schema.names if c not in frame.columns]
    if missing:
        raise ContractViolation(artifact, [Failure("schema", f"missing columns {missing}; expected {schema.names}")])
    frame = frame[schema.names].reset_index(drop=True)
    floats = [f.name for f in schema if f.type == pa.float64()]
    failures = []
    for column in floats:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        bad = np.isinf(values)
        if bad.any():
            failures.append(Failure("finite values", f"column {column}", int(bad.sum())))
    failures += run_suite(kind, frame, expectations(kind))
    if not failures:
        failures += _extra_failures(kind, frame)
    if failures:
        raise ContractViolation(artifact, failures)


def write_interpret(frame: pd.DataFrame, kind: str, path: Path) -> str:
    """Validate, then write atomically; the sha256."""
    validate_interpret(frame, kind, path)
    schema = KINDS[kind][0]
    table = arrow_table(frame, schema, path)
    return write_parquet_atomic(table, Path(path), kind)


def read_interpret(path: str | Path, kind: str) -> pd.DataFrame:
    path = Path(path)
    frame = read_parquet(path, KINDS[kind][0]).to_pandas()
    validate_interpret(frame, kind, path)
    return frame
