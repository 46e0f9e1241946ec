"""The report's sections: one function per section, from what it reads to its blocks.

Each function takes the frames, figures and settings it shows (None for an artifact that
is absent) and returns blocks of :mod:`tasks.report_doc`; none of them reads a file or
runs a model. :func:`tasks.report.build_report` reads the run directory and calls them
in order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from data_contracts.activations import ActivationManifest
from sae_core.methods import method
from sae_core.metric_catalog import METRIC_NAMES, metric_spec
from tasks.common import DOWNSTREAM_DIR, METRICS_DIR, MODELS_DIR
from tasks.config import PipelineConfig, TrainStageConfig
from tasks.figures import INTRINSIC_GRID_NAME
from tasks.report_doc import Block, BulletList, Heading, Image, Missing, Paragraph, Preformatted, Table
from tasks.report_tables import metric_tables, operating_point, probing_table, scr_baselines, scr_table
from tasks.top_contexts import CONTEXTS_MODEL, CONTEXTS_SPLIT, TOP_CONTEXTS_FILE

SUMMARY_FILE = f"{METRICS_DIR}/summary.parquet"
INTRINSIC_FILE = f"{METRICS_DIR}/intrinsic.parquet"
PROBING_FILE = f"{DOWNSTREAM_DIR}/probing.parquet"
SCR_FILE = f"{DOWNSTREAM_DIR}/scr.parquet"
INTRINSIC_FIGURE_PREFIX = "intrinsic"    # figures/intrinsic_<metric>.png (tasks.figures); other figures are downstream's
EXTRA_TABLE_ROWS = 100                   # rows shown of a downstream table the report has no section for
CONTEXT_COLUMNS = ["member", "latent", "frequency", "activation", "context"]


def needs(artifact: str, stage: str) -> str:
    """The text of a Missing block: which artifact, and the stage that writes it."""
    return f"needs `{artifact}`; run `sae-ensembles {stage}`."


def header(name: str, run_dir: Path, written_at: str, manifest: ActivationManifest | None, train: TrainStageConfig) -> list[Block]:
    """Title, where and when, the activations (from the manifest) and the SAEs trained."""
    blocks: list[Block] = [Heading(1, f"SAE ensembles: run `{name}`"),
                           Paragraph(f"Run directory `{run_dir}`, report written {written_at}.")]
    if manifest is not None:
        splits = ", ".join(f"{split} {n:,}" for split, n in manifest.tokens_per_split.items())
        blocks.append(Paragraph(f"Activations: `{manifest.model}` layer {manifest.layer} (d={manifest.d}), "
                                f"tokens per split {splits}."))
    expanded = ((f"; expanded SAEs at J ∈ {train.expanded_sizes} " + ("(TopK: k·J active latents)" if train.k else "(same sparsity coefficient)"))
                if train.trains_expanded else "; no expanded SAE")
    blocks.append(Paragraph(
        f"SAEs: {train.architecture}, d_sae={train.d_sae}" + (f", k={train.k}" if train.k else "") + f", J_max={train.n_members}, "
        f"S={train.n_runs} runs, {train.recipe.n_steps} steps of {train.recipe.batch_size} tokens{expanded}."
    ))
    if train.trains_expanded:
        blocks.append(Paragraph(compute_matching_text(train)))
    return blocks


def compute_matching_text(train: TrainStageConfig) -> str:
    """What each expanded SAE is matched to: one step of a J·d_sae-wide SAE costs what one step
    of J members costs, so the plain one is FLOP-matched to bagging; the J×-steps one is not."""
    text = (f"Compute: one step of an expanded SAE of width J·d_sae costs what one step of J members costs, so "
            f"the {method('expanded').label}, trained for the same {train.recipe.n_steps} steps, is **FLOP-matched** to "
            "bagging at that J.")
    if "expanded_compute_matched" in train.methods and train.compute_matched_expanded:
        text += (f" \"{method('expanded_compute_matched').label}\" is trained for J× the steps: **step-matched** (as many "
                 "optimiser steps as the J members take together), so it gets J× bagging's FLOPs.")
    return text


def operating_point_section(summary: pd.DataFrame | None) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Operating point")]
    if summary is None:
        return blocks + [Missing("no metric summary, so the operating point cannot be stated; " + needs(SUMMARY_FILE, "evaluate"))]
    table, verdict = operating_point(summary)
    blocks.append(Paragraph(verdict))
    if not table.empty:
        blocks.append(Table(table))
    return blocks


def claims_section(summary: pd.DataFrame | None, confidence: float, d: int | None = None) -> list[Block]:
    """The claims with their raw and floor-corrected verdicts, then every (method, J) where a
    comparison is not testable. ``d``: the activations' width (None: L0 is not checked against it)."""
    from tasks.claims import SATURATED_CONNECTIVITY, check_claims, untestable_points

    blocks: list[Block] = [Heading(2, "The paper's claims on this run")]
    if summary is None:
        return blocks + [Missing(needs(SUMMARY_FILE, "evaluate"))]
    text = (f"Each claim compares two (method, J) points: **supported** when the ordering holds and the {confidence:.0%} "
            "CIs do not overlap; L0 beside each point. Two verdicts per claim: on the raw metric, and on the metric minus "
            "its random floor (the same stability of untrained dictionaries of the same shapes, subtracted run by run; "
            "the floor itself rises with the width of the dictionaries compared, so raw stabilities across J or widths are "
            "not comparable). A metric without a floor gets the same verdict twice. **not testable**: a point's L0 "
            f"reaches d{f' = {d}' if d is not None else ''}, the activation width, where any dictionary reconstructs almost "
            f"anything, or, for connectivity, a point's connectivity is saturated (below {SATURATED_CONNECTIVITY:g}, or "
            "a CI reaching 0).")
    if d is None:
        text += " The activations' width is unknown (no manifest), so L0 is not checked against it."
    blocks += [Paragraph(text), Table(check_claims(summary, d=d), name="claims"),
               Heading(3, "Points where comparisons are not testable")]
    flagged = untestable_points(summary, d)
    if flagged.empty:
        return blocks + [Paragraph("None: every (method, J) has L0 below d and an unsaturated connectivity.")]
    return blocks + [Table(flagged, name="not_testable")]


