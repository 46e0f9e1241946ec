"""The sparse interpretable head (related.md §9): the job of :mod:`tasks.latent_analyses` that
writes ``latents/sparse_head.parquet`` and ``latents/sparse_head_latents.parquet``.

For each concept of the labelled sets (as for the cones) and each run-0 model at its full J,
an L1 logistic head (:func:`sae_core.sparse_head.fit_sparse_head`) is fitted on the documents'
mean-pooled concatenated codes (the kJ code of an ensemble, Proposition 1; train split) and
scored on the test split, beside a dense L2 logistic head on the raw pooled activations. Its
``top_latents`` latents by |w| are listed with their member, latent index and, when the
interpret stage explained them, their explanation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_contracts.latents import write_latent_table
from sae_core.probing import fit_probe, pooled_codes
from sae_core.sparse_head import fit_sparse_head
from tasks.config_latent import SparseHeadConfig
from tasks.latent_data import SPARSE_HEAD_FILE, SPARSE_HEAD_LATENTS_FILE, LabelledDocuments, Models
from tasks.progress import ProgressLog


def explanation_lookup(explanations: pd.DataFrame | None) -> dict[tuple[str, int, int], str]:
    """(model, member, latent) -> explanation, from the interpret stage's table (empty when None
    or when it lacks those columns)."""
    needed = {"model", "member", "latent", "explanation"}
    if explanations is None or not needed <= set(explanations.columns):
        return {}
    frame = explanations.dropna(subset=["explanation"]).drop_duplicates(["model", "member", "latent"])
    return {(str(m), int(j), int(i)): str(e) for m, j, i, e in frame[["model", "member", "latent", "explanation"]].itertuples(index=False)}


def _subset(docs: LabelledDocuments, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Token activations and re-indexed doc_index of the documents ``rows`` (in that order)."""
    position = torch.full((len(docs.docs),), -1, dtype=torch.long)
    position[torch.as_tensor(rows)] = torch.arange(len(rows))
    new_index = position[docs.doc_index]
    keep = new_index >= 0
    return docs.acts[keep], new_index[keep]


def run_sparse_head(run_dir: Path, models: Models, docs: LabelledDocuments, cfg: SparseHeadConfig, seed: int,
                    explanations: pd.DataFrame | None, progress: bool = True) -> list[str]:
    """Fit the heads; the paths written."""
    concepts = docs.concepts(cfg.tasks, cfg.max_datasets, cfg.max_concepts)
    if not concepts:
        raise ValueError("the sparse head needs probing tasks: the downstream stage's labelled sets have none "
                         "(set interpret.analyses.sparse_head.enabled: false, or add downstream.probing_datasets)")
    tasks = [(c, *docs.rows(c, "train", seed), *docs.rows(c, "test", seed)) for c in concepts]
    used = np.unique(np.concatenate([np.concatenate([tr, te]) for _, tr, _, te, _ in tasks]))
    where = {int(r): i for i, r in enumerate(used)}
    acts, doc_index = _subset(docs, used)
    dense = {c.name: fit_probe(docs.pooled[tr], y_tr).accuracy(docs.pooled[te], y_te) for c, tr, y_tr, te, y_te in tasks}
    known = explanation_lookup(explanations)
    models = [(m, e) for m, e in models if m.run == 0]
    log = ProgressLog("interpret: sparse head", len(models), "models", enabled=progress)
    heads, tops = [], []
    for model_dir, ensemble in models:
        codes = pooled_codes(ensemble, acts, doc_index, len(used)).double().numpy()   # [docs, kJ]
        m = ensemble.member_cfg.d_sae
        for concept, train, y_train, test, y_test in tasks:
            z_train, z_test = codes[[where[int(r)] for r in train]], codes[[where[int(r)] for r in test]]
            head = fit_sparse_head(z_train, y_train, cfg.l1, cfg.steps)
            heads.append({"method": model_dir.method, "model": model_dir.relative, "task": concept.name,
                          "n_features": codes.shape[1], "n_nonzero": head.n_nonzero, "l1": cfg.l1,
                          "accuracy": head.accuracy(z_test, y_test), "dense_accuracy": dense[concept.name],
                          "n_train": len(train), "n_test": len(test)})
            for rank, i in enumerate(head.top(cfg.top_latents), start=1):
                member, latent = divmod(int(i), m)
                tops.append({"method": model_dir.method, "model": model_dir.relative, "task": concept.name, "rank": rank,
                             "member": member, "latent": latent, "weight": float(head.coef[i]),
                             "explanation": known.get((model_dir.relative, member, latent), "")})
        log.advance(1, model_dir.relative)
    log.finish(f"{len(tasks)} tasks, λ = {cfg.l1}")
    run_dir = Path(run_dir)
    write_latent_table(pd.DataFrame(heads), run_dir / SPARSE_HEAD_FILE, "sparse_head")
    columns = ["method", "model", "task", "rank", "member", "latent", "weight", "explanation"]
    write_latent_table(pd.DataFrame(tops, columns=columns), run_dir / SPARSE_HEAD_LATENTS_FILE, "sparse_head_latents")
    return [SPARSE_HEAD_FILE, SPARSE_HEAD_LATENTS_FILE]
