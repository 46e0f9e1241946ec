"""The report stage: ``report/report.md`` and a self-contained ``report/report.html`` (SPEC §10).

It reads whatever the run directory holds and never fails on a missing optional artifact:
each absent table or figure is named, with the stage that produces it. Tables are read
through ``data_contracts.validate`` (a contract violation is an error, as everywhere).

Sections: operating point (SPEC §11), intrinsic metrics (mean [95% CI] with L0 beside
every metric), their figures, probing accuracy vs k, SCR score vs n (with cell counts),
other figures, the run's config and the package versions.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from sae_core.stats import mean_ci
from tasks.common import ACTIVATIONS_DIR, DOWNSTREAM_DIR, FIGURES_DIR, METRICS_DIR, MODELS_DIR, REPORT_DIR, StageResult
from tasks.config import PipelineConfig

METHOD_ORDER = ["single", "expanded", "expanded_compute_matched", "bagging", "boosting"]
METRIC_ORDER = [
    "mse", "explained_variance", "explained_variance_total", "l0", "dead_fraction", "shrinkage_gamma",
    "connectivity", "diversity", "diversity_fraction", "stability", "stability_matched", "stability_random",
    "c_dec", "ce_loss_recovered", "kl",
]
OPERATING_EV = (0.85, 0.92)   # SPEC §11: each member's explained variance
OPERATING_MAX_L0 = 64         # SPEC §11: and L0 at most this
VERSION_PACKAGES = ["torch", "transformers", "prefect", "polars", "pandas", "numpy", "scikit-learn", "great-expectations", "pyarrow", "safetensors"]

# artifact -> the stage that writes it (for the "missing" notes)
PRODUCER = {
    f"{METRICS_DIR}/summary.parquet": "evaluate",
    f"{METRICS_DIR}/intrinsic.parquet": "evaluate",
    f"{DOWNSTREAM_DIR}/probing.parquet": "downstream",
    f"{DOWNSTREAM_DIR}/scr.parquet": "downstream",
    f"{ACTIVATIONS_DIR}/manifest.json": "extract",
}


# ------------------------------------------------------------------ a tiny document model
@dataclass
class _Doc:
    """Blocks rendered twice: to markdown and to standalone HTML."""

    blocks: list[tuple[str, object]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self, base: Path) -> str:
        out: list[str] = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "ul":
                out.append("\n".join(f"- {x}" for x in v))
            elif kind == "table":
                df = v
                lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
                lines += ["| " + " | ".join(_cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
                out.append("\n".join(lines))
            elif kind == "img":
                path, caption = v
                rel = Path("..") / path.relative_to(base.parent) if path.is_relative_to(base.parent) else path
                out.append(f"![{caption}]({rel.as_posix()})")
            elif kind == "pre":
                out.append("```\n" + v + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}"
            "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
            "pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:0.85em}.missing{color:#a33}</style></head><body>",
        ]
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"<h{v[0]}>{html.escape(v[1])}</h{v[0]}>")
            elif kind == "p":
                cls = " class='missing'" if v.startswith("**Missing") else ""
                out.append(f"<p{cls}>{_inline_html(v)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in v) + "</ul>")
            elif kind == "table":
                df = v
                head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(x))}</td>" for x in row) + "</tr>" for row in df.itertuples(index=False))
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                path, caption = v
                data = base64.b64encode(path.read_bytes()).decode()
                out.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
            elif kind == "pre":
                out.append(f"<pre>{html.escape(v)}</pre>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _cell(x: object) -> str:
    if isinstance(x, (float, np.floating)):
        return "–" if not np.isfinite(x) else f"{x:.4g}"
    return str(x)


def _inline_html(text: str) -> str:
    """Markdown's `code` and **bold** (all this report uses) to HTML."""
    import re

    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


