"""The report stage: numbers it shows against hand-computed ones, missing artifacts, self-contained HTML,
and the typed blocks it is made of."""

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from sae_core.stats import mean_ci
from tasks.config import PipelineConfig
from tasks.report import run_report
from tasks.report_doc import BulletList, Document, Heading, Image, Missing, Paragraph, Preformatted, Table
from tasks.report_tables import metric_tables, operating_point, probing_table, scr_table


def _summary() -> pd.DataFrame:
    rows = []
    for method, j, ev, l0 in [("single", 1, 0.88, 16.0), ("bagging", 2, 0.90, 32.0), ("boosting", 2, 0.93, 32.0)]:
        rows.append((method, j, "explained_variance", ev, ev - 0.01, ev + 0.01, 3))
        rows.append((method, j, "l0", l0, l0 - 1, l0 + 1, 3))
    return pd.DataFrame(rows, columns=["method", "n_members", "metric", "mean", "ci_low", "ci_high", "n_runs"])


def _probing() -> pd.DataFrame:
    # run 0: classes 0.8 and 0.6 -> 0.7; run 1: 0.9 and 0.7 -> 0.8; mean 0.75
    return pd.DataFrame(
        [("bagging", 2, r, "bbc", c, 1, acc) for r, c, acc in [(0, "a", 0.8), (0, "b", 0.6), (1, "a", 0.9), (1, "b", 0.7)]],
        columns=["method", "n_members", "run", "dataset", "class", "k", "accuracy"],
    )


def _scr() -> pd.DataFrame:
    return pd.DataFrame(
        [("single", 1, 0, "business-sport", 2, 0.6, 0.7, 0.9, 1 / 3), ("single", 1, 1, "business-sport", 2, 0.6, 0.75, 0.9, 0.5)],
        columns=["method", "n_members", "run", "pair", "n_ablated", "acc_base", "acc_ablated", "acc_oracle", "score"],
    )


def _write(df: pd.DataFrame, path, kind: str) -> None:
    from data_contracts.labelled import write_table
    from data_contracts.metrics import write_summary

    path.parent.mkdir(parents=True, exist_ok=True)
    write_summary(df, path) if kind == "metric_summary" else write_table(df, path, kind)


def test_metric_tables_put_l0_beside_every_metric_with_its_interval():
    tables = metric_tables(_summary())
    ev = tables["explained_variance"]
    assert list(ev.columns) == ["method", "J", "explained_variance", "L0", "runs"]
    assert ev["method"].tolist() == ["single SAE", "bagging", "boosting"]  # the report's method order, by label
    assert ev.iloc[1].tolist() == ["bagging", 2, "0.9 [0.89, 0.91]", "32 [31, 33]", 3]
    assert "L0" not in tables["l0"].columns


def test_metric_tables_follow_the_catalog_order_and_show_t_beside_token_dependent_metrics():
    s = _summary()
    extra = [("single", 1, m, v, v, v, 3) for m, v in [("kl_divergence", 0.5), ("dead_fraction", 0.1), ("mse", 2.0)]]
    s = pd.concat([s, pd.DataFrame(extra, columns=s.columns)], ignore_index=True)
    tables = metric_tables(s, tokens_evaluated=3648)
    # catalog order: mse, explained_variance, l0, dead_fraction, ..., kl_divergence (last, not sorted away as "kl")
    assert list(tables) == ["mse", "explained_variance", "l0", "dead_fraction", "kl_divergence"]
    assert list(tables["dead_fraction"].columns) == ["method", "J", "dead_fraction", "L0", "T", "runs"]
    assert tables["dead_fraction"].iloc[0].tolist() == ["single SAE", 1, "0.1", "16 [15, 17]", 3648, 3]
    assert "T" not in tables["mse"].columns  # MSE does not depend on how many tokens were scored
    assert "T" not in metric_tables(s)["dead_fraction"].columns  # T unknown: no column


