"""The result store of a sweep (Chapter 8): point folders, their state, the collected table, fingerprints.

Each point of a sweep has its own folder under the sweep directory (see :mod:`nbsupport.book.experiments`
for the layout). A folder is *finished* only when it has the DONE marker, a ``run.json``, a
``params.json`` and (for notebooks with ``output_dir``) a ``metrics.json`` of the shared shape
(:func:`point_state`); :func:`collect` reads every folder into one table, and :func:`store_dir` names
the persistent folder of a sweep from a fingerprint of everything that decides its results.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import nbformat
import pandas as pd

from nbsupport.data.corpus import corpus_cache_root, data_version

from .notebook import check_metrics
from .sweep_grid import SweepError, without_output_dir

__all__ = [
    "DONE", "CORRUPT", "PARTIAL", "CLAIMS", "LOCK", "StoreNotWritable", "refusals_named", "point_state", "collect", "sweep_fingerprint", "store_dir",
    "reuse_counts", "attach_intervals", "metrics_rows", "column",
]

DONE = "DONE"
CORRUPT = "CORRUPT"
PARTIAL = ".partial"
CLAIMS = ".claims"
LOCK = ".sweep.lock"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def point_state(folder: str | os.PathLike) -> tuple[str, str]:
    """State of a point folder and why: ``DONE``, ``CORRUPT``, ``FAILED`` or ``MISSING`` (Chapter 8's store).

    ``DONE`` needs the DONE marker, a readable ``run.json`` and ``params.json`` and, when the notebook writes metrics
    (it has ``output_dir``), a ``metrics.json`` that parses and has the shape every chapter shares
    (:func:`nbsupport.book.notebook.check_metrics`). A DONE marker without those is ``CORRUPT``: the
    sweep runs such a point again and :func:`collect` reports it as corrupt, not as a result.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "MISSING", ""
    run = _read_json(folder / "run.json")
    if not (folder / DONE).exists():
        return "FAILED", str(run.get("error") or "no DONE marker")
    if not run:
        return CORRUPT, "run.json is missing or does not parse"
    if not _read_json(folder / "params.json"):  # what the point ran with: without it, no result to trust
        return CORRUPT, "params.json is missing or does not parse"
    expects = run.get("writes_metrics")
    if expects is None:  # folders written before run.json recorded it
        expects = (folder / "metrics.json").exists()
    if expects:
        try:
            _load_metrics(folder / "metrics.json")
        except ValueError as exc:
            return CORRUPT, str(exc)
    return DONE, ""


def _load_metrics(path: Path) -> dict:
    """``metrics.json`` parsed and checked (``notebook.check_metrics``); a ValueError says what is wrong."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError("metrics.json is missing (the notebook did not call run.write_metrics)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"metrics.json does not parse ({exc})") from None
    check_metrics(data)
    return data


def _params_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    norm = lambda d: json.dumps(without_output_dir(d), sort_keys=True, default=str)  # noqa: E731
    return norm(a) == norm(b)


def _duration(folder: Path) -> float:
    return _read_json(folder / "run.json").get("duration_s", 0.0)


def _requested(folder: Path) -> dict | None:
    """The parameters a finished point was asked to run with (``run.json``; older folders: ``params.json``)."""
    run = _read_json(folder / "run.json")
    if isinstance(run.get("requested"), dict):
        return run["requested"]
    return _read_json(folder / "params.json") or None


class StoreNotWritable(SweepError):
    """The sweep folder refuses writes (made read-only, a full or read-only file system): the sweep stops."""


#: errno values of a folder that refuses writes (as opposed to a folder that is changing under us).
_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def not_writable(out: Path, exc: OSError) -> StoreNotWritable:
    """The clear error of a sweep whose folder ``out`` refuses writes (``exc``: what the OS said)."""
    return StoreNotWritable(
        f"sweep folder {str(out)!r} refuses writes ({exc.strerror or exc}: {exc.filename or out}); the sweep "
        f"stops here. Finished points are kept; a point that finished but could not be installed waits in "
        f"{PARTIAL}/ and is installed, not run again, when the sweep is run again on a writable folder")


def refuses_writes(exc: BaseException) -> bool:
    """Whether ``exc`` says a folder refuses writes (permission, read-only or full file system)."""
    return isinstance(exc, OSError) and exc.errno in _REFUSED


@contextlib.contextmanager
def refusals_named(out: Path):
    """Create the sweep folder ``out``; inside, an ``OSError`` of a folder that refuses writes becomes the
    sweep's clear :class:`StoreNotWritable` naming ``out`` (other errors pass unchanged)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        if refuses_writes(exc):
            raise not_writable(out, exc) from exc
        raise


def _commit(tmp: Path, final: Path, scratch: Path) -> bool:
    """Rename the finished temporary folder ``tmp`` to ``final``; False when a finished point is already there.

    A failed or corrupt older folder is moved aside first. ``rename`` onto an existing non-empty
    folder fails, so even without the claim two executions can never both install a folder. A folder
    that refuses writes raises its ``OSError`` at once (``tmp`` stays where it is, finished).
    """
    for _ in range(10):
        try:
            os.rename(tmp, final)
            return True
        except OSError as exc:
            if refuses_writes(exc):
                raise
            if not final.exists():
                continue  # it was moved away between our rename and this check
            if point_state(final)[0] == DONE:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, scratch / f"old.{uuid.uuid4().hex[:8]}")
    raise OSError(f"could not install {tmp} as {final}: the folder keeps changing")


