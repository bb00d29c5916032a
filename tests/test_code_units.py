"""Every chapter shows the package code of the ideas it teaches (``show_code``), and that code exists.

For each notebook the opening cells (parameters and imports) are executed and every ``show_code(...)``
argument is evaluated there: a unit that was renamed or removed fails here, before the book is built.
Each unit is short (at most ``MAX_LINES``) and readable without sideways scrolling (lines <= 100).
"""
from __future__ import annotations

import ast

import nbformat
import pytest

from conftest import NOTEBOOKS
from nbsupport.book.show import MAX_LINES, CodeUnit

IDS = [nb.stem for nb in NOTEBOOKS]
#: Chapters that teach a model, and the least they must show (issue: "Ideas on the page").
REQUIRED = {"01_attention_basics": 4, "03_umons_monomodal": 2, "04_umons_multimodal": 2, "05_fe2e": 3,
            "06_mesm": 4, "07_two_phase_vs_end_to_end": 2}


def _shown(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    exprs = []
    for cell in code:
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "show_code" and node.args:
                exprs.append(ast.unparse(node.args[0]))
    return code, exprs


def shown_units(path) -> list[tuple[str, CodeUnit]]:
    """``(expression, unit)`` for every ``show_code(...)`` of a chapter, evaluated in its opening cell's imports."""
    code, exprs = _shown(path)
    if not exprs:
        return []
    ns: dict = {}
    imports = code[1].source.split("run = nb.start(")[0]  # the opening cell's imports, without the run
    exec(compile(code[0].source + "\n" + imports, f"{path.name}:opening", "exec"), ns)
    # NameError / AttributeError here: the chapter shows a symbol that no longer exists
    return [(expr, CodeUnit(eval(expr, ns))) for expr in exprs]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_shown_code_exists_and_is_short(path):
    units = shown_units(path)
    assert len(units) >= REQUIRED.get(path.stem, 0), f"{path.name} shows {len(units)} code unit(s)"
    for expr, unit in units:
        assert unit.n_lines <= MAX_LINES
        long = [line for line in unit.source.splitlines() if len(line) > 100]
        assert not long, f"{path.name}: {expr} has lines over 100 characters: {long[:2]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_code_cells_fit_the_page(path):
    code, _ = _shown(path)
    long = [line for c in code for line in c.source.splitlines() if len(line) > 100]
    assert not long, f"{path.name}: code lines over 100 characters: {long[:3]}"
