"""Notebook plumbing shared by every chapter: the one-call opening and its outputs.

Every chapter starts with a papermill ``parameters`` cell of plain literals, then one call:
``run = nb.start("06_mesm", globals())``. :func:`start` looks the chapter's :class:`Spec` up in
:mod:`nbsupport.book.chapters` (its rules, ranges, smoke overrides and cross-checks, declared once),
and *before any work is done* stops the notebook with a :class:`ParameterError` naming the
parameter and what was expected, including a misspelled name (with the closest valid one). It then
applies the smoke overrides (to the parameters not set explicitly: papermill's ``-p`` values win),
seeds Python, NumPy and PyTorch, resolves ``device="auto"`` and checks
that ``output_dir`` is writable (the book's *Design* page, "Notebook conventions"). The sweep
command (:mod:`nbsupport.book.experiments`) validates its ``-p``/``--grid`` values with the same
:func:`validate`. The rules, :class:`Spec` and the reader of the parameters cell live one layer
below, in :mod:`nbsupport.book.params` (re-exported here: ``nb.Int``, ``nb.Spec``, ...).
"""
from __future__ import annotations

import importlib.metadata as md
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from nbsupport.base import (ParameterError, atomic_write, atomic_write_json, atomic_write_text, jsonable,
                            resolve_device, seed_everything)

from . import chapters
from .params import (COMMON_RULES, UNKNOWN, Bool, Choice, DictOf, Float, Int, ListOf, Modalities, Path_, Spec,
                     Str, cell_assignments, validate)

__all__ = [
    "ParameterError", "Bool", "Int", "Float", "Choice", "Str", "Path_", "ListOf", "DictOf", "Modalities", "Spec",
    "validate", "start", "Run", "COMMON_RULES", "seed_everything", "resolve_device", "atomic_write", "atomic_write_text",
    "atomic_write_json", "METRIC_NAMES",
]

#: Metric names shared by every chapter's ``metrics.json`` (the Design page, "Notebook conventions").
METRIC_NAMES = ("wacc", "acc", "f1", "auc", "acc2", "acc7", "mae", "corr", "macs", "seconds", "n_params")


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




_LITERAL_TYPES = (bool, int, float, str, list, tuple, dict, type(None))
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def _given_names(namespace: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """The parameter names the reader or papermill gave, and those of them set *explicitly*.

    Given: the names assigned by the run of literal-only cells just before the current one (the
    ``parameters`` cell and papermill's injected cell), read from IPython's input history; outside
    IPython, every literal-valued global. Explicit: the names assigned by the cells of that run after
    its first (the defaults): papermill's ``-p`` values, which win over smoke sizes (:meth:`Spec.apply_smoke`).
    """
    history = namespace.get("In")
    if isinstance(history, list) and len(history) >= 2:
        cells: list[dict] = []
        for source in reversed(history[:-1]):
            values = cell_assignments(source)
            if values is None or UNKNOWN in values.values():
                break
            if values:  # In[0] is empty
                cells.insert(0, values)
        given = {name for cell in cells for name in cell}
        return given, {name for cell in cells[1:] for name in cell}
    return {k for k, v in namespace.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES and isinstance(v, _LITERAL_TYPES)}, set()


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
    spec = chapter if isinstance(chapter, Spec) else chapters.spec(chapter)
    values = {k: namespace[k] for k in spec.names if k in namespace}
    given, explicit = _given_names(namespace)
    for name in given - set(spec.names):
        values[name] = namespace.get(name)
    params = spec.validate(values)
    if params["smoke"]:
        params = spec.apply_smoke(params, explicit=explicit)
    device = resolve_device(params["device"])
    out = _writable(params["output_dir"])
    seed_everything(params["seed"])
    return Run(params=params, device=device, output_dir=out,
               notebook=chapter if isinstance(chapter, str) else "")


def environment() -> dict:
    """Versions of Python and the main libraries, for provenance in run folders."""
    info = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "transformers", "librosa", "spconv", "papermill", "nbsupport"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info
