"""The console script end to end: trains, saves loadable SAEs and a summary table."""

import json
import subprocess
import sys
from pathlib import Path

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
