"""Top-activating contexts, a table of the evaluation stage: ``metrics/top_contexts.parquet``.

For the first and the last member of bagging run 0, the ``latents_per_member`` latents that
fire on the most test tokens, and for each the ``contexts_per_latent`` tokens where it
fires strongest, with the tokens around them as text. The contract is
:mod:`data_contracts.contexts`; the report shows the table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from data_contracts.activations import read_manifest
from data_contracts.contexts import SCHEMA as CONTEXTS_SCHEMA, write_contexts
from sae_core.ensemble import Ensemble
from sae_core.io import ENSEMBLE_FILE, load_ensemble
from tasks.common import ACTIVATIONS_DIR, MANIFEST_FILE, METRICS_DIR, ModelDir

TOP_CONTEXTS_FILE = f"{METRICS_DIR}/top_contexts.parquet"
CONTEXTS_MODEL = ModelDir("bagging", 0)   # bagging's members are trained alike, so member 0 and J−1 compare
CONTEXTS_SPLIT = "test"
MAX_CONTEXT_TOKENS = 20_000               # the first this many test tokens (file order) are searched
TOKENS_BEFORE = 6                         # context shown before the marked token
TOKENS_AFTER = 2                          # and after it
ENCODE_BATCH = 4096                       # tokens encoded at once
_SHARD_COLUMNS = ["doc_id", "position", "token_id", "activation"]


def _first_tokens(acts_dir: Path, split: str, max_tokens: int) -> pd.DataFrame | None:
    """The first ``max_tokens`` rows of ``split`` in shard order (doc_id, position, token_id,
    activation), or None when the split has no shards."""
    shards = read_manifest(acts_dir).shards_of(split)
    frames, rows = [], 0
    for shard in shards:
        if rows >= max_tokens:
            break
        frame = pq.read_table(acts_dir / shard.file, columns=_SHARD_COLUMNS).to_pandas()
        frames.append(frame)
        rows += len(frame)
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True).iloc[:max_tokens]


def _token_text(model_name: str) -> Callable[[int], str]:
    """token id -> its text piece, with the extraction model's tokenizer; '#<id>' when the
    tokenizer cannot be loaded (the table stays usable, only less readable)."""
    from sae_core.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_name)
    except (OSError, ValueError, ImportError):
        return lambda token_id: f"#{int(token_id)}"
    return lambda token_id: tokenizer.convert_ids_to_tokens(int(token_id))


def _context(document: pd.DataFrame, position: int, piece: Callable[[int], str]) -> str:
    """The tokens of ``document`` (sorted by position) from TOKENS_BEFORE before ``position``
    to TOKENS_AFTER after it, the token at ``position`` marked [[like this]]."""
    near = document[(document["position"] >= position - TOKENS_BEFORE) & (document["position"] <= position + TOKENS_AFTER)]
    return " ".join(f"[[{piece(t)}]]" if p == position else piece(t) for p, t in zip(near["position"], near["token_id"]))


def _batches(x: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(x, ENCODE_BATCH))


def latent_frequency(ensemble: Ensemble, x: torch.Tensor, members: list[int]) -> torch.Tensor:
    """Fraction of the N tokens on which each latent of each of ``members`` fires:
    x [N, d] -> [M, d_sae] (float64), encoded ENCODE_BATCH tokens at a time."""
    counts = sum((ensemble.member_codes(xb)[members] > 0).sum(1) for xb in _batches(x))  # [M, d_sae]
    return counts.double() / x.shape[0]


def selected_codes(ensemble: Ensemble, x: torch.Tensor, members: list[int], latents: torch.Tensor) -> torch.Tensor:
    """The codes of ``latents`` [M, L] (row m: latents of ``members[m]``) on every token:
    x [N, d] -> [M, N, L], without holding the codes of all d_sae latents of all N tokens."""
    parts = []
    for xb in _batches(x):
        codes = ensemble.member_codes(xb)[members]                                        # [M, B, d_sae]
        parts.append(torch.gather(codes, 2, latents[:, None, :].expand(-1, codes.shape[1], -1)))
    return torch.cat(parts, 1)


def most_frequent_latents(frequency: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most frequent latents per row of ``frequency`` [M, d_sae] -> [M, n] (ties: lower index first)."""
    return torch.argsort(frequency, dim=1, descending=True, stable=True)[:, :n]


