"""The activation-extraction stage: corpus + model -> validated Parquet shards + manifest.

Outputs under the run directory::

    documents.parquet          the documents with their split (labelled-documents contract)
    activations/manifest.json  written last, after every shard passed its contract
    activations/split=<s>/shard-<i>.parquet

Shards are written atomically and carry the extraction fingerprint in their footer, so
an interrupted extraction resumes from its finished shards, and a rerun with the same
inputs finds a valid manifest and does no work.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data_contracts.activations import (
    LiveBlock,
    MANIFEST,
    SPLITS,
    ActivationManifest,
    ShardInfo,
    check_shard_file,
    shard_fingerprint,
    shard_path,
    validate_activations,
    write_manifest,
    write_shard,
)
from data_contracts.core import ContractViolation, file_sha256
from data_contracts.documents import write_documents
from sae_core.extraction import ActivationBatch, Window, extract_in_order, kept_span, make_windows
from sae_core.models import LoadedModel, resolve_source, load_model, weights_fingerprint
from sae_core.training.memory import keep_freed_memory
from tasks.common import ACTIVATIONS_DIR, DOCUMENTS_FILE
from tasks.config import ExtractConfig
from tasks.progress import ProgressLog
from tasks.sources import corpus_fingerprint, load_corpus
from tasks.units import Unit, UnitExecutor



@dataclass
class ExtractionReport:
    manifest: ActivationManifest
    shards_written: list[str]
    shards_reused: list[str]
    tokens_extracted: int
    seconds: float

    @property
    def did_work(self) -> bool:
        return bool(self.shards_written)


def model_identity(cfg: ExtractConfig) -> str:
    """Model name plus what pins its weights: the weight files' hash for local/embedded models."""
    source, _ = resolve_source(cfg.model)
    if isinstance(source, Path):
        return f"{cfg.model}@sha256:{weights_fingerprint(source)}"
    return f"{cfg.model}@{cfg.revision or 'default'}"


def extraction_fingerprint(cfg: ExtractConfig, corpus_fp: str, model_id: str) -> str:
    """What the shards depend on: the config (minus batching and device), the corpus and the weights."""
    recipe = cfg.model_dump(exclude={"batch_size", "device"})  # where it ran does not change what it wrote
    h = hashlib.sha256()
    h.update(repr(sorted(recipe.items())).encode())
    h.update(corpus_fp.encode())
    h.update(model_id.encode())
    return h.hexdigest()


def document_blocks(n_documents: int, documents_per_shard: int) -> list[slice]:
    """The shards' documents: consecutive blocks of ``documents_per_shard`` of ``n_documents``
    positions (the last block may be shorter); a document never spans two shards."""
    return [slice(i, min(i + documents_per_shard, n_documents)) for i in range(0, n_documents, documents_per_shard)]


def write_batch_shard(
    directory: Path, split: str, index: int, doc_ids: np.ndarray, batch: ActivationBatch, fingerprint: str,
    validate: tuple[int, float] | None, dtype: str = "float32",
) -> ShardInfo:
    """Write the rows of ``batch`` as shard ``index`` of ``split`` (checked first when
    ``validate=(vocab_size, max_norm)``), values stored as ``dtype``; ``batch.doc_index`` indexes ``doc_ids``."""
    return write_shard(
        directory, split, index, doc_ids[batch.doc_index], batch.position, batch.token_id, batch.activation, fingerprint,
        validate=validate, dtype=dtype,
    )


def write_batch_by_document(
    directory: Path, split: str, doc_ids: np.ndarray, batch: ActivationBatch, documents_per_shard: int, fingerprint: str,
    validate: tuple[int, float] | None,
) -> list[ShardInfo]:
    """Write ``batch`` (rows sorted by ``doc_index``, which indexes ``doc_ids``) as shards
    0, 1, ... of ``documents_per_shard`` documents each, like the extraction's plan; a
    block of documents without rows writes no shard. Returns the shards' manifest entries."""
    shards = []
    for block in document_blocks(len(doc_ids), documents_per_shard):
        lo, hi = np.searchsorted(batch.doc_index, [block.start, block.stop])
        if lo == hi:
            continue
        rows = ActivationBatch(batch.doc_index[lo:hi], batch.position[lo:hi], batch.token_id[lo:hi], batch.activation[lo:hi])
        shards.append(write_batch_shard(directory, split, len(shards), doc_ids, rows, fingerprint, validate))
    return shards


