"""Tests of the sweep command and result store (nbsupport.book.experiments, Chapter 8).

Real runs use a tiny generated notebook (not a chapter: kernels cost seconds each on 2 busy cores)
with a parameters cell, a ``sleep`` and a ``fail`` switch. It records its start/end time, its
CUDA_VISIBLE_DEVICES and its process ids, and writes a hand-written ``metrics.json`` in the book's
shared shape (it imports nothing from nbsupport, so no torch import slows the kernel). The driver
logic (resume, corrupt results, the per-point claim) is also tested without kernels, on an
in-process Dask cluster with papermill replaced by a stand-in that writes what a notebook writes.
Every Dask cluster listens on 127.0.0.1 only and is torn down in a ``finally``. Concurrency is checked
from overlapping start/end timestamps written by the kernels, never from wall-clock speed-ups.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from nbsupport.base import atomic_write_json
from nbsupport.book import experiments as ex
from nbsupport.book import sweep_run, sweep_store

PARAMS = '''smoke = False
seed = 0
device = "auto"
output_dir = None
sleep = 0.0
fail = False
x = 1
lr = 0.1
name = "a"
modalities = "L"
extra = None
n_train = 2000
log = None'''

# What a chapter does, in miniature: the smoke switch shrinks a size, and metrics.json records the
# parameters that ran. Files are written atomically (temporary name + os.replace).
BODY = '''import json, os, time
t0 = time.time()
def _log(word):
    if log:
        with open(log, "a") as fh:
            fh.write(f"{word} {x} {os.getpid()} {os.getppid()}\\n")
def _write(name, data):
    tmp = os.path.join(output_dir, name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, os.path.join(output_dir, name))
_log("start")
ran = dict(smoke=smoke, seed=seed, device=device, output_dir=output_dir, sleep=sleep, fail=fail, x=x, lr=lr,
           name=name, modalities=modalities, extra=extra, n_train=20 if smoke else n_train, log=log)
time.sleep(sleep)
if output_dir:
    _write("times.json", {"start": t0, "end": time.time(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                          "omp": os.environ.get("OMP_NUM_THREADS")})
if fail:
    raise RuntimeError("boom on purpose")
if output_dir:
    _write("metrics.json", {"parameters": ran, "results": [
        {"model": "toy", "modalities": "L", "wacc": x * lr},
        {"model": "toy", "modalities": "LA", "wacc": x * lr / 2, "macs": 10.0 * x}]})
_log("end")'''


def make_notebook(path: Path) -> Path:
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    params = new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [new_markdown_cell("# toy"), params, new_code_cell(BODY)]
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def toy_nb(tmp_path_factory) -> Path:
    return make_notebook(tmp_path_factory.mktemp("nb") / "toy.ipynb")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nbsupport.book.experiments", *map(str, args)]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def _points(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _log_lines(log: Path) -> list[tuple[str, int, int, int]]:
    """(word, x, kernel pid, kernel's parent pid = the Dask worker process) per line the toy wrote."""
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines()]
    return [(w, int(x), int(pid), int(ppid)) for w, x, pid, ppid in rows]


def _check_finished_once(out: Path, xs) -> None:
    """Every point x=… is one folder, DONE, with one metrics.json of its own parameters; nothing half-done."""
    assert _points(out) == sorted(f"x={x}" for x in xs)
    for x in xs:
        folder = out / f"x={x}"
        assert ex.point_state(folder) == (ex.DONE, "")
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["parameters"]["x"] == x and metrics["results"][0]["wacc"] == pytest.approx(x * 0.1)
        assert sorted(f.name for f in folder.glob("*.ipynb")) == ["toy.ipynb"]
    assert not (out / ex.PARTIAL).exists()


# ------------------------------------------------------------------------------------------------
# Parsing, grid expansion, validation (no kernel)
# ------------------------------------------------------------------------------------------------
def test_parse_value_like_papermill():
    assert ex.parse_value("3") == 3 and isinstance(ex.parse_value("3"), int)
    assert ex.parse_value("0.5") == 0.5
    assert ex.parse_value("True") is True and ex.parse_value("false") is False
    assert ex.parse_value("None") is None and ex.parse_value("null") is None
    assert ex.parse_value("LA") == "LA" and ex.parse_value("'3'") == "3"
    assert ex.parse_value("[1, 2]") == [1, 2]
    assert ex.parse_grid_option("top_p=0.5,0.9") == ("top_p", [0.5, 0.9])
    assert ex.parse_grid_option("sizes=[1,2],[3]") == ("sizes", [[1, 2], [3]])
    with pytest.raises(ex.SweepError, match="NAME=V1"):
        ex.parse_grid_option("top_p")
    with pytest.raises(ex.SweepError, match="repeated"):
        ex.parse_grid_option("x=1,1")
    assert ex.parse_resources("GPU=1") == {"GPU": 1}
    assert ex.parse_resources("GPU=1,MEM=0.5") == {"GPU": 1, "MEM": 0.5}
    assert ex.parse_resources(None) == {} and ex.parse_resources({"GPU": 2}) == {"GPU": 2}
    for bad in ("GPU", "GPU=x", "GPU=True", "1=2"):
        with pytest.raises(ex.SweepError, match="--resources"):
            ex.parse_resources(bad)
    with pytest.raises(ex.SweepError, match="positive"):
        ex.parse_resources({"GPU": 0})


