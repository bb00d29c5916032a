"""The package's layers import one way (book/design.md, "Layers"), checked with import-linter.

The contracts live in pyproject.toml ([tool.importlinter]); the second test plants an upward import
(a data module importing the book tooling) in a copy of the package and checks the linter rejects it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([*LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_package_keeps_its_layer_contracts():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "nbsupport", tmp_path / "nbsupport", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    common = tmp_path / "nbsupport" / "data" / "common.py"
    common.write_text(common.read_text() + "\nfrom nbsupport.book import notebook  # planted upward import\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "nbsupport.data is not allowed to import nbsupport.book" in res.stdout