def test_operating_point_is_judged_against_the_spec_band():
    _, text = operating_point(_summary())
    assert "0.880" in text and "L0 16.0" in text and "inside" in text
    s = _summary()
    first_members = s[s["method"] != "single"].assign(n_members=1)
    table, _ = operating_point(pd.concat([first_members, s[s["method"] == "single"]], ignore_index=True))
    assert table["method"].tolist() == ["single SAE", "bagging", "boosting"]  # table order, not alphabetical
    assert table.columns.tolist() == ["method", "explained_variance", "l0"]
    s = _summary()
    s.loc[(s["method"] == "single") & (s["metric"] == "l0"), "mean"] = 200.0
    assert "**outside**" in operating_point(s)[1]


def test_probing_and_scr_tables_average_classes_then_runs():
    p = probing_table(_probing(), 0.95)
    m, lo, hi = mean_ci(np.array([0.7, 0.8]))
    assert m == pytest.approx(0.75) and lo < 0.75 < hi
    assert p.iloc[0]["k=1"] == f"{m:.4g} [{lo:.4g}, {hi:.4g}]"
    # t interval with 1 degree of freedom: 12.706 * std/sqrt(2) = 12.706 * 0.05
    assert hi - m == pytest.approx(12.7062 * 0.05, rel=1e-4)
    s = scr_table(_scr(), 0.95)
    assert s.columns.tolist() == ["method", "J", "n=2"] and s.iloc[0]["n=2"].startswith("0.4167 [")


def test_probing_rows_follow_the_method_order_with_raw_first():
    rows = [(m, j, 0, "bbc", "a", 1, 0.5) for m, j in [("boosting", 2), ("bagging", 2), ("raw", 0), ("single", 1)]]
    p = probing_table(pd.DataFrame(rows, columns=_probing().columns), 0.95)
    assert p["method"].tolist() == ["raw activations", "single SAE", "bagging", "boosting"]
    assert p.iloc[0].tolist() == ["bbc", "raw activations", 0, "0.5"]  # one run: the mean without an interval


def test_claims_section_shows_both_verdicts_and_flags_points_whose_l0_reaches_d(tmp_path):
    from tasks.report_sections import claims_section

    s = _summary()  # boosting J=2 at L0 32
    s = pd.concat([s, pd.DataFrame([("boosting", 2, "connectivity", 1e-7, 0.0, 2e-7, 3)], columns=s.columns)], ignore_index=True)
    md = Document("t", claims_section(s, 0.95, d=32)).to_markdown(tmp_path)
    assert "| claim | claimed better | claimed worse | verdict (raw) | verdict (floor-corrected) | note |" in md
    assert "reaches d = 32, the activation width" in md
    flagged = md.split("### Points where comparisons are not testable")[1]
    # bagging J=2 (L0 32) and boosting J=2 (L0 32, connectivity 1e-7) are flagged; single SAE J=1 (L0 16) is not
    assert "| bagging | 2 | 32 [31, 33] | – | L0 32 ≥ d = 32 |" in flagged
    assert "| boosting | 2 | 32 [31, 33] | 1e-07 [0, 2e-07] | L0 32 ≥ d = 32; connectivity 1e-07 saturated |" in flagged
    assert "single SAE" not in flagged
    unknown = Document("t", claims_section(_summary(), 0.95)).to_markdown(tmp_path)
    assert "width is unknown (no manifest)" in unknown and "None: every (method, J) has L0 below d" in unknown


def test_the_header_says_what_each_expanded_sae_is_matched_to(tmp_path):
    from tasks.config import TrainStageConfig
    from tasks.report_sections import header

    md = Document("t", header("run", tmp_path, "now", None, TrainStageConfig())).to_markdown(tmp_path)
    assert "the expanded SAE, trained for the same 200 steps, is **FLOP-matched** to bagging" in md
    assert '"expanded SAE, J× steps" is trained for J× the steps: **step-matched**' in md
    plain = TrainStageConfig(methods=["bagging", "expanded"])
    md = Document("t", header("run", tmp_path, "now", None, plain)).to_markdown(tmp_path)
    assert "FLOP-matched" in md and "step-matched" not in md
    bagging_only = TrainStageConfig(methods=["bagging"])
    assert "FLOP-matched" not in Document("t", header("run", tmp_path, "now", None, bagging_only)).to_markdown(tmp_path)


