"""Sweep grids and parameters (Chapter 8): command-line values, grid points and their names, checks.

A sweep runs a chapter once per *point* of a grid (the cartesian product of ``--grid`` values, on top of
fixed ``-p`` values). This module turns the command line's strings into values (:func:`parse_value`,
:func:`parse_grid_option`), checks every value against the chapter's own :class:`~nbsupport.book.params.Spec`
before anything runs (:func:`check_parameters`), gives values the chapter treats as equal one canonical
form (:func:`canonical_grid`: ``LVA`` is ``LAV``, ``1`` is ``1.0`` for a real-valued parameter) and
expands the grid into named points (:func:`expand_grid`).

``output_dir`` belongs to the sweep (one folder per point), and this module is the one place that knows
it: :func:`takes_output_dir` says whether a notebook has it (then it writes ``metrics.json``),
:func:`refuse_output_dir` rejects it as a ``-p``/``--grid`` value, :func:`point_parameters` sets it to a
point's folder, and :func:`without_output_dir` leaves it out of what identifies a point. The runner
(:mod:`~nbsupport.book.sweep_run`) and the store (:mod:`~nbsupport.book.sweep_store`) call these.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from nbsupport.base import ParameterError

from . import chapters
from .params import COMMON_RULES, UNKNOWN, Bool, DictOf, Float, Int, ListOf, Spec, Str, parameters_cell

__all__ = [
    "SweepError", "Point", "OUTPUT_DIR", "parse_value", "parse_grid_option", "parse_resources", "expand_grid",
    "point_name", "notebook_parameters", "parameter_spec", "check_parameters", "canonical_grid", "find_notebook",
    "takes_output_dir", "refuse_output_dir", "point_parameters", "without_output_dir",
]

#: The parameter a sweep sets itself: each point's notebook writes its metrics and figures there.
OUTPUT_DIR = "output_dir"
_NAME_MAX = 100


class SweepError(ValueError):
    """A sweep cannot start: bad option, unknown parameter, wrong type, or a clash with earlier results."""


# ---------------------------------------------------------------------------------------------
# output_dir, the sweep's own parameter (one folder per point)
# ---------------------------------------------------------------------------------------------
def takes_output_dir(defaults: Mapping[str, Any]) -> bool:
    """Whether a notebook (its parameters cell's ``defaults``) has ``output_dir``: then each point gets
    its folder there and must leave a ``metrics.json`` in it to count as finished."""
    return OUTPUT_DIR in defaults


def refuse_output_dir(params: Mapping[str, Any], grid: Mapping[str, Any]) -> None:
    """Fail when a sweep's fixed ``params`` or its ``grid`` give ``output_dir``: the sweep sets it."""
    if OUTPUT_DIR in params or OUTPUT_DIR in grid:
        raise SweepError("parameter 'output_dir' is set by the sweep (one folder per point); do not pass it")


def point_parameters(params: Mapping[str, Any], folder: str | os.PathLike, *, takes: bool = True) -> dict:
    """``params`` with ``output_dir`` set to ``folder`` (for a notebook that ``takes`` it; else a copy)."""
    return {**params, OUTPUT_DIR: str(folder)} if takes else dict(params)


def without_output_dir(params: Mapping[str, Any]) -> dict:
    """``params`` without ``output_dir``: what identifies a point (its folder is the sweep's business)."""
    return {k: v for k, v in params.items() if k != OUTPUT_DIR}


# ---------------------------------------------------------------------------------------------
# Parsing command-line values
# ---------------------------------------------------------------------------------------------
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_value(text: str) -> Any:
    """Turn a command-line string into a Python literal, like papermill's ``-p``.

    ``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"True"``/``"true"`` -> True, ``"None"`` -> None,
    ``"[1, 2]"`` -> [1, 2], ``"'LA'"`` -> "LA"; anything else stays the string itself (``LA`` -> "LA").
    """
    if not isinstance(text, str):
        return text
    stripped = text.strip()
    if stripped.lower() in _WORDS:
        return _WORDS[stripped.lower()]
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes (so ``[1,2],[3]`` is two values)."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_grid_option(option: str) -> tuple[str, list]:
    """Parse ``--grid NAME=V1,V2,...`` into ``(NAME, [v1, v2, ...])`` (each value via :func:`parse_value`)."""
    name, sep, values = option.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise SweepError(f"--grid {option!r}: expected NAME=V1,V2,... with NAME a parameter name")
    items = _split_top_level(values)
    if any(not v.strip() for v in items):
        raise SweepError(f"--grid {option!r}: empty value in the list for '{name}'")
    parsed = [parse_value(v) for v in items]
    if len({json.dumps(v, sort_keys=True, default=str) for v in parsed}) != len(parsed):
        raise SweepError(f"--grid {option!r}: repeated value for '{name}'")
    return name, parsed


# ---------------------------------------------------------------------------------------------
# Grid expansion and point names
# ---------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One notebook run of a sweep: its folder ``name`` and the full ``params`` passed to papermill."""

    name: str
    params: dict
    grid_values: dict = field(default_factory=dict)
    recorded: dict = field(default_factory=dict)  # notebook defaults + params: what params.json holds


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)  # True, None, 0.5; 1.0 stays distinct from 1
    return json.dumps(value, separators=(",", ":"), default=str)


