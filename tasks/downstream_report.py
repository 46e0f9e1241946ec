"""The report's downstream sections that the sae-probes benchmark and the SCR headroom guard add.

- :func:`probing_sections`: the per-set probing table (BBC, tweets, files) as before, then
  the benchmark: mean over tasks with the CI over tasks, its half-width against the
  target, paired differences between the methods (which are outside their CIs),
  boosting's rows across J, and the per-task table.
- :func:`scr_section`: every pair's A_base, A_oracle and headroom ("no headroom" pairs
  shown with their numbers), then the scores of the pairs with headroom only.

Blocks only (:mod:`tasks.report_doc`); nothing is read or written here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sae_core.methods import RAW, method, method_rank
from tasks.common import DOWNSTREAM_DIR
from tasks.probing_benchmark import (
    benchmark_rows,
    comparisons,
    identical_across_j,
    largest_j_points,
    mean_over_tasks,
    paired_differences,
    point_label,
    task_accuracies,
)
from tasks.report_doc import Block, Heading, Missing, Paragraph, Table
from tasks.report_sections import SCR_FILE, needs, probing_section
from tasks.report_tables import scr_table
from tasks.sae_probes import DATASET_PREFIX
from tasks.summaries import format_ci

PAIRS_FILE = f"{DOWNSTREAM_DIR}/scr_pairs.parquet"
#: the benchmark's target: the 95% CI of the mean over tasks within ± this
TARGET_HALF_WIDTH = 0.02


def probing_sections(probing: pd.DataFrame | None, confidence: float) -> list[Block]:
    """The per-set section (absent sets: nothing; no table at all: what is missing) and the benchmark's."""
    if probing is None or probing.empty:
        return probing_section(probing, confidence)
    bench = benchmark_rows(probing)
    sets = probing.drop(bench.index)
    blocks = probing_section(sets, confidence) if len(sets) else []
    return blocks + (benchmark_section(probing, confidence) if len(bench) else [])


def _wide(frame: pd.DataFrame, rows: list[str], cell) -> pd.DataFrame:
    """One row per ``rows`` value, one column 'k=<k>' per k, cells ``cell(row)``."""
    out = frame.assign(cell=[cell(r) for r in frame.itertuples(index=False)])
    wide = out.pivot(index=rows, columns="k", values="cell")
    wide.columns = [f"k={int(c)}" for c in wide.columns]
    return wide.reset_index()


def over_tasks_table(over: pd.DataFrame) -> pd.DataFrame:
    """method, J, tasks, then 'mean [CI]' per k (methods in table order, J ascending)."""
    wide = _wide(over, ["method", "n_members", "n_tasks"], lambda r: format_ci(r.mean, r.ci_low, r.ci_high))
    wide = wide.sort_values(["method", "n_members"], key=lambda c: c.map(method_rank) if c.name == "method" else c)
    wide = wide.assign(method=wide["method"].map(lambda m: method(m).label)).rename(columns={"n_members": "J", "n_tasks": "tasks"})
    return wide.reset_index(drop=True)


def differences_table(diffs: pd.DataFrame) -> pd.DataFrame:
    """a, b, then 'Δ [CI]' per k, marked ' *' where the CI excludes 0."""
    def cell(r) -> str:
        return format_ci(r.difference, r.ci_low, r.ci_high) + (" *" if r.outside_ci else "")

    order = {pair: i for i, pair in enumerate(dict.fromkeys(zip(diffs["a"], diffs["b"])))}  # the comparisons' order
    wide = _wide(diffs, ["a", "b"], cell)
    rank = [order[(a, b)] for a, b in zip(wide["a"], wide["b"])]
    return wide.iloc[np.argsort(rank, kind="stable")].reset_index(drop=True)


def per_task_table(probing: pd.DataFrame) -> pd.DataFrame:
    """One row per task: each method at its largest J at the largest sparse k, and the raw
    dense probe; mean over classes and runs."""
    tasks = task_accuracies(probing)
    trained = tasks["method"] != RAW.name
    k = int(tasks.loc[trained, "k"].max()) if trained.any() else int(tasks["k"].min())
    columns = {}
    for name, j in largest_j_points(probing):
        sub = tasks[(tasks["method"] == name) & (tasks["n_members"] == j) & (tasks["k"] == k)]
        columns[f"{point_label((name, j))} (k={k})"] = sub.set_index("dataset")["accuracy"]
    raw_dense = tasks[(tasks["method"] == RAW.name) & (tasks["k"] > k)]
    if len(raw_dense):
        d = int(raw_dense["k"].max())
        columns[f"{RAW.label} (dense, k={d})"] = raw_dense[raw_dense["k"] == d].set_index("dataset")["accuracy"]
    frame = pd.DataFrame(columns)
    frame.index = [i[len(DATASET_PREFIX):] for i in frame.index]
    return frame.rename_axis("task").reset_index().round(3)


def _outside_sentences(diffs: pd.DataFrame, confidence: float) -> str:
    """Which paired differences exclude 0, with their values; how many do not."""
    outside = diffs[diffs["outside_ci"]]
    if outside.empty:
        return f"No difference between two methods is outside its {confidence:.0%} CI at any k."
    parts = []
    for (a, b), g in outside.groupby(["a", "b"], sort=False):
        ks = ", ".join(f"k={int(r.k)}: {r.difference:+.3f}" for r in g.itertuples())
        parts.append(f"{a} − {b} ({ks})")
    inside = len(diffs) - len(outside)
    return (f"Differences outside their {confidence:.0%} CIs (paired over tasks): " + "; ".join(parts)
            + f". The other {inside} differences (method pair × k) are inside their CIs.")


