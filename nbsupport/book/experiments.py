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

The code is split by concern, and every public name is importable from here as well:
:mod:`~nbsupport.book.sweep_grid` (command-line values, grid points, checks against the chapter's spec),
:mod:`~nbsupport.book.sweep_store` (point folders and their state, the collected table, fingerprints),
:mod:`~nbsupport.book.sweep_run` (claims, kernels, the Dask driver) and this module (the command line).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Mapping, Sequence

import pandas as pd

from nbsupport.base import atomic_write_text

from .params import GridRule, ParamsRule, shrink_grid
from .sweep_grid import (OUTPUT_DIR, Point, SweepError, _parse_gpus, canonical_grid, check_parameters, expand_grid,
                         find_notebook, notebook_parameters, parameter_spec, parse_grid_option, parse_resources,
                         parse_value, point_name)
from .sweep_run import THREAD_VARIABLES, PointResult, run_sweep, summary, threads_per_point, usable_cores
from .sweep_store import (CLAIMS, CORRUPT, DONE, LOCK, PARTIAL, attach_intervals, collect, column, metrics_rows,
                          point_state, reuse_counts, store_dir, sweep_fingerprint)

__all__ = [
    "SweepError", "Point", "PointResult", "parse_value", "parse_grid_option", "parse_resources", "expand_grid",
    "point_name", "notebook_parameters", "parameter_spec", "check_parameters", "point_state", "run_sweep", "collect", "main",
    "summary", "GridRule", "ParamsRule", "shrink_grid", "column", "command_line", "find_notebook",
    "threads_per_point", "usable_cores", "THREAD_VARIABLES", "canonical_grid", "OUTPUT_DIR",
    "metrics_rows", "sweep_fingerprint", "store_dir", "reuse_counts", "attach_intervals",
    "DONE", "CORRUPT", "PARTIAL", "CLAIMS", "LOCK",
]


def command_line(notebook: str | os.PathLike, out: str | os.PathLike, params: Mapping[str, Any] | None = None,
                 grid: Mapping[str, Sequence[Any]] | None = None, workers: int | None = 1,
                 gpus: Sequence[str] | str | None = None, *, scheduler: str | None = None,
                 resources: str | Mapping[str, float] | None = None, threads: int | None = None) -> str:
    """The shell command that runs the same sweep as :func:`run_sweep` with these arguments (Chapter 8)."""
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
            with pd.option_context("display.width", 200, "display.max_columns", 30):
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
