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
                    "jupyterlab": ("browser",), "local_sweep": ("cluster",), "dask_cluster": ("cluster",)}
SLOW_TIERS = ("notebook", "browser", "cluster", "fuzz", "slow")


#: Fixtures that read the shared smoke runs (``site``: unless $NBSUPPORT_BOOK_HTML names a built book).
SMOKE_FIXTURES = ("smoke_runs", "smoke_book", "site")


def _needs_smoke_runs(item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    if os.environ.get("NBSUPPORT_BOOK_HTML"):
        names.discard("site")
    return bool(names & set(SMOKE_FIXTURES))


def pytest_collection_modifyitems(config, items):
    """Mark every test by the tiers of the fixtures it uses (see ``TIERS_OF_FIXTURE``), and move the
    tests on the smoke runs to the end (in their order): the runs start in the background when
    collection ends (:func:`pytest_collection_finish`), so every other test runs beside them and
    those tests rarely wait."""
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            for tier in TIERS_OF_FIXTURE.get(name, ()):
                item.add_marker(getattr(pytest.mark, tier))
    items.sort(key=_needs_smoke_runs)  # stable: False (runs now) before True (reads the smoke runs)


def pytest_collection_finish(session):
    """Start the chapters' smoke runs and then the smoke book build in the background, once, when a
    selected test reads them: on 2 cores the papermill kernels use the cores the rest of the suite
    leaves idle (it runs one test at a time)."""
    if any(_needs_smoke_runs(item) for item in session.items):
        _background(session.config._tmp_path_factory)


def pytest_sessionfinish(session):
    """Cancel the smoke runs that have not started (an interrupted or failed-fast session)."""
    if _BACKGROUND:
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


def _background(tmp_path_factory) -> dict:
    """Every notebook of the book run once with smoke=True, ``SMOKE_WORKERS`` at a time, then the book
    built from them, all in background threads (each run is a papermill subprocess); started once."""
    if not _BACKGROUND:
        base, site = tmp_path_factory.mktemp("smoke"), tmp_path_factory.mktemp("site")
        pool = ThreadPoolExecutor(SMOKE_WORKERS, thread_name_prefix="smoke")
        runs = {nb.stem: pool.submit(_smoke_run, nb, base) for nb in NOTEBOOKS}

        def book():  # after the last run; a thread of its own, so it never waits for a pool slot
            return _build_smoke_book({k: f.result() for k, f in runs.items()}, site)

        book_pool = ThreadPoolExecutor(1, thread_name_prefix="smoke-book")
        _BACKGROUND.update(pool=pool, runs=runs, book=book_pool.submit(book), book_pool=book_pool)
    return _BACKGROUND


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

