"""Papermill experiment sweeps on Dask: resume, crash safety, one result folder (Chapter 8).

A *sweep* runs one chapter notebook once per *point* of a parameter grid (the cartesian product of
``--grid`` values, on top of fixed ``-p`` values). Each point gets its own folder under the sweep
directory::

    DIR/top_p=0.5__modalities=LA/
        06_mesm.ipynb   executed notebook (with the traceback when the point failed)
        metrics.json    written by the notebook itself (``run.write_metrics``, the book's shared shape)
        *.png           figures saved by the notebook (``run.save_figure``)
        params.json     the parameters the point ran with (the notebook's own validated values when it
                        wrote them in metrics.json, e.g. after a smoke-size shrink)
        run.json        status, requested parameters, start/end time, duration, git commit, package
                        versions, host and Dask worker
        DONE            marker, present only when the point succeeded

Points run as Dask tasks (``distributed``): on a local cluster of ``--workers`` workers by
default, or on an existing cluster with ``--scheduler tcp://HOST:8786`` (workers started with
``dask worker``, or by ``dask_jobqueue.SLURMCluster``). Every machine must see the sweep directory at
the same path (shared storage): points write their folders there, and the driver only collects
statuses. Dask re-runs a task whose worker died; what makes any re-execution harmless:

* a point runs in a fresh temporary folder ``DIR/.partial/<point>/<random>/`` and is renamed into
  place only when it has finished (renaming is atomic on one file system); the DONE marker is
  written inside the temporary folder before the rename, so a folder with DONE is always complete;
* a point is *finished* only when it has DONE and (for notebooks with ``output_dir``) a
  ``metrics.json`` that parses and has the shared shape (:func:`point_state`); finished points are
  skipped, by the driver before submitting and by the task itself before running;
* a per-point claim (``DIR/.claims/<point>``, an ``flock`` the OS drops when its process dies, even
  on ``kill -9``) lets one execution of a point run at a time; a second execution (a task Dask
  retried while the first was still alive, or one left over from a killed driver) waits, then
  finds the point finished and does nothing;
* a lock file stops two sweeps (two drivers) from using the same directory at once.

Command line (the same function, :func:`run_sweep`, is what Chapter 8 calls from Python)::

    python -m nbsupport.book.experiments run book/06_mesm.ipynb --out runs/mesm -p smoke True \
        --grid top_p=0.3,0.7,1.0 --grid modalities=LA,LAV --workers 2 [--gpus 0,1]
    python -m nbsupport.book.experiments run ... --scheduler tcp://HOST:8786 [--resources GPU=1]
    python -m nbsupport.book.experiments collect runs/mesm [--csv table.csv]
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import nbformat

from nbsupport.base import atomic_write_json, atomic_write_text
from nbsupport.data.corpus import corpus_cache_root, data_version

from . import chapters
from . import notebook as nb
from .notebook import check_metrics, environment

__all__ = [
    "SweepError", "Point", "PointResult", "parse_value", "parse_grid_option", "parse_resources", "expand_grid",
    "point_name", "notebook_parameters", "parameter_spec", "check_parameters", "point_state", "run_sweep", "collect", "main",
    "summary", "GridRule", "ParamsRule", "shrink_grid", "column", "command_line", "find_notebook",
    "threads_per_point", "usable_cores", "THREAD_VARIABLES",
    "metrics_rows", "sweep_fingerprint", "store_dir", "reuse_counts", "attach_intervals",
]

DONE = "DONE"
CORRUPT = "CORRUPT"
PARTIAL = ".partial"
CLAIMS = ".claims"
LOCK = ".sweep.lock"
_NAME_MAX = 100
_CONNECT_TIMEOUT_S = 30


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

        if not isinstance(value, Mapping):
            raise nb.ParameterError(f"parameter '{name}' must be a dict {{parameter: [values...]}}, got {value!r}")
        for k, v in value.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise nb.ParameterError(f"parameter '{name}': key {k!r} is not a parameter name")
            if not isinstance(v, (list, tuple)) or not v:
                raise nb.ParameterError(f"parameter '{name}': values of {k!r} must be a non-empty list, got {v!r}")
        return {k: list(v) for k, v in value.items()}


@dataclass
class ParamsRule:
    """``nb.start`` rule for a dict of fixed parameters (identifier keys, literal values)."""

    def __call__(self, name: str, value: Any) -> dict:

        if not isinstance(value, Mapping):
            raise nb.ParameterError(f"parameter '{name}' must be a dict {{parameter: value}}, got {value!r}")
        bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise nb.ParameterError(f"parameter '{name}': key(s) {bad} are not parameter names")
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


def command_line(notebook: str | os.PathLike, out: str | os.PathLike, params: Mapping[str, Any] | None = None,
                 grid: Mapping[str, Sequence[Any]] | None = None, workers: int | None = 1,
                 gpus: Sequence[str] | str | None = None, *, scheduler: str | None = None,
                 resources: str | Mapping[str, float] | None = None, threads: int | None = None) -> str:
    """The shell command that runs the same sweep as :func:`run_sweep` with these arguments (Chapter 8)."""
    import shlex

    lit = lambda v: v if isinstance(v, str) and parse_value(v) == v else repr(v)  # noqa: E731
    parts = ["python -m nbsupport.book.experiments run", shlex.quote(str(notebook)), "--out", shlex.quote(str(out))]
    for k, v in (params or {}).items():
        parts += ["-p", k, shlex.quote(lit(v))]
    for k, vs in (grid or {}).items():
        parts += ["--grid", shlex.quote(f"{k}=" + ",".join(lit(v) for v in vs))]
    gpu_ids = _parse_gpus(gpus)
    if scheduler is not None:
        parts += ["--scheduler", shlex.quote(str(scheduler))]
    elif workers is not None and workers != max(1, len(gpu_ids)):  # the default: one worker per GPU
        parts += ["--workers", str(workers)]
    if gpu_ids:
        parts += ["--gpus", shlex.quote(",".join(gpu_ids))]
    if threads is not None:
        parts += ["--threads", str(threads)]
    res = parse_resources(resources)
    if res:
        parts += ["--resources", shlex.quote(",".join(f"{k}={v}" for k, v in res.items()))]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Parameter validation against the notebook's parameters cell
# ---------------------------------------------------------------------------------------------
_UNKNOWN = object()


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """Names and default values of a notebook's ``parameters`` cell (its ``name = <literal>`` lines).

    A default that is not a plain literal is returned as an opaque marker, which accepts any value.
    """
    path = Path(notebook)
    if not path.is_file():
        raise SweepError(f"notebook {str(path)!r} does not exist")
    try:
        cells = nbformat.read(path, as_version=4).cells
        cell = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
        tree = ast.parse(cell.source)
    except StopIteration:
        raise SweepError(f"notebook {str(path)!r} has no cell tagged 'parameters'") from None
    except Exception as exc:  # noqa: BLE001 - report the file
        raise SweepError(f"notebook {str(path)!r}: cannot read its parameters cell ({exc})") from exc
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in (t for t in node.targets if isinstance(t, ast.Name)):
                try:
                    out[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    out[target.id] = _UNKNOWN
    return out


def _rule_from_default(default: Any):
    """A parameter rule inferred from a default, for notebooks outside the book (no chapter spec)."""
    if default is _UNKNOWN or default is None:
        return lambda name, value: value
    if isinstance(default, bool):
        return nb.Bool()
    if isinstance(default, int):
        return nb.Int()
    if isinstance(default, float):  # an int is a fine float (epochs-like 1 for lr-like 1.0)
        return nb.Float()
    if isinstance(default, (list, tuple)):
        return nb.ListOf(min_len=0)
    if isinstance(default, dict):
        return nb.DictOf()
    return nb.Str()


def parameter_spec(notebook: str | os.PathLike, defaults: Mapping[str, Any]) -> nb.Spec:
    """The :class:`~nbsupport.book.notebook.Spec` a sweep checks its values with: the chapter's own spec
    (the one its ``nb.start`` uses), or for another notebook one inferred from its defaults' types."""
    try:
        return chapters.spec(Path(notebook).stem)
    except nb.ParameterError:
        return nb.Spec(rules={k: _rule_from_default(v) for k, v in defaults.items() if k not in nb.COMMON_RULES})