def contexts_table(model: str, members: list[int], frequency: torch.Tensor, latents: torch.Tensor, codes: torch.Tensor,
                   tokens: pd.DataFrame, contexts_per_latent: int, piece: Callable[[int], str]) -> pd.DataFrame:
    """The rows of :mod:`data_contracts.contexts`: per member and latent, its ``contexts_per_latent``
    largest positive codes (rank 1 the largest) with the text around each token.

    model: the model directory ("models/bagging/run=0"); members: the M members described;
    frequency: [M, d_sae] from :func:`latent_frequency`; latents: [M, L] the latents shown;
    codes: [M, N, L] their codes (:func:`selected_codes`); tokens: the N tokens' doc_id,
    position and token_id in the same order; piece: token id -> its text.
    """
    documents = {doc: g.sort_values("position") for doc, g in tokens[["doc_id", "position", "token_id"]].groupby("doc_id")}
    rows = []
    for m, j in enumerate(members):
        for col, latent in enumerate(latents[m].tolist()):
            strongest = torch.topk(codes[m, :, col], min(contexts_per_latent, codes.shape[1]))
            for rank, (value, i) in enumerate(zip(strongest.values.tolist(), strongest.indices.tolist()), start=1):
                if value <= 0:
                    break  # sorted: no further token activates this latent
                doc, position = tokens["doc_id"].iloc[i], int(tokens["position"].iloc[i])
                rows.append({"model": model, "member": j, "latent": latent, "frequency": float(frequency[m, latent]),
                             "rank": rank, "activation": value, "doc_id": doc, "position": position,
                             "context": _context(documents[doc], position, piece)})
    return pd.DataFrame(rows, columns=CONTEXTS_SCHEMA.names)


def write_top_contexts(run_dir: Path, model_name: str, latents_per_member: int, contexts_per_latent: int) -> str | None:
    """Write ``metrics/top_contexts.parquet`` (validated) for bagging run 0's first and last
    member on the first MAX_CONTEXT_TOKENS test tokens; returns its path relative to ``run_dir``.

    model_name: the extraction model (the manifest's ``model``), whose tokenizer turns token
    ids into text. Returns None, and removes a table left from an earlier evaluation, when
    there is nothing to describe: no saved bagging run 0, no test split, or
    ``latents_per_member`` or ``contexts_per_latent`` is 0.
    """
    run_dir = Path(run_dir)
    out = run_dir / TOP_CONTEXTS_FILE
    ensemble_dir = CONTEXTS_MODEL.path(run_dir)
    acts_dir = run_dir / ACTIVATIONS_DIR
    tokens = None
    if latents_per_member and contexts_per_latent and (ensemble_dir / ENSEMBLE_FILE).is_file() and (run_dir / MANIFEST_FILE).is_file():
        tokens = _first_tokens(acts_dir, CONTEXTS_SPLIT, MAX_CONTEXT_TOKENS)
    if tokens is None or tokens.empty:
        out.unlink(missing_ok=True)  # a table of models that are gone would mislead the report
        return None
    x = torch.from_numpy(np.stack(tokens["activation"].to_numpy()).astype(np.float32))  # [N, d]
    ensemble = load_ensemble(ensemble_dir).eval()
    members = sorted({0, ensemble.n_members - 1})
    with torch.inference_mode():
        frequency = latent_frequency(ensemble, x, members)
        latents = most_frequent_latents(frequency, latents_per_member)
        codes = selected_codes(ensemble, x, members, latents)
    table = contexts_table(CONTEXTS_MODEL.relative, members, frequency, latents, codes, tokens, contexts_per_latent,
                           _token_text(model_name))
    write_contexts(table, out)
    return TOP_CONTEXTS_FILE