def _point_folders(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # skip .partial etc.
        if "run.json" in filenames or DONE in filenames:  # collect shows a corrupt point too
            found.append(Path(dirpath))
            dirnames[:] = []
    return found


def collect(*dirs: str | os.PathLike):
    """Gather sweep results into a pandas DataFrame: one row per point and ``metrics.json`` result row.

    Parameter columns (from each point's ``params.json``: what the point ran with) sit next to the
    metric columns of the result rows, with ``point``, ``status``, ``duration_s`` and ``folder``.
    ``status`` is ``DONE``, ``FAILED``, or ``CORRUPT`` (a DONE marker but no valid ``metrics.json``,
    ``run.json`` or ``params.json``,
    see :func:`point_state`); only ``DONE`` points contribute metrics, the others one row of NaN.
    Several directories (or one directory holding copies from several machines) are merged. A
    parameter whose name is also
    a result key (e.g. ``modalities``) becomes ``param_<name>``; the result row keeps the plain name.
    ``df.attrs["parameters"]`` lists the parameter columns.
    """
    rows, param_cols, metric_keys = [], [], set()
    points = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"collect: sweep directory {str(d)!r} does not exist")
        points.extend(_point_folders(d))
    loaded = []
    for folder in points:
        run = _read_json(folder / "run.json")
        params = without_output_dir(_read_json(folder / "params.json"))
        state, _ = point_state(folder)
        status = {DONE: DONE, CORRUPT: CORRUPT}.get(state, run.get("status") or "FAILED")
        results = _read_json(folder / "metrics.json").get("results", []) if state == DONE else []
        for r in results:
            metric_keys.update(r)
        loaded.append((folder, run, params, status, results))
    for folder, run, params, status, results in loaded:
        pv = {}
        for k, v in params.items():
            col = f"param_{k}" if k in metric_keys else k
            pv[col] = tuple(v) if isinstance(v, list) else v
            if col not in param_cols:
                param_cols.append(col)
        base = {"point": folder.name, **pv, "status": status, "duration_s": run.get("duration_s"),
                "folder": str(folder)}
        for r in results or [{}]:
            rows.append({**base, **r})
    df = pd.DataFrame(rows)
    if not df.empty:
        lead = ["point", *param_cols, "status", "duration_s"]
        df = df[lead + [c for c in df.columns if c not in lead and c != "folder"] + ["folder"]]
        df = df.sort_values(["point"], kind="stable").reset_index(drop=True)
    df.attrs["parameters"] = param_cols
    return df


_PACKAGE = Path(__file__).resolve().parents[1]  # the nbsupport package folder


def sweep_fingerprint(notebook: str | os.PathLike, params: Mapping[str, Any] | None = None, *,
                      package: str | os.PathLike | None = None,
                      requirements: str | os.PathLike | None = None, threads: int | None = None) -> str:
    """A 16-hex-digit hash of everything that decides a sweep point's result (Chapter 8's result store).

    Hashed: the code cells of ``notebook`` (its markdown does not change a result), every ``*.py`` file
    of the ``nbsupport`` package (``package``, by relative path and content), the data version
    (:func:`nbsupport.data.corpus.data_version`: corpus generator and feature cache), the parameters
    every point shares (``params``: the sweep's fixed values), the pinned requirements
    (``requirements``, default the repository's ``requirements.txt``; a missing file hashes as empty) and
    the installed PyTorch version, machine architecture and Python version, and ``threads`` (the CPU
    threads of each point's kernel, when the caller fixes them: summation order, so the last digits of
    a float result, depend on the thread count).
    Same inputs give the same fingerprint; any change to one of them gives another.
    """
    path = Path(notebook)
    try:
        cells = nbformat.read(path, as_version=4).cells
    except Exception as exc:  # noqa: BLE001 - report the file
        raise SweepError(f"notebook {str(path)!r}: cannot read it to fingerprint the sweep ({exc})") from exc
    package = Path(package) if package is not None else _PACKAGE
    requirements = Path(requirements) if requirements is not None else package.parent / "requirements.txt"
    h = hashlib.sha256()

    def part(label: str, data: bytes) -> None:  # length-prefixed, so two parts never run into each other
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    for cell in cells:
        if cell.cell_type == "code":
            part("cell", cell.source.encode())
    for src in sorted(package.rglob("*.py")):
        if "__pycache__" not in src.parts:
            part(f"src {src.relative_to(package).as_posix()}", src.read_bytes())
    part("data", data_version().encode())
    part("params", json.dumps(dict(params or {}), sort_keys=True, default=str).encode())
    part("requirements", requirements.read_bytes() if requirements.is_file() else b"")
    # what was actually installed and where it runs (a point's seconds and float results depend on them)
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    part("platform", f"torch {torch_version} {platform.machine()} {platform.python_version()}".encode())
    if threads is not None:  # absent for None: fingerprints from before this option stay the same
        part("threads", str(threads).encode())
    return h.hexdigest()[:16]


