"""The sweep runner (Chapter 8): one papermill run per point as a Dask task, resumable and crash-safe.

:func:`run_sweep` checks every value first (:mod:`nbsupport.book.sweep_grid`), skips the points the
result store already holds (:mod:`nbsupport.book.sweep_store`), and runs the others as Dask tasks,
on a local cluster or an existing one. Each point runs under a per-point claim (an ``flock`` the OS
drops when its holder dies) in a temporary folder that is renamed into place once finished; the
module notes of :mod:`nbsupport.book.experiments` explain why any re-execution is harmless.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
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

import pandas as pd
import papermill as pm
from distributed import Client, LocalCluster, as_completed, get_worker
from jupyter_client.manager import AsyncKernelManager
from tqdm.auto import tqdm

from nbsupport.base import atomic_write_json, atomic_write_text

from .notebook import environment
from .sweep_grid import (UNKNOWN, Point, SweepError, _parse_gpus, canonical_grid, check_parameters, expand_grid,
                         notebook_parameters, parse_resources, point_parameters, refuse_output_dir,
                         takes_output_dir, without_output_dir)
from .sweep_store import (CLAIMS, CORRUPT, DONE, LOCK, PARTIAL, StoreNotWritable, _commit, _duration, _load_metrics,
                          _params_equal, _requested, point_state, refusals_named)

__all__ = ["PointResult", "run_sweep", "summary", "threads_per_point", "usable_cores", "THREAD_VARIABLES"]

_CONNECT_TIMEOUT_S = 30


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
    writes_metrics: bool  # the notebook takes the point's folder (sweep_grid.takes_output_dir)
    provenance: dict
    timeout: float | None
    gpu_ids: list = field(default_factory=list)  # local cluster: worker k's kernel gets gpu_ids[k % n]
    threads: int | None = None  # local cluster: CPU threads of each point's kernel (None: inherited)


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
        try:  # local: fcntl is POSIX-only (Windows: no lock, see above)
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


def _run_point(point: Point, job: _Job, env: Mapping[str, str] | None = None) -> PointResult:
    """Run one point under its claim: skip it if finished, else run papermill, install its folder atomically."""
    env = dict(env or {})
    out = job.out
    final = out / point.name
    with _claim(out, point.name):
        if _install_waiting(out, point.name):  # finished by another execution (a Dask retry, an earlier driver)
            return PointResult(point.name, "SKIPPED", final, _duration(final))
        scratch = out / PARTIAL / point.name
        shutil.rmtree(scratch, ignore_errors=True)  # leftovers of an execution that died; we hold the claim
        tmp = scratch / uuid.uuid4().hex[:8]
        tmp.mkdir(parents=True)
        # the notebook writes metrics.json and figures into tmp; the point's records name the folder
        # it is installed as
        params = point_parameters(point.params, tmp, takes=job.writes_metrics)
        requested = point_parameters(point.recorded, final, takes=job.writes_metrics)
        atomic_write_json(tmp / "params.json", requested)
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
        if status == DONE and job.writes_metrics:  # finished = a metrics.json of the shared shape
            try:
                metrics = _load_metrics(tmp / "metrics.json")
            except ValueError as exc:
                status, error = "FAILED", str(exc)
            else:  # what ran: the notebook's own validated parameters (after e.g. a smoke-size shrink)
                ran = point_parameters({**requested, **metrics["parameters"]}, final)
        atomic_write_json(tmp / "params.json", ran)
        worker = None
        with contextlib.suppress(ValueError):  # not inside a Dask worker (a direct call)
            worker = get_worker().address
        atomic_write_json(tmp / "run.json", {
            "point": point.name, "status": status, "parameters": point.params, "requested": point.recorded,
            "error": error, "notebook": str(job.notebook), "grid": point.grid_values, "started": started,
            "finished": _now(), "duration_s": round(duration, 3), "host": socket.gethostname(),
            "worker": worker, "env": env,
            "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")),
            "writes_metrics": job.writes_metrics, **job.provenance})
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
        name = get_worker().name  # local cluster workers are named 0 .. workers-1
        k = name if isinstance(name, int) else 0
        env["CUDA_VISIBLE_DEVICES"] = job.gpu_ids[k % len(job.gpu_ids)]
    with refusals_named(job.out):  # the sweep folder refuses writes: stop the sweep with a clear error
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


def _install_waiting(out: Path, name: str) -> bool:
    """Install a finished result of point ``name`` left in ``.partial/<name>/`` (its execution finished but
    could not install it, e.g. on a read-only folder); True when the point is finished now. Under its claim."""
    scratch = out / PARTIAL / name
    finished = [d for d in sorted(scratch.iterdir()) if d.is_dir() and point_state(d)[0] == DONE] \
        if scratch.is_dir() else []
    if finished:
        _commit(finished[0], out / name, scratch)
    return point_state(out / name)[0] == DONE


def _clean_partial(out: Path) -> None:
    """Install the finished results left in ``.partial/<point>`` (a sweep stopped between finishing a point
    and installing it, e.g. on a read-only folder), then delete the leftovers of executions that died,
    except those of points still running."""
    partial = out / PARTIAL
    if not partial.is_dir():
        return
    for entry in partial.iterdir():
        try:
            with _claim(out, entry.name, wait=False):
                _install_waiting(out, entry.name)
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
    refuse_output_dir(params, grid)
    check_parameters(notebook, params, defaults=defaults)
    for name, values in grid.items():
        for v in values:
            check_parameters(notebook, {name: v}, defaults=defaults)
    grid = canonical_grid(notebook, grid, defaults=defaults)  # equal values, one point
    points = expand_grid(params, grid)
    literal_defaults = without_output_dir({k: v for k, v in defaults.items() if v is not UNKNOWN})
    for p in points:
        p.recorded = {**literal_defaults, **p.params}
    results: dict[str, PointResult] = {}
    with refusals_named(out), _sweep_lock(out):  # a folder that refuses writes: StoreNotWritable
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
                       writes_metrics=takes_output_dir(defaults), timeout=timeout,
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
                except StoreNotWritable:
                    raise
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
    return pd.DataFrame([{"point": r.name, "status": r.status, "duration_s": round(r.duration_s, 1),
                          "error": (r.error[:80] + "...") if len(r.error) > 80 else r.error} for r in results])
