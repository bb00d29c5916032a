"""What running sweep points as Dask tasks costs, against the thread-pool driver it replaced (Chapter 8).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sweep_overhead.py --out benchmarks/results/sweep_overhead.json

A trivial notebook (its one code cell writes ``metrics.json``) is swept over ``N`` points with one
worker by both drivers, interleaved within each repetition so that both see the same machine load:

* **dask**: :func:`nbsupport.book.experiments.run_sweep` of this checkout (a local Dask cluster is
  started and stopped inside every sweep, as the command line does);
* **threadpool**: the same function as of ``--baseline-ref`` (git), which ran points in a thread pool of
  the driver process, loaded from git history.

Two measures, each as mean, 95 % t-interval over repetitions, min and max:

* the time a fresh Python spends importing ``distributed`` (paid once by each command-line sweep; the
  sweeps below run in one process with it imported);
* from the wall time of ``run_sweep`` at the smallest and largest N, per driver and repetition, a fixed
  part (cluster start and stop) and a per-point part (the slope), and the paired differences
  dask - threadpool: the overhead Dask adds per sweep and per point;
* *driver time* = wall time - the papermill time of the points (the ``duration_s`` each ``run.json``
  records), per point: time outside the point runs, and its paired difference dask - threadpool;
* the papermill time per point, paired difference dask - threadpool (kernels are slower under Dask
  only by their launcher, which makes a kernel die with its worker; timed alone as well).

Writes the JSON and a PNG next to it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nbsupport.base import atomic_write, atomic_write_json  # noqa: E402
from nbsupport.book import experiments as dask_driver  # noqa: E402
from nbsupport.book import sweep_run  # noqa: E402

BODY = '''import json, os
if output_dir:
    with open(os.path.join(output_dir, "metrics.json"), "w") as fh:
        json.dump({"parameters": {"x": x, "output_dir": output_dir},
                   "results": [{"model": "trivial", "modalities": "L", "wacc": x}]}, fh)'''


def trivial_notebook(path: Path) -> Path:
    """A notebook whose only work is writing metrics.json: what is left of a point's time is overhead."""
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    params = new_code_cell("x = 0\noutput_dir = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, new_code_cell(BODY)]
    nbformat.write(nb, path)
    return path


def threadpool_driver(ref: str):
    """The sweep module as of git ``ref`` (the thread-pool driver), imported under another name."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:nbsupport/book/experiments.py"],
                         capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("nbsupport.book._sweep_threadpool", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "nbsupport.book"
    sys.modules[spec.name] = module
    exec(compile(src, f"{ref}:nbsupport/book/experiments.py", "exec"), module.__dict__)  # noqa: S102
    return module


def one_sweep(driver, notebook: Path, n: int, where: Path) -> dict:
    out = where / f"sweep_{time.monotonic_ns()}"
    t0 = time.perf_counter()
    results = driver.run_sweep(notebook, out, grid={"x": list(range(n))}, workers=1, progress=False)
    wall = time.perf_counter() - t0
    assert [r.status for r in results] == ["DONE"] * n, [(r.name, r.status, r.error) for r in results]
    papermill = sum(json.loads((out / r.name / "run.json").read_text())["duration_s"] for r in results)
    return {"n": n, "wall_s": wall, "papermill_s": papermill, "driver_s": wall - papermill,
            "driver_per_point_s": (wall - papermill) / n}


def import_seconds(module: str) -> float:
    """Wall time a fresh Python spends importing ``module`` (minus a bare start): a once-per-driver cost."""
    def run(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - t0
    return run(f"import {module}") - run("pass")


def wrapper_seconds() -> float:
    """Extra start time of one kernel: the launcher that makes it die with its Dask worker (Linux)."""
    def run(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        return time.perf_counter() - t0
    true = [sys.executable, "-c", "pass"]  # the kernel's own start is the same with or without the launcher
    return run([*sweep_run._kernel_launcher(), *true]) - run(true)


def interval(values: list[float]) -> dict:
    """Mean, 95 % t-interval, min and max of repeated measurements."""
    m = statistics.fmean(values)
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 \
        else float("nan")
    return {"mean": m, "ci95": [m - half, m + half], "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sweep_overhead.json"))
    ap.add_argument("--points", default="1,6", help="sweep sizes N (comma list)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--baseline-ref", default="5a72e3d", help="git commit of the thread-pool driver")
    args = ap.parse_args()
    sizes = [int(v) for v in args.points.split(",")]
    drivers = {"dask": dask_driver, "threadpool": threadpool_driver(args.baseline_ref)}
    # once per driver process: importing distributed (the sweeps below run with it imported)
    imports = [import_seconds("distributed") for _ in range(args.repeats)]
    launcher = [wrapper_seconds() for _ in range(3 * args.repeats)]
    import distributed  # noqa: F401
    rows = []
    with tempfile.TemporaryDirectory(prefix="sweep_overhead_") as tmp:
        notebook = trivial_notebook(Path(tmp) / "trivial.ipynb")
        for rep in range(args.repeats):
            for n in sizes:
                order = list(drivers) if rep % 2 == 0 else list(drivers)[::-1]  # alternate who goes first
                for name in order:
                    row = {"driver": name, "repeat": rep, **one_sweep(drivers[name], notebook, n, Path(tmp))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    per_point, paired, fixed, papermill_diff = {}, {}, {}, {}
    for n in sizes:
        sel = lambda d: [r["driver_per_point_s"] for r in rows if r["driver"] == d and r["n"] == n]  # noqa: E731
        per_point[n] = {d: interval(sel(d)) for d in drivers}
        paired[n] = interval([a - b for a, b in zip(sel("dask"), sel("threadpool"))])
        pm = lambda d: [r["papermill_s"] / n for r in rows if r["driver"] == d and r["n"] == n]  # noqa: E731
        papermill_diff[n] = interval([a - b for a, b in zip(pm("dask"), pm("threadpool"))])
    lo, hi = min(sizes), max(sizes)
    if hi > lo:  # wall time = fixed + per_point * N, per driver and repetition; then dask - threadpool, paired
        fit = {}
        for d in drivers:
            t = {(r["repeat"], r["n"]): r["wall_s"] for r in rows if r["driver"] == d}
            slopes = [(t[(k, hi)] - t[(k, lo)]) / (hi - lo) for k in range(args.repeats)]
            fit[d] = (slopes, [t[(k, lo)] - s * lo for k, s in zip(range(args.repeats), slopes)])
            fixed[d] = {"per_point_s": interval(fit[d][0]), "fixed_s": interval(fit[d][1])}
        fixed["dask_minus_threadpool"] = {
            "per_point_s": interval([a - b for a, b in zip(fit["dask"][0], fit["threadpool"][0])]),
            "fixed_s": interval([a - b for a, b in zip(fit["dask"][1], fit["threadpool"][1])])}
    result = {"rows": rows, "import_distributed_s": interval(imports), "kernel_launcher_s": interval(launcher),
              "papermill_per_point_dask_minus_threadpool_s": papermill_diff, "driver_time_per_point_s": per_point, "dask_minus_threadpool_per_point_s": paired,
              "fixed_and_marginal": fixed, "baseline_ref": args.baseline_ref,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average_at_end": os.getloadavg()}}
    out = Path(args.out)
    atomic_write_json(out, result)
    plot(rows, out.with_suffix(".png"))
    keys = ("import_distributed_s", "kernel_launcher_s", "dask_minus_threadpool_per_point_s",
            "papermill_per_point_dask_minus_threadpool_s")
    print(json.dumps({k: result[k] for k in keys}, indent=1))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    sns.stripplot(data=df, x="n", y="driver_per_point_s", hue="driver", dodge=True, size=7, ax=ax)
    ax.set(xlabel="points in the sweep (N), one worker", ylabel="driver time per point (s)",
           title="sweep driver overhead: Dask vs thread pool")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), "wb")


if __name__ == "__main__":
    main()
