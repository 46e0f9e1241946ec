"""Layering of the packages (SPEC §2, issue 15), read from the import statements.

sae_core is the core (imports none of the others); data_contracts knows artifacts (may use
sae_core's declarations, never tasks or flows); tasks are the stages (never import flows);
flows compose; the CLI only builds configs and calls flows. Private names (``_x``) are not
imported from another package. Function-level imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sae_core", "data_contracts", "tasks", "flows")
FORBIDDEN = {
    "sae_core": {"data_contracts", "tasks", "flows"},
    "data_contracts": {"tasks", "flows"},
    "tasks": {"flows"},
    "flows": set(),
}
CLI = "flows/cli.py"


def imports_of(source: str) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in ``source``; relative imports are not used here."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def violations(root: Path = ROOT) -> list[str]:
    """Every import that goes against the layering, as 'file:line: what'."""
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for module, names, line in imports_of(path.read_text()):
                top = module.split(".")[0]
                if top in FORBIDDEN[package]:
                    bad.append(f"{rel}:{line}: {package} imports {module}")
                if rel == CLI and top in PACKAGES and top != "flows":
                    bad.append(f"{rel}:{line}: the CLI imports {module}; it should only build configs and call flows")
                if top in PACKAGES and top != package:
                    private = [n for n in names if n.startswith("_")]
                    if private:
                        bad.append(f"{rel}:{line}: imports private {private} from {module}")
    return bad


def test_no_import_goes_against_the_layering():
    assert violations() == []


@pytest.mark.parametrize(
    ("file", "line", "expected"),
    [
        ("sae_core/x.py", "from tasks.common import ModelDir\n", "sae_core imports tasks.common"),
        ("sae_core/x.py", "def f():\n    import data_contracts\n", "sae_core imports data_contracts"),
        ("data_contracts/x.py", "from flows.stages import STAGES\n", "data_contracts imports flows.stages"),
        ("tasks/x.py", "from flows.cli import main\n", "tasks imports flows.cli"),
        ("flows/cli.py", "from sae_core.io import load_sae\n", "the CLI imports sae_core.io"),
        ("tasks/x.py", "from sae_core.models import _private\n", "imports private ['_private'] from sae_core.models"),
    ],
)
def test_a_wrong_way_import_is_reported(tmp_path, file, line, expected):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / file).write_text(line)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found