def test_expand_grid_is_cartesian_deterministic_and_named():
    pts = ex.expand_grid({"smoke": True}, {"top_p": [0.5, 1.0], "modalities": ["LA", "LAV", "L/V x"]})
    # hand-written expected product: first grid key varies slowest
    assert [(p.params["top_p"], p.params["modalities"]) for p in pts] == [
        (0.5, "LA"), (0.5, "LAV"), (0.5, "L/V x"), (1.0, "LA"), (1.0, "LAV"), (1.0, "L/V x")]
    assert all(p.params["smoke"] is True for p in pts)
    assert pts[0].name == "top_p=0.5__modalities=LA"
    assert pts[2].name == "top_p=0.5__modalities=L-V-x"  # sanitised
    assert len({p.name for p in pts}) == 6
    assert ex.expand_grid({"a": 1})[0].name == "default"
    # names that collide after sanitising get distinct hashed names
    clash = ex.expand_grid({}, {"m": ["a/b", "a b"]})
    assert len({p.name for p in clash}) == 2
    long = ex.expand_grid({}, {"s": ["x" * 300]})[0].name
    assert len(long) <= 100
    with pytest.raises(ex.SweepError, match="'x' is given both"):
        ex.expand_grid({"x": 1}, {"x": [1, 2]})


