"""Notebook harness shared by the tests: discovers the book's notebooks from _toc.yml, runs each once
headless with papermill (smoke=True) and builds a fast HTML book from those executed copies."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
SMOKE_WORKERS = int(os.environ.get("NB_SMOKE_WORKERS", "2"))


def _toc_files(node) -> list[str]:
    files = []
    if isinstance(node, dict):
        if "file" in node:
            files.append(node["file"])
        if "root" in node:
            files.append(node["root"])
        for key in ("chapters", "sections", "parts"):
            for child in node.get(key, []) or []:
                files.extend(_toc_files(child))
    elif isinstance(node, list):
        for child in node:
            files.extend(_toc_files(child))
    return files


def toc_notebooks() -> list[Path]:
    """Every .ipynb listed in _toc.yml, in book order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    paths = []
    for f in _toc_files(toc):
        p = ROOT / f
        if p.suffix == "":
            p = p.with_suffix(".ipynb") if p.with_suffix(".ipynb").exists() else p.with_suffix(".md")
        if p.suffix == ".ipynb":
            paths.append(p)
    return paths


NOTEBOOKS = toc_notebooks()

#: The slow tiers (pyproject.toml's markers; `make test-fast` deselects them): a test that uses one of
#: these fixtures, directly or through another fixture, gets the tiers' markers here, so a new test on
#: the smoke runs can never land in the fast tier by a forgotten decorator.
TIERS_OF_FIXTURE = {"smoke_runs": ("notebook",), "smoke_book": ("notebook",),
                    "site": ("browser", "notebook"),  # tests/test_browser.py: the smoke-built book
                    "jupyterlab": ("browser",), "local_sweep": ("cluster",), "dask_cluster": ("cluster",),
                    "stop_runs": ("notebook",)}
SLOW_TIERS = ("notebook", "browser", "cluster", "fuzz", "slow")


#: Fixtures that read the shared smoke runs (``site``: unless $NBSUPPORT_BOOK_HTML names a built book).
SMOKE_FIXTURES = ("smoke_runs", "smoke_book", "site")