def _metric_heading(metric: str) -> str:
    return f"`{metric}`: {metric_spec(metric).label}" if metric in METRIC_NAMES else f"`{metric}`"


def intrinsic_section(summary: pd.DataFrame | None, figures: list[Path], confidence: float,
                      tokens_evaluated: int | None) -> list[Block]:
    """Per metric a table (mean [CI], L0 beside it, T beside token-dependent metrics) and its
    figure; the grid figure first."""
    blocks: list[Block] = [Heading(2, "Intrinsic metrics (test split)")]
    if summary is None:
        return blocks + [Missing(needs(SUMMARY_FILE, "evaluate"))]
    by_name = {f.name: f for f in figures}
    text = (f"Mean over runs with its {confidence:.0%} confidence interval in brackets; L0 of the same method and J beside "
            "every metric, so no method wins by being less sparse")
    if tokens_evaluated is not None:
        text += f"; T: the {tokens_evaluated:,} tokens evaluated, beside the metrics that depend on how many there are"
    text += (". Each stability has a floor, `_random`: the same quantity for untrained (Gaussian) dictionaries of the same "
             "shapes, and `_corrected`: the stability minus that floor, run by run (its CI is over the runs' differences)")
    blocks.append(Paragraph(text + "."))
    if INTRINSIC_GRID_NAME in by_name:
        blocks.append(Image(by_name[INTRINSIC_GRID_NAME], "every intrinsic metric vs J (the paper's Figure 2)"))
    for metric, table in metric_tables(summary, tokens_evaluated).items():
        blocks += [Heading(3, _metric_heading(metric)), Table(table)]
        figure = by_name.get(f"{INTRINSIC_FIGURE_PREFIX}_{metric}.png")
        if figure is not None:
            blocks.append(Image(figure, f"{metric} vs J (bagging and boosting with CI bands; single and expanded references)"))
    return blocks


