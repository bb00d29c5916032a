"""The travel check of issue #28 (benchmarks/verdicts_travel.py, nbsupport.book.travel): every verdict of
chapters 4, 6, 7 and 8 must read the same when the chapters are built under another CPU thread count."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from nbsupport.book import travel

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("verdicts_travel", ROOT / "benchmarks" / "verdicts_travel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _verdict(decision, sentence=None):
    return {"a": "LAV", "b": "LA", "decision": decision, "sentence": sentence or f"{decision} reads so.",
            "value": 0.01, "low": -0.02, "high": 0.04, "n_seeds": 5, "per_seed": []}


def _write(build: Path, chapter: str, verdicts: dict) -> None:
    (build / chapter).mkdir(parents=True, exist_ok=True)
    (build / chapter / "metrics.json").write_text(json.dumps({"parameters": {}, "results": [{}],
                                                             "seed_verdicts": verdicts}))


def test_compare_builds_flags_a_flipped_or_missing_decision(tmp_path, capsys):
    a, b = tmp_path / "threads1", tmp_path / "threads2"
    _write(a, "04_umons_multimodal", {"vision_gain": _verdict("undecided"), "fusion_gain": _verdict("LAV")})
    _write(b, "04_umons_multimodal", {"vision_gain": _verdict("undecided", "other numbers, same verdict"),
                                      "fusion_gain": _verdict("undecided")})  # flips
    _write(a, "08_experiments", {"top_p_effect": _verdict("top_p=1.0")})
    _write(b, "08_experiments", {})  # missing in the second build
    rows = travel.compare_builds(a, b)
    assert [(r["chapter"], r["key"], r["same"]) for r in rows] == [
        ("04_umons_multimodal", "fusion_gain", False), ("04_umons_multimodal", "vision_gain", True),
        ("08_experiments", "top_p_effect", False)]
    assert set(rows[0]) == {"chapter", "key", "decision@1", "decision@2", "sentence@1", "sentence@2", "same"}
    assert (rows[0]["decision@1"], rows[0]["decision@2"]) == ("LAV", "undecided")
    assert rows[1]["sentence@2"] == "other numbers, same verdict" and rows[2]["decision@2"] is None
    # the command line: table files, and exit code 1 when a verdict reads differently
    out = tmp_path / "report"
    assert _script().main(["--out", str(out), "--compare", str(a), str(b)]) == 1
    data = json.loads((out / "verdicts_travel.json").read_text())
    assert data["all_same"] is False and len(data["rows"]) == 3
    md = (out / "verdicts_travel.md").read_text()
    assert "| 04_umons_multimodal | fusion_gain | LAV | undecided |" in md and "**no**" in md
    # the same decisions (numbers may differ): exit code 0
    _write(b, "04_umons_multimodal", {"vision_gain": _verdict("undecided"), "fusion_gain": _verdict("LAV", "x")})
    _write(b, "08_experiments", {"top_p_effect": _verdict("top_p=1.0")})
    assert _script().main(["--out", str(out), "--compare", str(a), str(b)]) == 0
    assert json.loads((out / "verdicts_travel.json").read_text())["all_same"] is True


def test_read_verdicts_needs_a_decision(tmp_path):
    _write(tmp_path, "04_umons_multimodal", {"fusion_gain": {"sentence": "no decision"}})
    with pytest.raises(ValueError, match="fusion_gain.*decision"):
        travel.read_verdicts(tmp_path / "04_umons_multimodal" / "metrics.json")
    assert travel.read_verdicts(tmp_path / "missing.json") == {}


@pytest.mark.slow
def test_run_chapter_sets_the_kernels_threads_and_chapter_8s_threads_parameter(tmp_path):
    """The kernel of each build runs under the build's thread count (PyTorch's pool and the thread
    variables), and chapter 8's own ``threads`` parameter (its sweep points' threads) follows it."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("smoke = False\noutput_dir = None\nthreads = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json, os, pathlib, torch\n"
        "pathlib.Path(output_dir, 'metrics.json').write_text(json.dumps({'torch': torch.get_num_threads(), "
        "'omp': os.environ['OMP_NUM_THREADS'], 'mkl': os.environ['MKL_NUM_THREADS'], 'param': threads, "
        "'smoke': smoke}))")]
    notebook = tmp_path / "book" / "08_experiments.ipynb"
    notebook.parent.mkdir()
    nbformat.write(nb, notebook)
    run = travel.run_chapter(notebook, tmp_path / "out", 2, smoke=True)
    assert run["error"] is None
    seen = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert seen == {"torch": 2, "omp": "2", "mkl": "2", "param": 2, "smoke": True}


@pytest.mark.slow
def test_travel_script_compares_chapter_4_built_under_two_threads_with_the_smoke_run(smoke_runs, tmp_path):
    """End to end at smoke size: the shared smoke run of chapter 4 (one thread, tests/conftest.py) is the
    first build, the script builds chapter 4 again under 2 threads, and the table compares every decision."""
    first = smoke_runs["04_umons_multimodal"]
    assert first.error is None, first.error
    out = tmp_path / "travel"
    rc = _script().main(["--out", str(out), "--smoke", "--chapters", "04_umons_multimodal",
                         "--build-a", str(first.output_dir.parent)])
    data = json.loads((out / "verdicts_travel.json").read_text())
    assert data["runs"]["2"]["04_umons_multimodal"]["error"] is None and "1" not in data["runs"]
    assert {r["key"] for r in data["rows"]} == {"fusion_gain", "vision_gain", "video_mask_bug"}
    for r in data["rows"]:
        assert r["decision@1"] is not None and r["decision@2"] is not None
        assert r["same"] == (r["decision@1"] == r["decision@2"])
    assert rc == (0 if data["all_same"] else 1)
    assert (out / "threads2" / "04_umons_multimodal" / "04_umons_multimodal.ipynb").is_file()
