"""The report's sections of the latent analyses (:mod:`tasks.latent_analyses`): monosemanticity
distributions with CIs, concept-cone containment per method and J against random
dictionaries, the sparse head's accuracy and top latents with their explanations, and one
steering example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts.latents import read_latent_table
from sae_core.monosemanticity import bootstrap_mean_ci
from sae_core.stats import mean_ci
from tasks.latent_data import CONES_FILE, MONOSEMANTICITY_FILE, SPARSE_HEAD_FILE, SPARSE_HEAD_LATENTS_FILE, STEERING_FILE
from tasks.report_doc import Block, Heading, Paragraph, Table

CONFIDENCE = 0.95
HEAD_LATENT_ROWS = 40          # top-latent rows shown (the table holds them all)
BOOTSTRAP = 1000


def _read(run_dir: Path, rel: str) -> pd.DataFrame | None:
    path = Path(run_dir) / rel
    return read_latent_table(path) if path.is_file() else None


def _interval(low: float | None, high: float | None) -> str:
    return "–" if low is None or high is None else f"[{low:.3g}, {high:.3g}]"


def monosemanticity_table(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group: latents, scored (defined) ones, mean score with its bootstrap CI, median."""
    rows = []
    for key, group in frame.groupby(by, sort=True):
        scores = group["score"].dropna().to_numpy(dtype=float)
        key = key if isinstance(key, tuple) else (key,)
        if scores.size:
            mean, low, high = bootstrap_mean_ci(scores, CONFIDENCE, BOOTSTRAP)
            median = float(np.median(scores))
        else:
            mean, low, high, median = float("nan"), None, None, float("nan")
        rows.append([*key, len(group), int(scores.size), mean, _interval(low, high), median])
    return pd.DataFrame(rows, columns=[*by, "latents", "scored", "mean MS", f"{CONFIDENCE:.0%} CI", "median MS"])


def cones_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method and J: mean containment over concepts with its t-CI, the random
    dictionaries' mean at the same size, and the atoms used."""
    rows = []
    for (method, J), group in frame.groupby(["method", "n_members"], sort=True):
        sae, random = group[group["dictionary"] == "sae"], group[group["dictionary"] == "random"]
        mean, low, high = mean_ci(sae["containment"], CONFIDENCE)
        rows.append([method, int(J), mean, _interval(low, high),
                     float(random["containment"].mean()) if len(random) else float("nan"),
                     float(sae["n_atoms"].mean()), int(sae["concept"].nunique())])
    return pd.DataFrame(rows, columns=["method", "J", "containment", f"{CONFIDENCE:.0%} CI", "random dictionary", "atoms used", "concepts"])


def _monosemanticity_blocks(frame: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = [Heading(3, "Monosemanticity"), Paragraph(
        "Pach et al.'s score per latent: the mean cosine similarity of the sentence embeddings of all pairs of evaluation "
        "contexts, weighted by the latent's min-max normalised activations on both (higher: its contexts share one "
        f"concept). Mean over latents with a {CONFIDENCE:.0%} bootstrap CI; `neurons` and `random_directions` are the raw "
        "activations' baselines on the same contexts; 'scored' counts latents active on at least two contexts.")]
    blocks.append(Table(monosemanticity_table(frame, ["method"]), name="latent_monosemanticity"))
    members = frame[frame["method"].isin(["bagging", "boosting"])]
    if len(members):
        blocks += [Paragraph("Per member of bagging and boosting (the paper: bagging's members alike, boosting's later "
                             "members more specific)."), Table(monosemanticity_table(members, ["method", "member"]))]
    return blocks


def _head_blocks(heads: pd.DataFrame, latents: pd.DataFrame | None) -> list[Block]:
    summary = heads.groupby("method", sort=True).agg(
        tasks=("task", "nunique"), accuracy=("accuracy", "mean"), dense_accuracy=("dense_accuracy", "mean"),
        nonzero=("n_nonzero", "mean"), features=("n_features", "first")).reset_index()
    blocks: list[Block] = [Heading(3, "Sparse interpretable head"), Paragraph(
        f"An L1 logistic head (λ = {heads['l1'].iloc[0]:.3g}) on the mean-pooled concatenated codes of each run-0 model, "
        "per probing concept, against a dense L2 head on the raw activations; test accuracy averaged over the tasks."),
        Table(summary, name="sparse_head")]
    if latents is not None and len(latents):
        shown = latents.sort_values(["task", "method", "rank"]).head(HEAD_LATENT_ROWS)
        blocks += [Paragraph("Each head's strongest latents by |w| (member, latent within it) with the interpret stage's "
                             "explanation where it wrote one."),
                   Table(shown[["task", "method", "rank", "member", "latent", "weight", "explanation"]].reset_index(drop=True))]
    return blocks


def _steering_blocks(frame: pd.DataFrame) -> list[Block]:
    first = frame.sort_values(["member", "latent"]).iloc[0]
    example = frame[(frame["member"] == first["member"]) & (frame["latent"] == first["latent"])]
    shown = example[["prompt", "strength", "norm", "generation", "changed"]].copy()
    shown["generation"] = shown["generation"].str.replace("\n", " ⏎ ", regex=False)   # one table row per generation
    return [Heading(3, "Steering"), Paragraph(
        f"Greedy generations with strength × the latent's typical activation times its decoder row added to the residual "
        f"stream at the hooked layer; latent {int(first['latent'])} of member {int(first['member'])} of `{first['model']}` "
        f"({frame[['member', 'latent']].drop_duplicates().shape[0]} latents steered, "
        f"{int(frame['changed'].sum())} of {int((frame['strength'] != 0).sum())} steered generations changed)."),
        Table(shown.reset_index(drop=True), name="steering")]


def latent_sections(run_dir: Path) -> list[Block]:
    """Monosemanticity, concept cones, the sparse head and steering, from what
    :func:`tasks.latent_analyses.run_latent_analyses` wrote under ``run_dir`` (nothing when
    it wrote nothing)."""
    mono, cones = _read(run_dir, MONOSEMANTICITY_FILE), _read(run_dir, CONES_FILE)
    heads, steering = _read(run_dir, SPARSE_HEAD_FILE), _read(run_dir, STEERING_FILE)
    if all(t is None for t in (mono, cones, heads, steering)):
        return []
    blocks: list[Block] = [Heading(2, "Latent analyses")]
    if mono is not None:
        blocks += _monosemanticity_blocks(mono)
    if cones is not None:
        blocks += [Heading(3, "Concept cones"), Paragraph(
            "Containment = 1 − residual² of a non-negative least-squares fit of each probing concept's unit probe direction "
            f"on the top-{int(cones['candidates'].iloc[0])} decoder rows by cosine (cos² of its angle to the cone) of each run-0 "
            f"model, mean over concepts with a {CONFIDENCE:.0%} t-CI; random dictionaries with as many atoms are the guard (more atoms "
            "contain more by size alone)."), Table(cones_table(cones), name="concept_cones")]
    if heads is not None:
        blocks += _head_blocks(heads, _read(run_dir, SPARSE_HEAD_LATENTS_FILE))
    if steering is not None and len(steering):
        blocks += _steering_blocks(steering)
    return blocks
