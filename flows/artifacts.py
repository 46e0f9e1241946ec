"""Prefect UI artifacts of a finished stage: the markdown summary, its tables and its figures.

Created by the stage flow from the stage's result (not inside the cached task), so a
cached stage shows its summary in the new flow run too, marked as cached.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.prefect_tasks import StageOutcome, artifact_slug

MAX_TABLE_ROWS = 200          # a table artifact beyond this is cut (the full table is on disk)
MAX_INLINE_FIGURE_BYTES = 400_000  # figures up to this size are embedded in the summary


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _path_line(run_dir: Path, rel: str) -> str:
    p = Path(rel) if Path(rel).is_absolute() else run_dir / rel
    if p.is_file():
        return f"- `{rel}` ({human_size(p.stat().st_size)})"
    if p.is_dir():
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return f"- `{rel}/` ({human_size(size)})"
    return f"- {rel}"


def _markdown_table(df: pd.DataFrame, max_rows: int = 12) -> str:
    shown = df.head(max_rows)
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in shown.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    if len(df) > max_rows:
        lines.append(f"\n_{len(df) - max_rows} more rows in the table artifact and on disk._")
    return "\n".join(lines)


def stage_summary_markdown(outcome: StageOutcome, run_dir: Path) -> str:
    """The markdown summary of one stage: status, read/written with sizes, validation, notes, figures."""
    r = outcome.result
    if outcome.cached:
        status = f"**cached**: nothing recomputed (cache key `{outcome.cache_key}`); computed earlier in {r.seconds:.1f} s"
    else:
        status = f"**ran** in {outcome.seconds:.1f} s ({outcome.reason})" + ("" if r.did_work else "; outputs were already up to date")
    parts = [f"# Stage `{outcome.stage}`", "", f"Run directory: `{run_dir}`", "", status, ""]
    if outcome.deleted:
        parts += [f"`--force` deleted {len(outcome.deleted)} earlier output files before the run.", ""]
    for title, items in (("Read", r.read), ("Written", r.written), ("Validated (contract passed)", r.validated)):
        parts.append(f"## {title}")
        parts += [_path_line(run_dir, x) for x in items[:50]] or ["- (none)"]
        if len(items) > 50:
            parts.append(f"- … and {len(items) - 50} more")
        parts.append("")
    if r.notes:
        parts += ["## Notes"] + [f"- {n}" for n in r.notes] + [""]
    for name, df in r.tables.items():
        parts += [f"## Table `{name}`", "", _markdown_table(df), ""]
    if r.figures:
        parts.append("## Figures")
        for fig in r.figures:
            p = Path(fig) if Path(fig).is_absolute() else run_dir / fig
            parts.append(f"- `{p}`")
            if p.is_file() and p.suffix.lower() == ".png" and p.stat().st_size <= MAX_INLINE_FIGURE_BYTES:
                data = base64.b64encode(p.read_bytes()).decode()
                parts += ["", f"![{p.name}](data:image/png;base64,{data})", ""]
    return "\n".join(parts)


def publish_stage_artifacts(outcome: StageOutcome, run_dir: Path) -> None:
    """Markdown summary + one table artifact per table + a link per figure, keyed by run dir and stage."""
    slug = artifact_slug(run_dir)
    stage = outcome.stage
    create_markdown_artifact(
        stage_summary_markdown(outcome, run_dir),
        key=f"{slug}-{stage}-summary",
        description=f"{stage}: {'cached' if outcome.cached else 'ran'}",
    )
    for name, df in outcome.result.tables.items():
        records = df.head(MAX_TABLE_ROWS).astype(object).where(df.head(MAX_TABLE_ROWS).notna(), None).to_dict(orient="records")
        key = re.sub(r"[^a-z0-9]+", "-", f"{slug}-{stage}-{name}".lower()).strip("-")
        create_table_artifact(records, key=key, description=f"{stage}: {name} ({len(df)} rows)")
    for fig in outcome.result.figures:
        p = Path(fig) if Path(fig).is_absolute() else run_dir / fig
        create_link_artifact(p.resolve().as_uri(), link_text=p.name, description=f"{stage}: figure {p.name}")
