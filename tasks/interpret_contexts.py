"""Latent contexts, a table of the evaluation stage: ``metrics/latent_contexts.parquet``
(contract: :mod:`data_contracts.interpret_contexts`), what the interpret stage reads.

For run 0 of every method, its first and last member: a seeded sample of latents stratified
by firing frequency (the firing latents sorted by frequency and cut into
``latents_per_member`` equal-count bins, one latent drawn per bin), and for each latent its
top-activating contexts, a seeded sample of its other activating tokens (held-out positives)
and tokens whose whole context window does not activate it (negatives). A context is the
window of tokens around the token, with the latent's code at each.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_contracts.interpret_contexts import SCHEMA, write_latent_contexts
from sae_core.ensemble import Ensemble
from sae_core.io import ENSEMBLE_FILE, load_ensemble
from tasks.common import ACTIVATIONS_DIR, MANIFEST_FILE, METRICS_DIR, ModelDir, discover_models
from tasks.config_interpret import LatentContextsConfig
from tasks.top_contexts import CONTEXTS_SPLIT, ENCODE_BATCH, TOKENS_AFTER, TOKENS_BEFORE, _first_tokens, _token_text

LATENT_CONTEXTS_FILE = f"{METRICS_DIR}/latent_contexts.parquet"
CONTEXTS_RUN = 0


def stratified_latents(frequency: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(latent, bin) pairs: the firing latents (frequency > 0) sorted by frequency (ties: lower
    index first), cut into min(n, #firing) equal-count bins (bin 0 the rarest), one latent
    drawn from each bin."""
    firing = np.flatnonzero(frequency > 0)
    if firing.size == 0 or n == 0:
        return []
    ordered = firing[np.argsort(frequency[firing], kind="stable")]
    return [(int(rng.choice(chunk)), b) for b, chunk in enumerate(np.array_split(ordered, min(n, ordered.size)))]


