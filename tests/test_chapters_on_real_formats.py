"""Chapters 3, 4 and 7 run on data in the forms researchers hold (issue: real data), headless with papermill.

The small files are written by the writers of ``tests/test_formats.py`` with the authors' key structure
(an MMSA ``unaligned_50.pkl``, a MulT ``mosei_senti_data.pkl``, a folder of CMU-SDK ``.csd``
sequences); each chapter then runs its smoke path
on them with ``-p data_root <file> -p data_format <form>`` and must write its metrics.
"""
import json

import numpy as np
import pytest

from conftest import BOOK, only_parameters_of, run_papermill
from test_formats import SIZES, _mmsa_split, _mult_data, _write_mult, csd  # noqa: F401 (csd: a fixture)

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
    # chapter 4's bug cost over seeds trains the same model on the same loaders again: its shared smoke
    # run checks it (tests/conftest.py); here the form is the point
    params.update(only_parameters_of(BOOK / f"{chapter}.ipynb", {"bug_cost_seeds": []}))
    _, error = run_papermill(BOOK / f"{chapter}.ipynb", tmp_path / "executed.ipynb", params)
    assert error is None, error[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parameters"]["data_format"] == form
    main = {"sentiment7": "acc7", "sentiment2": "acc2"}[task]
    assert all(0.0 <= row[main] <= 1.0 for row in metrics["results"])


def test_chapter_7_two_phase_models_on_cmu_sdk_sequences(csd, tmp_path):
    folder, _ = csd
    out = tmp_path / "out"
    params = {"smoke": True, "data_root": str(folder), "data_format": "csd", "output_dir": str(out)}
    _, error = run_papermill(BOOK / "07_two_phase_vs_end_to_end.ipynb", tmp_path / "executed.ipynb", params)
    assert error is None, error[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["model"] for r in metrics["results"]] == ["LF-LSTM", "LF-Transformer", "MulT"]  # no raw frames
    assert metrics["emotions"] == ["anger", "disgust", "fear", "happy", "sad", "surprise"]


def test_chapter_3_on_mult_iemocap_keeps_iemocaps_emotion_names(tmp_path):
    """The dataset parameter carries IEMOCAP through papermill; its emotions keep their own names."""
    data = _write_mult(tmp_path / "iemocap_data.pkl", _mult_data(np.random.default_rng(2), iemocap=True))
    out = tmp_path / "out"
    params = {"smoke": True, "data_root": str(data), "dataset": "iemocap", "sentiment_task": "",
              "output_dir": str(out)}
    _, error = run_papermill(BOOK / "03_umons_monomodal.ipynb", tmp_path / "executed.ipynb", params)
    assert error is None, error[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parameters"]["dataset"] == "iemocap"
    assert metrics["emotions"] == ["ang", "hap", "neu", "sad"]  # MulT's four, in the book's order
