"""Notebook plumbing shared by every chapter: the one-call opening, parameter rules, outputs.

Every chapter starts with a papermill ``parameters`` cell of plain literals, then one call:
``run = nb.start("06_mesm", globals())``. :func:`start` looks the chapter's :class:`Spec` up in
:mod:`nbsupport.book.chapters` (its rules, ranges, smoke overrides and cross-checks, declared once),
and *before any work is done* stops the notebook with a :class:`ParameterError` naming the
parameter and what was expected, including a misspelled name (with the closest valid one). It then
applies the smoke overrides, seeds Python, NumPy and PyTorch, resolves ``device="auto"`` and checks
that ``output_dir`` is writable (the book's *Design* page, "Notebook conventions"). The sweep
command (:mod:`nbsupport.book.experiments`) validates its ``-p``/``--grid`` values with the same
:func:`validate`.
"""
from __future__ import annotations

import ast
import difflib
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from nbsupport.base import (ParameterError, _describe, atomic_write, atomic_write_json, atomic_write_text,
                            check_modalities, jsonable, resolve_device, seed_everything)

__all__ = [
    "ParameterError", "Bool", "Int", "Float", "Choice", "Str", "Path_", "ListOf", "DictOf", "Modalities", "Spec",
    "validate", "start", "Run", "COMMON_RULES", "seed_everything", "resolve_device", "atomic_write", "atomic_write_text",
    "atomic_write_json", "METRIC_NAMES",
]

#: Metric names shared by every chapter's ``metrics.json`` (the Design page, "Notebook conventions").
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
        raise ParameterError("; ".join(_unknown_message(k, rules) for k in unknown))
    return {name: rules[name](name, values[name]) for name in values}


def _unknown_message(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(sorted(known))}"
    return f"unknown parameter '{name}'{hint}"


def check_metrics(data: Mapping[str, Any]) -> None:
    """Check the one shape of ``metrics.json``: parameters dict, results list of rows with model/modalities."""
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
    notebook: str = ""
    figures: list = field(default_factory=list)
    metrics_path: Path | None = None

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if k not in COMMON_RULES)
        where = f" -> {self.output_dir}" if self.output_dir else ""
        return (f"{self.notebook or 'run'}: seed {self.params['seed']}, {self.device.type}"
                f"{', smoke run' if self.params['smoke'] else ''}{where}\n{given}")

    def __getattr__(self, name: str) -> Any:  # run.epochs etc.
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(name)

    def save_figure(self, fig, name: str) -> None:
        """Save a matplotlib figure as ``<output_dir>/<name>.png`` when ``output_dir`` is set.

        Returns None, so a cell ending with it shows the figure and no path."""
        if self.output_dir is not None:
            path = atomic_write(self.output_dir / f"{name}.png",
                                lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"), "wb")
            self.figures.append(path.name)

    def write_metrics(self, results: Iterable[Mapping[str, Any]], **extra: Any) -> None:
        """Check and write ``metrics.json`` (the shape every chapter shares) when ``output_dir`` is set;
        its path is then ``self.metrics_path``."""
        data = {"parameters": dict(self.params), "results": [dict(r) for r in results], **extra}
        data = jsonable(data)
        check_metrics(data)
        if self.output_dir is not None:
            data.setdefault("figures", list(self.figures))
            self.metrics_path = atomic_write_json(self.output_dir / "metrics.json", data)


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

    def apply_smoke(self, params: Mapping[str, Any]) -> dict:
        """The parameters a smoke run uses: same code path, tiny sizes (``smoke=True``)."""
        out = dict(params)
        for name, over in self.smoke.items():
            out[name] = over(out[name]) if callable(over) else over
        return out


_LITERAL_TYPES = (bool, int, float, str, list, tuple, dict, type(None))
#: Names a chapter parameter cannot take: ``run.<name>`` reads these attributes of :class:`Run`.
_RUN_ATTRIBUTES = {"params", "output_dir", "notebook", "figures", "metrics_path", "save_figure", "write_metrics"}
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def _literal_assignments(source: str) -> list[str] | None:
    """Names a cell assigns when it holds only ``name = <literal>`` lines (a parameters cell), else None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets)):
            return None
        try:
            ast.literal_eval(node.value)
        except ValueError:
            return None
        names += [t.id for t in node.targets]
    return names


def _given_names(namespace: Mapping[str, Any]) -> set[str]:
    """The parameter names the reader or papermill gave: the names assigned by the run of literal-only
    cells just before the current one (the ``parameters`` cell and papermill's injected cell), read from
    IPython's input history; outside IPython, every literal-valued global."""
    history = namespace.get("In")
    if isinstance(history, list) and len(history) >= 2:
        given: set[str] = set()
        for source in reversed(history[:-1]):
            names = _literal_assignments(source)
            if names is None:
                break
            given.update(names)
        return given
    return {k for k, v in namespace.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES and isinstance(v, _LITERAL_TYPES)}


def _writable(output_dir: str | None, name: str = "output_dir") -> Path | None:
    """Create ``output_dir`` and prove it writable now, before any training (a run is never lost at its first figure)."""
    if output_dir is None:
        return None
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ParameterError(f"parameter '{name}': folder {str(out)!r} is not writable ({err.strerror or err})") from None
    return out


def start(chapter: "str | Spec", namespace: Mapping[str, Any]) -> Run:
    """The one-call opening of every chapter: ``run = nb.start("06_mesm", globals())``.

    Validates the parameters in ``namespace`` against the chapter's :class:`Spec` (a wrong type or
    range, a missing name, or a misspelled one such as papermill's ``-p epoch 5`` all stop here, naming
    the parameter), applies the smoke overrides when ``smoke=True`` (``run.params`` is then what runs,
    and what ``metrics.json`` records), resolves the device, checks ``output_dir`` is writable and seeds
    Python, NumPy and PyTorch.
    """
    from nbsupport.book import chapters  # the specs import this module's rules

    spec = chapter if isinstance(chapter, Spec) else chapters.spec(chapter)
    values = {k: namespace[k] for k in spec.names if k in namespace}
    for name in _given_names(namespace) - set(spec.names):
        values[name] = namespace.get(name)
    params = spec.validate(values)
    if params["smoke"]:
        params = spec.apply_smoke(params)
    device = resolve_device(params["device"])
    out = _writable(params["output_dir"])
    seed_everything(params["seed"])
    return Run(params=params, device=device, output_dir=out,
               notebook=chapter if isinstance(chapter, str) else "")


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
