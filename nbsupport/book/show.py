"""The package's code on the page: a chapter shows the tested source of the idea it teaches.

d2l and the Annotated Transformer put the class right under its equation; our chapters do the same
without a copy that can drift: ``show_code(umons.CoAttentionBlock)`` displays the source of that
object as it is in the installed package, syntax-highlighted, with the file and line numbers it comes
from. It renders as a fenced Markdown code block, which JupyterLab highlights and Jupyter Book renders
with the book's own code style (``tests/test_code_units.py`` checks every shown object exists and
stays short).
"""
from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

__all__ = ["show_code", "CodeUnit", "MAX_LINES"]

#: A unit on the page is short: split a longer function rather than show it whole.
MAX_LINES = 45


class CodeUnit:
    """Source of one package object, displayed as highlighted code with its origin (file, lines)."""

    def __init__(self, obj, *, max_lines: int = MAX_LINES):
        target = inspect.unwrap(obj)
        lines, first = inspect.getsourcelines(target)
        self.source = textwrap.dedent("".join(lines)).rstrip() + "\n"
        self.n_lines = self.source.count("\n")
        if self.n_lines > max_lines:
            raise ValueError(f"show_code: {self.qualname(target)} is {self.n_lines} lines; a unit on the page is at "
                             f"most {max_lines} lines (split the function)")
        path = Path(inspect.getsourcefile(target))
        parts = path.with_suffix("").parts
        self.module_path = "/".join(parts[parts.index("nbsupport"):]) + ".py" if "nbsupport" in parts else path.name
        self.where = f"{self.module_path}, lines {first}-{first + self.n_lines - 1}"
        self.name = self.qualname(target)

    @staticmethod
    def qualname(obj) -> str:
        module = getattr(obj, "__module__", "") or ""
        return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}".lstrip(".")

    def _repr_markdown_(self) -> str:
        return f"`{self.name}` ({self.where})\n\n```python\n{self.source}```\n"

    def __repr__(self) -> str:
        return f"# {self.name} ({self.where})\n{self.source}"


def show_code(obj, *, max_lines: int = MAX_LINES) -> CodeUnit:
    """Display the package source of ``obj`` (a class, function or method) under the equation it implements.

    One source: what the page shows is the tested code itself, read from the installed package.
    """
    return CodeUnit(obj, max_lines=max_lines)
