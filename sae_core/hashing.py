"""Content hashes of files (one definition, used by the model loader and the artifact contracts)."""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_CHUNK_BYTES = 1 << 22


def file_sha256(path: str | Path, chunk: int = HASH_CHUNK_BYTES) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
