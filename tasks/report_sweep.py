"""The sweep's report: sweep/report.md + report.html, and the sweep section of the pipeline report.

Both read ``sweep/results.parquet`` (validated) and ``sweep/summary.json`` (the chosen point,
written by :mod:`flows.sweep`) and show an EV-vs-L0 plot with its Pareto front, the
c_dec-vs-L0 curve with the L0 the guide picks (*Sparse but Wrong*), the points' table and
the chosen point.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from data_contracts.sweep import read_results
from tasks.figures import save_figure
from tasks.report_doc import Block, BulletList, Document, Heading, Image, Paragraph, Table
from tasks.sweep_results import BEST_FILE, RESULTS_FILE, SWEEP_DIR, point_means

SUMMARY_FILE = f"{SWEEP_DIR}/summary.json"
FIGURES = f"{SWEEP_DIR}/figures"
REPORT_MARKDOWN = f"{SWEEP_DIR}/report.md"
REPORT_HTML = f"{SWEEP_DIR}/report.html"
FIGURE_FILES = ("ev_vs_l0.png", "c_dec_vs_l0.png")


def pareto_front(l0: list[float], ev: list[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower or equal L0 and higher or equal EV,
    one strictly), in order of L0."""
    front = []
    for i, (a, e) in enumerate(zip(l0, ev)):
        dominated = any((b <= a and f >= e and (b < a or f > e)) for j, (b, f) in enumerate(zip(l0, ev)) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: l0[i])


def _l0_scale(means: pd.DataFrame) -> str:
    """log when the L0s span more than a factor of 10 (k doubling from point to point), else linear."""
    low = means["l0"][means["l0"] > 0]
    return "log" if len(low) and low.max() > 10 * low.min() else "linear"


def sweep_figures(means: pd.DataFrame, summary: dict, directory: Path) -> list[Path]:
    """figures: EV vs L0 (Pareto front joined, the chosen point ringed) and c_dec vs L0 (the guide's L0 marked)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: the flow runs without a display
    import matplotlib.pyplot as plt

    chosen = means[means["point"] == summary["point"]]
    out = []
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.scatter(means["l0"], means["explained_variance"], s=18, color="tab:blue", label="points")
    front = pareto_front(means["l0"].tolist(), means["explained_variance"].tolist())
    ax.plot(means["l0"].iloc[front], means["explained_variance"].iloc[front], color="tab:blue", alpha=0.6, label="Pareto front")
    ax.scatter(chosen["l0"], chosen["explained_variance"], s=90, facecolors="none", edgecolors="tab:red", label="chosen")
    ax.set(xlabel="L0 (validation)", ylabel="explained variance (validation)", title="EV vs L0", xscale=_l0_scale(means))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out.append(save_figure(fig, directory / FIGURE_FILES[0]))
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    curve = means.sort_values("l0")
    ax.plot(curve["l0"], curve["c_dec"], marker="o", ms=3, color="tab:green")
    if summary.get("guide_l0") is not None:
        ax.axvline(summary["guide_l0"], color="tab:red", ls="--", lw=1, label=f"guide: L0 = {summary['guide_l0']:.3g} ({summary['guide_rule']})")
        ax.legend(fontsize=7)
    ax.set(xlabel="L0 (validation)", ylabel="c_dec (mean |cos| of decoder columns)", title="c_dec vs L0 (Sparse but Wrong)",
           xscale=_l0_scale(means))
    ax.grid(alpha=0.3)
    out.append(save_figure(fig, directory / FIGURE_FILES[1]))
    return out


def _table(means: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The points' table (the values that differ between points) and the values every point shares."""
    shown = means.copy()
    params = [json.loads(p) for p in shown["params"]]
    varying = [k for k in params[0] if len({json.dumps(p.get(k)) for p in params}) > 1]
    shown["values"] = [", ".join(f"{k.split('.')[-1]}={p[k]:.4g}" if isinstance(p[k], float) else f"{k.split('.')[-1]}={p[k]}"
                                 for k in varying) for p in params]
    shown["tokens"] = shown["tokens"].astype("int64")
    columns = ["point", "values", "l0", "explained_variance", "mse", "dead_fraction", "c_dec", "stability", "score", "tokens"]
    return shown[columns].round(5), {k: v for k, v in params[0].items() if k not in varying}


def sweep_blocks(run_dir: Path, level: int = 2, draw: bool = False) -> list[Block]:
    """The sweep section, or nothing when the run directory holds no sweep/results.parquet.

    draw: (re)draw the figures into sweep/figures/ (the sweep flow); otherwise (the pipeline's
    report stage, which writes only under report/) show the ones the sweep drew."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS_FILE).is_file():
        return []
    frame = read_results(run_dir / RESULTS_FILE)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text()) if (run_dir / SUMMARY_FILE).is_file() else None
    means = point_means(frame)
    mode = frame["mode"].iloc[0]
    blocks: list[Block] = [Heading(level, "Sweep" + (" (population-based training)" if mode == "population" else " (grid)"))]
    scored = (f"{len(means)} members scored after each of {frame['round'].max()} rounds" if mode == "population"
              else f"{len(means)} points × {frame['seed'].nunique()} seed(s), {len(frame)} SAEs")
    blocks.append(Paragraph(f"{scored} in `{RESULTS_FILE}`; scored on the {summary['split'] if summary else 'validation'} split; "
                            f"training compute {int(frame.groupby(['point', 'seed'])['tokens'].max().sum()):,} tokens in all."))
    if summary is not None:
        items = [f"chosen: point {summary['point']} ({summary['values']}) by {summary['why']}",
                 f"as a pipeline config: `{BEST_FILE}` (`sae-ensembles run --config {run_dir / BEST_FILE}`)"]
        if summary.get("guide_l0") is not None:
            items.append(f"L0 guide (c_dec minimum, or the elbow when flat at high L0): L0 = {summary['guide_l0']:.3g}, "
                         f"rule {summary['guide_rule']}")
        items += summary.get("log", [])[-6:]
        blocks.append(BulletList(tuple(items)))
        figures = sweep_figures(means, summary, run_dir / FIGURES) if draw else [run_dir / FIGURES / n for n in FIGURE_FILES]
        captions = ("EV vs L0 on the validation split, Pareto front, chosen point", "c_dec vs L0 with the L0 the guide picks")
        blocks += [Image(path, caption) for path, caption in zip(figures, captions) if path.is_file()]
    table, shared = _table(means)
    if shared:
        blocks.append(Paragraph("every point: " + ", ".join(f"`{k}` = {v}" for k, v in shared.items())))
    blocks.append(Table(table, name="sweep_points"))
    return blocks


def write_sweep_report(run_dir: Path, title: str) -> list[str]:
    """sweep/report.md and sweep/report.html (self-contained), atomically; returns their relative paths."""
    run_dir = Path(run_dir).resolve()
    doc = Document(title, sweep_blocks(run_dir, level=1, draw=True))
    written = []
    for rel, render in ((REPORT_MARKDOWN, doc.to_markdown), (REPORT_HTML, doc.to_html)):
        path = run_dir / rel
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(render(path.parent), encoding="utf-8")
        os.replace(tmp, path)
        written.append(rel)
    return written
