"""Tests of the sweep command and result store (nbsupport.book.experiments, Chapter 8).

They run a tiny generated notebook (not a chapter: kernels cost ~2 s each) with a parameters cell,
a ``sleep`` and a ``fail`` switch, which records its start/end time and CUDA_VISIBLE_DEVICES and
writes ``metrics.json`` through ``nbsupport.book.notebook``. Concurrency is checked from overlapping
start/end timestamps written by the two kernels, never from wall-clock speed-ups.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from nbsupport.book import experiments as ex

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
extra = None'''

BODY = '''import json, os, time
t0 = time.time()
from nbsupport.book import notebook as nb
# nb.validate + nb.Run = nb.start without seeding torch (keeps this test kernel light)
params = nb.validate(dict(smoke=smoke, seed=seed, device=device, output_dir=output_dir, sleep=sleep, fail=fail,
                          x=x, lr=lr, name=name, modalities=modalities, extra=extra),
                     dict(sleep=nb.Float(min=0), fail=nb.Bool(), x=nb.Int(), lr=nb.Float(), name=nb.Str(),
                          modalities=nb.Modalities(), extra=lambda n, v: v))
run = nb.Run(params=params, device="cpu", output_dir=None if output_dir is None else __import__("pathlib").Path(output_dir))
time.sleep(sleep)
if output_dir:
    nb.atomic_write_json(os.path.join(output_dir, "times.json"),
                         {"start": t0, "end": time.time(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")})
if fail:
    raise RuntimeError("boom on purpose")
run.write_metrics([{"model": "toy", "modalities": "L", "wacc": x * lr},
                   {"model": "toy", "modalities": "LA", "wacc": x * lr / 2, "macs": 10.0 * x}])'''


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
    return [sys.executable, "-m", "nbsupport.book.experiments", *args]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _points(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


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
    (["--shard", "2/2"], "--shard"),
])
def test_bad_parameters_fail_before_anything_runs(toy_nb, tmp_path, capsys, args, word):
    out = tmp_path / "sweep"
    assert ex.main(["run", str(toy_nb), "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert word in err and "error:" in err
    assert not out.exists() or _points(out) == []


def test_type_rules_accept_what_they_should(toy_nb):
    # int for a float, anything for a None default, a list for a list: accepted
    ex.check_parameters(toy_nb, {"lr": 1, "extra": [1, "a"], "x": 3, "fail": True, "name": "b"})
    with pytest.raises(ex.SweepError, match="notebook .* does not exist"):
        ex.check_parameters(toy_nb.with_name("missing.ipynb"), {})


# ------------------------------------------------------------------------------------------------
# Shards, resume bookkeeping and collect with a fake point runner (no kernel)
# ------------------------------------------------------------------------------------------------
def test_shards_partition_points_and_collect_merges(toy_nb, tmp_path, monkeypatch):
    ran = []

    def fake_run_point(point, notebook, out, **kw):
        ran.append(point.name)
        folder = out / point.name
        folder.mkdir(parents=True)
        ex.atomic_write_json(folder / "params.json", point.recorded)
        ex.atomic_write_json(folder / "run.json", {"status": "DONE", "duration_s": 1.0})
        ex.atomic_write_json(folder / "metrics.json", {"parameters": point.params, "results": [
            {"model": "toy", "modalities": "L", "wacc": point.params["x"] * point.params["lr"]}]})
        ex.atomic_write_text(folder / ex.DONE, "ok")
        return ex.PointResult(point.name, "DONE", folder, 1.0)

    monkeypatch.setattr(ex, "_run_point", fake_run_point)
    grid = {"x": [1, 2, 3], "lr": [0.5, 1.0]}
    a = ex.run_sweep(toy_nb, tmp_path / "a", grid=grid, shard="0/2", progress=False)
    b = ex.run_sweep(toy_nb, tmp_path / "b", grid=grid, shard=(1, 2), progress=False)
    names = [p.name for p in ex.expand_grid({}, grid)]
    assert [r.name for r in a] == names[0::2] and [r.name for r in b] == names[1::2]
    again = ex.run_sweep(toy_nb, tmp_path / "a", grid=grid, shard="0/2", progress=False)
    assert {r.status for r in again} == {"SKIPPED"} and len(ran) == 6  # nothing ran twice
    df = ex.collect(tmp_path / "a", tmp_path / "b")
    assert len(df) == 6 and sorted(df["point"]) == sorted(names)
    assert (df["wacc"] == df["x"] * df["lr"]).all()
    assert {"x", "lr", "smoke", "name"} <= set(df.attrs["parameters"])  # notebook defaults recorded too
    # the same folder with other parameters is refused, not silently skipped
    with pytest.raises(ex.SweepError, match="other parameters"):
        ex.run_sweep(toy_nb, tmp_path / "a", params={"name": "b"}, grid=grid, shard="0/2", progress=False)


# ------------------------------------------------------------------------------------------------
# Real papermill runs
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def failing_parallel(toy_nb, tmp_path_factory):
    """One sweep of 2 points on 2 workers with fake GPU ids; one point fails on purpose."""
    out = tmp_path_factory.mktemp("sweep") / "fp"
    proc = subprocess.run(_cli("run", str(toy_nb), "--out", str(out), "-p", "sleep", "1.5", "-p", "x", "2",
                               "--grid", "fail=False,True", "--workers", "2", "--gpus", "7,9", "--no-progress"),
                          capture_output=True, text=True, env=_env(), timeout=120)
    return proc, out


def test_failing_point_keeps_traceback_and_others_finish(failing_parallel):
    proc, out = failing_parallel
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "FAILED" in proc.stdout and "1 failed" in proc.stdout
    assert _points(out) == ["fail=False", "fail=True"]
    ok, bad = out / "fail=False", out / "fail=True"
    assert (ok / ex.DONE).exists() and (ok / "metrics.json").exists() and (ok / "toy.ipynb").exists()
    assert not (bad / ex.DONE).exists()
    run = json.loads((bad / "run.json").read_text())
    assert run["status"] == "FAILED" and "boom on purpose" in run["error"]
    executed = nbformat.read(bad / "toy.ipynb", as_version=4)
    tracebacks = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
    assert tracebacks and tracebacks[0]["evalue"] == "boom on purpose"
    good = json.loads((ok / "run.json").read_text())
    assert good["status"] == "DONE" and good["duration_s"] > 1.5 and "torch" in good["versions"]
    assert "git_commit" in good
    assert json.loads((ok / "params.json").read_text())["x"] == 2


def test_parallel_workers_overlap_and_get_their_own_gpu(failing_parallel):
    _, out = failing_parallel
    t = [json.loads((out / p / "times.json").read_text()) for p in ("fail=False", "fail=True")]
    assert max(x["start"] for x in t) < min(x["end"] for x in t), t  # both kernels were running at once
    assert sorted(x["gpu"] for x in t) == ["7", "9"]


def test_collect_table(failing_parallel):
    _, out = failing_parallel
    df = ex.collect(out)
    assert len(df) == 3  # 2 result rows of the finished point + 1 row for the failed point
    done = df[df["status"] == "DONE"]
    assert list(done["modalities"]) == ["L", "LA"] and list(done["wacc"]) == pytest.approx([0.2, 0.1])
    assert "param_modalities" in df.columns  # parameter renamed where a result key has its name
    assert df.loc[df["status"] == "FAILED", "wacc"].isna().all()
    assert {"x", "fail", "sleep", "duration_s"} <= set(df.columns)
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


def test_resume_after_kill_9_runs_every_point_once(toy_nb, tmp_path):
    out = tmp_path / "resume"
    args = _cli("run", str(toy_nb), "--out", str(out), "-p", "sleep", "2.0", "--grid", "x=1,2,3", "--workers", "1",
                "--no-progress")
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    try:
        # wait until point 1 is finished and point 2 is half-way (its temporary folder exists)
        while time.time() < deadline:
            partial = list((out / ex.PARTIAL).glob("x=2.*")) if (out / ex.PARTIAL).exists() else []
            if (out / "x=1" / ex.DONE).exists() and partial:
                break
            assert proc.poll() is None, "sweep ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("sweep did not reach point 2")
        time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _points(out) == ["x=1"]  # nothing half-done is visible
    first = (out / "x=1" / "run.json").read_text()
    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _points(out) == ["x=1", "x=2", "x=3"]
    assert not (out / ex.PARTIAL).exists()
    assert (out / "x=1" / "run.json").read_text() == first  # finished point not re-run
    assert "SKIPPED" in done.stdout
    for x in (1, 2, 3):
        folder = out / f"x={x}"
        assert (folder / ex.DONE).exists()
        assert json.loads((folder / "metrics.json").read_text())["parameters"]["x"] == x
    df = ex.collect(out)
    assert sorted(df["x"].unique()) == [1, 2, 3] and len(df) == 6


def test_chapter_helpers(tmp_path, monkeypatch):
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
    params, grid = {"smoke": True, "name": "LA", "lr": 0.5}, {"top_p": [0.3, 1.0], "modalities": ["LAV", "LA"]}
    import shlex

    argv = shlex.split(ex.command_line("nb.ipynb", "out dir", params, grid, workers=2))[3:]
    a = ex._build_parser().parse_args(argv)
    assert a.out == "out dir" and a.workers == 2
    assert {k: ex.parse_value(v) for k, v in a.parameter} == params
    assert dict(ex.parse_grid_option(g) for g in a.grid) == grid
    # ... and through the real entry point to the same workers and GPUs as the Python call
    seen = {}
    monkeypatch.setattr(ex, "run_sweep", lambda notebook, out, **kw: seen.update(kw) or [])
    for workers, gpus, ids in [(1, "0,1", ["0", "1"]), (2, ["0", "1"], ["0", "1"]), (3, None, []), (1, None, []),
                               (1, "5", ["5"])]:
        assert ex.main(shlex.split(ex.command_line("nb.ipynb", "o", workers=workers, gpus=gpus))[3:]) == 0
        assert (seen["workers"], seen["gpus"]) == (workers, ids), (workers, gpus, seen)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book").mkdir()
    make_notebook(tmp_path / "book" / "toy.ipynb")
    assert ex.find_notebook("toy.ipynb") == (tmp_path / "book" / "toy.ipynb").resolve()
    with pytest.raises(ex.SweepError, match="'nope.ipynb' not found"):
        ex.find_notebook("nope.ipynb")
