"""Parameter rules, chapter specs and grids: the layer below every user of a chapter's parameters.

A chapter's ``parameters`` cell holds plain literals; :func:`parameters_cell` is the one reader of
such a cell (used by :func:`nbsupport.book.notebook.start`, the sweep command and
``benchmarks/gpu_check.py``). A :class:`Spec` declares a chapter's rules (:class:`Int`, :class:`Choice`,
...), smoke overrides and cross-checks once (the specs themselves live in
:mod:`nbsupport.book.chapters`); :func:`validate` checks values against it and stops with a
:class:`ParameterError` naming the parameter. :class:`GridRule`, :class:`ParamsRule` and
:func:`shrink_grid` describe a sweep's grid (Chapter 8). This module imports nothing from the rest of
the book tooling, so the chapter specs, the notebook opening and the sweep command all sit above it.
"""
from __future__ import annotations

import ast
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from nbsupport.base import ParameterError, _describe, check_modalities

__all__ = [
    "ParameterError", "Bool", "Int", "Float", "Choice", "Str", "Path_", "ListOf", "DictOf", "Modalities", "Spec",
    "validate", "COMMON_RULES", "MAX_INT", "MAX_SEED", "GridRule", "ParamsRule", "shrink_grid", "UNKNOWN",
    "cell_assignments", "parameters_cell",
]

#: Largest value of an integer parameter without a ``max`` of its own (a 32-bit signed count).
MAX_INT = 2**31 - 1
#: Largest seed: NumPy's legacy generator takes seeds below 2**32 (``nbsupport.base.seed_everything``
#: seeds Python, NumPy and PyTorch with the same number); a larger one stops the notebook at the top.
MAX_SEED = 2**32 - 1


# --------------------------------------------------------------------------------------------
# Rules: each is a callable ``rule(name, value) -> value`` that raises ParameterError.
# --------------------------------------------------------------------------------------------
@dataclass
class Bool:
    """A True/False flag."""

    def __call__(self, name: str, value: Any) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ParameterError(f"parameter '{name}' must be True or False, got {_describe(value)}")
        return bool(value)