@pytest.mark.parametrize("args, word", [
    (["-p", "nope", "1"], "'nope'"),                 # unknown name
    (["-p", "x", "0.5"], "'x'"),                    # float for an int
    (["-p", "fail", "1"], "'fail'"),                # bool is strict
    (["-p", "name", "3"], "'name'"),                # number for a string
    (["--grid", "x=1,2.5"], "'x'"),                 # a bad grid value
    (["--grid", "lr=0.1,oops"], "'lr'"),            # string for a float
    (["-p", "output_dir", "/tmp/x"], "output_dir"),  # set by the sweep
    (["--workers", "0"], "workers"),
    (["--resources", "GPU=1"], "resources"),        # resources are for workers of an existing cluster
    (["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "workers"),
    (["--scheduler", "tcp://127.0.0.1:9", "--gpus", "0"], "gpus"),
    (["--scheduler", "tcp://127.0.0.1:9", "--threads", "2"], "threads"),
    (["--threads", "0"], "threads"),
    (["--scheduler", "tcp://127.0.0.1:9", "-p", "x", "0.5"], "'x'"),  # checked before connecting
])
def test_bad_options_fail_before_anything_runs(toy_nb, tmp_path, capsys, args, word):
    out = tmp_path / "sweep"
    assert ex.main(["run", str(toy_nb), "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert word in err and "error:" in err
    assert not out.exists() or _points(out) == []


def test_threads_per_point_shares_the_usable_cores(monkeypatch):
    monkeypatch.setattr(sweep_run, "usable_cores", lambda: 16)
    assert [ex.threads_per_point(w) for w in (1, 2, 3, 16, 40)] == [16, 8, 5, 1, 1]
    assert ex.threads_per_point(4, threads=3) == 3  # an explicit count wins
    with pytest.raises(ex.SweepError, match="threads"):
        ex.threads_per_point(2, threads=True)


def test_unreachable_scheduler_is_a_clear_error(toy_nb, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep_run, "_CONNECT_TIMEOUT_S", 2)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    argv = ["run", str(toy_nb), "--out", str(tmp_path / "o"), "--scheduler", address, "--no-progress"]
    assert ex.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot connect to the Dask scheduler" in err and address in err


def test_second_sweep_on_the_same_folder_is_refused(toy_nb, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with sweep_run._sweep_lock(out):  # a running sweep holds the lock (another open of the lock file conflicts)
        assert ex.main(["run", str(toy_nb), "--out", str(out), "--grid", "x=1,2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another sweep is running" in err
    assert _points(out) == []


def test_type_rules_accept_what_they_should(toy_nb):
    # int for a float, anything for a None default, a list for a list: accepted
    ex.check_parameters(toy_nb, {"lr": 1, "extra": [1, "a"], "x": 3, "fail": True, "name": "b"})
    with pytest.raises(ex.SweepError, match="notebook .* does not exist"):
        ex.check_parameters(toy_nb.with_name("missing.ipynb"), {})


# ------------------------------------------------------------------------------------------------
# Driver logic on an in-process Dask cluster, papermill replaced by a stand-in (no kernel)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_papermill(monkeypatch):
    """Replace papermill's execute_notebook by what the toy notebook does, minus the kernel; count calls."""
    import papermill as pm

    calls = []

    def execute_notebook(input_path, output_path, parameters=None, **kw):
        p = dict(parameters)
        calls.append(p)
        time.sleep(p.get("sleep", 0.0))
        shutil.copy(input_path, output_path)
        if p.get("fail"):
            raise pm.PapermillExecutionError(2, 1, "raise", "RuntimeError", "boom on purpose", [])
        x, lr = p.get("x", 1), p.get("lr", 0.1)
        ran = {**p, "n_train": 20 if p.get("smoke") else p.get("n_train", 2000)}
        atomic_write_json(Path(p["output_dir"]) / "metrics.json", {
            "parameters": ran, "results": [{"model": "toy", "modalities": "L", "wacc": x * lr}]})

    monkeypatch.setattr(pm, "execute_notebook", execute_notebook)
    return calls


@pytest.fixture
def inproc_client():
    """A Dask client on an in-process cluster (threads), so the stand-in papermill is what runs."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(**sweep_run._LOCAL_CLUSTER, n_workers=2)  # the sweep's own local cluster settings
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def test_resume_skips_finished_points_and_reruns_corrupt_ones(toy_nb, tmp_path, fake_papermill, inproc_client):
    grid = {"x": [1, 2], "lr": [0.5, 1.0]}
    out = tmp_path / "a"
    run = lambda **kw: ex.run_sweep(toy_nb, out, grid=grid, scheduler=inproc_client, progress=False, **kw)  # noqa
    first = run(params={"smoke": True})
    assert [r.status for r in first] == ["DONE"] * 4 and len(fake_papermill) == 4
    assert {c["output_dir"].startswith(str(out / ex.PARTIAL)) for c in fake_papermill} == {True}
    # params.json records what ran (the smoke-shrunk n_train), run.json what was asked
    folder = out / "x=2__lr=0.5"
    assert json.loads((folder / "params.json").read_text())["n_train"] == 20
    assert json.loads((folder / "params.json").read_text())["output_dir"] == str(folder)
    assert json.loads((folder / "run.json").read_text())["requested"]["n_train"] == 2000
    assert not (out / ex.PARTIAL).exists()
    again = run(params={"smoke": True})
    assert {r.status for r in again} == {"SKIPPED"} and len(fake_papermill) == 4  # nothing ran twice
    # a finished point whose metrics.json is corrupt: CORRUPT in collect (no metrics), run again on resume
    (out / "x=1__lr=1.0" / "metrics.json").write_text('{"parameters": {}, "results": [')
    bad_shape = {"parameters": {}, "results": [{"model": "toy", "wacc": 0.5}]}  # no 'modalities'
    atomic_write_json(out / "x=2__lr=1.0" / "metrics.json", bad_shape)
    assert ex.point_state(out / "x=1__lr=1.0")[0] == ex.CORRUPT
    assert "modalities" in ex.point_state(out / "x=2__lr=1.0")[1]
    df = ex.collect(out)
    corrupt = df[df["status"] == ex.CORRUPT]
    assert sorted(corrupt["point"]) == ["x=1__lr=1.0", "x=2__lr=1.0"] and corrupt["wacc"].isna().all()
    third = run(params={"smoke": True})
    assert [r.status for r in third] == ["SKIPPED", "DONE", "SKIPPED", "DONE"] and len(fake_papermill) == 6
    df = ex.collect(out)
    assert set(df["status"]) == {"DONE"} and (df["wacc"] == df["x"] * df["lr"]).all()
    # the same folder with other parameters is refused, not silently skipped
    with pytest.raises(ex.SweepError, match="other parameters"):
        run(params={"smoke": True, "name": "b"})


def test_collect_merges_folders_and_failing_points_go_on(toy_nb, tmp_path, fake_papermill, inproc_client):
    a = ex.run_sweep(toy_nb, tmp_path / "a", grid={"x": [1, 2]}, scheduler=inproc_client, progress=False)
    b = ex.run_sweep(toy_nb, tmp_path / "b", grid={"x": [3]}, params={"fail": True}, scheduler=inproc_client,
                     progress=False)
    assert [r.status for r in a] == ["DONE", "DONE"] and [r.status for r in b] == ["FAILED"]
    assert b[0].error == "RuntimeError: boom on purpose"
    failed = tmp_path / "b" / "x=3"
    assert ex.point_state(failed) == ("FAILED", "RuntimeError: boom on purpose")
    assert (failed / "toy.ipynb").exists() and not (failed / ex.DONE).exists()
    df = ex.collect(tmp_path / "a", tmp_path / "b")
    assert list(df["point"]) == ["x=1", "x=2", "x=3"] and list(df["status"]) == ["DONE", "DONE", "FAILED"]
    assert list(df["wacc"][:2]) == pytest.approx([0.1, 0.2]) and df["wacc"][2] != df["wacc"][2]  # NaN
    assert {"x", "lr", "smoke", "name"} <= set(df.attrs["parameters"])  # notebook defaults recorded too
    # the failed point runs again on resume (and still fails), the finished ones do not
    n = len(fake_papermill)
    again = ex.run_sweep(toy_nb, tmp_path / "b", grid={"x": [3]}, params={"fail": True},
                         scheduler=inproc_client.cluster, progress=False)  # a cluster object works too
    assert [r.status for r in again] == ["FAILED"] and len(fake_papermill) == n + 1


def test_two_executions_of_one_point_install_it_once(toy_nb, tmp_path, fake_papermill):
    """What Dask may do (re-run a task whose worker looked dead but was not): the claim serialises the two,
    the second finds the point finished and runs nothing; and a finished folder is never replaced."""
    out = tmp_path / "twice"
    point = ex.expand_grid({"sleep": 0.5}, {"x": [7]})[0]
    point.recorded = dict(point.params)
    job = sweep_run._Job(notebook=toy_nb, out=out, kernel="python3", cwd=toy_nb.parent, writes_metrics=True,
                  provenance={}, timeout=None)
    results = []
    threads = [threading.Thread(target=lambda: results.append(sweep_run._run_point(point, job))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.status for r in results) == ["DONE", "SKIPPED"] and len(fake_papermill) == 1
    assert _points(out) == ["x=7"] and ex.point_state(out / "x=7")[0] == ex.DONE
    # a late copy of a finished point is not installed over it
    late = out / ex.PARTIAL / "late"
    late.mkdir(parents=True)
    (late / "marker").write_text("late")
    assert sweep_store._commit(late, out / "x=7", out / ex.PARTIAL) is False
    assert not (out / "x=7" / "marker").exists()


# ------------------------------------------------------------------------------------------------
# Real papermill runs on a local Dask cluster
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_sweep(toy_nb, tmp_path_factory):
    """4 smoke points on a LocalCluster of 2 workers with fake GPU ids; the fail=True points fail on purpose.

    The driver runs without OMP_NUM_THREADS set: each kernel's thread count comes from threads_per_point.
    """
    out = tmp_path_factory.mktemp("sweep") / "fp"
    env = _env()
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(_cli("run", toy_nb, "--out", out, "-p", "smoke", "True", "-p", "sleep", "1.0",
                               "--grid", "x=1,2", "--grid", "fail=False,True", "--workers", "2", "--gpus", "7,9",
                               "--no-progress"), capture_output=True, text=True, env=env, timeout=300)
    return proc, out


def test_local_cluster_runs_a_smoke_sweep_failures_keep_traceback(local_sweep):
    proc, out = local_sweep
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "4 point(s): 2 done, 2 failed" in proc.stdout
    assert _points(out) == ["x=1__fail=False", "x=1__fail=True", "x=2__fail=False", "x=2__fail=True"]
    for x in (1, 2):
        ok, bad = out / f"x={x}__fail=False", out / f"x={x}__fail=True"
        assert ex.point_state(ok) == (ex.DONE, "") and (ok / "toy.ipynb").exists()
        assert ex.point_state(bad) == ("FAILED", "RuntimeError: boom on purpose")
        executed = nbformat.read(bad / "toy.ipynb", as_version=4)
        tracebacks = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                      if o.get("output_type") == "error"]
        assert tracebacks and tracebacks[0]["evalue"] == "boom on purpose"
        good = json.loads((ok / "run.json").read_text())
        assert good["status"] == "DONE" and good["duration_s"] > 1.0 and "torch" in good["versions"]
        assert "git_commit" in good and good["worker"].startswith("inproc://")  # in-process local cluster
        ran = json.loads((ok / "params.json").read_text())
        assert ran["x"] == x and ran["smoke"] is True
        assert ran["n_train"] == 20 and good["requested"]["n_train"] == 2000  # what ran vs what was asked


def test_local_workers_overlap_and_each_kernel_sees_its_gpu(local_sweep):
    _, out = local_sweep
    t = [json.loads((f / "times.json").read_text()) for f in sorted(out.glob("x=*"))]
    starts, ends = sorted(x["start"] for x in t), sorted(x["end"] for x in t)
    assert any(starts[i + 1] < ends[i] for i in range(3)), t  # two kernels were running at once
    assert {x["gpu"] for x in t} == {"7", "9"}  # worker 0 -> GPU 7, worker 1 -> GPU 9
    for f in out.glob("x=*"):
        run = json.loads((f / "run.json").read_text())
        assert run["cuda_visible_devices"] == json.loads((f / "times.json").read_text())["gpu"]
    # the cores shared by the 2 workers (threads_per_point), not the caller's (unset) nor Dask's own value
    assert {x["omp"] for x in t} == {str(ex.threads_per_point(2))}
    for f in out.glob("x=*"):
        assert json.loads((f / "run.json").read_text())["env"]["OMP_NUM_THREADS"] == str(ex.threads_per_point(2))


def test_collect_table(local_sweep):
    _, out = local_sweep
    df = ex.collect(out)
    assert len(df) == 6  # 2 result rows per finished point + 1 row per failed point
    done = df[df["status"] == "DONE"]
    assert list(done["modalities"]) == ["L", "LA", "L", "LA"]
    assert list(done["wacc"]) == pytest.approx([0.1, 0.05, 0.2, 0.1])
    assert "param_modalities" in df.columns  # parameter renamed where a result key has its name
    assert df.loc[df["status"] == "FAILED", "wacc"].isna().all()
    assert {"x", "fail", "sleep", "duration_s", "n_train"} <= set(df.columns)
    assert set(done["n_train"]) == {20}
    assert "output_dir" not in df.columns


def test_metrics_rows_of_a_collect_table():
    import pandas as pd

    table = pd.DataFrame([
        {"point": "p1", "top_p": 0.3, "status": "DONE", "model": "mesm", "modalities": "LA", "wacc": 0.5,
         "macs": float("nan"), "folder": "/x/p1"},
        {"point": "p2", "top_p": 1.0, "status": "DONE", "model": "fe2e", "modalities": "LAV", "wacc": float("nan"),
         "macs": 10.0, "folder": "/x/p2"}])
    assert ex.metrics_rows(table) == [
        {"point": "p1", "top_p": 0.3, "status": "DONE", "model": "mesm", "modalities": "LA", "wacc": 0.5,
         "macs": None},
        {"point": "p2", "top_p": 1.0, "status": "DONE", "model": "fe2e", "modalities": "LAV", "wacc": None,
         "macs": 10.0}]
    assert ex.metrics_rows(table[["point", "top_p"]]) == [  # rows without model/modalities get defaults
        {"point": "p1", "top_p": 0.3, "model": "sweep", "modalities": "LAV"},
        {"point": "p2", "top_p": 1.0, "model": "sweep", "modalities": "LAV"}]


@pytest.mark.cluster  # real sweep drivers (local clusters, kernels) in child processes
def test_resume_after_killing_the_driver_runs_every_point_once(toy_nb, tmp_path):
    out, log = tmp_path / "resume", tmp_path / "kernels.log"
    args = _cli("run", toy_nb, "--out", out, "-p", "sleep", "2.0", "-p", "log", log, "--grid", "x=1,2",
                "--workers", "1", "--no-progress")
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    try:
        # wait until point 1 is finished and point 2's kernel is running (its temporary folder exists)
        while time.time() < deadline:
            started = [x for w, x, *_ in _log_lines(log) if w == "start"]
            if (out / "x=1" / ex.DONE).exists() and 2 in started:
                break
            assert proc.poll() is None, "sweep ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("sweep did not reach point 2")
        assert list((out / ex.PARTIAL / "x=2").iterdir())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _points(out) == ["x=1"]  # nothing half-done is visible
    first = (out / "x=1" / "run.json").read_text()
    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_finished_once(out, (1, 2))
    assert (out / "x=1" / "run.json").read_text() == first  # finished point not re-run
    assert "SKIPPED" in done.stdout
    starts = Counter(x for w, x, *_ in _log_lines(log) if w == "start")
    assert starts == {1: 1, 2: 2}  # only the interrupted point ran again
    df = ex.collect(out)
    assert sorted(df["x"].unique()) == [1, 2] and len(df) == 4


# ------------------------------------------------------------------------------------------------
# A cluster started with the `dask` command line (scheduler + 2 workers on localhost = 2 machines)
# ------------------------------------------------------------------------------------------------
def _dask_cli() -> str:
    exe = Path(sys.executable).with_name("dask")
    return str(exe) if exe.exists() else (shutil.which("dask") or pytest.fail("the `dask` command is missing"))


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and its process group (a worker's nanny + worker)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, each worker with its own GPU id.

    Started as the README shows for two machines: one worker per GPU, CUDA_VISIBLE_DEVICES set for
    it, ``--resources GPU=1``. Yields the scheduler address; every process is stopped at the end.
    """
    from distributed import Client

    where = tmp_path_factory.mktemp("dask")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    try:
        loopback = ["--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"]  # HTTP too
        cmd = [_dask_cli(), "scheduler", *loopback, "--port", str(port)]
        procs.append(subprocess.Popen(cmd, cwd=where, env=_env(), start_new_session=True,
                                      stdout=open(where / "scheduler.log", "w"), stderr=subprocess.STDOUT))
        for name, gpu in (("machine-a", "3"), ("machine-b", "5")):
            cmd = [_dask_cli(), "worker", address, *loopback, "--name", name, "--nthreads", "1",
                   "--resources", "GPU=1", "--local-directory", str(where / name), "--death-timeout", "120"]
            procs.append(subprocess.Popen(cmd, cwd=where, env=_env(CUDA_VISIBLE_DEVICES=gpu),
                                          start_new_session=True, stdout=open(where / f"{name}.log", "w"),
                                          stderr=subprocess.STDOUT))
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
        yield address
    finally:
        for p in reversed(procs):
            _stop(p)


def test_dask_cli_cluster_runs_a_sweep_on_both_workers(dask_cluster, toy_nb, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(_cli("run", toy_nb, "--out", out, "--scheduler", dask_cluster, "--resources", "GPU=1",
                               "-p", "sleep", "1.5", "--grid", "x=1,2", "--no-progress"),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 point(s): 2 done, 0 failed" in proc.stdout
    _check_finished_once(out, (1, 2))
    runs = [json.loads((out / f"x={x}" / "run.json").read_text()) for x in (1, 2)]
    assert len({r["worker"] for r in runs}) == 2  # both "machines" ran points
    gpus = [json.loads((out / f"x={x}" / "times.json").read_text())["gpu"] for x in (1, 2)]
    assert set(gpus) == {"3", "5"}  # each kernel saw its worker's GPU only
    assert ex.collect(out)["wacc"].notna().all()


def test_worker_killed_mid_point_leaves_every_point_finished_once(dask_cluster, toy_nb, tmp_path):
    out, log = tmp_path / "killed", tmp_path / "kernels.log"
    proc = subprocess.Popen(_cli("run", toy_nb, "--out", out, "--scheduler", dask_cluster, "-p", "sleep", "3.0",
                                 "-p", "log", log, "--grid", "x=1,2,3", "--no-progress"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not _log_lines(log):
            assert proc.poll() is None and time.time() < deadline, "no point started"
            time.sleep(0.05)
        _, victim, kernel_pid, worker_pid = _log_lines(log)[0]
        os.kill(worker_pid, signal.SIGKILL)  # the Dask worker process running point `victim`, mid-point
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "3 point(s): 3 done, 0 failed" in stdout
    _check_finished_once(out, (1, 2, 3))
    lines = _log_lines(log)
    starts = Counter(x for w, x, *_ in lines if w == "start")
    assert starts[victim] == 2 and all(starts[x] == 1 for x in (1, 2, 3) if x != victim), lines
    assert ("end", victim, kernel_pid) not in [tuple(row[:3]) for row in lines]  # the killed run never finished
    t0 = time.time()
    while _alive(kernel_pid) and time.time() - t0 < 10:  # the killed worker's kernel died with it
        time.sleep(0.1)
    assert not _alive(kernel_pid)


# ------------------------------------------------------------------------------------------------
# SLURM through dask-jobqueue (no SLURM here: check the documented configuration's job script)
# ------------------------------------------------------------------------------------------------
def test_documented_slurm_cluster_makes_one_gpu_worker_per_job():
    from dask_jobqueue import SLURMCluster

    # the README's configuration, with the scheduler on loopback; nothing is submitted
    cluster = SLURMCluster(cores=4, processes=1, memory="16GB", walltime="02:00:00",
                           job_extra_directives=["--gres=gpu:1"], worker_extra_args=["--resources", "GPU=1"],
                           scheduler_options={"host": "127.0.0.1", "dashboard": False})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script
    worker_cmd = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)
    argv = shlex.split(worker_cmd)
    assert argv[argv.index("--resources") + 1] == "GPU=1" and argv[argv.index("--nthreads") + 1] == "4"
    assert "--nworkers" not in argv and "tcp://127.0.0.1:" in worker_cmd  # one worker process (one GPU) per job


def test_chapter_helpers(toy_nb, tmp_path, monkeypatch):
    from nbsupport.base import ParameterError

    assert ex.shrink_grid({"top_p": [0.3, 0.5, 0.7, 1.0], "modalities": ["LAV", "LA"]}) == \
        {"top_p": [0.3, 1.0], "modalities": ["LAV"]}
    assert ex.shrink_grid({"a": [1]}) == {"a": [1]} and ex.shrink_grid({}) == {}
    assert ex.GridRule()("grid", {"top_p": (0.5,)}) == {"top_p": [0.5]}
    with pytest.raises(ParameterError, match="'grid'.*non-empty list"):
        ex.GridRule()("grid", {"top_p": []})
    with pytest.raises(ParameterError, match="'fixed'"):
        ex.ParamsRule()("fixed", ["smoke"])
    # the printed shell command parses back (through the real argparse parser) to the same sweep
    params, grid = {"smoke": True, "name": "LA", "lr": 0.5}, {"x": [1, 2], "modalities": ["LAV", "LA"]}
    argv = shlex.split(ex.command_line("nb.ipynb", "out dir", params, grid, workers=2))[3:]
    a = ex._build_parser().parse_args(argv)
    assert a.out == "out dir" and a.workers == 2
    assert {k: ex.parse_value(v) for k, v in a.parameter} == params
    assert dict(ex.parse_grid_option(g) for g in a.grid) == grid
    # ... and through the real entry point to the same cluster as the Python call
    seen, threads = [], []

    def fake_run_on_dask(todo, job, scheduler, workers, gpus, resources, progress, initial):
        seen.append((scheduler, workers, gpus, resources))
        threads.append(job.threads)
        return {p.name: ex.PointResult(p.name, "DONE", job.out / p.name) for p in todo}

    monkeypatch.setattr(sweep_run, "_run_on_dask", fake_run_on_dask)
    cases = [  # (command_line arguments, what the cluster gets: scheduler, workers, GPU ids, point resources)
        (dict(workers=1, gpus="0,1"), (None, 1, ["0", "1"], {"GPU": 1})),
        (dict(workers=2, gpus=["0", "1"]), (None, 2, ["0", "1"], {"GPU": 1})),
        (dict(workers=3), (None, 3, [], {})),
        (dict(workers=1), (None, 1, [], {})),
        (dict(workers=1, gpus="5"), (None, 1, ["5"], {"GPU": 1})),
        (dict(workers=None, scheduler="tcp://127.0.0.1:8786", resources="GPU=1"),
         ("tcp://127.0.0.1:8786", None, [], {"GPU": 1})),
    ]
    for kw, expected in cases:
        line = ex.command_line(toy_nb, tmp_path / f"o{len(seen)}", **kw)
        assert ex.main(shlex.split(line)[3:] + ["--no-progress"]) == 0, line
        assert seen[-1] == expected, (kw, seen[-1])
    assert threads == [ex.threads_per_point(w) for w in (1, 2, 3, 1, 1)] + [None]  # None: the cluster's
    line = ex.command_line(toy_nb, tmp_path / "t", workers=2, threads=1)
    assert ex.main(shlex.split(line)[3:] + ["--no-progress"]) == 0 and threads[-1] == 1, line
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book").mkdir()
    make_notebook(tmp_path / "book" / "toy.ipynb")
    assert ex.find_notebook("toy.ipynb") == (tmp_path / "book" / "toy.ipynb").resolve()
    with pytest.raises(ex.SweepError, match="'nope.ipynb' not found"):
        ex.find_notebook("nope.ipynb")


# ------------------------------------------------------------------------------------------------
# The persistent result store: one folder per fingerprint of what decides a point's result
def _store_sources(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A notebook, a stand-in package (two modules) and a requirements file, all in tmp_path."""
    nb_path = make_notebook(tmp_path / "toy.ipynb")
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    req = tmp_path / "requirements.txt"
    req.write_text("torch==2.13.0\n")
    return nb_path, pkg, req


def test_store_dir_same_inputs_same_folder_any_change_another(tmp_path, monkeypatch):
    nb_path, pkg, req = _store_sources(tmp_path)
    params = {"smoke": False, "epochs": 3}
    store = lambda p=params: ex.store_dir(nb_path, p, root=tmp_path / "cache", package=pkg,  # noqa: E731
                                          requirements=req)
    first = store()
    assert first.parent == tmp_path / "cache" / "sweeps" and first.name.startswith("toy-")
    assert len(first.name) == len("toy-") + 16
    assert store() == first and store(dict(reversed(params.items()))) == first  # key order does not matter
    seen = {first}

    def changed(what: str) -> None:
        new = store()
        assert new not in seen, f"{what} did not change the store folder"
        seen.add(new)

    assert store({**params, "epochs": 4}) not in seen  # a fixed parameter
    # a code cell of the swept notebook; a markdown edit leaves results (and the folder) as they were
    book = nbformat.read(nb_path, as_version=4)
    book.cells[0].source = "# toy, reworded"
    nbformat.write(book, nb_path)
    assert store() == first
    book.cells[2].source += "\n# a code change"
    nbformat.write(book, nb_path)
    changed("a code cell")
    (pkg / "sub" / "b.py").write_text("B = 3\n")
    changed("a package module")
    (pkg / "sub" / "c.py").write_text("")
    changed("a new package module")
    req.write_text("torch==2.13.1\n")
    changed("the requirements")
    monkeypatch.setattr(sweep_store, "data_version", lambda: "synth999-features999")
    changed("the data version")
    now = store()
    one = ex.store_dir(nb_path, params, root=tmp_path / "cache", package=pkg, requirements=req, threads=1)
    two = ex.store_dir(nb_path, params, root=tmp_path / "cache", package=pkg, requirements=req, threads=2)
    assert len({now, one, two}) == 3  # fixed thread counts: their own folders
    # the default root is the data cache root ($NBSUPPORT_DATA)
    monkeypatch.setenv("NBSUPPORT_DATA", str(tmp_path / "env_cache"))
    assert ex.store_dir(nb_path, params, package=pkg, requirements=req).parent == tmp_path / "env_cache" / "sweeps"


def test_store_fingerprint_covers_the_real_package(tmp_path):
    """With the defaults, the fingerprint reads this repository's nbsupport sources and requirements."""
    nb_path = make_notebook(tmp_path / "toy.ipynb")
    pkg = Path(ex.__file__).resolve().parents[1]
    assert ex.sweep_fingerprint(nb_path, {"x": 1}) == ex.sweep_fingerprint(
        nb_path, {"x": 1}, package=pkg, requirements=pkg.parent / "requirements.txt")
    copy = tmp_path / "copy"
    shutil.copytree(pkg, copy / "nbsupport", ignore=shutil.ignore_patterns("__pycache__"))
    assert ex.sweep_fingerprint(nb_path, {"x": 1}, package=copy / "nbsupport",
                                requirements=pkg.parent / "requirements.txt") == ex.sweep_fingerprint(nb_path, {"x": 1})
    with open(copy / "nbsupport" / "base.py", "a") as fh:
        fh.write("\n")
    assert ex.sweep_fingerprint(nb_path, {"x": 1}, package=copy / "nbsupport",
                                requirements=pkg.parent / "requirements.txt") != ex.sweep_fingerprint(nb_path, {"x": 1})


def test_unchanged_rerun_in_the_store_reuses_every_point(toy_nb, tmp_path, fake_papermill, inproc_client):
    out = ex.store_dir(toy_nb, {"smoke": True}, root=tmp_path)
    run = lambda: ex.run_sweep(toy_nb, out, params={"smoke": True}, grid={"x": [1, 2, 3]},  # noqa: E731
                               scheduler=inproc_client, progress=False)
    assert ex.reuse_counts(run()) == {"reused": 0, "run": 3, "failed": 0}
    assert ex.reuse_counts(run()) == {"reused": 3, "run": 0, "failed": 0} and len(fake_papermill) == 3


def test_attach_intervals_reads_each_points_model_interval(tmp_path):
    import pandas as pd

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
    atomic_write_json(a / "metrics.json", {"parameters": {}, "results": [], "intervals": {
        "wacc": {"MESM": {"value": 0.7, "low": 0.6, "high": 0.8, "level": 0.95},
                 "FE2E": {"value": 0.5, "low": 0.4, "high": 0.55, "level": 0.95}}}})
    atomic_write_json(b / "metrics.json", {"parameters": {}, "results": []})  # no interval written
    table = pd.DataFrame([
        {"model": "MESM", "status": "DONE", "wacc": 0.7, "folder": str(a)},
        {"model": "FE2E", "status": "DONE", "wacc": 0.5, "folder": str(a)},
        {"model": "MESM", "status": "DONE", "wacc": 0.6, "folder": str(b)},
        {"model": "MESM", "status": "FAILED", "wacc": float("nan"), "folder": str(a)}])
    out = ex.attach_intervals(table)
    assert out["wacc_low"].tolist()[:2] == [0.6, 0.4] and out["wacc_high"].tolist()[:2] == [0.8, 0.55]
    assert out["wacc_low"].iloc[2:].isna().all() and out["wacc_high"].iloc[2:].isna().all()
    assert "wacc_low" not in table.columns  # a copy


# ------------------------------------------------------------------------------------------------
# Hostile sweeps (issue "nothing silently wrong"): equal grid values, a DONE point without params.json,
# a sweep folder that turns read-only while the sweep runs
# ------------------------------------------------------------------------------------------------
CHAPTER6 = Path(__file__).resolve().parents[1] / "book" / "06_mesm.ipynb"


def test_grid_values_the_chapter_treats_as_equal_make_one_point(toy_nb, tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(sweep_run, "_run_on_dask", lambda todo, job, *a, **kw: ran.extend(todo) or {
        p.name: ex.PointResult(p.name, "DONE", job.out / p.name) for p in todo})
    # chapter 6 orders its modalities L, A, V: "LVA" is "LAV"; its top_p is real-valued: 1 is 1.0
    for option in ("modalities=LAV,LVA", "top_p=1,1.0"):
        assert ex.main(["run", str(CHAPTER6), "--out", str(tmp_path / "c6"), "--grid", option]) == 2
        err = capsys.readouterr().err
        assert "are the same for 06_mesm.ipynb" in err and option.split("=")[0] in err, err
    assert ran == []  # refused before anything ran
    # one canonical form per value: the point is named and run with what the chapter uses
    assert ex.canonical_grid(CHAPTER6, {"modalities": ["LVA", "LA"], "top_p": [1, 0.5]}) == {
        "modalities": ["LAV", "LA"], "top_p": [1.0, 0.5]}
    results = ex.run_sweep(toy_nb, tmp_path / "toy", grid={"lr": [1]}, progress=False)  # toy: lr = 0.1, a float
    assert [r.name for r in results] == ["lr=1.0"] and ran[0].params["lr"] == 1.0


def test_done_point_without_params_json_is_corrupt_and_runs_again(toy_nb, tmp_path, fake_papermill, inproc_client):
    out = tmp_path / "s"
    run = lambda: ex.run_sweep(toy_nb, out, grid={"x": [1, 2]}, scheduler=inproc_client, progress=False)  # noqa
    assert [r.status for r in run()] == ["DONE", "DONE"]
    (out / "x=2" / "params.json").unlink()
    assert ex.point_state(out / "x=2") == (ex.CORRUPT, "params.json is missing or does not parse")
    df = ex.collect(out)
    assert list(df["point"]) == ["x=1", "x=2"] and list(df["status"]) == [ex.DONE, ex.CORRUPT]
    assert df.loc[df["point"] == "x=2", "wacc"].isna().all()
    again = run()
    assert [r.status for r in again] == ["SKIPPED", "DONE"] and len(fake_papermill) == 3
    assert ex.point_state(out / "x=2") == (ex.DONE, "") and (out / "x=2" / "params.json").exists()


def test_sweep_folder_made_read_only_mid_sweep_stops_clearly_and_keeps_every_result(
        toy_nb, tmp_path, fake_papermill, inproc_client, monkeypatch):
    out = (tmp_path / "s").resolve()
    run = lambda: ex.run_sweep(toy_nb, out, grid={"x": [1, 2, 3]}, scheduler=inproc_client, progress=False)  # noqa
    real_rename = os.rename
    installed = []

    def rename(src, dst):  # the folder turns read-only once the first point is installed (root ignores chmod)
        if Path(dst).parent == out and Path(src).parent.parent == out / ex.PARTIAL:
            if installed:
                raise PermissionError(13, "Permission denied", str(dst))
            installed.append(dst)
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ex.SweepError, match=r"refuses writes \(Permission denied.*kept"):
        run()
    installed_then = {p.name: (p / "run.json").read_text() for p in out.iterdir() if not p.name.startswith(".")}
    assert installed_then and all(ex.point_state(out / name)[0] == ex.DONE for name in installed_then)
    waiting = [d for d in (out / ex.PARTIAL).glob("*/*") if ex.point_state(d)[0] == ex.DONE]
    assert waiting  # the point that could not be installed is kept, finished
    monkeypatch.setattr(os, "rename", real_rename)  # writable again (a point still running may finish now)
    again = run()  # the waiting results are installed, not computed again
    assert {r.status for r in again} <= {"SKIPPED", "DONE"}
    assert all(ex.point_state(out / f"x={x}")[0] == ex.DONE for x in (1, 2, 3))
    assert Counter(c["x"] for c in fake_papermill) == {1: 1, 2: 1, 3: 1}  # no point ran twice
    assert {name: (out / name / "run.json").read_text() for name in installed_then} == installed_then
