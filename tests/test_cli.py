"""The console script end to end: trains, saves loadable SAEs and a summary table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_core import load_sae

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_command_writes_loadable_saes_and_summary(tmp_path):
    out = tmp_path / "syn"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "synthetic", "--steps", "30", "--arch", "topk", "--arch", "gated",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "topk" in proc.stdout and str(out) in proc.stdout
    summary = json.loads((out / "summary" / "recovery.json").read_text())
    assert [r["architecture"] for r in summary] == ["topk", "gated"]
    assert all(0 < r["recovery"] <= 1 and r["n_steps"] == 30 for r in summary)
    sae = load_sae(out / "topk")
    codes = sae.encode(torch.randn(5, 64))
    assert ((codes != 0).sum(-1) <= 4).all()


def test_unknown_architecture_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "synthetic", "--arch", "vanilla", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 2 and "unknown architecture(s) ['vanilla']" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # 55 s (two CLI runs, each with a temporary Prefect server); `sae-ensembles extract`
# stays in `make test` through test_reliability.py::test_extraction_killed_mid_run_resumes_to_identical_shards
def test_extract_command_runs_the_stage_and_then_reports_up_to_date(tmp_path):
    from tests.tiny_models import TEXTS, build_tiny_model

    model = build_tiny_model(tmp_path / "model", "bert")
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"name: tiny\nextract:\n  model: {model}\n  layer: 1\n  context_length: 8\n"
        f"  corpus:\n    - name: {corpus}\n  split_fractions: {{train: 0.6, val: 0.2, test: 0.2}}\n"
    )
    cmd = [sys.executable, "-m", "flows.cli", "extract", "--config", str(cfg), "--out", str(tmp_path / "run")]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("extracted ") and (tmp_path / "run" / "activations" / "manifest.json").is_file()
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert second.returncode == 0 and second.stdout.startswith("already up to date:")
    assert "0 written" in second.stdout

    cfg.write_text("extract:\n  model: x\n  layerz: 3\n")
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "layerz" in bad.stderr and "Extra inputs are not permitted" in bad.stderr


def test_run_and_stage_commands_refuse_bad_configs_and_misplaced_force(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: bad\ntrain:\n  d_sae: many\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(cfg), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert f"{cfg}: section 'train': train.d_sae: Input should be a valid integer" in proc.stderr and "'many'" in proc.stderr
    assert not (tmp_path / "r").exists()
    cfg.write_text("name: bad\ntrain:\n  d_sea: 3\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(cfg), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "unknown key 'train.d_sea'" in proc.stderr and "known keys here:" in proc.stderr
    assert not (tmp_path / "r").exists()

    cfg.write_text("name: ok\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--config", str(cfg), "--force", "evaluate"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "use `sae-ensembles run --force evaluate`" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--force", "everything"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'everything'" in proc.stderr