def check_parameters(notebook: str | os.PathLike, params: Mapping[str, Any], *,
                     defaults: Mapping[str, Any] | None = None) -> None:
    """Fail before anything runs if a parameter is unknown to the notebook or breaks its rule.

    The same validator as the chapter's opening call (:meth:`Spec.validate`): the values a point
    would run with (defaults updated with ``params``) are checked by the chapter's spec -- names
    (a misspelled one gets the closest valid name), types, ranges and choices.
    """
    defaults = notebook_parameters(notebook) if defaults is None else defaults
    spec = parameter_spec(notebook, defaults)
    common = {"smoke": False, "seed": 0, "device": "auto", "output_dir": None}
    values = {**common, **{k: (None if v is _UNKNOWN else v) for k, v in defaults.items()}, **params}
    try:
        spec.validate(values)
    except nb.ParameterError as err:
        raise SweepError(f"{Path(notebook).name}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Point state, claims and the point runner (a Dask task)
# ---------------------------------------------------------------------------------------------
@dataclass
class PointResult:
    """Outcome of one point: ``DONE`` (ran now), ``SKIPPED`` (finished earlier), or ``FAILED``."""

    name: str
    status: str
    folder: Path
    duration_s: float = 0.0
    error: str = ""


@dataclass
class _Job:
    """What every point task needs besides its :class:`Point` (sent to the Dask workers once per point)."""

    notebook: Path
    out: Path
    kernel: str
    cwd: Path
    pass_output_dir: bool
    provenance: dict
    timeout: float | None
    gpu_ids: list = field(default_factory=list)  # local cluster: worker k's kernel gets gpu_ids[k % n]
    threads: int | None = None  # local cluster: CPU threads of each point's kernel (None: inherited)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def point_state(folder: str | os.PathLike) -> tuple[str, str]:
    """State of a point folder and why: ``DONE``, ``CORRUPT``, ``FAILED`` or ``MISSING`` (Chapter 8's store).

    ``DONE`` needs the DONE marker, a readable ``run.json`` and, when the notebook writes metrics
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


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool, what: str):
    """Hold an exclusive ``flock`` on ``path``; the OS releases it when the process dies (even ``kill -9``).

    ``wait=False`` raises :class:`BlockingIOError` when another process (or another open of the file)
    holds it. Hand-written on ``fcntl`` because the lock must die with its holder, which no lock
    file library guarantees; works across machines on NFS, where Linux maps ``flock`` to POSIX locks.
    Without ``fcntl`` (Windows) there is no lock, a documented limitation.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        while fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise
                time.sleep(0.5)  # polling keeps the waiting Dask thread interruptible
            except OSError as exc:
                raise OSError(f"cannot lock {what} ({path}): {exc}") from exc
        yield
    finally:
        fh.close()


def _claim(out: Path, name: str, *, wait: bool = True):
    """The per-point claim: one execution of point ``name`` at a time, over all workers and machines."""
    return _flock(out / CLAIMS / name, wait=wait, what=f"point {name!r}")


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


# Run by the kernel's launcher process before it becomes the kernel (exec keeps the setting): the
# kernel gets SIGKILL when the process that started it (a Dask worker) dies, even by kill -9.
# Hand-written: ipykernel only notices a dead parent when it is re-parented to PID 1, which a
# subreaper (systemd, some containers) prevents, and a leaked kernel can hold a GPU.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ppid = os.getppid(); "
                    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL)); "  # 1 = PR_SET_PDEATHSIG
                    "os.getppid() == ppid or os._exit(1); os.execvp(sys.argv[1], sys.argv[1:])")


