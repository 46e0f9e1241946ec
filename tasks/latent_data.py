"""What the latent analyses read from a run directory: the trained ensembles, the test tokens
with where they are, and the downstream stage's labelled documents with their pooled raw
activations (the concepts of the cones and the tasks of the sparse head)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from data_contracts.activations import read_manifest
from sae_core.ensemble import Ensemble
from sae_core.io import load_ensemble
from tasks.common import ACTIVATIONS_DIR, DOWNSTREAM_DIR, ModelDir, discover_models, has_ensemble, split_tokens

LATENTS_DIR = "latents"
MONOSEMANTICITY_FILE = f"{LATENTS_DIR}/monosemanticity.parquet"
CONES_FILE = f"{LATENTS_DIR}/cones.parquet"
SPARSE_HEAD_FILE = f"{LATENTS_DIR}/sparse_head.parquet"
SPARSE_HEAD_LATENTS_FILE = f"{LATENTS_DIR}/sparse_head_latents.parquet"
STEERING_FILE = f"{LATENTS_DIR}/steering.parquet"
TEST_SPLIT = "test"
DATASETS_DIR = f"{DOWNSTREAM_DIR}/datasets"
TOKENS_DIR = f"{DOWNSTREAM_DIR}/activations"
POSITIVE_LABEL = "1"   # the positive class of a binary (sae-probes) task


#: loaded models: (where, the ensemble), in path order
Models = list[tuple[ModelDir, Ensemble]]


def ensembles(run_dir: Path, runs: set[int] | None = None) -> Models:
    """Every saved model of ``run_dir`` (of ``runs`` only, when given), loaded, in path order."""
    return [(m, load_ensemble(m.path(run_dir))) for m in discover_models(run_dir)
            if has_ensemble(run_dir, m) and (runs is None or m.run in runs)]


@dataclass
class SplitTokens:
    """The first N tokens of a split in file order: acts [N, d] and where each one is
    (doc_id, position, token_id)."""

    acts: torch.Tensor
    where: pd.DataFrame


def first_tokens(run_dir: Path, split: str, max_tokens: int) -> SplitTokens | None:
    """The first ``max_tokens`` tokens of ``split`` (None when the split has none)."""
    directory = Path(run_dir) / ACTIVATIONS_DIR
    shards = read_manifest(directory).shards_of(split)
    if not shards:
        return None
    frames, rows = [], 0
    for shard in shards:
        if rows >= max_tokens:
            break
        frames.append(pq.read_table(directory / shard.file, columns=["doc_id", "position", "token_id"]).to_pandas())
        rows += len(frames[-1])
    where = pd.concat(frames, ignore_index=True).iloc[:max_tokens]
    acts = split_tokens(directory, split, None, 0)[: len(where)]
    return SplitTokens(acts, where)


@dataclass
class Concept:
    """A binary concept of a labelled set: ``label`` against the other rows of ``dataset``."""

    dataset: str
    label: str

    @property
    def name(self) -> str:
        return f"{self.dataset}:{self.label}"


@dataclass
class LabelledDocuments:
    """The downstream stage's labelled probing documents and their mean-pooled raw activations."""

    docs: pd.DataFrame           # doc_id, dataset, text, label, split
    pooled: np.ndarray           # [N, d] float64
    acts: torch.Tensor           # token activations [T, d]
    doc_index: torch.Tensor      # [T] row of docs of each token

    def concepts(self, datasets: list[str] | None, max_datasets: int, max_per_dataset: int) -> list[Concept]:
        """The binary concepts: for a two-class set its positive class ('1', else the second
        label in sorted order); for more classes one-vs-rest, the first ``max_per_dataset``."""
        names = sorted(self.docs["dataset"].unique())
        if datasets is not None:
            unknown = sorted(set(datasets) - set(names))
            if unknown:
                raise ValueError(f"unknown probing datasets {unknown}; the downstream stage wrote {names}")
            names = [n for n in names if n in set(datasets)]
        out = []
        for name in names[:max_datasets]:
            labels = sorted(self.docs.loc[self.docs["dataset"] == name, "label"].unique())
            if len(labels) == 2:
                out.append(Concept(name, POSITIVE_LABEL if POSITIVE_LABEL in labels else labels[1]))
            else:
                out += [Concept(name, label) for label in labels[:max_per_dataset]]
        return out

    def rows(self, concept: Concept, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows of docs, labels 0/1) of a balanced one-vs-rest task on ``split``."""
        from sae_core.probing import one_vs_rest_rows

        frame = self.docs[(self.docs["dataset"] == concept.dataset) & (self.docs["split"] == split)]
        chosen = one_vs_rest_rows(frame["label"].to_numpy(), concept.label, seed)
        rows = frame.index.to_numpy()[chosen]
        return rows, (self.docs.loc[rows, "label"].to_numpy() == concept.label).astype(np.int64)


def labelled_documents(run_dir: Path) -> LabelledDocuments | None:
    """The labelled probing sets (``downstream/datasets/probe_*.parquet``) with their token
    activations (``downstream/activations``); None when the downstream stage wrote none."""
    from data_contracts.labelled import read_table
    from tasks.downstream_tokens import read_tokens

    files = sorted((Path(run_dir) / DATASETS_DIR).glob("probe_*.parquet"))
    if not files or not (Path(run_dir) / TOKENS_DIR).is_dir():
        return None
    docs = pd.concat([read_table(f, "labelled_probing") for f in files], ignore_index=True)
    docs = docs.drop_duplicates("doc_id").reset_index(drop=True)
    # the token cache also holds the SCR sets' documents: read them all, keep the probing ones
    others = [read_table(f, "labelled_scr")[["doc_id"]] for f in sorted((Path(run_dir) / DATASETS_DIR).glob("scr_*.parquet"))]
    cached = pd.concat([docs[["doc_id"]], *others], ignore_index=True).drop_duplicates("doc_id").reset_index(drop=True)
    tokens = read_tokens(Path(run_dir) / TOKENS_DIR, cached)
    keep = tokens.doc_index < len(docs)   # docs come first in `cached`, in the same order
    acts, doc_index = tokens.acts[keep], tokens.doc_index[keep]
    from sae_core.probing import mean_pool

    return LabelledDocuments(docs, mean_pool(acts, doc_index, len(docs)).double().numpy(), acts, doc_index)
