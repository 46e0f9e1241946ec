"""The layout promises of SPEC §2: sae_core stays pure torch/numpy."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sae_core_imports_no_orchestration_or_dataframe_library():
    code = (
        "import sys, pkgutil, importlib, sae_core\n"
        "for m in pkgutil.walk_packages(sae_core.__path__, 'sae_core.'): importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'prefect', 'polars', 'great_expectations'})\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_layout_exists():
    for name in ["flows", "tasks", "sae_core", "data_contracts", "tests", "configs", "benchmarks",
                 "pyproject.toml", "prefect.yaml", "README.md", "Makefile", ".ci/run"]:
        assert (ROOT / name).exists(), name