def _plan(docs: pd.DataFrame, token_ids: list[list[int]], cfg: ExtractConfig, n_special: int) -> dict[str, list[np.ndarray]]:
    """Per split, the shards as arrays of row indices into ``docs`` (capped by max_tokens_per_split)."""
    plan: dict[str, list[np.ndarray]] = {}
    body = cfg.context_length - n_special
    for split in SPLITS:
        rows = np.flatnonzero(docs["split"].to_numpy() == split)
        rows = rows[np.argsort(docs["doc_id"].to_numpy()[rows], kind="stable")]
        cap = (cfg.max_tokens_per_split or {}).get(split)
        if cap is not None:
            kept, total = [], 0
            for r in rows:
                if total >= cap:
                    break
                n = len(token_ids[r])
                total += n + (n_special * -(-n // max(body, 1)) if cfg.include_special_tokens else 0)
                kept.append(r)
            rows = np.array(kept, dtype=np.int64)
        rows = rows[[len(token_ids[r]) > 0 for r in rows]] if len(rows) else rows
        plan[split] = [rows[block] for block in document_blocks(len(rows), cfg.documents_per_shard)]
    return plan


def _existing_shard_info(directory: Path, rel: str, split: str) -> ShardInfo:
    path = directory / rel
    table = pq.read_table(path, columns=["doc_id"])
    return ShardInfo(
        file=rel, split=split, rows=table.num_rows, documents=len(table.column("doc_id").unique()), sha256=file_sha256(path)
    )


def shard_windows(loaded: LoadedModel, ids: list[list[int]], cfg: ExtractConfig) -> list[Window]:
    """One shard's windows in (document, window) order, the shard's row order (``doc_index`` indexes ``ids``)."""
    return document_windows(loaded, ids, cfg.context_length)


def document_windows(loaded: LoadedModel, ids: list[list[int]], context_length: int) -> list[Window]:
    """The windows of documents ``ids`` in (document, window) order (:func:`shard_windows` without a config)."""
    return [w for i, toks in enumerate(ids) for w in make_windows(i, toks, context_length, loaded.prefix_ids, loaded.suffix_ids)]


def _extract_shard(loaded: LoadedModel, ids: list[list[int]], cfg: ExtractConfig, on_batch: Callable[[int], None] | None) -> ActivationBatch:
    """One shard's rows, ordered by document then position (``doc_index`` indexes ``ids``)."""
    return extract_in_order(loaded, shard_windows(loaded, ids, cfg), cfg.batch_size, cfg.include_special_tokens, on_batch)


def live_blocks(loaded: LoadedModel, docs: pd.DataFrame, token_ids: list[list[int]], blocks: list[np.ndarray],
                cfg: ExtractConfig) -> list[LiveBlock]:
    """A split that is not stored: its shards' documents and the rows each block yields (no forward pass)."""
    out = []
    for rows in blocks:
        windows = shard_windows(loaded, [token_ids[r] for r in rows], cfg)
        n = sum(hi - lo for lo, hi in (kept_span(w, cfg.include_special_tokens) for w in windows))
        out.append(LiveBlock(doc_ids=docs["doc_id"].to_numpy()[rows].tolist(), rows=n))
    return out


def extract_documents(loaded: LoadedModel, texts: list[str], context_length: int, batch_size: int,
                      include_special_tokens: bool) -> np.ndarray:
    """The activations [n, d] of ``texts`` in shard row order (document, then position): what
    the extract stage would have written for them as one shard (a live split's reader)."""
    ids = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return extract_in_order(loaded, document_windows(loaded, ids, context_length), batch_size, include_special_tokens).activation


class _LogBar:
    """tqdm's ``update``/``close`` over a :class:`~tasks.progress.ProgressLog`."""

    def __init__(self, log: ProgressLog) -> None:
        self.log = log

    def update(self, n: int) -> None:
        self.log.advance(n)

    def close(self) -> None:
        if self.log.done:
            self.log.finish()


#: shards per unit of work when extraction fans out (a unit loads the model once for its shards)
SHARDS_PER_UNIT = 4


@dataclass(frozen=True)
class ShardsOutcome:
    """What extracting a list of shards did: their manifest entries (in the order asked), the
    shards written and the ones reused (relative paths)."""

    shards: tuple[ShardInfo, ...]
    written: tuple[str, ...]
    reused: tuple[str, ...]


def _extract_shards(loaded: LoadedModel, docs: pd.DataFrame, token_ids: list[list[int]], plan: dict[str, list[np.ndarray]],
                    cfg: ExtractConfig, out: Path, fingerprint: str, items: list[tuple[str, int]], bar) -> ShardsOutcome:
    """Extract (or reuse) the shards ``items`` ((split, index) of the plan) into ``out``."""
    # Each finished shard is validated and written by one background thread while the
    # model runs the next shard's batches; at most one write is pending, so memory holds
    # two shards at most. A failed write surfaces at the next wait and stops the stage;
    # every shard that was written is complete. (On 2 cores the writer slows the forward
    # it overlaps, but still comes out ahead of writing in line; README.)
    slots: list[ShardInfo | Future] = []
    written, reused = [], []
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        for split, index in items:
            rows = plan[split][index]
            rel = shard_path(split, index)
            if (out / rel).is_file():
                info = _existing_shard_info(out, rel, split)
                # a finished shard is reused only if it still passes its contract;
                # a damaged one (NaN rows, wrong width, ...) is extracted again
                damaged = check_shard_file(out / rel, info, loaded.d_model, loaded.vocab_size, cfg.max_norm, cfg.activation_dtype)
                if not damaged:
                    slots.append(info)
                    reused.append(rel)
                    continue
                print(f"re-extracting {rel}: " + "; ".join(f.detail for f in damaged[:3]))
                (out / rel).unlink()
            doc_ids = docs["doc_id"].to_numpy()[rows]
            batch = _extract_shard(loaded, [token_ids[r] for r in rows], cfg, bar.update if bar is not None else None)
            if pending is not None:
                pending.result()  # re-raises a failed write before more work is queued
            pending = writer.submit(
                write_batch_shard, out, split, index, doc_ids, batch, fingerprint, (loaded.vocab_size, cfg.max_norm),
                cfg.activation_dtype,
            )
            slots.append(pending)
            written.append(rel)
        if pending is not None:
            pending.result()
    shards = [slot.result() if isinstance(slot, Future) else slot for slot in slots]
    return ShardsOutcome(tuple(shards), tuple(written), tuple(reused))


def _shard_files(items) -> tuple[str, ...]:
    """Run-dir-relative paths of the shards ``items`` (published ones are pulled to be reused)."""
    return tuple(f"{ACTIVATIONS_DIR}/{shard_path(split, index)}" for split, index in items)


def extract_unit(run_dir: Path, cfg: ExtractConfig, items: tuple[tuple[str, int], ...], fingerprint: str) -> ShardsOutcome:
    """A range of shards as one unit of work on a worker: the corpus, the model and the plan
    are rebuilt from ``cfg`` (deterministic), then the shards are extracted as in process."""
    run_dir = Path(run_dir)
    docs = load_corpus(cfg, cache_dir=run_dir / ".cache" / "datasets")
    here = extraction_fingerprint(cfg, corpus_fingerprint(docs), model_identity(cfg))
    if here != fingerprint:
        raise ValueError(
            f"this worker sees another corpus or model than the flow that planned the extraction (fingerprint {here[:12]} vs "
            f"{fingerprint[:12]}): the model path and the corpus files of extract.* must be the same on every worker"
        )
    keep_freed_memory()
    loaded = load_model(cfg.model, cfg.layer, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, device=cfg.device)
    token_ids = loaded.tokenizer(docs["text"].tolist(), add_special_tokens=False)["input_ids"]
    plan = _plan(docs, token_ids, cfg, len(loaded.prefix_ids) + len(loaded.suffix_ids))
    todo = sum(len(token_ids[r]) for split, i in items for r in plan[split][i])
    bar = _LogBar(ProgressLog("extract", todo, "tokens", tokens_per_unit=1))
    try:
        return _extract_shards(loaded, docs, token_ids, plan, cfg, run_dir / ACTIVATIONS_DIR, fingerprint, list(items), bar)
    finally:
        bar.close()


def run_extraction(cfg: ExtractConfig, run_dir: str | Path, *, progress: bool = True, executor: UnitExecutor | None = None) -> ExtractionReport:
    """Extract (or resume, or confirm) the activations of ``cfg`` into ``run_dir``; ``executor``
    runs ranges of shards as units of work (default: all in this process)."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    out = run_dir / ACTIVATIONS_DIR
    docs = load_corpus(cfg, cache_dir=run_dir / ".cache" / "datasets")
    corpus_fp = corpus_fingerprint(docs)
    fingerprint = extraction_fingerprint(cfg, corpus_fp, model_identity(cfg))

    if (out / MANIFEST).is_file():
        try:
            manifest = validate_activations(out)
            if manifest.config_fingerprint == fingerprint:
                if not (run_dir / DOCUMENTS_FILE).is_file():  # deleted by hand: cheap to restore
                    write_documents(docs, run_dir / DOCUMENTS_FILE)
                return ExtractionReport(manifest, [], [s.file for s in manifest.shards], 0, time.perf_counter() - start)
        except ContractViolation:
            pass  # damaged or incomplete: resume below, reusing every intact shard

    existing = {p: shard_fingerprint(p) for p in out.glob("split=*/*.parquet")}
    for path, fp in existing.items():
        if fp is None:  # unreadable (e.g. truncated by a crash outside our atomic write): redo it
            path.unlink()
    stale = [p for p, fp in existing.items() if fp is not None and fp != fingerprint]
    if stale:
        raise ValueError(
            f"{out} holds shards extracted with a different config, corpus or model (e.g. {stale[0].name}); "
            "delete that directory or choose another run directory"
        )

    # shard-sized arrays and Parquet buffers (~180 MB each for 120k tokens of d = 384) are
    # allocated per shard: with glibc's default every one is a fresh mmap, zero-filled
    # page by page (the minor faults and system time this costs: README, "Measurements
    # behind design choices").
    keep_freed_memory()
    loaded = load_model(cfg.model, cfg.layer, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, device=cfg.device)
    token_ids = loaded.tokenizer(docs["text"].tolist(), add_special_tokens=False)["input_ids"]
    n_special = len(loaded.prefix_ids) + len(loaded.suffix_ids)
    plan = _plan(docs, token_ids, cfg, n_special)

    stored = [split for split in SPLITS if cfg.store_train or split != "train"]
    live = {} if cfg.store_train else {"train": live_blocks(loaded, docs, token_ids, plan["train"], cfg)}
    items = [(split, index) for split in stored for index in range(len(plan[split]))]
    todo_tokens = sum(len(token_ids[r]) for split, i in items if not (out / shard_path(split, i)).is_file() for r in plan[split][i])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=f"extract {cfg.model} layer {cfg.layer}")
    else:  # no terminal: a progress line every SAE_ENSEMBLES_PROGRESS_SECONDS through the run logger
        log = ProgressLog("extract", todo_tokens, "tokens", tokens_per_unit=1)
        bar = _LogBar(log)
    try:
        if executor is None or executor.in_process:
            outcome = _extract_shards(loaded, docs, token_ids, plan, cfg, out, fingerprint, items, bar)
        else:  # shard ranges as units of work: each worker loads the model and writes its shards
            ranges = [tuple(items[i: i + SHARDS_PER_UNIT]) for i in range(0, len(items), SHARDS_PER_UNIT)]
            units = [Unit(extract_unit, {"cfg": cfg, "items": r, "fingerprint": fingerprint},
                          f"extract {r[0][0]}/{r[0][1]}..{r[-1][0]}/{r[-1][1]}", reads=_shard_files(r), writes=_shard_files(r),
                          cost=sum(len(token_ids[row]) for s, i in r for row in plan[s][i])) for r in ranges]
            parts = executor.run("extract", units, on_done=lambda unit, _o: bar.update(unit.cost) if bar is not None else None)
            outcome = ShardsOutcome(tuple(x for o in parts for x in o.shards), tuple(x for o in parts for x in o.written),
                                    tuple(x for o in parts for x in o.reused))
    finally:
        if bar is not None:
            bar.close()
    shards, written, reused = list(outcome.shards), list(outcome.written), list(outcome.reused)
    extracted = sum(info.rows for info in shards if info.file in written)

    tokens = {s: sum(i.rows for i in shards if i.split == s) + sum(b.rows for b in live.get(s, [])) for s in SPLITS}
    documents = {s: sum(i.documents for i in shards if i.split == s) + sum(len(b.doc_ids) for b in live.get(s, [])) for s in SPLITS}
    provisional = ActivationManifest(
        model=cfg.model,
        revision=loaded.revision,
        layer=cfg.layer,
        d=loaded.d_model,
        tokenizer=type(loaded.tokenizer).__name__ + f"(vocab={loaded.vocab_size})",
        vocab_size=loaded.vocab_size,
        context_length=cfg.context_length,
        include_special_tokens=cfg.include_special_tokens,
        corpus_fingerprint=corpus_fp,
        config_fingerprint=fingerprint,
        tokens_per_split=tokens,
        documents_per_split=documents,
        shards=shards,
        max_norm=cfg.max_norm,
        trust_remote_code=cfg.trust_remote_code,
        dtype=cfg.activation_dtype,
        live_splits=live,
        live_batch_size=cfg.batch_size if live else None,
    )
    # every shard passed its contract: written ones before they were written, reused ones
    # when they were found. The documents go out with the manifest, not before the shards,
    # so a failed extraction publishes neither.
    write_documents(docs, run_dir / DOCUMENTS_FILE)
    write_manifest(out, provisional)
    return ExtractionReport(provisional, written, reused, extracted, time.perf_counter() - start)
