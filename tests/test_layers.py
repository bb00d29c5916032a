"""The package's layers import one way (book/design.md, "Layers"), checked with import-linter.

The contracts live in pyproject.toml ([tool.importlinter]): between the packages, inside the book
tooling, inside the sparse package and inside the data package. The planted tests add one forbidden
import to a copy of the package and check the linter rejects it: an upward import between packages,
and (inside a function, where an import hides best) one inside each of the book tooling, the sparse
package and the data package.

An import inside a function is allowed only with its reason, a ``# local:`` comment (an optional
dependency, or one too slow to load for the modules that import this one): every other import sits at
the top of its module, where a reader and the linter see it.
"""
from __future__ import annotations

import ast
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
    for name in ("Book tooling: experiments > sweep_run", "Sparse: layers > backends > engine > topp",
                 "Data: prepare > formats/corpus > datasets"):
        assert name in flat, f"contract {name!r} is not checked"


def _copy(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "nbsupport", tmp_path / "nbsupport", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")


def _plant(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    _copy(tmp_path)
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
    ("data/safe_pickle.py", "\n\ndef _planted():\n    from . import raw  # planted\n    return raw\n",
     "nbsupport.data.safe_pickle is not allowed to import nbsupport.data.raw"),
], ids=["between-packages", "inside-book", "inside-sparse", "inside-data"])
def test_a_planted_import_breaks_a_contract(tmp_path, module, line, message):
    res = _plant(tmp_path, module, line)
    assert res.returncode != 0
    assert message in res.stdout, res.stdout[-3000:]


def test_a_new_data_module_must_be_given_its_layer(tmp_path):
    # the data contract is exhaustive: a module that is in no layer is reported, not silently unchecked
    _copy(tmp_path)
    (tmp_path / "nbsupport" / "data" / "planted.py").write_text("X = 1\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "nbsupport.data.planted" in res.stdout and "exhaustive" in res.stdout, res.stdout[-3000:]


# ------------------------------------------------------------------------------------------ local imports
LOCAL = "# local:"


def unexplained_local_imports(package: Path) -> list[str]:
    """``path:line: statement`` of every import inside a function of ``package`` that carries no
    ``# local:`` reason: on its own line(s), or in the comment lines just above it, reading upwards
    through a ``try:`` and through the other imports of the same group."""
    found = []
    for path in sorted(package.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), str(path))
        local = []  # imports whose enclosing scope is a function
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
        spans = {n.lineno: n.end_lineno for n in local}
        ends = {end: start for start, end in spans.items()}
        for node in {id(n): n for n in local}.values():  # nested functions are walked twice
            if not _explained(lines, node.lineno, node.end_lineno, ends):
                found.append((str(path.relative_to(package.parent)), node.lineno, lines[node.lineno - 1].strip()))
    return [f"{where}:{line}: {text}" for where, line, text in sorted(set(found))]


def _explained(lines: list[str], start: int, end: int, ends: dict[int, int]) -> bool:
    if any(LOCAL in lines[i - 1] for i in range(start, end + 1)):
        return True
    i = start - 1
    while i >= 1:
        text = lines[i - 1].strip()
        if i in ends:  # the import above in the same group: its reason counts, else read on above it
            if any(LOCAL in lines[j - 1] for j in range(ends[i], i + 1)):
                return True
            i = ends[i] - 1
        elif text.startswith("#") or text.startswith("try:"):
            if LOCAL in text:
                return True
            i -= 1
        else:
            return False
    return False


def test_every_import_inside_a_function_says_why():
    bad = unexplained_local_imports(ROOT / "nbsupport")
    assert not bad, ("imports inside functions without a '# local:' reason (move them to the top of the "
                     "module, or say why they must stay):\n" + "\n".join(bad))


@pytest.mark.parametrize("body, explained", [
    ("def f():\n    import json\n    return json\n", False),
    ("def f():\n    import json  # local: why\n    return json\n", True),
    ("def f():\n    # local: why, on the line above\n    import json\n    import csv\n    return json, csv\n",
     True),
    ("def f():\n    try:  # local: optional\n        import fcntl\n    except ImportError:\n        fcntl = None\n",
     True),
    ("def f():\n    x = 1  # local: not about the import\n    import json\n    return json\n", False),
    ("class A:\n    def f(self):\n        def g():\n            from json import (\n                dumps)\n"
     "        return g\n", False),
    ("import json  # top level: fine without a reason\n", True),
])
def test_the_local_import_check_reads_the_comment_rule(tmp_path, body, explained):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(body)
    assert (not unexplained_local_imports(tmp_path / "pkg")) == explained
