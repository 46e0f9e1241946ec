"""The latent analyses of the interpret stage (issue 21): monosemanticity of every latent,
concept cones, a sparse interpretable head and steering. The interpret stage calls
:func:`run_latent_analyses` after it wrote its explanations; each analysis is a job of its own
module and writes contracted tables under ``latents/`` (:mod:`data_contracts.latents`):

    latents/monosemanticity.parquet      tasks.latent_monosemanticity
    latents/cones.parquet                tasks.latent_cones
    latents/sparse_head.parquet          tasks.latent_sparse_head
    latents/sparse_head_latents.parquet
    latents/steering.parquet             tasks.latent_steering (decoder models only)

The cones and the sparse head read the downstream stage's labelled documents; without them
(the downstream stage has not run) they are skipped with a logged reason, as steering is for
an encoder model. A file of a skipped or disabled analysis left by an earlier run is removed,
so the report never shows a stale table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data_contracts.activations import read_manifest
from tasks.common import ACTIVATIONS_DIR
from tasks.config_latent import LatentAnalysisConfig
from tasks.latent_data import (
    CONES_FILE,
    MONOSEMANTICITY_FILE,
    SPARSE_HEAD_FILE,
    SPARSE_HEAD_LATENTS_FILE,
    STEERING_FILE,
    ensembles,
    labelled_documents,
)
from tasks.progress import run_logger

ALL_FILES = (MONOSEMANTICITY_FILE, CONES_FILE, SPARSE_HEAD_FILE, SPARSE_HEAD_LATENTS_FILE, STEERING_FILE)


def run_latent_analyses(run_dir: Path, cfg: LatentAnalysisConfig, explanations: pd.DataFrame | None,
                        *, progress: bool = True) -> list[str]:
    """Run every enabled analysis on ``run_dir``; the paths written, relative to it.
    ``explanations``: the interpret stage's per-latent table (model, member, latent,
    explanation, scores), or None."""
    run_dir = Path(run_dir)
    log = run_logger()
    written: list[str] = []
    models = ensembles(run_dir, runs={0}) if cfg.monosemanticity.enabled or cfg.cones.enabled or cfg.sparse_head.enabled else []
    if cfg.monosemanticity.enabled:
        from tasks.latent_monosemanticity import run_monosemanticity

        model = read_manifest(run_dir / ACTIVATIONS_DIR).model
        if cfg.monosemanticity.embedding_model == model:
            log.info(f"interpret: monosemanticity embeds contexts with {model}, the analysed model itself (circular: "
                     "its own geometry judges its SAE's latents); set monosemanticity.embedding_model to another encoder")
        written += run_monosemanticity(run_dir, models, cfg.monosemanticity, cfg.seed, model, progress)
    if cfg.cones.enabled or cfg.sparse_head.enabled:
        docs = labelled_documents(run_dir)
        if docs is None:
            log.info("interpret: concept cones and the sparse head skipped: no labelled documents under downstream/ "
                     "(run the downstream stage first)")
        else:
            if cfg.cones.enabled:
                from tasks.latent_cones import run_cones

                written += run_cones(run_dir, models, docs, cfg.cones, cfg.seed, progress)
            if cfg.sparse_head.enabled:
                from tasks.latent_sparse_head import run_sparse_head

                written += run_sparse_head(run_dir, models, docs, cfg.sparse_head, cfg.seed, explanations, progress)
    if cfg.steering.enabled:
        from tasks.latent_steering import run_steering

        written += run_steering(run_dir, cfg.steering, explanations, progress)
    for stale in set(ALL_FILES) - set(written):
        (run_dir / stale).unlink(missing_ok=True)
    return written
