"""The page "Reproducing the papers": every recipe's preset trains with its authors' protocol, a sweep over
seeds runs through the same Dask sweep runner as the chapters, and the comparison table is computed from
the points (nbsupport.book.reproduce)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from nbsupport.book import experiments as ex
from nbsupport.book import reproduce
from nbsupport.data import ensure_corpus
from nbsupport.evidence import seed_interval
from test_formats import SIZES, _mult_data, _write_mult

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
POINT = ROOT / "benchmarks" / "reproduce_point.ipynb"


def _write_umons_pickles(folder, seed=0):
    """UMONS's pre-extracted pickles ({split}_sentences/_mels/_emotion/_sentiment.p), as its code reads them."""
    rng = np.random.default_rng(seed)
    words = ["i", "am", "so", "happy", "sad", "angry", "today", "really"]
    for split, n in SIZES.items():
        ids = [f"{split}{i}_0" for i in range(n)]
        data = {"sentences": {u: list(rng.choice(words, 3 + i % 4)) for i, u in enumerate(ids)},
                "mels": {u: rng.normal(size=(6 + i % 5, 80)) for i, u in enumerate(ids)},
                "emotion": {u: [float(v) for v in rng.integers(0, 2, 6)] for u in ids},
                "sentiment": {u: float(rng.uniform(-3, 3)) for u in ids}}
        for k, v in data.items():
            (folder / f"{split}_{k}.p").write_bytes(pickle.dumps(v))
    return folder


def test_recipes_name_their_published_numbers_and_commands():
    for name, r in reproduce.RECIPES.items():
        assert r.published.source and (r.published.value is None or 0 < r.published.value < 1), name
        cmd = reproduce.commands(name, "/data", "runs/x", seeds=range(5))
        assert "--grid seed=0,1,2,3,4" in cmd and "--resources GPU=1" in cmd and f"-p recipe {name}" in cmd
    # the UMONS README's test column, read from the repository
    assert reproduce.RECIPES["umons-mosei-emotion"].published.value == pytest.approx(0.8129)
    with pytest.raises(ValueError, match="unknown recipe"):
        reproduce.commands("umons-iemocap", "/data", "runs/x")


@pytest.mark.slow
@pytest.mark.notebook
def test_recipe_end_to_end_on_each_real_format_writes_the_comparison_table(tmp_path):
    """One sweep per data form, two seeds each, through benchmarks/reproduce_point.ipynb and Dask."""
    (tmp_path / "umons_pickles").mkdir()
    umons_dir = _write_umons_pickles(tmp_path / "umons_pickles")
    mult = _write_mult(tmp_path / "mosei_senti_data_noalign.pkl", _mult_data(np.random.default_rng(4), iemocap=False))
    raw = {s: ensure_corpus(None, n=40, seed=0, style=s, progress=False) for s in ("mosei", "iemocap")}
    sweeps = {"umons-mosei-emotion": umons_dir, "fe2e-iemocap": raw["iemocap"], "mesm-mosei": raw["mosei"],
              "mult-mosei": mult}
    dirs = []
    for recipe, data in sweeps.items():
        out = tmp_path / "runs" / recipe
        results = ex.run_sweep(POINT, out, params={"smoke": True, "recipe": recipe, "data_root": str(data)},
                               grid={"seed": [0, 1]}, workers=2, progress=False)
        assert [r.status for r in results] == ["DONE", "DONE"], [r.error[-2000:] for r in results]
        dirs.append(out)
    table = reproduce.comparison(*dirs)
    assert sorted(table["recipe"]) == sorted(sweeps) and set(table["n_seeds"]) == {2}
    for row in table.itertuples():  # the mean and interval are the points' own numbers
        metric = reproduce.RECIPES[row.recipe].metric
        vals = [json.loads((p / "metrics.json").read_text())["results"][0][metric]
                for p in sorted((tmp_path / "runs" / row.recipe).iterdir()) if (p / "DONE").exists()]
        est = seed_interval(vals)
        assert row.measured == pytest.approx(est.value)
        assert (row.low == pytest.approx(est.low)) or (np.isnan(row.low) and np.isnan(est.low))
        pub = reproduce.RECIPES[row.recipe].published.value
        assert (row.difference == pytest.approx(row.measured - pub)) if pub is not None else np.isnan(row.difference)
    md = tmp_path / "table.md"
    assert reproduce.main(["table", *map(str, dirs), "--out", str(md)]) == 0
    text = md.read_text()
    assert "| umons-mosei-emotion | acc | 81.3 |" in text and "jbdel/MOSEI_UMONS README" in text