def window_rows(doc_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For tokens sorted by (document, position) with ``doc_codes`` [N] (one integer per
    document): (rows [N, W], valid [N, W]) of the window of each token, W = TOKENS_BEFORE + 1
    + TOKENS_AFTER rows around it, valid where the row exists and is in the same document."""
    offsets = np.arange(-TOKENS_BEFORE, TOKENS_AFTER + 1)
    rows = np.arange(doc_codes.size)[:, None] + offsets[None, :]
    inside = (rows >= 0) & (rows < doc_codes.size)
    clipped = np.clip(rows, 0, max(doc_codes.size - 1, 0))
    return clipped, inside & (doc_codes[clipped] == doc_codes[:, None])


def latent_rows(codes: np.ndarray, rows: np.ndarray, valid: np.ndarray, cfg: LatentContextsConfig,
                rng: np.random.Generator) -> list[tuple[str, int, int]]:
    """(kind, rank, token row) of one latent's contexts from its codes [N] on the sorted tokens:
    the ``cfg.top`` largest positive codes (ties: earlier token first), a seeded sample of
    ``cfg.random`` other positive ones, a seeded sample of ``cfg.negatives`` tokens whose
    whole window has code 0."""
    positive = np.flatnonzero(codes > 0)
    top = positive[np.argsort(-codes[positive], kind="stable")][: cfg.top]
    rest = np.setdiff1d(positive, top)
    random = np.sort(rng.choice(rest, min(cfg.random, rest.size), replace=False)) if rest.size else rest
    window_max = np.where(valid, codes[rows], 0.0).max(1)
    quiet = np.flatnonzero(window_max == 0)
    negative = np.sort(rng.choice(quiet, min(cfg.negatives, quiet.size), replace=False)) if quiet.size else quiet
    return [(kind, rank, int(i)) for kind, chosen in (("top", top), ("random", random), ("negative", negative))
            for rank, i in enumerate(chosen, start=1)]


def _rng(seed: int, model: str, member: int, latent: int = -1) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(model.encode()), member, latent + 1])


class SparseCodes:
    """The non-zero codes of some members on N tokens, from one encoding pass (the slow twin:
    :func:`tasks.top_contexts.latent_frequency` then :func:`~tasks.top_contexts.selected_codes`,
    two passes and a dense [M, N, L] gather)."""

    def __init__(self, ensemble: Ensemble, x: torch.Tensor, members: list[int]) -> None:
        parts, start = [], 0
        if ensemble.method != "boosting" and len(members) < ensemble.n_members:  # members read a alone: encode only these
            chosen = type(ensemble.members).stack([ensemble.members.member(j) for j in members])
            ensemble, members = Ensemble(chosen, "bagging"), list(range(len(members)))
        with torch.inference_mode():
            for xb in torch.split(x, ENCODE_BATCH):
                codes = ensemble.member_codes(xb)[members]                               # [M, B, d_sae]
                m, t, latent = codes.nonzero(as_tuple=True)
                parts.append((m, t + start, latent, codes[m, t, latent]))
                start += xb.shape[0]
        self.member, self.token, self.latent, self.value = (torch.cat(p).numpy() for p in zip(*parts))
        self.n_tokens, self.n_members, self.d_sae = x.shape[0], len(members), ensemble.member_cfg.d_sae

    def frequency(self) -> np.ndarray:
        """[M, d_sae]: fraction of the tokens on which each latent fires (float64)."""
        counts = np.bincount(self.member * self.d_sae + self.latent, minlength=self.n_members * self.d_sae)
        return counts.reshape(self.n_members, self.d_sae) / self.n_tokens

    def dense(self, m: int, latent: int) -> np.ndarray:
        """[N]: the codes of one latent of the m-th member (float64)."""
        out = np.zeros(self.n_tokens)
        keep = (self.member == m) & (self.latent == latent)
        out[self.token[keep]] = self.value[keep]
        return out


def model_contexts(model: ModelDir, ensemble, x: torch.Tensor, tokens: pd.DataFrame, rows: np.ndarray, valid: np.ndarray,
                   pieces: list[str], cfg: LatentContextsConfig) -> list[dict]:
    """The table's rows of one model (its first and last member) on the sorted tokens x [N, d]."""
    members = sorted({0, ensemble.n_members - 1})
    sparse = SparseCodes(ensemble, x, members)
    frequency = sparse.frequency()                                                      # [M, d_sae]
    chosen = [stratified_latents(frequency[m], cfg.latents_per_member, _rng(cfg.seed, model.relative, j))
              for m, j in enumerate(members)]
    out = []
    for m, j in enumerate(members):
        for latent, b in chosen[m]:
            c = sparse.dense(m, latent)
            for kind, rank, i in latent_rows(c, rows, valid, cfg, _rng(cfg.seed, model.relative, j, latent)):
                window = rows[i][valid[i]]
                out.append({"model": model.relative, "method": model.method, "member": j, "latent": latent,
                            "frequency": float(frequency[m, latent]), "frequency_bin": b, "kind": kind, "rank": rank,
                            "activation": float(c[i]), "doc_id": tokens["doc_id"].iloc[i],
                            "position": int(tokens["position"].iloc[i]), "center": int(np.searchsorted(window, i)),
                            "pieces": [pieces[r] for r in window], "activations": [float(v) for v in c[window]]})
    return out


def write_latent_contexts_table(run_dir: Path, model_name: str, cfg: LatentContextsConfig) -> str | None:
    """Write ``metrics/latent_contexts.parquet`` (validated) for run 0 of every saved model on the
    first ``cfg.max_tokens`` test tokens; its path relative to ``run_dir``. None, and a table
    left from an earlier evaluation removed, when there is nothing to describe (no run-0
    model, no test split, ``cfg.latents_per_member`` 0)."""
    run_dir = Path(run_dir)
    out = run_dir / LATENT_CONTEXTS_FILE
    models = [m for m in discover_models(run_dir) if m.run == CONTEXTS_RUN and (m.path(run_dir) / ENSEMBLE_FILE).is_file()]
    tokens = None
    if cfg.latents_per_member and models and (run_dir / MANIFEST_FILE).is_file():
        tokens = _first_tokens(run_dir / ACTIVATIONS_DIR, CONTEXTS_SPLIT, cfg.max_tokens)
    if tokens is None or tokens.empty:
        out.unlink(missing_ok=True)
        return None
    tokens = tokens.sort_values(["doc_id", "position"], kind="stable").reset_index(drop=True)
    x = torch.from_numpy(np.stack(tokens["activation"].to_numpy()).astype(np.float32))
    rows, valid = window_rows(pd.factorize(tokens["doc_id"])[0])
    piece = _token_text(model_name)
    pieces = [piece(t) for t in tokens["token_id"]]
    table = []
    for model in models:
        table += model_contexts(model, load_ensemble(model.path(run_dir)).eval(), x, tokens, rows, valid, pieces, cfg)
    write_latent_contexts(pd.DataFrame(table, columns=SCHEMA.names), out)
    return LATENT_CONTEXTS_FILE