def _needs_smoke_runs(item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    if os.environ.get("NBSUPPORT_BOOK_HTML"):
        names.discard("site")
    return bool(names & set(SMOKE_FIXTURES))


def _needs_stop_runs(item) -> bool:
    return "stop_runs" in getattr(item, "fixturenames", ())


def _reads_background(item) -> bool:
    """True for a test on work that runs in the background (:func:`_background`, :func:`_background_stops`)."""
    return _needs_smoke_runs(item) or _needs_stop_runs(item)


#: Tiers whose tests mostly wait (sleeping sweep points, cluster start-ups, a fuzzer bounded in time): they
#: run first, while the background runs keep both cores busy.
WAITING_TIERS = ("cluster", "fuzz")


def _order(item) -> int:
    """0: a test that mostly waits; 1: any other; 2: a test on the background runs (they run last)."""
    if _reads_background(item):
        return 2
    markers = {m.name for m in getattr(item, "iter_markers", lambda: ())()}
    return 0 if markers & set(WAITING_TIERS) else 1


def pytest_collection_modifyitems(config, items):
    """Mark every test by the tiers of the fixtures it uses (see ``TIERS_OF_FIXTURE``), and order them
    (stable, see :func:`_order`): the papermill runs start in the background when collection ends
    (:func:`pytest_collection_finish`), the tests that mostly wait run beside them first, and the tests
    that read them run last, when they are done."""
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            for tier in TIERS_OF_FIXTURE.get(name, ()):
                item.add_marker(getattr(pytest.mark, tier))
    items.sort(key=_order)


def pytest_collection_finish(session):
    """Start the chapters' smoke runs and then the smoke book build in the background, once, when a
    selected test reads them: on 2 cores the papermill kernels use the cores the rest of the suite
    leaves idle (it runs one test at a time). Nothing starts under ``--collect-only``."""
    if session.config.option.collectonly:
        return
    if any(_needs_smoke_runs(item) for item in session.items):
        _background(session.config._tmp_path_factory)
    if any(_needs_stop_runs(item) for item in session.items):
        _background_stops(session.config._tmp_path_factory)


def pytest_sessionfinish(session):
    """Cancel the smoke runs that have not started (an interrupted or failed-fast session)."""
    if "pool" in _BACKGROUND:
        _BACKGROUND["pool"].shutdown(wait=False, cancel_futures=True)


@dataclass
class SmokeRun:
    notebook: Path
    executed: Path
    output_dir: Path
    seconds: float
    error: str | None


def run_papermill(notebook: Path, executed: Path, parameters: dict, env_extra: dict | None = None,
                  timeout: int = 900) -> tuple[float, str | None]:
    """Run ``notebook`` with papermill in a subprocess (kernel cwd = book/); return (seconds, error text or None)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(executed), "--cwd", str(notebook.parent),
           "--kernel", "python3", "--no-progress-bar"]
    for k, v in parameters.items():
        if isinstance(v, (list, dict)):  # papermill's -p would hand the chapter a string
            cmd += ["-y", json.dumps({k: v})]
        else:
            cmd += ["-p", k, str(v)] if not isinstance(v, str) else ["-r", k, v]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    seconds = time.perf_counter() - start
    return seconds, None if proc.returncode == 0 else (proc.stdout[-4000:] + proc.stderr[-8000:])


#: The background work of :func:`_background`: the pool, a future per smoke run, the book build's future.
_BACKGROUND: dict = {}


def _smoke_run(nb: Path, base: Path) -> SmokeRun:
    out = base / nb.stem
    out.mkdir()
    executed = base / f"{nb.stem}.executed.ipynb"
    seconds, error = run_papermill(nb, executed, {"smoke": True, "output_dir": str(out)})
    return SmokeRun(nb, executed, out, seconds, error)


def _build_smoke_book(runs: dict[str, SmokeRun], site: Path) -> tuple[Path | None, str | None]:
    """The HTML book built (execution off) from the smoke-executed notebooks: ``(_build/html copy, error)``."""
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, site / name)
    shutil.copytree(BOOK, site / "book", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for run in runs.values():
        if run.error is None:
            shutil.copy(run.executed, site / "book" / run.notebook.name)
    cfg = yaml.safe_load((site / "_config.yml").read_text())
    cfg.setdefault("execute", {})["execute_notebooks"] = "off"
    (site / "_config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(site),
                           "--warningiserror", "--keep-going"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return None, f"jupyter-book build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    artifacts = ROOT / "_build" / "smoke-html"
    shutil.rmtree(artifacts, ignore_errors=True)
    shutil.copytree(site / "_build" / "html", artifacts)
    return artifacts, None


def _pool() -> ThreadPoolExecutor:
    """The background papermill runs, ``SMOKE_WORKERS`` at a time, first submitted first run."""
    if "pool" not in _BACKGROUND:
        _BACKGROUND["pool"] = ThreadPoolExecutor(SMOKE_WORKERS, thread_name_prefix="notebooks")
    return _BACKGROUND["pool"]


def _background(tmp_path_factory) -> dict:
    """Every notebook of the book run once with smoke=True, ``SMOKE_WORKERS`` at a time, then the book
    built from them, all in background threads (each run is a papermill subprocess); started once."""
    if "runs" not in _BACKGROUND:
        base, site = tmp_path_factory.mktemp("smoke"), tmp_path_factory.mktemp("site")
        pool = _pool()
        runs = {nb.stem: pool.submit(_smoke_run, nb, base) for nb in NOTEBOOKS}

        def book():  # after the last run; a thread of its own, so it never waits for a pool slot
            return _build_smoke_book({k: f.result() for k, f in runs.items()}, site)

        book_pool = ThreadPoolExecutor(1, thread_name_prefix="smoke-book")
        _BACKGROUND.update(runs=runs, book=book_pool.submit(book), book_pool=book_pool)
    return _BACKGROUND


#: Runs that must stop in their opening cells (tests/test_notebooks.py): (notebook stem, case) -> the
#: papermill parameters; "seed": a wrong type, "typo": a misspelled name.
STOP_CASES = {**{(nb.stem, "seed"): {"smoke": True, "seed": "notanumber"} for nb in NOTEBOOKS},
              **{(nb.stem, "typo"): {"smoke": True, "epoch": 5} for nb in NOTEBOOKS
                 if nb.stem in ("01_attention_basics", "06_mesm")}}


def _stop_run(nb: Path, parameters: dict, executed: Path) -> tuple[Path, str | None]:
    return executed, run_papermill(nb, executed, parameters)[1]


def _background_stops(tmp_path_factory) -> dict:
    """The :data:`STOP_CASES` runs in the background pool, after the smoke runs; started once."""
    if "stops" not in _BACKGROUND:
        base, by_stem = tmp_path_factory.mktemp("stops"), {nb.stem: nb for nb in NOTEBOOKS}
        _BACKGROUND["stops"] = {(stem, case): _pool().submit(_stop_run, by_stem[stem], params,
                                                             base / f"{stem}-{case}.ipynb")
                                for (stem, case), params in STOP_CASES.items()}
    return _BACKGROUND


@pytest.fixture(scope="session")
def stop_runs(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, str | None]]:
    """``(stem, case) -> (executed notebook, papermill's error text or None)`` of :data:`STOP_CASES`."""
    return {key: f.result() for key, f in _background_stops(tmp_path_factory)["stops"].items()}


def only_parameters_of(notebook: Path, parameters: dict) -> dict:
    """The entries of ``parameters`` that ``notebook``'s parameters cell defines: a test that switches
    off work it does not check (e.g. a bug cost over seeds) keeps running when a chapter drops a switch."""
    nb = json.loads(notebook.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    names = {line.split("=", 1)[0].strip() for line in "".join(cell["source"]).splitlines()
             if "=" in line and not line.startswith((" ", "#"))}
    return {k: v for k, v in parameters.items() if k in names}


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> dict[str, SmokeRun]:
    """Every notebook of the book executed once with smoke=True, two at a time (started in the
    background when collection ends, see :func:`pytest_collection_finish`)."""
    runs = {stem: f.result() for stem, f in _background(tmp_path_factory)["runs"].items()}
    for r in runs.values():
        print(f"smoke run {r.notebook.name}: {r.seconds:.1f} s{' FAILED' if r.error else ''}")
    return runs


@pytest.fixture(scope="session")
def smoke_book(smoke_runs, tmp_path_factory) -> Path:
    """The HTML book built (execution off) from the smoke-executed notebooks; returns _build/html."""
    path, error = _background(tmp_path_factory)["book"].result()
    if error:
        pytest.fail(error)
    return path


# ---------------------------------------------------------------------------------------------
# System programs the README does not require: skip locally, fail in CI
# ---------------------------------------------------------------------------------------------
def in_ci() -> bool:
    """True when the ``CI`` environment variable is set (``.ci/run`` sets ``CI=true``)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason`` (which names the Debian package to install); fail instead when
    ``CI`` is set, so a CI machine that lacks the package cannot pass by skipping."""
    if in_ci():
        pytest.fail(f"CI is set but this test cannot run: {reason}")
    pytest.skip(reason)


def require_program(program: str, package: str) -> str:
    """Path of the system ``program`` (from Debian's ``package``); skip locally or fail in CI without it."""
    path = shutil.which(program)
    if path is None:
        skip_or_fail(f"{program} not installed (apt-get install {package}; .ci/run installs it)")
    return path

