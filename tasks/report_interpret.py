"""The report's interpretation section: the interpret stage's explanations and their scores.

Per method, the distribution of each score over the explained latents (mean with its CI
over latents, median and range); for bagging and boosting, the best-explained latents of the
first and the last member side by side — the paper's qualitative claim (bagging's members
alike, boosting's later members more specific) is read from them, not asserted.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data_contracts import validate
from tasks.report_doc import Block, Heading, Missing, Paragraph, Table, format_cell

EXPLANATIONS_FILE = "interpret/explanations.parquet"
SUMMARY_FILE = "interpret/summary.parquet"
SCORE_NAMES = {"detection_accuracy": "detection (balanced accuracy)", "detection_auroc": "detection (AUROC of P(yes))",
               "fuzzing_accuracy": "fuzzing (balanced accuracy)", "fuzzing_auroc": "fuzzing (AUROC of P(yes))"}
FIRST_LAST_METHODS = ("bagging", "boosting")
BEST_SHOWN = 3


def _interval(row: pd.Series) -> str:
    if pd.isna(row["ci_low"]):
        return f"{format_cell(row['mean'])} (n = {row['n_latents']}, no CI)"
    return f"{format_cell(row['mean'])} [{format_cell(row['ci_low'])}, {format_cell(row['ci_high'])}] (n = {row['n_latents']})"


def score_table(explanations: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, score): mean [CI] over latents, then the median and range of the latents' scores."""
    rows = []
    for (method, score), part in summary[summary["position"] == "all"].groupby(["method", "score"], sort=True):
        values = explanations.loc[explanations["method"] == method, score].dropna()
        rows.append({"method": method, "score": SCORE_NAMES[score], "mean [CI]": _interval(part.iloc[0]),
                     "median": float(values.median()), "min": float(values.min()), "max": float(values.max())})
    return pd.DataFrame(rows)


def best_explained(explanations: pd.DataFrame, method: str, n: int = BEST_SHOWN) -> pd.DataFrame:
    """The ``n`` best-explained latents (detection accuracy, then its AUROC) of the first and the
    last member of ``method``'s model, side by side by rank."""
    frame = explanations[explanations["method"] == method]
    if frame.empty or frame["member"].nunique() < 2:
        return pd.DataFrame()
    first, last = frame["member"].min(), frame["member"].max()
    columns = {}
    for label, member in (("first", first), ("last", last)):
        ranked = frame[frame["member"] == member].sort_values(["detection_accuracy", "detection_auroc"], ascending=False,
                                                              na_position="last").head(n)
        columns[f"member {member} ({label}) latent"] = [f"{lat} (f = {format_cell(f)})" for lat, f in zip(ranked["latent"], ranked["frequency"])]
        columns[f"member {member} explanation"] = list(ranked["explanation"])
        columns[f"member {member} detection (AUROC)"] = [f"{format_cell(acc)} ({format_cell(auc)})" for acc, auc
                                                        in zip(ranked["detection_accuracy"], ranked["detection_auroc"])]
    depth = max(len(v) for v in columns.values())
    return pd.DataFrame({k: v + [""] * (depth - len(v)) for k, v in columns.items()})


def interpretation_section(run_dir: Path) -> list[Block]:
    """The section from ``interpret/`` (a note naming the stage when it has not run)."""
    blocks: list[Block] = [Heading(2, "Interpreting latents")]
    if not (Path(run_dir) / EXPLANATIONS_FILE).is_file():
        return blocks + [Missing(f"`{EXPLANATIONS_FILE}` is written by `sae-ensembles interpret` (with interpret.latents_per_member > 0)")]
    explanations, summary = validate(Path(run_dir) / EXPLANATIONS_FILE), validate(Path(run_dir) / SUMMARY_FILE)
    if explanations.empty:
        return blocks + [Paragraph("No latent was explained (the contexts table held none of the chosen methods).")]
    backends = ", ".join(f"`{b}`" for b in sorted(explanations["backend"].unique()))
    confidence = float(summary["confidence"].iloc[0]) if len(summary) else 0.95
    blocks.append(Paragraph(
        f"{len(explanations)} latents (sampled per member across firing-frequency bins) explained by {backends} from their "
        "top-activating contexts. Detection: the scorer judges held-out activating and non-activating contexts one at a "
        "time; fuzzing: whether marked tokens are where the latent fires (half the markings are wrong). 0.5 is chance for "
        f"every score. Mean with its {confidence:.0%} t-interval over latents, cut to [0, 1]."))
    blocks.append(Table(score_table(explanations, summary), name="interpret_scores"))
    for method in FIRST_LAST_METHODS:
        side = best_explained(explanations, method)
        if side.empty:
            continue
        parts = summary[(summary["method"] == method) & (summary["score"] == "detection_accuracy")].set_index("position")
        text = ", ".join(f"{p} member {_interval(parts.loc[p])}" for p in ("first", "last") if p in parts.index)
        blocks += [Heading(3, f"{method}: first vs last member"),
                   Paragraph(f"Best-explained latents of the first and last member side by side; detection accuracy: {text}.")]
        blocks.append(Table(side))
    return blocks
