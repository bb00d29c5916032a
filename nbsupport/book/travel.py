"""Do the book's verdicts travel to another machine? Build the chapters under two CPU thread counts and
compare every verdict (issue #28; ``benchmarks/verdicts_travel.py`` is the command line).

Inside one machine training is deterministic, so a second build there proves nothing. Across machines
the last digits of floating-point sums differ (instruction sets, library kernels) and training takes
another path. Changing the number of CPU threads changes the summation order of PyTorch's kernels in
the same way, on one machine: each chapter is run with papermill under ``threads_a`` and ``threads_b``
threads (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``, as :mod:`nbsupport.book.sweep_run` sizes a sweep
point's kernel; PyTorch's intra-op pool reads ``OMP_NUM_THREADS``), and every entry of each
``metrics.json``'s ``seed_verdicts`` is compared by its ``decision``: the numbers may differ, the
decision must not. Chapter 8's sweep points run with its own ``threads`` parameter (fixed so that
points reproduce), so that parameter is set to the build's thread count too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from nbsupport.base import atomic_write, atomic_write_json

from .sweep_run import THREAD_VARIABLES

__all__ = ["CHAPTERS", "read_verdicts", "compare_builds", "markdown_table", "run_chapter", "build",
           "write_report"]

#: The chapters whose method verdicts are decided across seeds (``seed_verdicts`` in metrics.json).
CHAPTERS = ("04_umons_multimodal", "06_mesm", "07_two_phase_vs_end_to_end", "08_experiments")
#: Chapters whose own parameter sizes a part of the build's CPU threads (Chapter 8's sweep points).
THREAD_PARAMETER = {"08_experiments": "threads"}


def read_verdicts(metrics_path: str | os.PathLike) -> dict[str, dict]:
    """``{key: {"decision", "sentence"}}`` from one chapter's ``metrics.json`` (its ``seed_verdicts``).

    A missing file or a file without ``seed_verdicts`` gives ``{}``; an entry without a string
    ``decision`` is a :class:`ValueError` naming the file and the key."""
    path = Path(metrics_path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    verdicts = data.get("seed_verdicts") or {}
    if not isinstance(verdicts, Mapping):
        raise ValueError(f"{path}: field 'seed_verdicts' must be an object, got {type(verdicts).__name__}")
    out = {}
    for key, v in verdicts.items():
        if not isinstance(v, Mapping) or not isinstance(v.get("decision"), str):
            raise ValueError(f"{path}: seed_verdicts[{key!r}] needs a string 'decision' (one of the two names "
                             f"or 'undecided')")
        out[str(key)] = {"decision": v["decision"], "sentence": str(v.get("sentence", ""))}
    return out


def compare_builds(build_a: str | os.PathLike, build_b: str | os.PathLike,
                   chapters: Sequence[str] = CHAPTERS, labels: Sequence[str] = ("1", "2")) -> list[dict]:
    """One row per (chapter, verdict key) found in either build (``<build>/<chapter>/metrics.json``):
    ``chapter``, ``key``, ``decision@<label>``, ``sentence@<label>`` for both builds and ``same``
    (both decisions present and equal; a verdict missing from one build is not the same)."""
    la, lb = labels
    rows = []
    for chapter in chapters:
        va = read_verdicts(Path(build_a) / chapter / "metrics.json")
        vb = read_verdicts(Path(build_b) / chapter / "metrics.json")
        for key in sorted(set(va) | set(vb)):
            a, b = va.get(key, {}), vb.get(key, {})
            rows.append({"chapter": chapter, "key": key,
                         f"decision@{la}": a.get("decision"), f"decision@{lb}": b.get("decision"),
                         f"sentence@{la}": a.get("sentence"), f"sentence@{lb}": b.get("sentence"),
                         "same": a.get("decision") is not None and a.get("decision") == b.get("decision")})
    return rows


def markdown_table(rows: Sequence[Mapping], labels: Sequence[str] = ("1", "2")) -> str:
    """The comparison as a markdown table (``|`` in a sentence escaped)."""
    cols = ["chapter", "key", *(f"decision@{x}" for x in labels), *(f"sentence@{x}" for x in labels), "same"]
    cell = lambda v: "yes" if v is True else "**no**" if v is False else str(v or "").replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_chapter(notebook: str | os.PathLike, out_dir: str | os.PathLike, threads: int, *, smoke: bool = False,
                parameters: Mapping | None = None, timeout: int = 3600) -> dict:
    """Run one chapter with papermill in a fresh kernel under ``threads`` CPU threads, writing its
    ``metrics.json`` (and executed notebook) into ``out_dir``. Returns ``{"seconds", "error"}``."""
    notebook, out_dir = Path(notebook), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARIABLES}, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    params = {"smoke": smoke, "output_dir": str(out_dir), **(parameters or {})}
    if notebook.stem in THREAD_PARAMETER:
        params.setdefault(THREAD_PARAMETER[notebook.stem], threads)
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(out_dir / f"{notebook.stem}.ipynb"),
           "--cwd", str(notebook.parent), "--kernel", "python3", "--no-progress-bar"]
    for k, v in params.items():
        cmd += ["-r", k, v] if isinstance(v, str) else ["-y", json.dumps({k: v})]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    seconds = round(time.perf_counter() - start, 1)
    return {"seconds": seconds, "error": None if proc.returncode == 0 else (proc.stderr or proc.stdout)[-4000:]}


def build(book_dir: str | os.PathLike, out: str | os.PathLike, threads: int, chapters: Sequence[str] = CHAPTERS,
          *, smoke: bool = False, parameters: Mapping[str, Mapping] | None = None) -> dict:
    """Run ``chapters`` of ``book_dir`` one after the other under ``threads`` threads into
    ``out/<chapter>/``; ``parameters[chapter]`` adds papermill parameters. Returns ``{chapter: run}``."""
    return {c: run_chapter(Path(book_dir) / f"{c}.ipynb", Path(out) / c, threads, smoke=smoke,
                           parameters=(parameters or {}).get(c)) for c in chapters}


def write_report(out: str | os.PathLike, rows: Sequence[Mapping], runs: Mapping | None = None,
                 labels: Sequence[str] = ("1", "2")) -> tuple[Path, Path]:
    """``verdicts_travel.json`` (rows, runs, ``all_same``) and ``verdicts_travel.md`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"labels": list(labels), "rows": list(rows), "runs": dict(runs or {}),
            "all_same": all(r["same"] for r in rows)}
    md = markdown_table(rows, labels)
    return (atomic_write_json(out / "verdicts_travel.json", data),
            atomic_write(out / "verdicts_travel.md", lambda fh: fh.write(md)))