def _short_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def point_name(grid_values: Mapping[str, Any]) -> str:
    """Readable, file-system-safe folder name of a grid point: ``top_p=0.5__modalities=LA``.

    Characters outside ``[A-Za-z0-9._=+-]`` become ``-``; a name longer than 100 characters is
    cut and suffixed with a hash of the values; no grid at all gives ``default``.
    """
    if not grid_values:
        return "default"
    raw = "__".join(f"{k}={_fmt(v)}" for k, v in grid_values.items())
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", raw).lstrip(".") or "point"
    if len(name) > _NAME_MAX:
        name = f"{name[:_NAME_MAX - 9]}-{_short_hash(dict(grid_values))}"
    return name


def expand_grid(fixed: Mapping[str, Any] | None = None, grid: Mapping[str, Sequence[Any]] | None = None) -> list[Point]:
    """Cartesian product of the grid values on top of the fixed parameters, in a deterministic order.

    The first grid parameter varies slowest (``itertools.product`` order, grid keys in the given
    order). Points whose sanitised names collide get a hash suffix so every folder is distinct.
    """
    fixed = dict(fixed or {})
    grid = {k: list(v) for k, v in (grid or {}).items()}
    for k, values in grid.items():
        if not values:
            raise SweepError(f"grid parameter '{k}' has no values")
        if k in fixed:
            raise SweepError(f"parameter '{k}' is given both as -p and as --grid")
    points = []
    for combo in itertools.product(*grid.values()):
        gv = dict(zip(grid.keys(), combo))
        points.append(Point(point_name(gv), {**fixed, **gv}, gv))
    names = [p.name for p in points]
    for p in points:
        if names.count(p.name) > 1:
            p.name = f"{p.name[:_NAME_MAX - 9]}-{_short_hash(p.grid_values)}"
    return points


def find_notebook(name: str | os.PathLike) -> Path:
    """Resolve a chapter name: an existing path as given, else under ``./book`` or the repository's ``book/``."""
    path = Path(name)
    candidates = [path] if path.is_absolute() else [
        Path.cwd() / path, Path.cwd() / "book" / path, Path(__file__).resolve().parents[1] / "book" / path]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SweepError(f"notebook {str(name)!r} not found (looked in: {', '.join(str(c) for c in candidates)})")


def _parse_gpus(gpus: Sequence[str] | str | None) -> list[str]:
    """GPU ids from ``"0,1"`` (the ``--gpus`` form) or a sequence; ``None`` or ``""`` -> none."""
    if isinstance(gpus, str):
        return [g.strip() for g in gpus.split(",") if g.strip()]
    return list(gpus or [])


def parse_resources(resources: str | Mapping[str, float] | None) -> dict[str, float]:
    """Dask worker resources a point needs, from ``"GPU=1"`` (the ``--resources`` form) or a dict.

    Chapter 8's "one point per GPU": workers started with ``--resources GPU=1`` and points that ask
    for ``GPU=1`` run one point per GPU at a time.
    """
    if resources is None or resources == "":
        return {}
    if isinstance(resources, str):
        out = {}
        for item in resources.split(","):
            name, sep, amount = item.partition("=")
            value = parse_value(amount)
            if not sep or not name.strip().isidentifier() or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                raise SweepError(f"--resources {resources!r}: expected NAME=AMOUNT[,NAME=AMOUNT], e.g. GPU=1")
            out[name.strip()] = value
        resources = out
    if not isinstance(resources, Mapping):
        raise SweepError(f"resources must be a dict like {{'GPU': 1}} or a string 'GPU=1', got {resources!r}")
    for name, value in resources.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SweepError(f"resource {name!r} needs a positive amount, got {value!r}")
    return dict(resources)


