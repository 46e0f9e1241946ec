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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts.activations import (
    MANIFEST,
    SPLITS,
    ActivationManifest,
    shard_fingerprint,
    shard_path,
    validate_activations,
    write_manifest,
)
from data_contracts.core import ContractViolation
from data_contracts.documents import write_documents
from sae_core.models import resolve_source, load_model, weights_fingerprint
from sae_core.training.memory import keep_freed_memory
from tasks.common import ACTIVATIONS_DIR, DOCUMENTS_FILE
from tasks.config import ExtractConfig
from tasks.extract_shards import ShardsOutcome, document_blocks, extract_shards, live_blocks
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
        return extract_shards(loaded, docs, token_ids, plan, cfg, run_dir / ACTIVATIONS_DIR, fingerprint, list(items), bar)
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
            outcome = extract_shards(loaded, docs, token_ids, plan, cfg, out, fingerprint, items, bar)
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
