"""The report's sections of the latent analyses (:mod:`tasks.latent_analyses`)."""

from __future__ import annotations

from pathlib import Path

from tasks.report_doc import Block


def latent_sections(run_dir: Path) -> list[Block]:
    """Monosemanticity, concept cones, the sparse head and steering, from what
    :func:`tasks.latent_analyses.run_latent_analyses` wrote under ``run_dir`` (nothing when
    it wrote nothing)."""
    return []