def store_dir(notebook: str | os.PathLike, params: Mapping[str, Any] | None = None, *,
              root: str | os.PathLike | None = None, **fingerprint_options) -> Path:
    """The persistent sweep folder of ``notebook`` with the shared ``params`` (Chapter 8's result store).

    ``<root>/sweeps/<notebook stem>-<fingerprint>/`` with ``root`` defaulting to the data cache root
    (:func:`nbsupport.data.corpus.corpus_cache_root`, ``$NBSUPPORT_DATA``) and the fingerprint from
    :func:`sweep_fingerprint`. An unchanged rebuild finds its finished points there and runs none; a
    changed notebook, package, data version, parameter or requirement gets a new folder, so a stale
    result is never read back. Pass ``package``/``requirements`` to fingerprint other sources.
    """
    root = Path(root) if root is not None else corpus_cache_root()
    stem = Path(notebook).stem
    return root / "sweeps" / f"{stem}-{sweep_fingerprint(notebook, params, **fingerprint_options)}"


def reuse_counts(results: Iterable) -> dict[str, int]:
    """How many points of a :func:`run_sweep` were ``reused`` (finished earlier), ``run`` now, and ``failed``."""
    results = list(results)
    return {"reused": sum(r.status == "SKIPPED" for r in results), "run": sum(r.status == "DONE" for r in results),
            "failed": sum(r.status == "FAILED" for r in results)}


def attach_intervals(table, metric: str = "wacc"):
    """Add ``<metric>_low`` and ``<metric>_high`` to a :func:`collect` table from each point's ``metrics.json``.

    A chapter writes a model's bootstrap interval over its test utterances (Chapter 3's convention,
    :mod:`nbsupport.evidence`) as ``"intervals": {metric: {model: {"value", "low", "high", "level"}}}``;
    a row gets the interval of its own ``model``, or NaN where its point wrote none. Returns a copy.
    """
    df = table.copy()
    lows, highs = [], []
    for _, r in df.iterrows():
        est = {}
        if r.get("status") == DONE and isinstance(r.get("folder"), str):
            found = _read_json(Path(r["folder"]) / "metrics.json").get("intervals") or {}
            est = (found.get(metric) or {}).get(str(r.get("model")), {}) if isinstance(found, dict) else {}
        lows.append(float(est["low"]) if isinstance(est, dict) and est.get("low") is not None else float("nan"))
        highs.append(float(est["high"]) if isinstance(est, dict) and est.get("high") is not None else float("nan"))
    df[f"{metric}_low"], df[f"{metric}_high"] = lows, highs
    return df


def metrics_rows(table) -> list[dict]:
    """Rows of a :func:`collect` table as ``metrics.json`` result rows (Chapter 8 writes its sweep's table).

    One dict per table row, without the ``folder`` column; NaN (a metric a row does not have) becomes
    ``None`` (JSON ``null``); ``model`` and ``modalities`` are strings, ``"sweep"`` and ``"LAV"`` when
    missing, as every chapter's result rows have them.
    """
    def clean(v):
        return None if isinstance(v, float) and v != v else v

    rows = [{k: clean(v) for k, v in r.items() if k != "folder"} for r in table.to_dict("records")]
    return [{**r, "model": str(r.get("model", "sweep")), "modalities": str(r.get("modalities", "LAV"))}
            for r in rows]


def column(df, name: str) -> str:
    """The column of parameter ``name`` in a :func:`collect` table (``param_<name>`` when renamed)."""
    if f"param_{name}" in df.columns:
        return f"param_{name}"
    if name in df.columns:
        return name
    raise KeyError(f"collect table has no parameter column '{name}'; columns: {', '.join(map(str, df.columns))}")
