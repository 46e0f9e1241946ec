"""Sparse probing and SCR of one dictionary, given the documents' pooled activations (SPEC §7).

:func:`make_tasks` turns the labelled sets into row indices and labels and fits the SCR
probes once (they read only the activations, so every method shares them); a pair
without headroom (A_oracle − A_base below ``scr_min_headroom``) gets no SCR task, only its
row in the pair table (:func:`scr_pair_table`);
:func:`evaluate_codes` scores one dictionary's pooled codes; :func:`evaluate_model` loads
a saved model and scores it at every J it is compared at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sae_core.devices import resolve_device
from sae_core.io import load_ensemble
from sae_core.probing import full_probe_accuracy, pooled_member_codes, prefix_pooled_codes, sparse_probe_accuracy
from sae_core.scr import SCRData, SCRProbes, fit_scr_probes, has_headroom, shift_curve
from tasks.common import ModelDir
from tasks.config import DownstreamConfig
from tasks.downstream_tokens import DocumentTokens
from tasks.labelled import LabelledSets

PROBING_COLUMNS = ["method", "n_members", "run", "dataset", "class", "k", "accuracy"]
SCR_COLUMNS = ["method", "n_members", "run", "pair", "n_ablated", "acc_base", "acc_ablated", "acc_oracle", "score"]
SCR_SPLITS = ("train_biased", "train_balanced", "test")
SCR_PAIR_COLUMNS = ["pair", "acc_base", "acc_oracle", "headroom", "min_headroom", "conditioned", "n_test"]


@dataclass
class ProbingTask:
    """One probing set: rows into the pooled documents and their labels, per split."""

    train_rows: np.ndarray
    test_rows: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


@dataclass
class SCRTask:
    """One SCR pair: its data on the raw activations, the rows of its balanced train and
    test documents, and the probes fitted on the raw activations."""

    data: SCRData
    balanced_rows: np.ndarray
    test_rows: np.ndarray
    probes: SCRProbes


def _rows(frame: pd.DataFrame, split: str, position: dict[str, int]) -> np.ndarray:
    return np.array([position[d] for d in frame.loc[frame["split"] == split, "doc_id"]], dtype=np.int64)


def make_tasks(
    sets: LabelledSets, doc_ids: list[str], pooled_acts: np.ndarray, min_headroom: float = 0.0
) -> tuple[dict[str, ProbingTask], dict[str, SCRTask], pd.DataFrame]:
    """Row indices and labels of every probing task, the fitted SCR probes of every pair
    with headroom, and the pair table (SCR_PAIR_COLUMNS: every pair, with or without).

    ``pooled_acts``: [N, d], row i the document ``doc_ids[i]``.
    """
    position = {d: i for i, d in enumerate(doc_ids)}
    probing = {}
    for name, f in sets.probing.items():
        probing[name] = ProbingTask(
            _rows(f, "train", position), _rows(f, "test", position),
            f.loc[f["split"] == "train", "label"].to_numpy(), f.loc[f["split"] == "test", "label"].to_numpy(),
            sorted(f["label"].unique().tolist()),
        )
    scr, pairs = {}, []
    for pair, f in sets.scr.items():
        b, o, t = (f[f["split"] == s] for s in SCR_SPLITS)
        rb, ro, rt = (_rows(f, s, position) for s in SCR_SPLITS)
        data = SCRData(
            pooled_acts[rb], b["y"].to_numpy(), pooled_acts[ro], o["y"].to_numpy(), o["z"].to_numpy(), pooled_acts[rt], t["y"].to_numpy()
        )
        probes = fit_scr_probes(data)
        conditioned = has_headroom(probes.acc_base, probes.acc_oracle, min_headroom)
        pairs.append({"pair": pair, "acc_base": probes.acc_base, "acc_oracle": probes.acc_oracle, "headroom": probes.headroom,
                      "min_headroom": min_headroom, "conditioned": conditioned, "n_test": len(rt)})
        if conditioned:
            scr[pair] = SCRTask(data, ro, rt, probes)
    return probing, scr, pd.DataFrame(pairs, columns=SCR_PAIR_COLUMNS)


def evaluate_codes(
    method: str, n_members: int, run: int, codes: np.ndarray, W_dec: np.ndarray,
    probing: dict[str, ProbingTask], scr: dict[str, SCRTask], cfg: DownstreamConfig, dense_probe: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Probing rows (PROBING_COLUMNS) and SCR rows (SCR_COLUMNS) of one dictionary.

    ``codes``: pooled codes [N, m]; ``W_dec``: its decoder [m, d]. ``dense_probe`` adds a
    probe on every feature (k = m), the raw baseline's upper line.
    """
    key = {"method": method, "n_members": n_members, "run": run}
    prows, srows = [], []
    for name, task in probing.items():
        results = sparse_probe_accuracy(codes[task.train_rows], task.train_labels, codes[task.test_rows], task.test_labels,
                                        cfg.probing_ks, classes=task.classes, seed=cfg.seed)
        if dense_probe:
            results += full_probe_accuracy(codes[task.train_rows], task.train_labels, codes[task.test_rows], task.test_labels,
                                           classes=task.classes, seed=cfg.seed)
        prows += [{**key, "dataset": name, "class": r.cls, "k": r.k, "accuracy": r.accuracy} for r in results]
    for pair, task in scr.items():
        curve = shift_curve(task.probes, task.data, codes[task.balanced_rows], codes[task.test_rows], W_dec, cfg.scr_n_ablated)
        srows += [
            {**key, "pair": pair, "n_ablated": r.n_ablated, "acc_base": r.acc_base, "acc_ablated": r.acc_ablated,
             "acc_oracle": r.acc_oracle, "score": r.score}
            for r in curve
        ]
    return prows, srows


@torch.no_grad()
def evaluate_model(
    model: ModelDir, run_dir: Path, tokens: DocumentTokens, probing: dict[str, ProbingTask], scr: dict[str, SCRTask],
    cfg: DownstreamConfig,
) -> tuple[list[dict], list[dict]]:
    """Probing and SCR rows of one saved model at every J it is compared at
    (:meth:`ModelDir.prefixes`: each prefix of bagging/boosting, its own J otherwise).

    The members are encoded once, on ``cfg.device``; each prefix only re-weights their
    pooled codes (on the CPU, like the probes).
    """
    path = model.path(run_dir)
    ens = load_ensemble(path).to(resolve_device(cfg.device))
    if ens.d_in != tokens.acts.shape[1]:
        raise ValueError(f"model {path} reads d={ens.d_in}, but the activations have d={tokens.acts.shape[1]}")
    members = pooled_member_codes(ens, tokens.acts, tokens.doc_index, len(tokens.doc_ids), cfg.encode_batch_size)
    d_sae = ens.member_cfg.d_sae
    W_all = ens.W_dec.detach().float().cpu().numpy()
    prows, srows = [], []
    for n, label_j in model.prefixes(ens.n_members):
        codes = prefix_pooled_codes(members, ens.prefix_alpha(n).cpu()).numpy()
        p, s = evaluate_codes(model.method, label_j, model.run, codes, W_all[: n * d_sae], probing, scr, cfg)
        prows += p
        srows += s
    return prows, srows
