"""The activation contract: Parquet shards of residual-stream activations plus a manifest.

Layout of an activation directory::

    manifest.json
    split=train/shard-00000.parquet   (doc_id, split, position, token_id, activation[d])
    split=val/...
    split=test/...

Every shard holds whole documents, so (doc_id, position) is unique within a shard and
no document spans two shards. The manifest records the model (id and revision or weight
hash), layer, d, tokenizer, the corpus fingerprint, token counts per split and each
shard's row count and sha256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from data_contracts.core import ContractViolation, Failure, file_sha256, run_suite, write_parquet_atomic

ARTIFACT = "activations"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="Path relative to the activation directory.")
    split: str
    rows: int = Field(ge=0)
    documents: int = Field(ge=0)
    sha256: str

    @field_validator("file")
    @classmethod
    def _inside_directory(cls, value: str) -> str:
        """A shard lives in the activation directory: split=<s>/<name>.parquet, nothing else."""
        parts = value.split("/")
        if len(parts) != 2 or not parts[0].startswith("split=") or not parts[1].endswith(".parquet") or any(
            p in ("", ".", "..") or "\\" in p for p in parts
        ):
            raise ValueError(f"shard file {value!r} is not of the form split=<split>/<name>.parquet inside the activation directory")
        return value


class LiveBlock(BaseModel):
    """A block of documents of a split that is not stored: its activations are computed by
    the model when a stage reads them (``extract.store_train: false``)."""

    model_config = ConfigDict(extra="forbid")

    doc_ids: list[str] = Field(description="The block's documents, in row order (doc_id order, as a shard's).")
    rows: int = Field(ge=0, description="Tokens the block yields (the kept tokens of its windows).")


class ActivationManifest(BaseModel):
    """What the activation directory holds and how it was made."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    model: str
    revision: str
    layer: int = Field(ge=0)
    d: int = Field(gt=0)
    tokenizer: str
    vocab_size: int = Field(gt=0)
    context_length: int = Field(gt=0)
    include_special_tokens: bool
    corpus_fingerprint: str
    config_fingerprint: str
    tokens_per_split: dict[str, int]
    documents_per_split: dict[str, int]
    shards: list[ShardInfo]
    max_norm: float = Field(gt=0, description="Upper bound on a token's activation norm (contract).")
    trust_remote_code: bool = Field(
        default=False, description="The extraction opted in to the model's own code; later stages load it the same way."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="How the activation values are stored: float32, or bfloat16 (half the disk; each value within a "
        "relative 2^-8 (0.4%) of the float32 one: round to nearest even at 8 significant bits), a row's d bfloat16 bit "
        "patterns as one 2·d-byte fixed-size binary value, since Parquet has no bfloat16 type and stores 16-bit "
        "integers as INT32. Readers always get float32.",
    )

    live_splits: dict[str, list[LiveBlock]] = Field(
        default_factory=dict,
        description="Splits that are not stored but computed from the model when read, as blocks of documents "
        "(SAELens' default of training from the forward pass, for budgets where disk is the limit).",
    )
    live_batch_size: int | None = Field(default=None, gt=0, description="Windows per forward pass of a live split.")

    def is_live(self, split: str) -> bool:
        return split in self.live_splits

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]


def activation_type(d: int, dtype: str = "float32") -> pa.DataType:
    """The ``activation`` column's type: d float32 values, or (bfloat16) one 2·d-byte value per
    row holding the d little-endian bfloat16 bit patterns (Parquet stores it as a
    FIXED_LEN_BYTE_ARRAY, 2 bytes a value; it has no bfloat16 or 16-bit integer type)."""
    if dtype == "bfloat16":
        return pa.binary(2 * d)
    if dtype == "float32":
        return pa.list_(pa.float32(), d)
    raise ValueError(f"unknown activation dtype {dtype!r}; use float32 or bfloat16")