def _kernel_launcher() -> list[str]:
    """Command prefix that starts a kernel so that it dies with its worker (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return []
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT]  # -I -S: no site packages, starts in ~0.1 s


#: The variables that size a kernel's CPU thread pools (PyTorch's intra-op pool reads OMP_NUM_THREADS).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count``)."""
    with contextlib.suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_point(workers: int, threads: int | None = None) -> int:
    """CPU threads each kernel of a local sweep gets: ``threads``, or the usable cores shared by ``workers``.

    Points that run at once on one machine share its cores. Each kernel inheriting the caller's
    thread count (the book's ``OMP_NUM_THREADS=2`` on 2 cores) oversubscribes them: measured on 2
    cores, two such MESM points at once trained 3-4x slower each than one alone, slower in total than
    running them one after the other. ``cores // workers`` threads per kernel (at least 1) avoids that.
    """
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise SweepError(f"threads must be an integer >= 1, got {threads!r}")
        return threads
    return max(1, usable_cores() // max(1, workers))


def _kernel_manager(extra_env: Mapping[str, str]):
    """A jupyter_client kernel manager class for one point's kernel.

    The kernel starts with ``extra_env`` added (``--gpus`` on the local cluster: worker k's kernel
    sees only its own GPU via ``CUDA_VISIBLE_DEVICES``) and, on Linux, dies with the worker that
    started it, so a killed worker leaves no kernel behind.
    """
    from jupyter_client.manager import AsyncKernelManager

    class _PointKernelManager(AsyncKernelManager):
        def format_kernel_cmd(self, extra_arguments=None):  # noqa: D401 - jupyter_client API
            cmd = super().format_kernel_cmd(extra_arguments)
            return [*_kernel_launcher(), *cmd]

        async def start_kernel(self, **kw):  # noqa: D401 - jupyter_client API
            kw["env"] = {**os.environ, **kw.get("env", {}), **extra_env}
            return await super()._async_start_kernel(**kw)

    return _PointKernelManager


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _params_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    norm = lambda d: json.dumps({k: v for k, v in d.items() if k != "output_dir"}, sort_keys=True, default=str)  # noqa: E731
    return norm(a) == norm(b)


def _duration(folder: Path) -> float:
    return _read_json(folder / "run.json").get("duration_s", 0.0)


def _requested(folder: Path) -> dict | None:
    """The parameters a finished point was asked to run with (``run.json``; older folders: ``params.json``)."""
    run = _read_json(folder / "run.json")
    if isinstance(run.get("requested"), dict):
        return run["requested"]
    return _read_json(folder / "params.json") or None


def _commit(tmp: Path, final: Path, scratch: Path) -> bool:
    """Rename the finished temporary folder ``tmp`` to ``final``; False when a finished point is already there.

    A failed or corrupt older folder is moved aside first. ``rename`` onto an existing non-empty
    folder fails, so even without the claim two executions can never both install a folder.
    """
    for _ in range(10):
        try:
            os.rename(tmp, final)
            return True
        except OSError:
            if not final.exists():
                continue  # it was moved away between our rename and this check
            if point_state(final)[0] == DONE:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, scratch / f"old.{uuid.uuid4().hex[:8]}")
    raise OSError(f"could not install {tmp} as {final}: the folder keeps changing")