# ------------------------------------------------------------------------- reading
def read_table(run_dir: Path, rel: str, result: StageResult, missing: list[str]) -> pd.DataFrame | None:
    """The validated frame of ``rel``, or None (noted in ``missing``) when the file is absent."""
    from data_contracts import ContractViolation, validate

    path = run_dir / rel
    if not path.is_file():
        missing.append(f"`{rel}` is missing: run `sae-ensembles {PRODUCER.get(rel, 'run')}`")
        return None
    try:
        frame = validate(path)
        result.validated.append(rel)
    except ContractViolation as err:
        # a contract that is not written yet is not a violation of the artifact: read it, say so
        if not all(f.expectation == "known artifact kind" for f in err.failures):
            raise
        frame = pd.read_parquet(path)
        result.notes.append(f"{rel}: no contract for its kind yet; read without validation")
    result.read.append(rel)
    return frame if isinstance(frame, pd.DataFrame) else pd.read_parquet(path)


def _ordered(values: list, order: list) -> list:
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), str(v)))


def _fmt_ci(mean: float, lo: float, hi: float) -> str:
    if not np.isfinite(mean):
        return "–"
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo == hi:
        return f"{mean:.4g}"
    return f"{mean:.4g} [{lo:.4g}, {hi:.4g}]"


