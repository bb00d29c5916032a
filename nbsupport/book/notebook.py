"""Notebook plumbing shared by every chapter: parameter checks, seeding, device choice, outputs.

Every chapter starts with a papermill ``parameters`` cell of plain literals and then calls
:func:`start` with those values and the rules for its own extra parameters. ``start`` stops the
notebook with a :class:`ParameterError` naming the parameter and what was expected *before any
work is done*, seeds Python, NumPy and PyTorch, resolves ``device="auto"`` and, when
``output_dir`` is set, prepares it for ``metrics.json`` and figures (DESIGN.md, "Notebook
conventions").
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from nbsupport.base import (ParameterError, _describe, atomic_write, atomic_write_json, atomic_write_text,
                            check_modalities, jsonable, resolve_device, seed_everything)

__all__ = [
    "ParameterError", "Bool", "Int", "Float", "Choice", "Str", "Path_", "ListOf", "Modalities",
    "validate", "start", "Run", "seed_everything", "resolve_device", "atomic_write", "atomic_write_text",
    "atomic_write_json", "METRIC_NAMES",
]

#: Metric names shared by every chapter's ``metrics.json`` (DESIGN.md).
METRIC_NAMES = ("wacc", "acc", "f1", "auc", "acc2", "acc7", "mae", "corr", "macs", "seconds", "n_params")


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
    """An integer, optionally bounded (inclusive)."""

    min: int | None = None
    max: int | None = None
    optional: bool = False

    def __call__(self, name: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ParameterError(f"parameter '{name}' must be an integer, got {_describe(value)}")
        if self.min is not None and value < self.min:
            raise ParameterError(f"parameter '{name}' must be >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise ParameterError(f"parameter '{name}' must be <= {self.max}, got {value}")
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
    """A string; ``optional`` also accepts None and ``""``."""

    optional: bool = False

    def __call__(self, name: str, value: Any) -> str | None:
        if value is None and self.optional:
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
class Modalities:
    """A modality string over the letters L (language), A (audio), V (vision), e.g. ``"LAV"``.

    ``need_text`` enforces MESM's rule that the text CLS vector drives the cross-modal attention.
    """

    need_text: bool = False

    def __call__(self, name: str, value: Any) -> str:
        return check_modalities(name, value, need_text=self.need_text)


COMMON_RULES = {
    "smoke": Bool(),
    "seed": Int(min=0),
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
        raise ParameterError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(rules))}")
    return {name: rules[name](name, values[name]) for name in values}


def check_metrics(data: Mapping[str, Any]) -> None:
    """Check the shape DESIGN.md fixes for ``metrics.json``: parameters dict, results list of rows with model/modalities."""
    if not isinstance(data, Mapping):
        raise ValueError("metrics.json: top level must be an object")
    if not isinstance(data.get("parameters"), Mapping):
        raise ValueError("metrics.json: field 'parameters' must be an object")
    results = data.get("results")
    if not isinstance(results, list) or not results:
        raise ValueError("metrics.json: field 'results' must be a non-empty list")
    for i, row in enumerate(results):
        if not isinstance(row, Mapping):
            raise ValueError(f"metrics.json: results[{i}] must be an object")
        for key in ("model", "modalities"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"metrics.json: results[{i}].{key} must be a string")
        for key in METRIC_NAMES:
            if key in row and row[key] is not None and not isinstance(row[key], (int, float)):
                raise ValueError(f"metrics.json: results[{i}].{key} must be a number, got {row[key]!r}")


@dataclass
class Run:
    """What :func:`start` returns: validated parameters, the torch device, and where outputs go."""

    params: dict
    device: Any
    output_dir: Path | None = None
    figures: list = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:  # run.epochs etc.
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(name)

    def save_figure(self, fig, name: str) -> Path | None:
        """Save a matplotlib figure as ``<output_dir>/<name>.png`` when ``output_dir`` is set."""
        if self.output_dir is None:
            return None
        path = atomic_write(self.output_dir / f"{name}.png",
                            lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"), "wb")
        self.figures.append(path.name)
        return path

    def write_metrics(self, results: Iterable[Mapping[str, Any]], **extra: Any) -> Path | None:
        """Write ``metrics.json`` (DESIGN.md shape) when ``output_dir`` is set; return its path."""
        data = {"parameters": dict(self.params), "results": [dict(r) for r in results], **extra}
        data = jsonable(data)
        check_metrics(data)
        if self.output_dir is None:
            return None
        data.setdefault("figures", list(self.figures))
        return atomic_write_json(self.output_dir / "metrics.json", data)


def start(values: Mapping[str, Any], **rules: Any) -> Run:
    """Validate a chapter's parameters, seed everything and resolve the device (DESIGN.md conventions).

    ``values`` holds every name from the parameters cell; ``rules`` gives a rule for each
    chapter-specific one (``smoke``, ``seed``, ``device`` and ``output_dir`` are checked always).
    """
    params = validate(values, rules)
    device = resolve_device(params["device"])
    seed_everything(params["seed"])
    out = None
    if params["output_dir"]:
        out = Path(params["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
    return Run(params=params, device=device, output_dir=out)


def environment() -> dict:
    """Versions of Python and the main libraries, for provenance in run folders."""
    import importlib.metadata as md

    info = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "transformers", "librosa", "spconv", "papermill", "nbsupport"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info