def activation_schema(d: int, dtype: str = "float32") -> pa.Schema:
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("split", pa.string()),
            ("position", pa.int32()),
            ("token_id", pa.int32()),
            ("activation", activation_type(d, dtype)),
        ]
    )


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as the uint16 bits of their bfloat16 rounding (round to nearest even)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits back to float32 (exact: every bfloat16 is a float32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _encode(activation: np.ndarray, dtype: str) -> pa.Array:
    n, d = activation.shape
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(to_bfloat16_bits(activation).astype("<u2", copy=False))
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * d), n, [None, pa.py_buffer(bits.tobytes())])
    flat = pa.array(np.ascontiguousarray(activation, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, d)


def activation_values(column) -> np.ndarray:
    """The [n, d] float32 matrix of an ``activation`` column of either dtype (one chunk: a
    view of a float32 column's values, not a copy)."""
    col = column
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if pa.types.is_fixed_size_binary(col.type):
        width = col.type.byte_width
        if not len(col):
            return np.zeros((0, width // 2), np.float32)
        bits = np.frombuffer(col.buffers()[1], dtype="<u2", count=len(col) * width // 2, offset=col.offset * width)
        return from_bfloat16_bits(bits.reshape(len(col), width // 2))
    d = col.type.list_size
    if not len(col):
        return np.zeros((0, d), np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


# How shards are written. Real residual-stream floats do not compress: snappy saves almost
# nothing on them and doubles the write time (reading is the same; README, "Measurements
# behind design choices"). Dictionary encoding and min/max statistics of millions of
# floats are work nobody reads back. The small id columns keep snappy and statistics.
_ACTIVATION_VALUES = "activation.list.element"  # the Parquet path of the list's values
SHARD_PARQUET_OPTIONS = {
    "compression": {"doc_id": "snappy", "split": "snappy", "position": "snappy", "token_id": "snappy", _ACTIVATION_VALUES: "none"},
    "use_dictionary": ["doc_id", "split"],
    "write_statistics": ["doc_id", "split", "position", "token_id"],
}
SHARD_PARQUET_OPTIONS_BF16 = {**SHARD_PARQUET_OPTIONS, "compression": {**SHARD_PARQUET_OPTIONS["compression"], "activation": "none"}}
del SHARD_PARQUET_OPTIONS_BF16["compression"][_ACTIVATION_VALUES]


# Activation bytes per Parquet row group. The writer builds a row group's list levels and
# pages in buffers of about its size, fresh memory each time, so one large row group
# writes about twice as slowly as the same rows in 16 MB row groups (README,
# "Measurements behind design choices").
ROW_GROUP_BYTES = 16 << 20


def shard_path(split: str, index: int) -> str:
    return f"split={split}/shard-{index:05d}.parquet"


def write_shard(
    directory: Path,
    split: str,
    index: int,
    doc_ids: np.ndarray,
    position: np.ndarray,
    token_id: np.ndarray,
    activation: np.ndarray,
    config_fingerprint: str,
    validate: tuple[int, float] | None = None,
    dtype: str = "float32",
) -> ShardInfo:
    """Write one shard atomically; returns its manifest entry.

    With ``validate=(vocab_size, max_norm)`` the rows are checked against the shard
    suite first and a violation raises before anything is written. ``dtype``: how the
    values are stored (:attr:`ActivationManifest.dtype`); the suite checks the stored values.
    """
    n, d = activation.shape
    table = pa.Table.from_arrays(
        [
            pa.array(doc_ids, type=pa.string()),
            pa.array([split] * n, type=pa.string()),
            pa.array(position, type=pa.int32()),
            pa.array(token_id, type=pa.int32()),
            _encode(activation, dtype),
        ],
        schema=activation_schema(d, dtype),
    )
    rel = shard_path(split, index)
    info = ShardInfo(file=rel, split=split, rows=n, documents=len(set(doc_ids.tolist())), sha256="")
    if validate is not None:
        # check the rows before they are published, so a bad shard never lands on disk
        _, failures = validate_table(table, info, *validate)
        if failures:
            raise ContractViolation(directory / rel, failures)
    digest = write_parquet_atomic(
        table, directory / rel, ARTIFACT, {"sae_ensembles.config_fingerprint": config_fingerprint},
        row_group_size=max(1024, ROW_GROUP_BYTES // ((2 if dtype == "bfloat16" else 4) * d)),
        **(SHARD_PARQUET_OPTIONS_BF16 if dtype == "bfloat16" else SHARD_PARQUET_OPTIONS),
    )
    return info.model_copy(update={"sha256": digest})


def shard_fingerprint(path: Path) -> str | None:
    """The extraction-config fingerprint stored in a shard's footer (None if unreadable)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = meta.get(b"sae_ensembles.config_fingerprint")
    return value.decode() if value else None


def write_manifest(directory: Path, manifest: ActivationManifest) -> None:
    tmp = directory / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> ActivationManifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ContractViolation(directory, [Failure("manifest exists", f"no {MANIFEST} in {directory}: run extraction first")])
    try:
        return ActivationManifest(**json.loads(path.read_text()))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise ContractViolation(path, [Failure("manifest is valid", problems)]) from err
    except (json.JSONDecodeError, TypeError) as err:
        raise ContractViolation(path, [Failure("manifest is valid", str(err).splitlines()[0])]) from err


def _shard_table(path: Path, d: int, dtype: str = "float32") -> tuple[pa.Table | None, list[Failure]]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        return None, [Failure("readable Parquet", f"{path.name} cannot be read ({err}); the file is truncated or corrupt")]
    expected = activation_schema(d, dtype)
    got = table.schema.remove_metadata()
    if not got.equals(expected):
        problems = []
        for f in expected:
            if f.name not in got.names:
                problems.append(f"missing column {f.name}")
            elif got.field(f.name).type != f.type:
                t = got.field(f.name).type
                if f.name == "activation" and (pa.types.is_fixed_size_list(t) or pa.types.is_fixed_size_binary(t)):
                    found = (f"has width {t.list_size} ({t.value_type})" if pa.types.is_fixed_size_list(t)
                             else f"holds {t.byte_width} bytes a row (bfloat16 bits of width {t.byte_width // 2})")
                    wanted = "float" if dtype == "float32" else f"bfloat16 bits, {2 * d} bytes a row; the manifest's dtype {dtype}"
                    problems.append(f"column activation {found}, expected width {d} (the manifest's d) of {wanted}")
                else:
                    problems.append(f"column {f.name} is {t}, expected {f.type}")
        return None, [Failure("schema", "; ".join(problems) or f"schema {got} != {expected}")]
    return table, []


def row_summary(table: pa.Table) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-row summary for the expectation suite (ids, norm, finiteness) and the [n, d] matrix."""
    col = table.column("activation")
    # one chunk (a shard about to be written): a view of its float32 values, not a 180 MB copy
    values = activation_values(col)
    # one pass for the common case: a row's squared norm is finite iff all its values are
    # (or it overflows, > 1.8e19, far past any max_norm); only such rows are looked at again
    norm = np.sqrt(np.einsum("ij,ij->i", values, values))
    finite = np.isfinite(norm)
    if not finite.all():
        odd = np.flatnonzero(~finite)
        rows = values[odd].astype(np.float64)
        ok = np.isfinite(rows)
        finite[odd] = ok.all(axis=1)
        norm[odd] = np.linalg.norm(np.where(ok, rows, 0.0), axis=1)  # the norm of the finite values
    frame = pd.DataFrame(
        {
            "doc_id": table.column("doc_id").to_pandas(),
            "split": table.column("split").to_pandas(),
            # int64 and float64, not the shard's int32/float32: great-expectations' pandas
            # "between" is vectorised only for those dtypes and otherwise calls a Python
            # function per value
            "position": table.column("position").to_numpy().astype(np.int64),
            "token_id": table.column("token_id").to_numpy().astype(np.int64),
            "norm": norm.astype(np.float64),
            "finite": finite,
        }
    )
    return frame, values


def shard_expectations(info: ShardInfo, vocab_size: int, max_norm: float) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToEqual(value=info.rows),
        gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=[info.split]),
        gxe.ExpectColumnValuesToBeBetween(column="position", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="token_id", min_value=0, max_value=vocab_size - 1),
        gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="norm", min_value=0, max_value=max_norm),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["doc_id", "position"]),
    ]


def validate_table(table: pa.Table, info: ShardInfo, vocab_size: int, max_norm: float) -> tuple[np.ndarray, list[Failure]]:
    """Run the shard suite on a table already checked for schema; returns (matrix, failures)."""
    where = f"[{info.file}] "
    frame, values = row_summary(table)
    failures = run_suite(f"activations_{info.split}", frame, shard_expectations(info, vocab_size, max_norm))
    for f in failures:
        f.detail = where + f.detail
        if f.expectation == "expect_column_values_to_be_in_set" and "finite" in f.detail:
            bad = frame.index[~frame["finite"]][:5]
            f.samples = frame.loc[bad, ["doc_id", "position", "token_id"]].to_dict("records")
    return values, failures


def check_shard_file(path: Path, info: ShardInfo, d: int, vocab_size: int, max_norm: float, dtype: str = "float32") -> list[Failure]:
    """The shard suite on one file without a manifest (schema, then rows): [] when it passes."""
    table, read_failures = _shard_table(Path(path), d, dtype)
    if table is None:
        return read_failures
    return validate_table(table, info, vocab_size, max_norm)[1]


def validate_shard(directory: Path, info: ShardInfo, manifest: ActivationManifest, *, check_checksum: bool = True) -> tuple[np.ndarray | None, list[Failure]]:
    """Check one shard against the manifest and the suite; returns (matrix or None, failures)."""
    path = Path(directory) / info.file
    where = f"[{info.file}] "
    if not path.is_file():
        return None, [Failure("shard exists", f"{where}listed in the manifest but missing")]
    failures: list[Failure] = []
    if check_checksum:
        digest = file_sha256(path)
        if digest != info.sha256:
            failures.append(Failure("checksum matches manifest", f"{where}sha256 {digest[:12]}… != manifest {info.sha256[:12]}…"))
    table, read_failures = _shard_table(path, manifest.d, manifest.dtype)
    if table is None:
        return None, failures + [Failure(f.expectation, where + f.detail) for f in read_failures]
    if failures:
        return None, failures
    return validate_table(table, info, manifest.vocab_size, manifest.max_norm)


def validate_activations(directory: str | Path, *, splits: tuple[str, ...] = SPLITS) -> ActivationManifest:
    """Validate a whole activation directory; raise one ContractViolation listing every problem."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    failures: list[Failure] = []
    seen_docs: dict[str, str] = {}
    for split in splits:
        rows = 0
        for info in manifest.shards_of(split):
            _, shard_failures = validate_shard(directory, info, manifest)
            failures += shard_failures
            rows += info.rows
            if not shard_failures:
                docs = pq.read_table(directory / info.file, columns=["doc_id"]).column("doc_id").unique().to_pylist()
                for doc in docs:
                    if doc in seen_docs:
                        failures.append(Failure("documents in one shard", f"doc {doc!r} is in {seen_docs[doc]} and {info.file}"))
                    seen_docs[doc] = info.file
        rows += sum(block.rows for block in manifest.live_splits.get(split, []))
        expected = manifest.tokens_per_split.get(split, 0)
        if rows != expected:
            failures.append(Failure("token counts match manifest", f"split {split}: shards list {rows} rows, manifest says {expected}"))
    if failures:
        raise ContractViolation(directory, failures)
    return manifest


def load_split(directory: str | Path, split: str, *, validate: bool = True) -> np.ndarray:
    """All activations of one split as one float32 matrix [N, d] (validated on read)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.is_live(split):
        raise ContractViolation(directory, [Failure("split is stored", f"split {split!r} is not stored (extract.store_train: false): "
                                                    "its activations are computed by the model as they are read; stream it "
                                                    "(tasks.common.activation_source)")])
    parts, failures = [], []
    for info in manifest.shards_of(split):
        if validate:
            values, shard_failures = validate_shard(directory, info, manifest)
            failures += shard_failures
        else:
            values = row_summary(pq.read_table(directory / info.file))[1]
        if values is not None:
            parts.append(values)
    if failures:
        raise ContractViolation(directory, failures)
    if not parts:
        raise ContractViolation(directory, [Failure("split has tokens", f"split {split!r} has no shards in the manifest")])
    return np.concatenate(parts)


# ------------------------------------------------------------------------ streaming reads


def split_chunks(directory: str | Path, split: str, manifest: ActivationManifest | None = None) -> list:
    """The row groups of ``split``'s shards, in manifest order, as chunks of an activation
    source (:class:`sae_core.training.sources.Chunk`, key = (shard file, row group)). Reads
    only the Parquet footers."""
    from sae_core.training.sources import Chunk

    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    chunks = []
    for info in manifest.shards_of(split):
        meta = pq.ParquetFile(directory / info.file).metadata
        chunks += [Chunk((info.file, g), meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        if sum(meta.row_group(g).num_rows for g in range(meta.num_row_groups)) != info.rows:
            raise ContractViolation(directory, [Failure("token counts match manifest", f"{info.file}: row groups hold a different number of rows than the manifest's {info.rows}")])
    if not chunks:
        raise ContractViolation(directory, [Failure("split has tokens", f"split {split!r} has no shards in the manifest")])
    return chunks


def chunk_reader(directory: str | Path, d: int):
    """A reader of chunks from :func:`split_chunks`: fills ``out`` [Σ n, d] with their rows,
    one row group at a time (memory: ``out`` plus one row group)."""
    directory = Path(directory)

    def read(chunks, out: np.ndarray) -> None:
        at = 0
        for chunk in chunks:
            file, group = chunk.key
            column = pq.ParquetFile(directory / file).read_row_group(group, columns=["activation"]).column("activation")
            values = activation_values(column)
            if chunk.keep is not None:
                values = values[np.asarray(chunk.keep, dtype=np.int64)]
            out[at : at + values.shape[0]] = values
            at += values.shape[0]
        if at != out.shape[0]:
            raise ValueError(f"read {at} rows from {directory} where {out.shape[0]} were expected")

    return read