def _downstream_section(title: str, rel: str, frame: pd.DataFrame | None,
                        build: Callable[[pd.DataFrame], list[Block]]) -> list[Block]:
    """A downstream section: its heading, then ``build(frame)``, or what is missing."""
    if frame is None or frame.empty:
        return [Heading(2, title), Missing(needs(rel, "downstream"))]
    return [Heading(2, title), *build(frame)]


def probing_section(probing: pd.DataFrame | None, confidence: float) -> list[Block]:
    return _downstream_section("Concept detection: sparse probing accuracy vs k", PROBING_FILE, probing, lambda frame: [
        Paragraph("Test accuracy of one-vs-rest logistic probes on the top-k latents, averaged over classes; "
                  "mean [CI] over runs."),
        Table(probing_table(frame, confidence), name="probing"),
    ])


def scr_section(scr: pd.DataFrame | None, confidence: float) -> list[Block]:
    return _downstream_section("Spurious correlation removal: SCR score vs n", SCR_FILE, scr, lambda frame: [
        Paragraph("S = (A_abl − A_base) / (A_oracle − A_base) after zero-ablating the top-n latents, averaged over "
                  "topic pairs; mean [CI] over runs."),
        Table(scr_table(frame, confidence), name="scr"),
        Heading(3, "Probe baselines per topic pair"),
        Table(scr_baselines(frame)),
    ])


def extra_downstream_tables(tables: dict[str, pd.DataFrame]) -> list[Block]:
    """Downstream tables without a section of their own (the SCR cell counts), by path."""
    blocks: list[Block] = []
    for path, frame in tables.items():
        title = "Cell counts" if "cell" in Path(path).stem else Path(path).stem
        blocks += [Heading(3, f"{title} (`{path}`)"), Table(frame.head(EXTRA_TABLE_ROWS))]
    return blocks


def downstream_figures_section(figures: list[Path]) -> list[Block]:
    """Every figure that is not an intrinsic-metric figure (probing, SCR)."""
    others = [f for f in figures if not f.name.startswith(INTRINSIC_FIGURE_PREFIX)]
    if not others:
        return []
    return [Heading(2, "Downstream figures"), *(Image(f, f.stem.replace("_", " ")) for f in others)]


def top_contexts_section(contexts: pd.DataFrame | None) -> list[Block]:
    """The evaluation stage's table of top-activating contexts."""
    blocks: list[Block] = [Heading(2, "Top-activating contexts")]
    if contexts is None:
        return blocks + [Missing(
            f"`{TOP_CONTEXTS_FILE}` is written by `sae-ensembles evaluate` when `{CONTEXTS_MODEL.relative}` and the test "
            "split exist (and the top_contexts and latents_per_member settings are above 0); run `sae-ensembles evaluate`."
        )]
    models = ", ".join(f"`{m}`" for m in sorted(contexts["model"].unique())) or f"`{CONTEXTS_MODEL.relative}`"
    blocks.append(Paragraph(
        f"Most frequent latents of the first and last member of {models} on the {CONTEXTS_SPLIT} split; each latent's strongest "
        "tokens, marked [[like this]], with the tokens before them."
    ))
    if contexts.empty:
        return blocks + [Paragraph("None of these latents fired on an evaluated token.")]
    ordered = contexts.sort_values(["model", "member", "frequency", "latent", "rank"], ascending=[True, True, False, True, True])
    return blocks + [Table(ordered[CONTEXT_COLUMNS].reset_index(drop=True))]


def models_section(models: list[str]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Trained models")]
    if not models:
        return blocks + [Missing(f"no trained models under `{MODELS_DIR}/`; run `sae-ensembles train`.")]
    return blocks + [BulletList(tuple(f"`{m}`" for m in models))]


def missing_section(missing: list[str]) -> list[Block]:
    return [Heading(2, "Missing artifacts"), BulletList(tuple(missing))] if missing else []


def configuration_section(cfg: PipelineConfig) -> list[Block]:
    import yaml

    return [Heading(2, "Configuration"), Preformatted(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).strip())]


def versions_section(versions: dict[str, str]) -> list[Block]:
    return [Heading(2, "Package versions"), Table(pd.DataFrame(list(versions.items()), columns=["package", "version"]))]
