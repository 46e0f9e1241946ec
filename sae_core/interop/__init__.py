"""Interoperation with other SAE tools: SAELens folders out and in (:mod:`sae_core.interop.saelens`)."""

from sae_core.interop.saelens import (
    FROM_SAELENS,
    SAELENS_ARCHITECTURE,
    NotExportable,
    NotImportable,
    NotOneSAE,
    SAELensFolder,
    export_bagging_as_one_sae,
    export_member,
    fold_bagging,
    read_saelens_folder,
    saelens_config,
    saelens_tensors,
    write_saelens_folder,
)

__all__ = [
    "FROM_SAELENS",
    "SAELENS_ARCHITECTURE",
    "NotExportable",
    "NotImportable",
    "NotOneSAE",
    "SAELensFolder",
    "export_bagging_as_one_sae",
    "export_member",
    "fold_bagging",
    "read_saelens_folder",
    "saelens_config",
    "saelens_tensors",
    "write_saelens_folder",
]
