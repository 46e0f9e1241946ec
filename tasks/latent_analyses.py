"""The latent analyses of the interpret stage: monosemanticity, concept cones, a sparse
interpretable head and steering (issue 21). The interpret stage calls
:func:`run_latent_analyses` after it wrote its explanations."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.config_latent import LatentAnalysisConfig


def run_latent_analyses(run_dir: Path, cfg: LatentAnalysisConfig, explanations: pd.DataFrame | None) -> list[str]:
    """Run every enabled analysis on ``run_dir``; the paths written, relative to it.
    ``explanations``: the interpret stage's per-latent table (model, member, latent,
    explanation, scores), or None."""
    return []
