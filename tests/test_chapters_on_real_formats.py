"""Chapters 3 and 4 run on data in the forms researchers hold (issue: real data), headless with papermill.

The small files are written by the writers of ``tests/test_formats.py`` with the authors' key structure
(an MMSA ``unaligned_50.pkl``, a MulT ``mosei_senti_data.pkl``); each chapter then runs its smoke path
on them with ``-p data_root <file> -p data_format <form>`` and must write its metrics.
"""
import json

import numpy as np
import pytest

from conftest import BOOK, run_papermill
from test_formats import SIZES, _mmsa_split, _mult_data, _write_mult

pytestmark = pytest.mark.notebook


def _write_mmsa(folder):
    import pickle

    rng = np.random.default_rng(0)
    path = folder / "unaligned_50.pkl"
    path.write_bytes(pickle.dumps({s: _mmsa_split(rng, n, s) for s, n in SIZES.items()}, protocol=4))
    return path


@pytest.mark.parametrize("chapter, form, task", [("03_umons_monomodal", "mmsa", "sentiment7"),
                                                 ("04_umons_multimodal", "mult", "sentiment2")])
def test_chapter_runs_on_a_real_format(chapter, form, task, tmp_path):
    if form == "mmsa":
        data = _write_mmsa(tmp_path)
    else:
        data = _write_mult(tmp_path / "mosei_senti_data.pkl", _mult_data(np.random.default_rng(3), iemocap=False))
    out = tmp_path / "out"
    params = {"smoke": True, "data_root": str(data), "data_format": form, "task": task, "output_dir": str(out)}
    if chapter == "03_umons_monomodal":
        params["sentiment_task"] = ""
    _, error = run_papermill(BOOK / f"{chapter}.ipynb", tmp_path / "executed.ipynb", params)
    assert error is None, error[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parameters"]["data_format"] == form
    main = {"sentiment7": "acc7", "sentiment2": "acc2"}[task]
    assert all(0.0 <= row[main] <= 1.0 for row in metrics["results"])
