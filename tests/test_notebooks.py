"""Every notebook in _toc.yml: the Design page's conventions, a headless smoke run, parameter validation, the book build."""
import json

import nbformat
import pytest

from conftest import NOTEBOOKS, ROOT
from nbsupport.book.notebook import check_metrics

IDS = [nb.stem for nb in NOTEBOOKS]
REQUIRED = {"smoke": False, "seed": 0, "device": "auto", "output_dir": None}


def test_toc_lists_notebooks():
    assert NOTEBOOKS, "_toc.yml lists no notebook"
    for nb in NOTEBOOKS:
        assert nb.exists(), f"{nb} listed in _toc.yml does not exist"


def _parameters_cell(nb):
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    return code, tagged


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_conventions(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.lstrip().startswith("# "), \
        f"{path.name}: first cell must be the title"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, \
                f"{path.name}: cell {i} is committed with outputs"
    code, tagged = _parameters_cell(nb)
    assert len(tagged) == 1 and tagged[0] is code[0], f"{path.name}: the first code cell must be tagged 'parameters'"
    namespace = {}
    exec(compile(tagged[0].source, f"{path.name}:parameters", "exec"), namespace)  # plain literals only
    for name, default in REQUIRED.items():
        assert name in namespace, f"{path.name}: parameter '{name}' missing"
        assert namespace[name] == default, f"{path.name}: parameter '{name}' should default to {default!r}"
    assert f'nb.start("{path.stem}", globals())' in code[1].source, \
        f"{path.name}: the cell after the parameters must be the one-call opening nb.start(\"{path.stem}\", globals())"
    for cell in code[:2]:
        assert "hide-cell" in cell.metadata.get("tags", []), f"{path.name}: set-up cells are collapsed (hide-cell)"
    later = [i for i, c in enumerate(code[2:], 2) if any(line.startswith(("import ", "from "))
                                                         for line in c.source.splitlines())]
    assert not later, f"{path.name}: imports belong in the opening cell, found in code cell(s) {later}"
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "## Summary" in text and "## Exercises" in text, f"{path.name}: must end with Summary and Exercises"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_smoke_run_writes_metrics(path, smoke_runs):
    run = smoke_runs[path.stem]
    assert run.error is None, f"{path.name} failed under papermill:\n{run.error}"
    metrics = json.loads((run.output_dir / "metrics.json").read_text())
    check_metrics(metrics)
    assert metrics["parameters"]["smoke"] is True
    for fig in metrics.get("figures", []):
        assert (run.output_dir / fig).stat().st_size > 0


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_wrong_parameter_stops_early_with_clear_message(path, stop_runs):
    executed, error = stop_runs[path.stem, "seed"]  # papermill with seed="notanumber" (conftest.STOP_CASES)
    assert error is not None, f"{path.name} accepted seed='notanumber'"
    assert "ParameterError" in error and "'seed'" in error and "integer" in error, error[-2000:]
    nb = nbformat.read(executed, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    failed = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert failed and failed[0] <= 2, f"{path.name}: the bad parameter must stop the notebook in its first cells"
    assert all(c.get("execution_count") is None for c in code[failed[0] + 1:]), "work ran after the bad parameter"


@pytest.mark.notebook
@pytest.mark.parametrize("path", [nb for nb in NOTEBOOKS if nb.stem in ("01_attention_basics", "06_mesm")],
                         ids=["01_attention_basics", "06_mesm"])
def test_misspelled_parameter_stops_with_the_closest_name(path, stop_runs):
    executed, error = stop_runs[path.stem, "typo"]  # papermill with epoch=5 (conftest.STOP_CASES)
    assert error is not None, f"{path.name} accepted the misspelled parameter 'epoch'"
    assert "unknown parameter 'epoch' (did you mean 'epochs'?)" in error, error[-2000:]
    code = [c for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code"]
    assert all(c.get("execution_count") is None for c in code[3:]), "work ran after the misspelled parameter"


def test_book_builds_from_smoke_runs(smoke_book):
    assert (smoke_book / "index.html").exists() or (smoke_book / "book" / "intro.html").exists()
    for nb in NOTEBOOKS:
        page = smoke_book / nb.relative_to(ROOT).with_suffix(".html")
        assert page.exists(), f"{page} missing from the built book"
        html = page.read_text()
        assert "Traceback" not in html and 'class="output error"' not in html, f"{page.name} shows an error"
        assert "<img" in html, f"{page.name} shows no figure"