@dataclass
class Int:
    """An integer, bounded (inclusive) by ``min`` and ``max``; without a ``max``, :data:`MAX_INT`.

    A count or size beyond what any run can hold (``n_train=10**12``) stops at the top, naming the
    parameter, instead of failing much later inside an allocation."""

    min: int | None = None
    max: int | None = None
    optional: bool = False

    def __call__(self, name: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ParameterError(f"parameter '{name}' must be an integer, got {_describe(value)}")
        top = MAX_INT if self.max is None else self.max
        if self.min is not None and value < self.min:
            raise ParameterError(f"parameter '{name}' must be >= {self.min}, got {value}")
        if value > top:
            raise ParameterError(f"parameter '{name}' must be <= {top}, got {value}")
        return int(value)


@dataclass
class Float:
    """A real number (integers accepted), optionally bounded; ``open_min`` makes the lower bound strict."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    optional: bool = False

    def __call__(self, name: str, value: Any) -> float | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ParameterError(f"parameter '{name}' must be a number, got {_describe(value)}")
        value = float(value)
        if not np.isfinite(value):
            raise ParameterError(f"parameter '{name}' must be finite, got {value}")
        if self.min is not None and (value <= self.min if self.open_min else value < self.min):
            raise ParameterError(
                f"parameter '{name}' must be {'>' if self.open_min else '>='} {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise ParameterError(f"parameter '{name}' must be <= {self.max}, got {value}")
        return value


@dataclass
class Choice:
    """One of a fixed set of values."""

    choices: Sequence[Any] = ()

    def __init__(self, *choices: Any):
        self.choices = choices

    def __call__(self, name: str, value: Any) -> Any:
        if value not in self.choices:
            raise ParameterError(
                f"parameter '{name}' must be one of {', '.join(map(repr, self.choices))}, got {_describe(value)}")
        return value


@dataclass
class Str:
    """A string; ``optional`` also accepts None and ``""``, which both mean "not set" (returned as None)."""

    optional: bool = False

    def __call__(self, name: str, value: Any) -> str | None:
        if (value is None or value == "") and self.optional:
            return None
        if not isinstance(value, str):
            raise ParameterError(f"parameter '{name}' must be a string, got {_describe(value)}")
        return value


@dataclass
class Path_:
    """A filesystem path given as a string (None allowed when ``optional``); ``must_exist`` checks it."""

    optional: bool = True
    must_exist: bool = False

    def __call__(self, name: str, value: Any) -> str | None:
        if value is None or value == "":
            if self.optional:
                return None
            raise ParameterError(f"parameter '{name}' must be a path, got {_describe(value)}")
        if not isinstance(value, (str, os.PathLike)):
            raise ParameterError(f"parameter '{name}' must be a path string, got {_describe(value)}")
        if self.must_exist and not Path(value).exists():
            raise ParameterError(f"parameter '{name}': path {str(value)!r} does not exist")
        return str(value)


@dataclass
class ListOf:
    """A non-empty list (or tuple) whose items each pass ``item``."""

    item: Any = None
    min_len: int = 1

    def __call__(self, name: str, value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise ParameterError(f"parameter '{name}' must be a list, got {_describe(value)}")
        if len(value) < self.min_len:
            raise ParameterError(f"parameter '{name}' must have at least {self.min_len} item(s), got {len(value)}")
        return [self.item(f"{name}[{i}]", v) if self.item else v for i, v in enumerate(value)]


@dataclass
class DictOf:
    """A dict whose keys are among ``keys`` (all of them when ``complete``) and whose values pass ``rules[key]``
    (or ``item`` when a key has no rule of its own): model sizes given as one parameter, for example."""

    keys: Sequence[str] = ()
    item: Any = None
    rules: Mapping[str, Any] = field(default_factory=dict)
    complete: bool = False

    def __call__(self, name: str, value: Any) -> dict:
        if not isinstance(value, Mapping):
            raise ParameterError(f"parameter '{name}' must be a dict, got {_describe(value)}")
        unknown = [k for k in value if self.keys and k not in self.keys]
        if unknown:
            raise ParameterError(f"parameter '{name}': unknown key(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(self.keys)}")
        missing = [k for k in self.keys if self.complete and k not in value]
        if missing:
            raise ParameterError(f"parameter '{name}': key(s) {', '.join(map(repr, missing))} missing")
        out = {}
        for k, v in value.items():
            rule = self.rules.get(k, self.item)
            out[k] = rule(f"{name}[{k!r}]", v) if rule else v
        return out


@dataclass
class Modalities:
    """A modality string over the letters L (language), A (audio), V (vision), e.g. ``"LAV"``.

    ``need_text`` enforces MESM's rule that the text CLS vector drives the cross-modal attention.
    """

    need_text: bool = False

    def __call__(self, name: str, value: Any) -> str:
        return check_modalities(name, value, need_text=self.need_text)


COMMON_RULES = {
    "smoke": Bool(),
    "seed": Int(min=0, max=MAX_SEED),
    "device": Choice("auto", "cpu", "cuda"),
    "output_dir": Path_(optional=True),
}


def validate(values: Mapping[str, Any], rules: Mapping[str, Any]) -> dict:
    """Check every parameter in ``values`` against ``rules`` (plus the common ones) and return them normalised.

    A parameter without a rule, or a rule without a value, is a programming error and is reported too.
    """
    rules = {**COMMON_RULES, **rules}
    missing = [k for k in rules if k not in values]
    if missing:
        raise ParameterError(f"parameter(s) {', '.join(missing)} missing from the parameters cell")
    unknown = [k for k in values if k not in rules]
    if unknown:
        raise ParameterError("; ".join(_unknown_message(k, rules) for k in unknown))
    return {name: rules[name](name, values[name]) for name in values}


def _unknown_message(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(sorted(known))}"
    return f"unknown parameter '{name}'{hint}"


@dataclass
class Spec:
    """A chapter's parameters, declared once: a rule per name (the common four are added), smoke
    overrides (name -> value, or a function of the given value), and a cross-parameter ``check``
    (``check(params)`` raises :class:`ParameterError`). :mod:`nbsupport.book.chapters` holds one per chapter;
    :func:`start` and the sweep command both use it."""

    rules: Mapping[str, Any]
    smoke: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict], None] | None = None

    def __post_init__(self):
        shadowed = sorted(set(self.rules) & _RUN_ATTRIBUTES)
        if shadowed:  # run.<name> would read the Run's attribute, not the parameter
            raise ValueError(f"Spec: parameter name(s) {', '.join(shadowed)} are attributes of Run; rename them")

    @property
    def names(self) -> list[str]:
        """Every parameter name of the chapter, the common ones first."""
        return list({**COMMON_RULES, **self.rules})

    def validate(self, values: Mapping[str, Any]) -> dict:
        """Check ``values`` (every name once, no unknown name) and return them normalised."""
        params = validate(values, self.rules)
        if self.check is not None:
            self.check(params)
        return params

    def apply_smoke(self, params: Mapping[str, Any], explicit: Iterable[str] = ()) -> dict:
        """The parameters a smoke run uses: same code path, tiny sizes (``smoke=True``).

        A name in ``explicit`` (set on purpose, e.g. papermill's ``-p epochs 3``) keeps its value:
        explicit parameters win over smoke sizes."""
        out = dict(params)
        for name, over in self.smoke.items():
            if name not in explicit:
                out[name] = over(out[name]) if callable(over) else over
        return out


#: Names a chapter parameter cannot take: ``run.<name>`` reads these attributes of
#: :class:`nbsupport.book.notebook.Run`.
_RUN_ATTRIBUTES = {"params", "output_dir", "notebook", "figures", "metrics_path", "save_figure", "write_metrics"}


# --------------------------------------------------------------------------------------------
# Sweep grids (Chapter 8)
# --------------------------------------------------------------------------------------------
@dataclass
class GridRule:
    """``nb.start`` rule for a grid parameter: a dict mapping parameter names to non-empty lists of values."""

    def __call__(self, name: str, value: Any) -> dict:

        if not isinstance(value, Mapping):
            raise ParameterError(f"parameter '{name}' must be a dict {{parameter: [values...]}}, got {value!r}")
        for k, v in value.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise ParameterError(f"parameter '{name}': key {k!r} is not a parameter name")
            if not isinstance(v, (list, tuple)) or not v:
                raise ParameterError(f"parameter '{name}': values of {k!r} must be a non-empty list, got {v!r}")
        return {k: list(v) for k, v in value.items()}


@dataclass
class ParamsRule:
    """``nb.start`` rule for a dict of fixed parameters (identifier keys, literal values)."""

    def __call__(self, name: str, value: Any) -> dict:

        if not isinstance(value, Mapping):
            raise ParameterError(f"parameter '{name}' must be a dict {{parameter: value}}, got {value!r}")
        bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ParameterError(f"parameter '{name}': key(s) {bad} are not parameter names")
        return dict(value)


def shrink_grid(grid: Mapping[str, Sequence[Any]], max_points: int = 2) -> dict:
    """A smoke-sized grid: the first parameter keeps ``max_points`` evenly spread values, the others their first.

    Chapter 8 in ``smoke`` mode runs the same sweep code on ``max_points`` points.
    """
    grid = {k: list(v) for k, v in grid.items()}
    if not grid:
        return {}
    first, *rest = grid
    vals = grid[first]
    if len(vals) > max_points:  # evenly spread, ends included (e.g. the smallest and largest top_p)
        idx = sorted({round(i * (len(vals) - 1) / max(max_points - 1, 1)) for i in range(max_points)})
        vals = [vals[i] for i in idx]
    return {first: vals, **{k: grid[k][:1] for k in rest}}


# --------------------------------------------------------------------------------------------
# The parameters cell: one reader for the notebook opening, the sweep command and the GPU check
# --------------------------------------------------------------------------------------------
#: The value :func:`cell_assignments` gives a name whose value is not a plain literal.
UNKNOWN = type("Unknown", (), {"__repr__": lambda self: "<not a literal>"})()


def cell_assignments(source: str) -> dict[str, Any] | None:
    """``name -> value`` of a cell made only of ``name = <literal>`` lines (a ``parameters`` cell).

    A value that is not a plain literal (the Design page forbids it, papermill cannot set it) is
    :data:`UNKNOWN`; a cell that is not Python, or holds anything but assignments to names, gives None.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    out: dict[str, Any] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets)):
            return None
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = UNKNOWN
        for target in node.targets:
            out[target.id] = value
    return out


def parameters_cell(notebook: str | os.PathLike) -> dict[str, Any]:
    """Names and default values of ``notebook``'s cell tagged ``parameters`` (see :func:`cell_assignments`).

    Reads the ``.ipynb`` file as JSON (no Jupyter package needed: the GPU check runs on a bare machine);
    a missing file, a notebook without that cell or a cell of anything but assignments is a
    :class:`ParameterError` naming the file.
    """
    path = Path(notebook)
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    except FileNotFoundError:
        raise ParameterError(f"notebook {str(path)!r} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ParameterError(f"notebook {str(path)!r}: cannot read it as a notebook ({exc})") from None
    for cell in cells:
        if isinstance(cell, dict) and cell.get("cell_type") == "code" \
                and "parameters" in (cell.get("metadata") or {}).get("tags", []):
            source = cell.get("source", "")
            values = cell_assignments("".join(source) if isinstance(source, list) else str(source))
            if values is None:
                raise ParameterError(f"notebook {str(path)!r}: its parameters cell must hold only "
                                     "'name = <literal>' lines")
            return values
    raise ParameterError(f"notebook {str(path)!r} has no cell tagged 'parameters'")
