"""The package's layers import one way (book/design.md, "Layers"), checked with import-linter.

The contracts live in pyproject.toml ([tool.importlinter]): between the packages, inside the book
tooling and inside the sparse package. The planted tests add one forbidden import to a copy of the
package and check the linter rejects it: an upward import between packages, and (inside a function,
where an import hides best) one inside the book tooling and one inside the sparse package.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([*LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def _contract_names() -> list[str]:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [c["name"] for c in config["tool"]["importlinter"]["contracts"]]


def test_package_keeps_its_layer_contracts():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    names = _contract_names()
    assert len(names) >= 3 and f"{len(names)} kept, 0 broken" in res.stdout
    flat = re.sub(r"\s+", " ", res.stdout)  # the linter wraps long contract names
    for name in ("Book tooling: experiments > sweep_run", "Sparse: layers > backends > engine > topp"):
        assert name in flat, f"contract {name!r} is not checked"


def _plant(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    shutil.copytree(ROOT / "nbsupport", tmp_path / "nbsupport", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "nbsupport" / module
    path.write_text(path.read_text() + line)
    return _lint(tmp_path)


@pytest.mark.parametrize("module, line, message", [
    ("data/common.py", "\nfrom nbsupport.book import notebook  # planted upward import\n",
     "nbsupport.data is not allowed to import nbsupport.book"),
    ("book/params.py", "\n\ndef _planted():\n    from nbsupport.book import chapters  # planted\n    return chapters\n",
     "nbsupport.book.params is not allowed to import nbsupport.book.chapters"),
    ("sparse/topp.py", "\n\ndef _planted():\n    from . import engine  # planted\n    return engine\n",
     "nbsupport.sparse.topp is not allowed to import nbsupport.sparse.engine"),
], ids=["between-packages", "inside-book", "inside-sparse"])
def test_a_planted_import_breaks_a_contract(tmp_path, module, line, message):
    res = _plant(tmp_path, module, line)
    assert res.returncode != 0
    assert message in res.stdout, res.stdout[-3000:]
