"""SAELens export for the CLI (``sae-ensembles export``): the CLI only calls flows, so this
thin wrapper stands between it and :func:`tasks.interop.export_model`. Export is a utility
on a finished run, not a pipeline stage: it runs without Prefect."""

from __future__ import annotations

from pathlib import Path

from tasks.interop import ExportResult, export_model

#: formats ``sae-ensembles export --format`` writes
EXPORT_FORMATS = ("saelens",)


def export_run_model(run_dir: str | Path, model: str, run: int, out: str | Path, *, member: int | None = None,
                     one_sae_only: bool = False, fmt: str = "saelens") -> ExportResult:
    """Export ``models/<model>/run=<run>/`` of ``run_dir`` to ``out`` in format ``fmt`` (see :func:`tasks.interop.export_model`)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
    return export_model(run_dir, model, run, out, member=member, one_sae_only=one_sae_only)
