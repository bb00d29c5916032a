"""Papermill experiment sweeps with resume, parallel workers and a result store (Chapter 8).

A *sweep* runs one chapter notebook once per *point* of a parameter grid (the cartesian product of
``--grid`` values, on top of fixed ``-p`` values). Each point gets its own folder under the sweep
directory::

    DIR/top_p=0.5__modalities=LA/
        06_mesm.ipynb   executed notebook (with the traceback when the point failed)
        metrics.json    written by the notebook itself (``run.write_metrics``, DESIGN.md shape)
        *.png           figures saved by the notebook (``run.save_figure``)
        params.json     every parameter the point ran with
        run.json        status, start/end time, duration, git commit, package versions, host, GPU
        DONE            marker, present only when the point succeeded

Crash safety (what makes ``kill -9`` harmless): a point runs in a fresh temporary folder under
``DIR/.partial/`` and is renamed into place only when it has finished (renaming is atomic on one
file system); the DONE marker is written inside the temporary folder before the rename, so a folder
with DONE is always complete. On the next run, points with DONE are skipped, ``.partial`` leftovers
are deleted, and failed or missing points run again. A lock file stops two sweeps from writing the
same directory at once (the lock dies with its process, so a killed sweep does not block the next).

Command line (the same function, :func:`run_sweep`, is what Chapter 8 calls from Python)::

    python -m nbsupport.book.experiments run book/06_mesm.ipynb --out runs/mesm -p smoke True \
        --grid top_p=0.3,0.7,1.0 --grid modalities=LA,LAV --workers 2 [--gpus 0,1] [--shard 0/2]
    python -m nbsupport.book.experiments collect runs/mesm [--csv table.csv]
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import itertools
import json
import os
import platform
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from nbsupport.base import atomic_write_json, atomic_write_text
from .notebook import environment

__all__ = [
    "SweepError", "Point", "PointResult", "parse_value", "parse_grid_option", "expand_grid",
    "point_name", "notebook_parameters", "check_parameters", "run_sweep", "collect", "main", "summary",
    "GridRule", "ParamsRule", "shrink_grid", "column", "command_line", "find_notebook", "metrics_rows",
]

DONE = "DONE"
PARTIAL = ".partial"
LOCK = ".sweep.lock"
_NAME_MAX = 100


class SweepError(ValueError):
    """A sweep cannot start: bad option, unknown parameter, wrong type, or a clash with earlier results."""


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


@dataclass
class GridRule:
    """``nb.start`` rule for a grid parameter: a dict mapping parameter names to non-empty lists of values."""

    def __call__(self, name: str, value: Any) -> dict:
        from .notebook import ParameterError

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
        from .notebook import ParameterError

        if not isinstance(value, Mapping):
            raise ParameterError(f"parameter '{name}' must be a dict {{parameter: value}}, got {value!r}")
        bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ParameterError(f"parameter '{name}': key(s) {bad} are not parameter names")
        return dict(value)


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


def command_line(notebook: str | os.PathLike, out: str | os.PathLike, params: Mapping[str, Any] | None = None,
                 grid: Mapping[str, Sequence[Any]] | None = None, workers: int = 1,
                 gpus: Sequence[str] | str | None = None) -> str:
    """The shell command that runs the same sweep as :func:`run_sweep` with these arguments."""
    import shlex

    lit = lambda v: v if isinstance(v, str) and parse_value(v) == v else repr(v)  # noqa: E731
    parts = ["python -m nbsupport.book.experiments run", shlex.quote(str(notebook)), "--out", shlex.quote(str(out))]
    for k, v in (params or {}).items():
        parts += ["-p", k, shlex.quote(lit(v))]
    for k, vs in (grid or {}).items():
        parts += ["--grid", shlex.quote(f"{k}=" + ",".join(lit(v) for v in vs))]
    gpu_ids = _parse_gpus(gpus)
    if workers != max(1, len(gpu_ids)):  # the command line's default: one worker per GPU
        parts += ["--workers", str(workers)]
    if gpu_ids:
        parts += ["--gpus", shlex.quote(",".join(gpu_ids))]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Parameter validation against the notebook's parameters cell
# ---------------------------------------------------------------------------------------------
_UNKNOWN = object()


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """Names and default values of a notebook's ``parameters`` cell (via ``papermill.inspect_notebook``).

    A default that is not a plain literal is returned as an opaque marker, which accepts any value.
    """
    import papermill as pm

    path = Path(notebook)
    if not path.is_file():
        raise SweepError(f"notebook {str(path)!r} does not exist")
    try:
        info = pm.inspect_notebook(str(path))
    except Exception as exc:  # noqa: BLE001 - report the file
        raise SweepError(f"notebook {str(path)!r}: cannot read its parameters cell ({exc})") from exc
    if not info:
        raise SweepError(f"notebook {str(path)!r} has no cell tagged 'parameters'")
    out = {}
    for name, meta in info.items():
        try:
            out[name] = ast.literal_eval(meta["default"])
        except (ValueError, SyntaxError, TypeError):
            out[name] = _UNKNOWN
    return out


def _type_ok(default: Any, value: Any) -> bool:
    if default is _UNKNOWN or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):  # an int is a fine float (epochs-like 1 for lr-like 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_parameters(notebook: str | os.PathLike, params: Mapping[str, Any], *,
                     defaults: Mapping[str, Any] | None = None) -> None:
    """Fail before anything runs if a parameter is unknown to the notebook or has the wrong type.

    Types follow the default in the parameters cell: bool is strict, a float accepts an int, a
    ``None`` default accepts anything, strings and numbers do not mix. Values (ranges, choices) are
    checked again by the notebook's own ``nb.start`` when it runs.
    """
    defaults = notebook_parameters(notebook) if defaults is None else defaults
    for name, value in params.items():
        if name not in defaults:
            raise SweepError(f"parameter '{name}' is not in the parameters cell of {Path(notebook).name}; "
                             f"known: {', '.join(defaults)}")
        if not _type_ok(defaults[name], value):
            d = defaults[name]
            raise SweepError(f"parameter '{name}' of {Path(notebook).name} expects {type(d).__name__} "
                             f"(default {d!r}), got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------------------------------------
# Running points
# ---------------------------------------------------------------------------------------------
@dataclass
class PointResult:
    """Outcome of one point: ``DONE`` (ran now), ``SKIPPED`` (done earlier), or ``FAILED``."""

    name: str
    status: str
    folder: Path
    duration_s: float = 0.0
    error: str = ""


def _git_commit(where: Path) -> dict:
    info = {}
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _kernel_manager_with_env(extra_env: Mapping[str, str]):
    """A jupyter_client kernel manager class that starts its kernel with ``extra_env`` added.

    Used for ``--gpus``: each worker's kernel sees only its own GPU via ``CUDA_VISIBLE_DEVICES``
    (threads share ``os.environ``, so the variable must go to the kernel process, not to us).
    """
    from jupyter_client.manager import AsyncKernelManager

    class _EnvKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):  # noqa: D401 - jupyter_client API
            kw["env"] = {**os.environ, **kw.get("env", {}), **extra_env}
            return await super()._async_start_kernel(**kw)

    return _EnvKernelManager


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _params_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    norm = lambda d: json.dumps({k: v for k, v in d.items() if k != "output_dir"}, sort_keys=True, default=str)  # noqa: E731
    return norm(a) == norm(b)


def _run_point(point: Point, notebook: Path, out: Path, *, kernel: str, cwd: Path, pass_output_dir: bool,
               provenance: dict, env: Mapping[str, str], timeout: float | None) -> PointResult:
    import papermill as pm

    final = out / point.name
    tmp = out / PARTIAL / f"{point.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    params = dict(point.params)
    recorded = {**point.recorded, **({"output_dir": str(final)} if pass_output_dir else {})}
    atomic_write_json(tmp / "params.json", recorded)
    if pass_output_dir:
        params["output_dir"] = str(tmp)  # the notebook writes metrics.json + figures here
    started, t0 = _now(), time.perf_counter()
    status, error = DONE, ""
    kwargs = {"kernel_manager_class": _kernel_manager_with_env(env)} if env else {}
    try:
        pm.execute_notebook(str(notebook), str(tmp / notebook.name), parameters=params, kernel_name=kernel,
                            cwd=str(cwd), progress_bar=False, log_output=False, execution_timeout=timeout,
                            **kwargs)
    except pm.PapermillExecutionError as exc:  # the executed notebook (with traceback) is already saved
        status, error = "FAILED", f"{exc.ename}: {exc.evalue}"
    except Exception as exc:  # noqa: BLE001 - kernel died, timeout...: keep the reason next to the notebook
        status, error = "FAILED", f"{type(exc).__name__}: {exc}"
        atomic_write_text(tmp / "error.txt", traceback.format_exc())
    duration = time.perf_counter() - t0
    atomic_write_json(tmp / "run.json", {
        "point": point.name, "status": status, "parameters": point.params, "error": error, "notebook": str(notebook),
        "grid": point.grid_values, "started": started, "finished": _now(), "duration_s": round(duration, 3),
        "host": socket.gethostname(), "env": dict(env), **provenance})
    if status == DONE:
        atomic_write_text(tmp / DONE, _now() + "\n")  # last file of a complete point
    # Commit: move an older (failed) folder away, then rename the new one into place.
    if final.exists():
        old = out / PARTIAL / f"old.{point.name}.{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return PointResult(point.name, status, final, duration, error)


@contextlib.contextmanager
def _sweep_lock(out: Path):
    """Exclusive lock on the sweep directory; released by the OS when the process dies (even kill -9)."""
    fh = open(out / LOCK, "a+")
    try:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no lock, documented limitation
            pass
        except OSError as exc:
            raise SweepError(f"another sweep is running in {str(out)!r} (lock {LOCK} held)") from exc
        yield
    finally:
        fh.close()


def _parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise SweepError(f"--shard {shard!r}: expected I/N, e.g. 0/4")
        shard = int(m.group(1)), int(m.group(2))
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise SweepError(f"--shard {i}/{n}: need 0 <= I < N")
    return i, n


def run_sweep(notebook: str | os.PathLike, out: str | os.PathLike, *, params: Mapping[str, Any] | None = None,
              grid: Mapping[str, Sequence[Any]] | None = None, workers: int = 1,
              gpus: Sequence[str] | str | None = None, shard: str | tuple[int, int] | None = None,
              kernel: str = "python3", cwd: str | os.PathLike | None = None, timeout: float | None = None,
              progress: bool = True) -> list[PointResult]:
    """Run ``notebook`` once per grid point into ``out/<point>/``; resume, parallel, crash safe (Chapter 8).

    ``params`` are fixed for every point, ``grid`` maps a parameter to the values to sweep. Every
    name and value type is checked against the notebook's parameters cell before anything runs
    (:class:`SweepError`). ``workers`` points run at once (each in its own kernel process);
    ``gpus`` (e.g. ``"0,1"``) gives each worker slot its own ``CUDA_VISIBLE_DEVICES``, round-robin;
    ``shard="i/n"`` runs only points ``i, i+n, i+2n, ...`` so ``n`` machines can split a sweep.
    ``cwd`` (default: the notebook's folder, as Jupyter and the book build use) is where the
    kernel starts. Returns one :class:`PointResult` per selected point, in grid order.
    """
    notebook = Path(notebook).resolve()
    out = Path(out)
    params = dict(params or {})
    grid = dict(grid or {})
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise SweepError(f"workers must be an integer >= 1, got {workers!r}")
    gpus = _parse_gpus(gpus)
    shard_ = _parse_shard(shard)
    defaults = notebook_parameters(notebook)
    if "output_dir" in params or "output_dir" in grid:
        raise SweepError("parameter 'output_dir' is set by the sweep (one folder per point); do not pass it")
    check_parameters(notebook, params, defaults=defaults)
    for name, values in grid.items():
        for v in values:
            check_parameters(notebook, {name: v}, defaults=defaults)
    points = expand_grid(params, grid)
    if shard_:
        points = points[shard_[0]::shard_[1]]
    literal_defaults = {k: v for k, v in defaults.items() if v is not _UNKNOWN and k != "output_dir"}
    for p in points:
        p.recorded = {**literal_defaults, **p.params}
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, PointResult] = {}
    with _sweep_lock(out):
        shutil.rmtree(out / PARTIAL, ignore_errors=True)  # leftovers of killed runs: never complete
        todo = []
        for p in points:
            folder = out / p.name
            if (folder / DONE).exists():
                try:
                    old = json.loads((folder / "params.json").read_text())
                except (OSError, ValueError):
                    old = None
                if old is None or not _params_equal(old, p.recorded):
                    raise SweepError(f"{str(folder)!r} already holds a finished point with other parameters "
                                     f"({old}); use another --out or delete it")
                results[p.name] = PointResult(p.name, "SKIPPED", folder,
                                              _read_json(folder / "run.json").get("duration_s", 0.0))
            else:
                todo.append(p)
        provenance = {**_git_commit(notebook.parent), "versions": environment(),
                      "python_executable": sys.executable, "platform": platform.platform()}
        pass_output_dir = "output_dir" in defaults
        run_cwd = Path(cwd) if cwd is not None else notebook.parent
        slots: queue.Queue[int] = queue.Queue()
        for s in range(workers):
            slots.put(s)

        def task(p: Point) -> PointResult:
            slot = slots.get()
            try:
                env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else {}
                return _run_point(p, notebook, out, kernel=kernel, cwd=run_cwd, pass_output_dir=pass_output_dir,
                                  provenance=provenance, env=env, timeout=timeout)
            finally:
                slots.put(slot)

        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), initial=len(points) - len(todo), desc=f"sweep {notebook.name}",
                   unit="point", disable=not progress)
        failed = 0
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            futures = {pool.submit(task, p): p for p in todo}
            for fut in as_completed(futures):
                r = fut.result()
                results[r.name] = r
                failed += r.status == "FAILED"
                bar.update(1)
                bar.set_postfix(failed=failed)
        finally:  # Ctrl-C: points not started are dropped; running ones finish (or die with us)
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        with contextlib.suppress(OSError):
            (out / PARTIAL).rmdir()  # only when empty
    return [results[p.name] for p in points]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def summary(results: Iterable[PointResult]):
    """A small table (pandas DataFrame) of point, status, duration and error of a sweep."""
    import pandas as pd

    return pd.DataFrame([{"point": r.name, "status": r.status, "duration_s": round(r.duration_s, 1),
                          "error": (r.error[:80] + "...") if len(r.error) > 80 else r.error} for r in results])


# ---------------------------------------------------------------------------------------------
# Result store
# ---------------------------------------------------------------------------------------------
def _point_folders(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # skip .partial etc.
        if "run.json" in filenames and "params.json" in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
    return found


def collect(*dirs: str | os.PathLike):
    """Gather sweep results into a pandas DataFrame: one row per point and ``metrics.json`` result row.

    Parameter columns (from each point's ``params.json``) sit next to the metric columns of the
    result rows, with ``point``, ``status``, ``duration_s`` and ``folder``. Several directories (or
    one directory holding copies from several machines) are merged. A parameter whose name is also
    a result key (e.g. ``modalities``) becomes ``param_<name>``; the result row keeps the plain name.
    ``df.attrs["parameters"]`` lists the parameter columns.
    """
    import pandas as pd

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
        params = {k: v for k, v in _read_json(folder / "params.json").items() if k != "output_dir"}
        metrics = _read_json(folder / "metrics.json")
        status = "DONE" if (folder / DONE).exists() else run.get("status", "FAILED")
        results = metrics.get("results") if isinstance(metrics.get("results"), list) else []
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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nbsupport.book.experiments",
                                 description="Papermill sweeps over a chapter's parameters (Chapter 8).")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a notebook once per grid point (resumable)")
    r.add_argument("notebook")
    r.add_argument("--out", required=True, help="sweep directory (one folder per point)")
    r.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="fixed parameter, value parsed like papermill -p (3, 0.5, True, None, LA, [1,2])")
    r.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="parameter to sweep (cartesian product over all --grid options)")
    r.add_argument("--workers", type=int, default=None, help="points run at once (default 1, or one per GPU)")
    r.add_argument("--gpus", default=None, help="comma list of GPU ids; worker k gets CUDA_VISIBLE_DEVICES=gpus[k %% n]")
    r.add_argument("--shard", default=None, metavar="I/N", help="run only points I, I+N, I+2N, ... (0-based)")
    r.add_argument("--kernel", default="python3")
    r.add_argument("--cwd", default=None, help="kernel working directory (default: the notebook's folder)")
    r.add_argument("--timeout", type=float, default=None, help="seconds per cell before a point fails")
    r.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("collect", help="print (or save) the table of a sweep's results")
    c.add_argument("dirs", nargs="+")
    c.add_argument("--csv", default=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m nbsupport.book.experiments``; returns the exit code (1 if a point failed)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "collect":
            df = collect(*args.dirs)
            if args.csv:
                atomic_write_text(args.csv, df.to_csv(index=False))
            with __import__("pandas").option_context("display.width", 200, "display.max_columns", 30):
                print(df.drop(columns=["folder"], errors="ignore").to_string(index=False))
            return 0
        params = {}
        for name, value in args.parameter:
            if name in params:
                raise SweepError(f"-p {name} given twice")
            params[name] = parse_value(value)
        grid = {}
        for g in args.grid:
            name, values = parse_grid_option(g)
            if name in grid:
                raise SweepError(f"--grid {name} given twice")
            grid[name] = values
        gpus = _parse_gpus(args.gpus)
        workers = args.workers if args.workers is not None else max(1, len(gpus))
        results = run_sweep(args.notebook, args.out, params=params, grid=grid, workers=workers, gpus=gpus,
                            shard=args.shard, kernel=args.kernel, cwd=args.cwd, timeout=args.timeout,
                            progress=not args.no_progress)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = summary(results)
    print(table.to_string(index=False))
    n_failed = int((table["status"] == "FAILED").sum()) if len(table) else 0
    print(f"{len(results)} point(s): {len(results) - n_failed} done, {n_failed} failed -> {args.out}")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
