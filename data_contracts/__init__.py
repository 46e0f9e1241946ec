"""Schemas and great-expectations suites of every artifact, and the one ``validate`` entry point.

Only this package knows an artifact's schema. Stages call :func:`validate` on what they
read and write; a violation raises :class:`ContractViolation` naming the artifact, the
failed expectations and sample offending rows; an artifact whose footer names a kind
this package has no contract for raises its subclass :class:`UnknownArtifact`.
"""

from __future__ import annotations

from pathlib import Path

from data_contracts.core import ARTIFACT_KEY, ContractViolation, Failure


class UnknownArtifact(ContractViolation):
    """The artifact names a kind (in its Parquet footer) that no contract here describes,
    e.g. one written by a newer version. Callers may read such a file unvalidated."""

    def __init__(self, artifact: str | Path, kind: str) -> None:
        self.kind = kind
        super().__init__(artifact, [Failure("known artifact kind", f"no contract for kind {kind!r}")])


def artifact_kind(path: str | Path) -> str:
    """'activations' for an activation directory, else the kind stored in the Parquet footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        return "activations"
    if not path.exists():
        raise ContractViolation(path, [Failure("artifact exists", "no such file or directory")])
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as err:
        raise ContractViolation(path, [Failure("readable Parquet", f"cannot be read ({err})")]) from err
    kind = meta.get(ARTIFACT_KEY)
    if kind is None:
        raise ContractViolation(path, [Failure("artifact kind", "the Parquet footer names no sae_ensembles artifact")])
    return kind.decode()


def validate(artifact: str | Path) -> object:
    """Validate an artifact by its kind; returns its manifest or frame.

    Raises ContractViolation when it breaks its contract, UnknownArtifact when no contract
    knows its kind.
    """
    kind = artifact_kind(artifact)
    if kind == "activations":
        from data_contracts.activations import validate_activations

        return validate_activations(artifact)
    if kind == "documents":
        from data_contracts.documents import read_documents

        return read_documents(artifact)
    if kind in ("intrinsic_metrics", "metric_summary"):
        from data_contracts.metrics import read_intrinsic, read_summary

        return read_intrinsic(artifact) if kind == "intrinsic_metrics" else read_summary(artifact)
    if kind == "top_contexts":
        from data_contracts.contexts import read_contexts

        return read_contexts(artifact)
    if kind == "latent_contexts":
        from data_contracts.interpret_contexts import read_latent_contexts

        return read_latent_contexts(artifact)
    if kind.startswith("interpret_"):
        from data_contracts.interpret import KINDS as INTERPRET_KINDS, read_interpret

        if kind in INTERPRET_KINDS:
            return read_interpret(artifact, kind)
    from data_contracts.latents import KINDS as LATENT_KINDS, read_latent_table

    if kind in LATENT_KINDS:
        return read_latent_table(artifact, kind)
    if kind == "sweep_results":
        from data_contracts.sweep import read_results

        return read_results(artifact)
    from data_contracts.labelled import KINDS as DOWNSTREAM_KINDS, read_table

    if kind in DOWNSTREAM_KINDS:
        return read_table(artifact, kind)
    raise UnknownArtifact(artifact, kind)


__all__ = ["ContractViolation", "Failure", "UnknownArtifact", "validate", "artifact_kind"]
