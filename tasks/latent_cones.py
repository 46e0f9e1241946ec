"""Concept cones (related.md §4): the job of :mod:`tasks.latent_analyses` that writes
``latents/cones.parquet``.

Concept directions are the unit weight vectors (in the raw activation space) of logistic
probes on the mean-pooled raw activations of the downstream stage's labelled documents (train
split; one per binary task, one-vs-rest per class of a multi-class set). For every run-0 model
and every J it stands at (each prefix of bagging and boosting), the direction is fitted in the
cone of its dictionary's top-s atoms by cosine (:func:`sae_core.cones.cone_fits`), and so it is
in ``random_dictionaries`` random dictionaries of the same number of atoms (nested: the
J-prefix of one random draw), the guard against size alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts.latents import write_latent_table
from sae_core.cones import cone_fits, random_dictionary
from sae_core.probing import fit_probe
from tasks.config_latent import ConesConfig
from tasks.latent_data import CONES_FILE, LabelledDocuments, Models
from tasks.progress import ProgressLog


def concept_directions(docs: LabelledDocuments, cfg: ConesConfig, seed: int) -> dict[str, np.ndarray]:
    """name -> the unit probe direction [d] of each concept (train rows only)."""
    out = {}
    for concept in docs.concepts(cfg.concepts, cfg.max_datasets, cfg.max_concepts):
        rows, y = docs.rows(concept, "train", seed)
        direction = fit_probe(docs.pooled[rows], y).direction
        out[concept.name] = direction / np.linalg.norm(direction)
    return out


def _row(method: str, model: str, run: int, n: int, concept: str, dictionary: str, draw: int, s: int, fit) -> dict:
    return {"method": method, "model": model, "run": run, "n_members": n, "concept": concept, "dictionary": dictionary,
            "draw": draw, "candidates": s, "containment": fit.containment, "residual": fit.residual, "n_atoms": fit.n_atoms}


def run_cones(run_dir: Path, models: Models, docs: LabelledDocuments, cfg: ConesConfig, seed: int,
              progress: bool = True) -> list[str]:
    """Fit every concept in every model's cone at every J (and the random guard); the paths written."""
    directions = concept_directions(docs, cfg, seed)
    if not directions:
        raise ValueError("concept cones need probing concepts: the downstream stage's labelled sets have none "
                         "(set interpret.analyses.cones.enabled: false, or add downstream.probing_datasets)")
    names, w = list(directions), np.stack(list(directions.values()))
    largest = max(e.W_dec.shape[0] for _, e in models)
    guards = [random_dictionary(largest, w.shape[1], seed + 1 + draw) for draw in range(cfg.random_dictionaries)]
    log = ProgressLog("interpret: concept cones", len(models), "models", enabled=progress)
    rows = []
    for model_dir, ensemble in models:
        W = ensemble.W_dec.detach().cpu().double().numpy()
        m = ensemble.member_cfg.d_sae
        for members, J in model_dir.prefixes(ensemble.n_members):
            atoms = members * m
            dictionaries = [("sae", 0, W[:atoms])] + [("random", draw, R[:atoms]) for draw, R in enumerate(guards)]
            for kind, draw, D in dictionaries:
                for name, fit in zip(names, cone_fits(w, D, cfg.candidates)):
                    rows.append(_row(model_dir.method, model_dir.relative, model_dir.run, J, name, kind, draw, cfg.candidates, fit))
        log.advance(1, model_dir.relative)
    log.finish(f"{len(directions)} concepts, s = {cfg.candidates}")
    write_latent_table(pd.DataFrame(rows), Path(run_dir) / CONES_FILE, "concept_cones")
    return [CONES_FILE]