def test_report_on_an_empty_run_names_each_missing_artifact_and_its_stage(tmp_path):
    result = run_report(PipelineConfig(name="empty"), tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert result.written == ["report/report.md", "report/report.html"]
    for rel, stage in [("metrics/summary.parquet", "evaluate"), ("downstream/probing.parquet", "downstream"),
                       ("downstream/scr.parquet", "downstream"), ("activations/manifest.json", "extract"),
                       ("metrics/top_contexts.parquet", "evaluate")]:
        assert f"`{rel}` is missing: run `sae-ensembles {stage}`" in md
    assert "sae-ensembles train" in md  # no models
    assert "## Configuration" in md and "d_sae: 768" in md and "| prefect | 3.8" in md


def test_full_report_shows_tables_and_embeds_figures(tmp_path):
    _write(_summary(), tmp_path / "metrics" / "summary.parquet", "metric_summary")
    _write(_probing(), tmp_path / "downstream" / "probing.parquet", "probing_results")
    _write(_scr(), tmp_path / "downstream" / "scr.parquet", "scr_results")
    (tmp_path / "figures").mkdir()
    for name in ("intrinsic_explained_variance", "scr_score"):
        plt.figure(figsize=(2, 2)); plt.plot([0, 1]); plt.savefig(tmp_path / "figures" / f"{name}.png"); plt.close()
    result = run_report(PipelineConfig(name="full"), tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    page = (tmp_path / "report" / "report.html").read_text()
    assert "| bagging | 2 | 0.9 [0.89, 0.91] | 32 [31, 33] | 3 |" in md
    assert "inside" in md and "![scr score](../figures/scr_score.png)" in md
    assert page.count("src='data:image/png;base64,") == 2
    assert not re.search(r"src=['\"](?!data:)", page)  # nothing loaded from outside the file
    assert set(result.tables) == {"claims", "probing", "scr"}
    assert "| Bagging reconstructs better than a single SAE (MSE) |" in md  # claims checked (mse not in this summary)
    assert {"metrics/summary.parquet", "downstream/probing.parquet", "downstream/scr.parquet"} <= set(result.read)


def test_a_table_breaking_its_contract_fails_the_report(tmp_path):
    from data_contracts import ContractViolation

    (tmp_path / "metrics").mkdir()
    _summary().to_parquet(tmp_path / "metrics" / "summary.parquet")  # no artifact kind in the footer
    with pytest.raises(ContractViolation, match="summary.parquet"):
        run_report(PipelineConfig(name="bad"), tmp_path)




def _contexts() -> pd.DataFrame:
    rows = [("models/bagging/run=0", 0, 7, 0.25, rank, act, "bbc/tech/1", pos, f"a <b> [[x{rank}]] & c")
            for rank, act, pos in [(1, 3.5, 4), (2, 1.25, 9)]]
    return pd.DataFrame(rows, columns=["model", "member", "latent", "frequency", "rank", "activation", "doc_id",
                                       "position", "context"])


def test_a_run_without_top_contexts_says_which_stage_writes_them(tmp_path):
    _write(_summary(), tmp_path / "metrics" / "summary.parquet", "metric_summary")
    result = run_report(PipelineConfig(name="no-contexts"), tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    page = (tmp_path / "report" / "report.html").read_text()
    section = md.split("## Top-activating contexts")[1].split("\n## ")[0]
    assert "**Missing**: `metrics/top_contexts.parquet` is written by `sae-ensembles evaluate`" in section
    assert "`metrics/top_contexts.parquet` is missing: run `sae-ensembles evaluate`" in md  # in the list of missing artifacts
    assert "<p class='missing'><b>Missing</b>: <code>metrics/top_contexts.parquet</code> is written by" in page
    assert "metrics/top_contexts.parquet is missing: run sae-ensembles evaluate" in result.notes


def test_top_contexts_are_read_from_their_table_and_escaped_in_html(tmp_path):
    from data_contracts.contexts import write_contexts

    write_contexts(_contexts(), tmp_path / "metrics" / "top_contexts.parquet")
    # a model directory that cannot be loaded: the report reads tables, it never loads a model
    (tmp_path / "models" / "bagging" / "run=0").mkdir(parents=True)
    (tmp_path / "models" / "bagging" / "run=0" / "ensemble.json").write_text("{not json")
    result = run_report(PipelineConfig(name="contexts"), tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    page = (tmp_path / "report" / "report.html").read_text()
    assert "first and last member of `models/bagging/run=0`" in md
    assert "| member | latent | frequency | activation | context |" in md
    assert "| 0 | 7 | 0.25 | 3.5 | a <b> [[x1]] & c |\n| 0 | 7 | 0.25 | 1.25 | a <b> [[x2]] & c |" in md
    assert "<td>a &lt;b&gt; [[x1]] &amp; c</td>" in page and "<b> [[x1]]" not in page
    assert "metrics/top_contexts.parquet" in result.validated
    assert "- `models/bagging/run=0`" in md and not any("context" in n for n in result.notes)


def test_a_table_of_unknown_kind_is_shown_unvalidated_and_said_so(tmp_path):
    import pyarrow as pa

    from data_contracts.core import write_parquet_atomic

    table = pa.Table.from_pandas(pd.DataFrame({"pair": ["a-b"], "count": [3]}), preserve_index=False)
    write_parquet_atomic(table, tmp_path / "downstream" / "future_cells.parquet", "some_future_kind")
    result = run_report(PipelineConfig(name="unknown"), tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "### Cell counts (`downstream/future_cells.parquet`)" in md and "| a-b | 3 |" in md
    assert "downstream/future_cells.parquet: no contract for its kind 'some_future_kind' yet; read without validation" in result.notes
    assert "downstream/future_cells.parquet" in result.read and "downstream/future_cells.parquet" not in result.validated


# ------------------------------------------------------------------ the blocks
def test_each_block_renders_markdown_and_escaped_html(tmp_path):
    report_dir = tmp_path / "report"
    figure = tmp_path / "figures" / "f.png"
    figure.parent.mkdir()
    figure.write_bytes(b"\x89PNG fake")
    cases = [
        (Heading(2, "Run `a<b>`"), "## Run `a<b>`", "<h2>Run <code>a&lt;b&gt;</code></h2>"),
        (Paragraph("**bold** & `x<y`"), "**bold** & `x<y`", "<p><b>bold</b> &amp; <code>x&lt;y</code></p>"),
        (Missing("needs `m.parquet`"), "**Missing**: needs `m.parquet`",
         "<p class='missing'><b>Missing</b>: needs <code>m.parquet</code></p>"),
        (BulletList(("`a`", "b & c")), "- `a`\n- b & c", "<ul><li><code>a</code></li><li>b &amp; c</li></ul>"),
        (Table(pd.DataFrame({"m<": ["x&y"], "v": [1 / 3], "w": [float("nan")]})),
         "| m< | v | w |\n|---|---|---|\n| x&y | 0.3333 | – |",
         "<table><thead><tr><th>m&lt;</th><th>v</th><th>w</th></tr></thead>"
         "<tbody><tr><td>x&amp;y</td><td>0.3333</td><td>–</td></tr></tbody></table>"),
        (Image(figure, "a 'quoted' <fig>"), "![a 'quoted' <fig>](../figures/f.png)",
         "<figure><img alt='a &#x27;quoted&#x27; &lt;fig&gt;' src='data:image/png;base64,iVBORyBmYWtl'>"
         "<figcaption>a &#x27;quoted&#x27; &lt;fig&gt;</figcaption></figure>"),
        (Preformatted("a: <b>\n  c: `d`"), "```\na: <b>\n  c: `d`\n```", "<pre>a: &lt;b&gt;\n  c: `d`</pre>"),
    ]
    for block, markdown, page in cases:
        assert block.to_markdown(report_dir) == markdown
        assert block.to_html(report_dir) == page
    doc = Document("T <1>", [c[0] for c in cases])
    assert doc.to_markdown(report_dir) == "\n\n".join(c[1] for c in cases) + "\n"
    html = doc.to_html(report_dir)
    assert "<title>T &lt;1&gt;</title>" in html and html.rstrip().endswith("</body></html>")
    assert all(c[2] in html for c in cases)
    assert doc.images() == [cases[5][0]]


def test_named_tables_are_handed_to_the_stage_result():
    frame = pd.DataFrame({"a": [1]})
    doc = Document("t", [Table(frame, name="claims"), Table(pd.DataFrame({"b": [2]})), Paragraph("x")])
    assert list(doc.named_tables()) == ["claims"] and doc.named_tables()["claims"] is frame