def metric_tables(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per metric: method × J rows with 'mean [95% CI]', L0 beside it, and the number of runs."""
    l0 = summary[summary["metric"] == "l0"].set_index(["method", "n_members"])
    tables = {}
    for metric in _ordered(summary["metric"].unique().tolist(), METRIC_ORDER):
        rows = []
        part = summary[summary["metric"] == metric]
        for method in _ordered(part["method"].unique().tolist(), METHOD_ORDER):
            for _, r in part[part["method"] == method].sort_values("n_members").iterrows():
                key = (r["method"], r["n_members"])
                row = {"method": method, "J": int(r["n_members"]), metric: _fmt_ci(r["mean"], r["ci_low"], r["ci_high"])}
                if metric != "l0":
                    row["L0"] = _fmt_ci(*l0.loc[key, ["mean", "ci_low", "ci_high"]]) if key in l0.index else "–"
                row["runs"] = int(r["n_runs"])
                rows.append(row)
        tables[metric] = pd.DataFrame(rows)
    return tables


def operating_point(summary: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Explained variance and L0 of one member (the single SAE, J = 1) against SPEC §11's target."""
    s = summary[(summary["n_members"] == 1) & summary["metric"].isin(["explained_variance", "l0"])]
    wide = s.pivot_table(index="method", columns="metric", values="mean", aggfunc="first").reset_index()
    single = wide[wide["method"] == "single"]
    if single.empty or not {"explained_variance", "l0"} <= set(wide.columns):
        return wide, "The single SAE's explained variance and L0 are not in the summary; the operating point cannot be stated."
    ev, l0 = float(single["explained_variance"].iloc[0]), float(single["l0"].iloc[0])
    ok = OPERATING_EV[0] <= ev <= OPERATING_EV[1] and l0 <= OPERATING_MAX_L0
    verdict = "inside" if ok else "**outside**"
    text = (
        f"Operating point: one member (single SAE) reaches explained variance {ev:.3f} at L0 {l0:.1f}, {verdict} the "
        f"target band (EV {OPERATING_EV[0]}–{OPERATING_EV[1]}, L0 ≤ {OPERATING_MAX_L0}; SPEC §11)."
    )
    return wide, text


def _mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval over runs (sae_core.stats.mean_ci; a single run gives a zero-width interval)."""
    mean, lo, hi = mean_ci(values, confidence)
    return (mean, mean, mean) if lo is None or hi is None else (mean, lo, hi)


def probing_table(probing: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Accuracy (mean over classes, then mean [CI] over runs) per dataset, method, J; one column per k."""
    per_run = probing.groupby(["dataset", "method", "n_members", "run", "k"], as_index=False)["accuracy"].mean()
    rows = []
    for (dataset, method, j), g in per_run.groupby(["dataset", "method", "n_members"]):
        row = {"dataset": dataset, "method": method, "J": int(j)}
        for k, gk in g.groupby("k"):
            row[f"k={int(k)}"] = _fmt_ci(*_mean_ci(gk["accuracy"].to_numpy(), confidence))
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values(["dataset", "method", "J"], key=lambda c: c.map(lambda v: METHOD_ORDER.index(v) if v in METHOD_ORDER else v) if c.name == "method" else c).reset_index(drop=True)


def scr_table(scr: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """SCR score S (mean over pairs, then mean [CI] over runs) per method, J; one column per n."""
    per_run = scr.groupby(["method", "n_members", "run", "n_ablated"], as_index=False)["score"].mean()
    rows = []
    for (method, j), g in per_run.groupby(["method", "n_members"]):
        row = {"method": method, "J": int(j)}
        for n, gn in g.groupby("n_ablated"):
            row[f"n={int(n)}"] = _fmt_ci(*_mean_ci(gn["score"].to_numpy(), confidence))
        rows.append(row)
    return pd.DataFrame(rows)


def scr_baselines(scr: pd.DataFrame) -> pd.DataFrame:
    """Per topic pair: the biased probe's accuracy (A_base) and the oracle's (A_oracle)."""
    return scr.groupby("pair", as_index=False)[["acc_base", "acc_oracle"]].mean()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES + ["sae-ensembles"]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        versions["git commit"] = (commit + (" (modified)" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        versions["git commit"] = "unknown"
    return versions


def _tokenizer(model: str):
    """The extraction model's tokenizer, or None (contexts then show token ids)."""
    try:
        from transformers import AutoTokenizer

        from sae_core.models import _resolve_source

        source, revision = _resolve_source(model)
        return AutoTokenizer.from_pretrained(source, revision=revision)
    except Exception:  # noqa: BLE001 - any failure just means ids instead of text
        return None


def top_contexts(run_dir: Path, model: str, latents_per_member: int, n_contexts: int, window: int = 6,
                 max_tokens: int = 20_000) -> tuple[str, pd.DataFrame] | None:
    """Top-activating test-split contexts for the most frequent latents of bagging run 0's first and last members.

    Returns (ensemble dir, table with member, latent, frequency, activation, context), or None
    when there is no bagging ensemble or no test split. The token is marked with [[ ]].
    """
    import pyarrow.parquet as pq
    import torch

    from data_contracts.activations import read_manifest
    from sae_core.io import load_ensemble

    ens_dir = run_dir / MODELS_DIR / "bagging" / "run=0"
    acts_dir = run_dir / ACTIVATIONS_DIR
    if not (ens_dir / "ensemble.json").is_file() or not (acts_dir / "manifest.json").is_file():
        return None
    manifest = read_manifest(acts_dir)
    tables = [pq.read_table(acts_dir / s.file) for s in manifest.shards_of("test")]
    if not tables:
        return None
    frame = pd.concat([t.to_pandas() for t in tables], ignore_index=True).iloc[:max_tokens]
    x = torch.from_numpy(np.stack(frame["activation"].to_numpy()).astype(np.float32))
    ensemble = load_ensemble(ens_dir).eval()
    tok = _tokenizer(model)
    piece = (lambda t: tok.convert_ids_to_tokens(int(t))) if tok is not None else (lambda t: f"#{int(t)}")
    by_doc = {d: g.sort_values("position") for d, g in frame[["doc_id", "position", "token_id"]].groupby("doc_id")}
    rows = []
    members = sorted({0, ensemble.n_members - 1})
    with torch.inference_mode():
        codes = ensemble.member_codes(x)  # [J, N, k]
    for j in members:
        c = codes[j]
        freq = (c > 0).float().mean(0)
        for latent in torch.argsort(freq, descending=True)[:latents_per_member].tolist():
            top = torch.topk(c[:, latent], min(n_contexts, len(c))).indices.tolist()
            for i in top:
                if c[i, latent] <= 0:
                    continue
                doc, pos = frame["doc_id"].iloc[i], int(frame["position"].iloc[i])
                g = by_doc[doc]
                near = g[(g["position"] >= pos - window) & (g["position"] <= pos + 2)]
                text = " ".join(f"[[{piece(t)}]]" if p == pos else piece(t) for p, t in zip(near["position"], near["token_id"]))
                rows.append({"member": j, "latent": latent, "frequency": round(float(freq[latent]), 4),
                             "activation": round(float(c[i, latent]), 3), "context": text})
    return ens_dir.relative_to(run_dir).as_posix(), pd.DataFrame(rows)


# ------------------------------------------------------------------------- the stage
def build_report(cfg: PipelineConfig, run_dir: Path, result: StageResult) -> _Doc:
    """Assemble the report's blocks from the run directory (nothing is written here)."""
    import yaml

    doc = _Doc()
    missing: list[str] = []
    doc.h(1, f"SAE ensembles: run `{cfg.name}`")
    doc.p(f"Run directory `{run_dir}`, report written {time.strftime('%Y-%m-%d %H:%M:%S')}.")

    manifest_path = run_dir / ACTIVATIONS_DIR / "manifest.json"
    if manifest_path.is_file():
        m = json.loads(manifest_path.read_text())
        result.read.append(f"{ACTIVATIONS_DIR}/manifest.json")
        doc.p(f"Activations: `{m['model']}` layer {m['layer']} (d={m['d']}), tokens per split "
              + ", ".join(f"{k} {v:,}" for k, v in m["tokens_per_split"].items()) + ".")
    else:
        missing.append(f"`{ACTIVATIONS_DIR}/manifest.json` is missing: run `sae-ensembles extract`")
    t = cfg.train
    doc.p(f"SAEs: {t.architecture}, d_sae={t.d_sae}" + (f", k={t.k}" if t.k else "") + f", J_max={t.n_members}, "
          f"S={t.n_runs} runs, {t.recipe.n_steps} steps of {t.recipe.batch_size} tokens"
          + ((f"; expanded SAEs at J ∈ {t.expanded_sizes} " + ("(TopK: k·J active latents)" if t.k else "(same sparsity coefficient)"))
             if t.trains_expanded else "; no expanded SAE") + ".")

    summary = read_table(run_dir, f"{METRICS_DIR}/summary.parquet", result, missing)
    doc.h(2, "Operating point")
    if summary is not None:
        op, text = operating_point(summary)
        doc.p(text)
        if not op.empty:
            doc.table(op)
    else:
        doc.p("**Missing**: no metric summary, so the operating point cannot be stated; run `sae-ensembles evaluate`.")

    doc.h(2, "The paper's claims on this run")
    if summary is not None:
        from tasks.claims import check_claims

        claims = check_claims(summary)
        result.tables["claims"] = claims
        doc.p("Each claim compares two (method, J) points: **supported** when the ordering holds and the 95% CIs do not "
              "overlap; L0 beside each point.")
        doc.table(claims)
    else:
        doc.p("**Missing**: needs `metrics/summary.parquet`; run `sae-ensembles evaluate`.")

    doc.h(2, "Intrinsic metrics (test split)")
    if summary is not None:
        doc.p(f"Mean over runs with its {cfg.evaluate.confidence:.0%} confidence interval in brackets; L0 of the same method "
              "and J beside every metric, so no method wins by being less sparse.")
        grid = run_dir / FIGURES_DIR / "intrinsic.png"
        if grid.is_file():
            doc.image(grid, "every intrinsic metric vs J (the paper's Figure 2)")
            result.read.append(grid.relative_to(run_dir).as_posix())
        for metric, table in metric_tables(summary).items():
            doc.h(3, metric)
            doc.table(table)
            fig = run_dir / FIGURES_DIR / f"intrinsic_{metric}.png"
            if fig.is_file():
                doc.image(fig, f"{metric} vs J (bagging and boosting with CI bands; single and expanded references)")
                result.read.append(fig.relative_to(run_dir).as_posix())
    else:
        doc.p("**Missing**: `metrics/summary.parquet`; run `sae-ensembles evaluate`.")
    read_table(run_dir, f"{METRICS_DIR}/intrinsic.parquet", result, missing)

    doc.h(2, "Concept detection: sparse probing accuracy vs k")
    probing = read_table(run_dir, f"{DOWNSTREAM_DIR}/probing.parquet", result, missing)
    if probing is not None and len(probing):
        doc.p("Test accuracy of one-vs-rest logistic probes on the top-k latents, averaged over classes; mean [CI] over runs.")
        table = probing_table(probing, cfg.evaluate.confidence)
        result.tables["probing"] = table
        doc.table(table)
    else:
        doc.p("**Missing**: `downstream/probing.parquet`; run `sae-ensembles downstream`.")

    doc.h(2, "Spurious correlation removal: SCR score vs n")
    scr = read_table(run_dir, f"{DOWNSTREAM_DIR}/scr.parquet", result, missing)
    if scr is not None and len(scr):
        doc.p("S = (A_abl − A_base) / (A_oracle − A_base) after zero-ablating the top-n latents, averaged over topic pairs; "
              "mean [CI] over runs.")
        table = scr_table(scr, cfg.evaluate.confidence)
        result.tables["scr"] = table
        doc.table(table)
        doc.h(3, "Probe baselines per topic pair")
        doc.table(scr_baselines(scr))
    else:
        doc.p("**Missing**: `downstream/scr.parquet`; run `sae-ensembles downstream`.")
    for extra in sorted((run_dir / DOWNSTREAM_DIR).glob("*.parquet")) if (run_dir / DOWNSTREAM_DIR).is_dir() else []:
        rel = extra.relative_to(run_dir).as_posix()
        if rel in PRODUCER:
            continue
        frame = read_table(run_dir, rel, result, missing)
        if frame is not None:
            title = "Cell counts" if "cell" in extra.stem else extra.stem
            doc.h(3, f"{title} (`{rel}`)")
            doc.table(frame.head(100))

    others = [f for f in sorted((run_dir / FIGURES_DIR).glob("*.png")) if not f.name.startswith("intrinsic")] if (run_dir / FIGURES_DIR).is_dir() else []
    if others:
        doc.h(2, "Downstream figures")
        for f in others:
            doc.image(f, f.stem.replace("_", " "))
            result.read.append(f.relative_to(run_dir).as_posix())

    doc.h(2, "Top-activating contexts")
    if cfg.report.latents_per_member and cfg.report.top_contexts:
        model = json.loads(manifest_path.read_text())["model"] if manifest_path.is_file() else ""
        failure = None
        try:
            found = top_contexts(run_dir, model, cfg.report.latents_per_member, cfg.report.top_contexts) if model else None
        except (ValueError, OSError, KeyError, RuntimeError) as err:  # a damaged model: say so, keep the report
            found, failure = None, f"{type(err).__name__}: {err}"
            result.notes.append(f"top-activating contexts unavailable: {failure}")
        if failure is not None:
            doc.p(f"**Missing**: could not compute them ({failure}).")
        elif found is None:
            doc.p("**Missing**: needs `models/bagging/run=0` and the test activations; run `sae-ensembles train`.")
        else:
            where, table = found
            doc.p(f"Most frequent latents of the first and last member of `{where}` on the test split; "
                  "each latent's strongest tokens, marked [[like this]], with the tokens before them.")
            doc.table(table)
            result.read.append(where)
    models = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / MODELS_DIR).glob("*/run=*")) if (run_dir / MODELS_DIR).is_dir() else []
    doc.h(2, "Trained models")
    doc.bullets([f"`{m}`" for m in models] or ["**Missing**: no trained models; run `sae-ensembles train`."])

    if missing:
        doc.h(2, "Missing artifacts")
        doc.bullets(missing)
        result.notes += [m.replace("`", "") for m in missing]

    doc.h(2, "Configuration")
    doc.pre(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).strip())
    doc.h(2, "Package versions")
    doc.table(pd.DataFrame(list(package_versions().items()), columns=["package", "version"]))
    return doc


def run_report(cfg: PipelineConfig, run_dir: str | Path, *, progress: bool = True) -> StageResult:
    """Write report/report.md and report/report.html from whatever ``run_dir`` holds."""
    import os

    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    result = StageResult(stage="report")
    doc = build_report(cfg, run_dir, result)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.md", doc.markdown(out)), ("report.html", doc.html(f"SAE ensembles: {cfg.name}"))):
        tmp = out / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
        result.written.append(f"{REPORT_DIR}/{name}")
    result.seconds = time.perf_counter() - start
    return result
