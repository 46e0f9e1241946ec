"""The report's training section: how the dead fraction and the loss moved during training.

Every saved model keeps its members' training records (``training_history.json`` beside
``ensemble.json``); the dead fraction there counts latents that have not fired within the
trainer's dead-latent window (the AuxK window of TopK-type SAEs), so it shows whether AuxK
had anything to do and whether wide SAEs (the expanded ones) lose more latents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sae_core.io import load_training_history
from sae_core.methods import method_rank
from tasks.common import ModelDir
from tasks.report_doc import Block, Heading, Missing, Paragraph, Table
from tasks.summaries import format_ci

#: the points of the run the table shows, as fractions of its steps
TRAINING_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
HISTORY_COLUMNS = ["method", "J", "run", "member", "step", "fraction", "loss", "dead_fraction"]


def training_frame(run_dir: Path, models: list[ModelDir]) -> pd.DataFrame:
    """One row per logged step of every member of every model that saved its history:
    method, J (the largest J it is scored at), run, member, step, fraction of its steps, loss, dead_fraction."""
    rows = []
    for model in models:
        histories = load_training_history(model.path(run_dir))
        if not histories:
            continue
        J = model.prefixes(len(histories))[-1][1]
        for member, records in enumerate(histories):
            last = records[-1].step if records else 1
            rows += [{"method": model.method, "J": J, "run": model.run, "member": member, "step": r.step,
                      "fraction": r.step / last, "loss": r.mean_loss(), "dead_fraction": float(np.mean(r.dead_fraction))}
                     for r in records]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def dead_fraction_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method and J: the dead fraction (mean over members and runs, [min, max] over runs)
    at each of TRAINING_FRACTIONS of the run, and the final loss."""
    rows = []
    for (method, J), group in sorted(frame.groupby(["method", "J"]), key=lambda kv: (method_rank(kv[0][0]), kv[0][1])):
        row: dict = {"method": method, "J": int(J)}
        for fraction in TRAINING_FRACTIONS:
            # the logged step closest to this point of the run, per member
            at = group.loc[(group["fraction"] - fraction).abs().groupby([group["run"], group["member"]]).idxmin()]
            per_run = at.groupby("run")["dead_fraction"].mean()
            row[f"dead @ {fraction:.0%}"] = format_ci(per_run.mean(), per_run.min(), per_run.max())
        final = group.loc[group.groupby(["run", "member"])["step"].idxmax()].groupby("run")["loss"].mean()
        row["final loss"] = format_ci(final.mean(), final.min(), final.max())
        rows.append(row)
    return pd.DataFrame(rows)


def training_section(frame: pd.DataFrame | None, dead_window: str) -> list[Block]:
    """The dead fraction over training per method and J, or what is missing."""
    blocks: list[Block] = [Heading(2, "Dead latents during training")]
    if frame is None or frame.empty:
        return blocks + [Missing("no model saved its training history (models trained before histories were kept); "
                                 "retrain with `sae-ensembles train --force`")]
    blocks.append(Paragraph(
        f"Fraction of latents that did not fire within the dead-latent window ({dead_window}) at points of each "
        "model's training; mean over members and runs, [min, max] over runs. TopK-type SAEs train their dead "
        "latents with AuxK."))
    blocks.append(Table(dead_fraction_table(frame), name="dead_fraction_during_training"))
    return blocks
