"""Shared machinery of the contracts: the violation error, great-expectations runs, atomic writes."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sae_core.hashing import file_sha256  # noqa: F401  (re-exported: one definition of a file hash)

ARTIFACT_KEY = b"sae_ensembles.artifact"


@dataclass
class Failure:
    """One failed expectation: what was expected and sample offending values."""

    expectation: str
    detail: str
    unexpected_count: int | None = None
    samples: list[Any] = field(default_factory=list)

    def __str__(self) -> str:
        count = f" ({self.unexpected_count} rows)" if self.unexpected_count is not None else ""
        sample = f"; sample: {self.samples[:5]}" if self.samples else ""
        return f"{self.expectation}: {self.detail}{count}{sample}"


class ContractViolation(ValueError):
    """An artifact breaks its contract. Names the artifact, the failed expectations and samples."""

    def __init__(self, artifact: str | Path, failures: list[Failure]) -> None:
        self.artifact = str(artifact)
        self.failures = failures
        lines = "\n".join(f"  - {f}" for f in failures)
        super().__init__(f"artifact {self.artifact} violates its contract ({len(failures)} failed):\n{lines}")


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through it: the digest without re-reading the file."""

    def __init__(self, file) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._hash.update(data)
        self._size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._size

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def arrow_table(frame: pd.DataFrame, schema: pa.Schema, artifact: str | Path) -> pa.Table:
    """``frame``'s schema columns as an Arrow table of ``schema`` (the index dropped); a
    ContractViolation naming ``artifact`` when a column does not convert."""
    try:
        return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ContractViolation(artifact, [Failure("schema", f"columns do not convert to {schema} ({err})")]) from err


def write_parquet_atomic(
    table: pa.Table,
    path: Path,
    artifact: str,
    extra_metadata: dict[str, str] | None = None,
    compression: str | dict[str, str] = "zstd",
    **parquet_options: Any,
) -> str:
    """Write ``table`` to ``path`` via a temp file and rename; returns the file's sha256.

    The sha256 is computed from the bytes as they are written (the same digest as
    :func:`file_sha256` of the result, tested). ``parquet_options`` go to
    ``pyarrow.parquet.write_table`` (per-column dictionary and statistics settings).
    """
    meta = dict(table.schema.metadata or {})
    meta[ARTIFACT_KEY] = artifact.encode()
    for k, v in (extra_metadata or {}).items():
        meta[k.encode()] = v.encode()
    table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            hashing = _HashingWriter(f)
            pq.write_table(table, hashing, compression=compression, **parquet_options)
        digest = hashing.hexdigest()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


def read_parquet(path: Path, schema: pa.Schema | None = None) -> pa.Table:
    """The Parquet table at ``path``; an unreadable file is a ContractViolation naming it.

    With ``schema``, every column of it must be present with its type (a ContractViolation
    lists each missing or mistyped column).
    """
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise ContractViolation(path, [Failure("readable Parquet", f"cannot be read ({err})")]) from err
    if schema is not None:
        check_schema(table, schema, path)
    return table


def check_schema(table: pa.Table, schema: pa.Schema, path: str | Path) -> None:
    """Every column of ``schema`` is in ``table`` with its type; else a ContractViolation listing each."""
    got = table.schema.remove_metadata()
    wrong = [f"{f.name}: {got.field(f.name).type if f.name in got.names else 'missing'} (expected {f.type})"
             for f in schema if f.name not in got.names or got.field(f.name).type != f.type]
    if wrong:
        raise ContractViolation(path, [Failure("schema", "; ".join(wrong))])


_CONTEXT = None
# great-expectations' context keeps the data source, asset and batch definition of a
# suite name as shared state: two threads validating under one name (the extraction's
# shard writer and a reused shard's check) would validate each other's frames.
_GX_LOCK = threading.RLock()


def gx_context():
    """One ephemeral great-expectations context per process, progress bars off."""
    with _GX_LOCK:
        return _context_locked()


def _context_locked():
    global _CONTEXT
    if _CONTEXT is None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        _CONTEXT = gx.get_context(mode="ephemeral")
        _CONTEXT.variables.progress_bars = ProgressBarsConfig(globally=False)
    return _CONTEXT


def run_suite(name: str, frame: pd.DataFrame, expectations: list) -> list[Failure]:
    """Validate ``frame`` against great-expectations ``expectations``; return the failures."""
    import great_expectations as gx

    with _GX_LOCK:  # one ephemeral context per process, and it is not thread-safe
        return _run_suite_locked(gx, name, frame, expectations)


def _run_suite_locked(gx, name: str, frame: pd.DataFrame, expectations: list) -> list[Failure]:
    ctx = gx_context()
    source_name = f"src_{name}"
    try:
        source = ctx.data_sources.get(source_name)
    except (KeyError, ValueError):
        source = ctx.data_sources.add_pandas(source_name)
    try:
        asset = source.get_asset("frame")
    except (LookupError, ValueError):
        asset = source.add_dataframe_asset("frame")
    try:
        batch_def = asset.get_batch_definition("whole")
    except (KeyError, ValueError):
        batch_def = asset.add_batch_definition_whole_dataframe("whole")
    batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name=name, expectations=[e.copy() if hasattr(e, "copy") else e for e in expectations])
    result = batch.validate(suite)
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        res = r.result or {}
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in {"batch_id"}}
        failures.append(
            Failure(
                expectation=cfg.type,
                detail=", ".join(f"{k}={v}" for k, v in kwargs.items()) + (f"; observed {res['observed_value']}" if "observed_value" in res else ""),
                unexpected_count=res.get("unexpected_count"),
                samples=list(res.get("partial_unexpected_list", []) or [])[:5],
            )
        )
    return failures