def _run_point(point: Point, job: _Job, env: Mapping[str, str] | None = None) -> PointResult:
    """Run one point under its claim: skip it if finished, else run papermill, install its folder atomically."""
    import papermill as pm

    env = dict(env or {})
    out = job.out
    final = out / point.name
    with _claim(out, point.name):
        state, _ = point_state(final)
        if state == DONE:  # finished by another execution of this point (a Dask retry, an earlier driver)
            return PointResult(point.name, "SKIPPED", final, _duration(final))
        scratch = out / PARTIAL / point.name
        shutil.rmtree(scratch, ignore_errors=True)  # leftovers of an execution that died; we hold the claim
        tmp = scratch / uuid.uuid4().hex[:8]
        tmp.mkdir(parents=True)
        params = dict(point.params)
        requested = {**point.recorded, **({"output_dir": str(final)} if job.pass_output_dir else {})}
        atomic_write_json(tmp / "params.json", requested)
        if job.pass_output_dir:
            params["output_dir"] = str(tmp)  # the notebook writes metrics.json + figures here
        started, t0 = _now(), time.perf_counter()
        status, error = DONE, ""
        try:
            pm.execute_notebook(str(job.notebook), str(tmp / job.notebook.name), parameters=params,
                                kernel_name=job.kernel, cwd=str(job.cwd), progress_bar=False, log_output=False,
                                execution_timeout=job.timeout,
                                kernel_manager_class=_kernel_manager(env))
        except pm.PapermillExecutionError as exc:  # the executed notebook (with traceback) is already saved
            status, error = "FAILED", f"{exc.ename}: {exc.evalue}"
        except Exception as exc:  # noqa: BLE001 - kernel died, timeout...: keep the reason next to the notebook
            status, error = "FAILED", f"{type(exc).__name__}: {exc}"
            atomic_write_text(tmp / "error.txt", traceback.format_exc())
        duration = time.perf_counter() - t0
        ran = requested
        if status == DONE and job.pass_output_dir:  # finished = a metrics.json of the shared shape
            try:
                metrics = _load_metrics(tmp / "metrics.json")
            except ValueError as exc:
                status, error = "FAILED", str(exc)
            else:  # what ran: the notebook's own validated parameters (after e.g. a smoke-size shrink)
                ran = {**requested, **metrics["parameters"], "output_dir": str(final)}
        atomic_write_json(tmp / "params.json", ran)
        worker = None
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_worker

            worker = get_worker().address
        atomic_write_json(tmp / "run.json", {
            "point": point.name, "status": status, "parameters": point.params, "requested": point.recorded,
            "error": error, "notebook": str(job.notebook), "grid": point.grid_values, "started": started,
            "finished": _now(), "duration_s": round(duration, 3), "host": socket.gethostname(),
            "worker": worker, "env": env,
            "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")),
            "writes_metrics": job.pass_output_dir, **job.provenance})
        if status == DONE:
            atomic_write_text(tmp / DONE, _now() + "\n")  # last file of a complete point
        installed = _commit(tmp, final, scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    if not installed:
        return PointResult(point.name, "SKIPPED", final, _duration(final))
    return PointResult(point.name, status, final, duration, error)


def _point_task(point: Point, job: _Job) -> PointResult:
    """The Dask task of one point: its kernel's CPU threads and GPU (local cluster), then run it."""
    env = {}
    if job.threads:
        env.update({v: str(job.threads) for v in THREAD_VARIABLES})
    if job.gpu_ids:
        from distributed import get_worker

        name = get_worker().name  # local cluster workers are named 0 .. workers-1
        k = name if isinstance(name, int) else 0
        env["CUDA_VISIBLE_DEVICES"] = job.gpu_ids[k % len(job.gpu_ids)]
    return _run_point(point, job, env)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sweep_lock(out: Path):
    """Exclusive lock on the sweep directory: a second sweep (driver) on the same ``--out`` is refused."""
    try:
        with _flock(out / LOCK, wait=False, what="the sweep directory"):
            yield
    except BlockingIOError as exc:
        raise SweepError(f"another sweep is running in {str(out)!r} (lock {LOCK} held); "
                         "wait for it to end or use another --out") from exc


def _clean_partial(out: Path) -> None:
    """Delete leftovers of executions that died (``.partial/<point>``), except those of points still running."""
    partial = out / PARTIAL
    if not partial.is_dir():
        return
    for entry in partial.iterdir():
        try:
            with _claim(out, entry.name, wait=False):
                shutil.rmtree(entry, ignore_errors=True)
        except BlockingIOError:
            pass  # an execution from an earlier driver is still running this point; it cleans up itself
    with contextlib.suppress(OSError):
        partial.rmdir()  # only when empty


# The local cluster: in-process workers of one thread (one point each at a time); no dashboard, and the
# HTTP endpoints Dask always opens (health, metrics) on loopback, not on every interface (its default).
_LOCAL_CLUSTER = dict(threads_per_worker=1, processes=False, dashboard_address=None,
                      scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                      worker_dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)


@contextlib.contextmanager
def _dask_client(scheduler: Any, workers: int, gpus: list[str], resources: Mapping[str, float]):
    """A ``distributed.Client``: on a new local cluster, or on ``scheduler`` (address, Client or Cluster).

    The local cluster is a ``LocalCluster`` of ``workers`` workers of one thread each (one point at a
    time per worker) inside this process (``processes=False``, in-process transport, HTTP endpoints
    on loopback only, no dashboard): a point's work happens in its own kernel process, so a worker only supervises
    papermill, and in-process workers start in a fraction of a second instead of a fresh Python
    with its imports per worker (measured by ``benchmarks/sweep_overhead.py``). Kernels inherit
    this process's environment, except their thread counts (:func:`threads_per_point`) and GPU.
    """
    from distributed import Client, LocalCluster

    if scheduler is None:
        cluster = LocalCluster(**_LOCAL_CLUSTER, n_workers=workers, resources=dict(resources) or None)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    if isinstance(scheduler, Client):
        yield scheduler  # the caller's client: neither closed nor changed
        return
    address = getattr(scheduler, "scheduler_address", scheduler)  # a Cluster object (SLURMCluster, ...)
    try:
        client = Client(address, timeout=_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise SweepError(f"cannot connect to the Dask scheduler {address!r}: {exc}") from exc
    with client:
        if resources:
            have = [w.get("resources", {}) for w in client.scheduler_info()["workers"].values()]
            if not any(all(r.get(k, 0) >= v for k, v in resources.items()) for r in have):
                print(f"note: no worker of {address} offers {resources} yet; points wait until one joins "
                      "(start workers with --resources)", file=sys.stderr)
        yield client


def run_sweep(notebook: str | os.PathLike, out: str | os.PathLike, *, params: Mapping[str, Any] | None = None,
              grid: Mapping[str, Sequence[Any]] | None = None, workers: int | None = None,
              gpus: Sequence[str] | str | None = None, scheduler: Any = None,
              resources: str | Mapping[str, float] | None = None, kernel: str = "python3",
              cwd: str | os.PathLike | None = None, timeout: float | None = None,
              progress: bool = True, threads: int | None = None) -> list[PointResult]:
    """Run ``notebook`` once per grid point into ``out/<point>/`` as Dask tasks, resumable (Chapter 8).

    ``params`` are fixed for every point, ``grid`` maps a parameter to the values to sweep. Every
    name and value type is checked against the notebook's parameters cell before anything runs
    (:class:`SweepError`, via :func:`check_parameters`). Points run as Dask tasks:

    * ``scheduler=None``: on a local cluster of ``workers`` workers (default 1, or one per GPU);
      ``gpus`` (e.g. ``"0,1"``) gives worker k's kernel ``CUDA_VISIBLE_DEVICES=gpus[k % n]`` and each
      worker the resource ``GPU=1``;
    * ``scheduler="tcp://HOST:8786"`` (or a ``distributed.Client``, or a cluster object such as
      ``dask_jobqueue.SLURMCluster``): on that cluster. ``resources={"GPU": 1}`` runs each point on a
      worker started with ``--resources GPU=1``, one point per GPU; that worker's own
      ``CUDA_VISIBLE_DEVICES`` (set when it was started, or by SLURM) is what its kernel sees.

    On the local cluster each kernel gets ``threads`` CPU threads (``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS``; default: the usable cores divided by ``workers``, see
    :func:`threads_per_point`), so points running at once do not oversubscribe the cores. On an
    existing cluster kernels inherit their worker's environment.

    Finished points are skipped, a point whose worker died runs again elsewhere, and every
    point folder is installed atomically once (see the module notes). ``cwd`` (default: the
    notebook's folder) is where the kernel starts; all paths must be the same on every machine.
    Returns one :class:`PointResult` per point, in grid order.
    """
    notebook = Path(notebook).resolve()
    out = Path(out).resolve()
    params = dict(params or {})
    grid = dict(grid or {})
    gpus = _parse_gpus(gpus)
    res = parse_resources(resources)
    if scheduler is not None:
        if threads is not None:
            raise SweepError("threads sizes the kernels of the local cluster; on a cluster, set "
                             "OMP_NUM_THREADS where its workers start (drop --threads)")
        if workers is not None:
            raise SweepError("workers sizes the local cluster; with a scheduler, its workers decide "
                             "(drop --workers)")
        if gpus:
            raise SweepError("gpus describes local workers; on a cluster start one worker per GPU with "
                             "CUDA_VISIBLE_DEVICES and --resources GPU=1, and pass resources GPU=1")
    else:
        workers = max(1, len(gpus)) if workers is None else workers
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise SweepError(f"workers must be an integer >= 1, got {workers!r}")
        if res:
            raise SweepError("resources are for workers of an existing cluster (scheduler); the local cluster "
                             "gets GPU=1 per worker from gpus")
        if gpus:
            res = {"GPU": 1}
        threads = threads_per_point(workers, threads)
    defaults = notebook_parameters(notebook)
    if "output_dir" in params or "output_dir" in grid:
        raise SweepError("parameter 'output_dir' is set by the sweep (one folder per point); do not pass it")
    check_parameters(notebook, params, defaults=defaults)
    for name, values in grid.items():
        for v in values:
            check_parameters(notebook, {name: v}, defaults=defaults)
    points = expand_grid(params, grid)
    literal_defaults = {k: v for k, v in defaults.items() if v is not _UNKNOWN and k != "output_dir"}
    for p in points:
        p.recorded = {**literal_defaults, **p.params}
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, PointResult] = {}
    with _sweep_lock(out):
        _clean_partial(out)
        todo, corrupt = [], []
        for p in points:
            folder = out / p.name
            state, why = point_state(folder)
            if state == DONE:
                old = _requested(folder)
                if old is None or not _params_equal(old, p.recorded):
                    raise SweepError(f"{str(folder)!r} already holds a finished point with other parameters "
                                     f"({old}); use another --out or delete it")
                results[p.name] = PointResult(p.name, "SKIPPED", folder, _duration(folder))
            else:
                todo.append(p)
                if state == CORRUPT:
                    corrupt.append(f"{p.name} ({why})")
        if corrupt:
            print(f"running again {len(corrupt)} point(s) whose result is corrupt: {'; '.join(corrupt)}",
                  file=sys.stderr)
        if todo:
            job = _Job(notebook=notebook, out=out, kernel=kernel,
                       cwd=Path(cwd).resolve() if cwd is not None else notebook.parent,
                       pass_output_dir="output_dir" in defaults, timeout=timeout,
                       gpu_ids=gpus if scheduler is None else [], threads=threads,
                       provenance={**_git_commit(notebook.parent), "versions": environment(),
                                   "python_executable": sys.executable, "platform": platform.platform()})
            results.update(_run_on_dask(todo, job, scheduler, workers, gpus, res, progress,
                                        initial=len(points) - len(todo)))
        with contextlib.suppress(OSError):
            (out / PARTIAL).rmdir()  # only when empty
    return [results[p.name] for p in points]


def _run_on_dask(todo: list[Point], job: _Job, scheduler: Any, workers: int | None, gpus: list[str],
                 resources: Mapping[str, float], progress: bool, initial: int) -> dict[str, PointResult]:
    """The driver of :func:`run_sweep`: one Dask task per point (grid order first), results as they finish."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    results: dict[str, PointResult] = {}
    token = uuid.uuid4().hex[:8]  # keys unique to this driver: tasks of a killed earlier driver never clash
    bar = tqdm(total=initial + len(todo), initial=initial, desc=f"sweep {job.notebook.name}", unit="point",
               disable=not progress)
    failed = 0
    with _dask_client(scheduler, workers or 0, gpus, resources) as client:
        futures = {}
        for i, p in enumerate(todo):
            fut = client.submit(_point_task, p, job, key=f"sweep-{token}-{p.name}", pure=False,
                                resources=dict(resources) or None, priority=len(todo) - i)
            futures[fut] = p
        try:
            for fut in as_completed(futures):
                p = futures[fut]
                try:
                    r = fut.result()
                except Exception as exc:  # noqa: BLE001 - KilledWorker (died too often), lost scheduler...
                    r = PointResult(p.name, "FAILED", job.out / p.name, 0.0, f"{type(exc).__name__}: {exc}")
                results[p.name] = r
                failed += r.status == "FAILED"
                bar.update(1)
                bar.set_postfix(failed=failed)
        finally:  # Ctrl-C: cancel what has not run; a running point is dropped with its kernel
            client.cancel(list(futures))
            bar.close()
    return results


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

    Parameter columns (from each point's ``params.json``: what the point ran with) sit next to the
    metric columns of the result rows, with ``point``, ``status``, ``duration_s`` and ``folder``.
    ``status`` is ``DONE``, ``FAILED``, or ``CORRUPT`` (a DONE marker but no valid ``metrics.json``,
    see :func:`point_state`); only ``DONE`` points contribute metrics, the others one row of NaN.
    Several directories (or one directory holding copies from several machines) are merged. A
    parameter whose name is also
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


def reuse_counts(results: Iterable[PointResult]) -> dict[str, int]:
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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nbsupport.book.experiments",
                                 description="Papermill sweeps of a chapter's parameters, on Dask (Chapter 8).")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a notebook once per grid point (resumable)")
    r.add_argument("notebook")
    r.add_argument("--out", required=True,
                   help="sweep directory (one folder per point; on shared storage for a cluster)")
    r.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="fixed parameter, value parsed like papermill -p (3, 0.5, True, None, LA, [1,2])")
    r.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="parameter to sweep (cartesian product over all --grid options)")
    r.add_argument("--workers", type=int, default=None,
                   help="workers of the local Dask cluster, one point each at a time (default 1, "
                        "or one per GPU)")
    r.add_argument("--gpus", default=None,
                   help="local cluster: comma list of GPU ids; worker k's kernel gets "
                        "CUDA_VISIBLE_DEVICES=gpus[k %% n]")
    r.add_argument("--threads", type=int, default=None,
                   help="local cluster: CPU threads of each point's kernel (default: usable cores // workers)")
    r.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on an existing Dask cluster, e.g. tcp://HOST:8786 (dask scheduler / dask worker)")
    r.add_argument("--resources", default=None, metavar="NAME=N",
                   help="worker resources each point needs on a --scheduler cluster, e.g. GPU=1")
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
        results = run_sweep(args.notebook, args.out, params=params, grid=grid, workers=args.workers,
                            gpus=args.gpus, scheduler=args.scheduler, resources=args.resources,
                            kernel=args.kernel, cwd=args.cwd, timeout=args.timeout,
                            progress=not args.no_progress, threads=args.threads)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = summary(results)
    print(table.to_string(index=False))
    n_failed = int((table["status"] == "FAILED").sum()) if len(table) else 0
    print(f"{len(results)} point(s): {len(results) - n_failed} done, {n_failed} failed -> {args.out}")
    return 1 if n_failed else 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: Dask pickles the point tasks and their
    # dataclasses by reference, and workers import them as nbsupport.book.experiments.
    from nbsupport.book.experiments import main as _main

    sys.exit(_main())