# ---------------------------------------------------------------------------------------------
# Parameter validation against the chapter's spec
# ---------------------------------------------------------------------------------------------
def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """Names and default values of a notebook's ``parameters`` cell (its ``name = <literal>`` lines).

    Read by the book's one reader of that cell (:func:`nbsupport.book.params.parameters_cell`); a
    default that is not a plain literal is :data:`~nbsupport.book.params.UNKNOWN`, which accepts any value.
    """
    try:
        return parameters_cell(notebook)
    except ParameterError as err:
        raise SweepError(str(err)) from None


def _rule_from_default(default: Any):
    """A parameter rule inferred from a default, for notebooks outside the book (no chapter spec)."""
    if default is UNKNOWN or default is None:
        return lambda name, value: value
    if isinstance(default, bool):
        return Bool()
    if isinstance(default, int):
        return Int()
    if isinstance(default, float):  # an int is a fine float (epochs-like 1 for lr-like 1.0)
        return Float()
    if isinstance(default, (list, tuple)):
        return ListOf(min_len=0)
    if isinstance(default, dict):
        return DictOf()
    return Str()


def parameter_spec(notebook: str | os.PathLike, defaults: Mapping[str, Any]) -> Spec:
    """The :class:`~nbsupport.book.notebook.Spec` a sweep checks its values with: the chapter's own spec
    (the one its ``nb.start`` uses), or for another notebook one inferred from its defaults' types."""
    try:
        return chapters.spec(Path(notebook).stem)
    except ParameterError:
        return Spec(rules={k: _rule_from_default(v) for k, v in defaults.items() if k not in COMMON_RULES})


def check_parameters(notebook: str | os.PathLike, params: Mapping[str, Any], *,
                     defaults: Mapping[str, Any] | None = None) -> None:
    """Fail before anything runs if a parameter is unknown to the notebook or breaks its rule.

    The same validator as the chapter's opening call (:meth:`Spec.validate`): the values a point
    would run with (defaults updated with ``params``) are checked by the chapter's spec -- names
    (a misspelled one gets the closest valid name), types, ranges and choices.
    """
    defaults = notebook_parameters(notebook) if defaults is None else defaults
    spec = parameter_spec(notebook, defaults)
    common = {"smoke": False, "seed": 0, "device": "auto", OUTPUT_DIR: None}
    values = {**common, **{k: (None if v is UNKNOWN else v) for k, v in defaults.items()}, **params}
    try:
        spec.validate(values)
    except ParameterError as err:
        raise SweepError(f"{Path(notebook).name}: {err}") from None


def canonical_grid(notebook: str | os.PathLike, grid: Mapping[str, Sequence[Any]], *,
                   defaults: Mapping[str, Any] | None = None) -> dict[str, list]:
    """The grid with every value in the one form the chapter gives it, so equal values make one point.

    Each value goes through its rule in the chapter's spec (:func:`parameter_spec`), the normalisation
    the chapter itself applies when it starts: ``1`` is ``1.0`` for a real-valued parameter such as
    ``top_p``, ``"LVA"`` is ``"LAV"`` for modalities. Two values of one parameter that the chapter treats
    as equal would run the same point twice under two names: a :class:`SweepError` names both.
    Call it after :func:`check_parameters` (every value already passes its rule).
    """
    defaults = notebook_parameters(notebook) if defaults is None else defaults
    rules = {**COMMON_RULES, **parameter_spec(notebook, defaults).rules}
    out: dict[str, list] = {}
    for name, values in grid.items():
        rule = rules.get(name)
        given: dict[str, Any] = {}  # canonical form (as JSON) -> the value given for it
        out[name] = []
        for value in values:
            canon = rule(name, value) if rule is not None else value
            key = json.dumps(canon, sort_keys=True, default=str)
            if key in given:
                raise SweepError(f"--grid {name}: values {given[key]!r} and {value!r} are the same for "
                                 f"{Path(notebook).name} (both mean {canon!r}); give each value once")
            given[key] = value
            out[name].append(canon)
    return out