def benchmark_section(probing: pd.DataFrame, confidence: float) -> list[Block]:
    """The sae-probes benchmark: means over tasks with CIs over tasks, paired differences,
    boosting across J, per-task accuracies."""
    over = mean_over_tasks(probing, confidence)
    n_tasks = int(over["n_tasks"].max())
    trained = over[over["method"] != RAW.name]
    sparse = over[over["k"] <= (trained["k"].max() if len(trained) else over["k"].max())]
    widest = float(np.nanmax(sparse["half_width"])) if sparse["half_width"].notna().any() else float("nan")
    met = "within" if widest <= TARGET_HALF_WIDTH else "**wider than**"
    blocks: list[Block] = [
        Heading(2, "Concept detection on the sae-probes benchmark"),
        Paragraph(
            f"{n_tasks} binary tasks of the sae-probes benchmark (Kantamneni et al., *Are Sparse Autoencoders Useful?*). "
            "Each text is mean-pooled over its tokens; classes are balanced; the top-k latents by |mean difference| are "
            "chosen on the train split only; a logistic probe on them is scored on the test split. A task's accuracy is its "
            f"mean over runs; each cell is the mean over tasks with its {confidence:.0%} Student-t interval **over tasks** "
            "(n = tasks), so it says how far the mean would move with another draw of such tasks. "
            f"Widest half-width at sparse k: ±{widest:.3f}, {met} the ±{TARGET_HALF_WIDTH} target."
        ),
        Table(over_tasks_table(over), name="probing_benchmark"),
    ]
    diffs = paired_differences(probing, comparisons(probing), confidence)
    if len(diffs):
        blocks += [
            Heading(3, "Which differences are outside their CIs"),
            Paragraph(_outside_sentences(diffs, confidence) + " Each cell: mean over tasks of "
                      "accuracy(a) − accuracy(b) with its interval over the tasks' differences; * where it excludes 0. "
                      "Pairing by task removes the tasks' difficulty, so these intervals are much narrower than the means'."),
            Table(differences_table(diffs), name="probing_benchmark_differences"),
        ]
    same, groups = identical_across_j(benchmark_rows(probing), "boosting")
    if groups:
        if same == groups:
            text = (f"Finding: boosting's probing accuracy is identical at every J on all {groups} (run, task, k) groups. "
                    "Top-k selection by mean difference always picks stage-1 latents: the later stages encode residuals, "
                    "whose latents differ less between classes, so adding stages never changes the probe.")
        else:
            text = (f"Boosting's probing accuracy is the same at every J on {same} of {groups} (run, task, k) groups "
                    f"({same / groups:.0%}): top-k selection by mean difference mostly picks stage-1 latents.")
        blocks.append(Paragraph(text))
    blocks += [Heading(3, "Per task"), Table(per_task_table(probing), name="probing_benchmark_tasks")]
    return blocks


def has_scored_pairs(pairs: pd.DataFrame | None) -> bool:
    """Whether scr.parquet is expected: no pair table (an older run) or a pair with headroom."""
    return pairs is None or bool(pairs["conditioned"].any())


def pairs_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """pair, A_base, A_oracle, headroom, test documents, status ('scored' or 'no headroom (< min)')."""
    return pd.DataFrame({
        "pair": pairs["pair"], "A_base": pairs["acc_base"].round(3), "A_oracle": pairs["acc_oracle"].round(3),
        "headroom": pairs["headroom"].round(3), "test documents": pairs["n_test"],
        "status": [("scored" if c else f"no headroom (< {m:g})") for c, m in zip(pairs["conditioned"], pairs["min_headroom"])],
    })


def scr_section(scr: pd.DataFrame | None, pairs: pd.DataFrame | None, confidence: float) -> list[Block]:
    """Every pair with its headroom, then the scores of the pairs with headroom (means and figures use only those)."""
    title = "Spurious correlation removal: SCR score vs n"
    blocks: list[Block] = [Heading(2, title)]
    if pairs is not None:
        minimum = float(pairs["min_headroom"].iloc[0])
        blocks += [
            Paragraph(f"A pair is scored only when A_oracle − A_base ≥ {minimum:g} (the headroom guard): below it "
                      "S = (A_abl − A_base) / (A_oracle − A_base) divides test-set noise by noise. Pairs without headroom "
                      "are shown here with their numbers and left out of every mean and figure. Splits take whole documents."),
            Table(pairs_table(pairs), name="scr_pairs"),
        ]
        if not pairs["conditioned"].any():
            return blocks + [Paragraph(f"No pair has headroom ≥ {minimum:g}: no SCR score is reported.")]
    if scr is None or scr.empty:
        return blocks + [Missing(needs(SCR_FILE, "downstream"))]
    scored = sorted(scr["pair"].unique())
    return blocks + [
        Paragraph(f"S after zero-ablating the top-n latents, averaged over the pairs with headroom ({', '.join(scored)}); "
                  f"mean [CI] over runs."),
        Table(scr_table(scr, confidence), name="scr"),
    ]

