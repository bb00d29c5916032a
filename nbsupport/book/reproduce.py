"""Reproducing the papers' tables: each preset trained with its authors' protocol over seeds, then set
beside the published number (book page "Reproducing the papers").

A *recipe* (:data:`RECIPES`) names one published result: the model preset (``UmonsConfig.paper()``,
``MesmConfig.paper("FE2E"/"MESM")``, :data:`nbsupport.models.baselines.MULT_REFERENCE`), the data set
and the form its data comes in, the task, the metric the number is reported in, the authors' training
settings, and the published number with where it was read. Every seed of a recipe is one *point*:

* :func:`run_point` trains the preset for one seed and writes ``metrics.json`` (the book's shared
  shape); ``benchmarks/reproduce_point.ipynb`` calls it, so a sweep runs it on Dask like any chapter::

      python -m nbsupport.book.experiments run benchmarks/reproduce_point.ipynb --out runs/umons \\
          -p recipe umons-mosei-emotion -p data_root /data/umons --grid seed=0,1,2,3,4 \\
          --scheduler tcp://HOST:8786 --resources GPU=1

* :func:`comparison` collects the points of any number of sweep folders into one table: published
  number and source, the measured mean over seeds with its t interval (the variance of training again
  is in it), and the difference (:func:`nbsupport.evidence.seed_interval`); ``python -m
  nbsupport.book.reproduce table DIR ... [--out table.md]`` prints or writes it.

The reference bugs are on by default (``reference_bugs=True``): the published numbers were produced by
the authors' code as it runs.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch

from nbsupport import evidence, protocol, train
from nbsupport.base import atomic_write_json, atomic_write_text, jsonable
from nbsupport.models import baselines, mesm, umons

from .experiments import collect
from .notebook import check_metrics

__all__ = ["Published", "Recipe", "RECIPES", "run_point", "commands", "comparison", "comparison_markdown", "main"]

#: Where the published numbers were read (the page says which came from where).
UMONS_README = ("jbdel/MOSEI_UMONS README.md, 'You should approximate the following results' "
                "(test column, single model; fetched from the repository)")
MESM_PAPER = ("Dai et al. 2021 (NAACL), IEMOCAP result as the book quotes it (Chapter 7); the authors' "
              "repository README has no results table")


@dataclass(frozen=True)
class Published:
    """One published number: ``value`` (a fraction, e.g. 0.8129 for 81.29 %) and its ``source``."""

    value: float | None
    source: str


@dataclass(frozen=True)
class Recipe:
    """One table cell to reproduce: model preset, data, task, metric and the authors' training settings."""

    model: str  # "UMONS", "FE2E", "MESM" or "MulT"
    dataset: str  # "mosei" or "iemocap"
    data_format: str  # the form the authors' data comes in (nbsupport.data.formats)
    task: str
    metric: str
    modalities: str
    epochs: int
    lr: float
    batch_size: int
    published: Published
    top_p: float | None = None
    note: str = ""
    smoke_sizes: dict = field(default_factory=dict)


_E2E_SMOKE = dict(stem_channels=4, block_channels=(4, 8, 8), dim=8, layers=1, heads=2, flatten_hidden=16)
_UMONS_SMOKE = dict(hidden_size=16, ff_size=32, layers=2, heads=2, seq_len=8)
_MULT_SMOKE = dict(dim=10, heads=5, cross_layers=1, self_layers=1)
_MISSING = Published(None, "not stored: the paper's table is not in the authors' repository; add it here")

#: The papers' tables, one recipe per published number (see the book page "Reproducing the papers").
RECIPES: dict[str, Recipe] = {
    "umons-mosei-emotion": Recipe("UMONS", "mosei", "umons", "emotion", "acc", "LA", 99, 1e-4, 32,
                                  Published(0.8129, UMONS_README + ": Emotion-6"), smoke_sizes=_UMONS_SMOKE,
                                  note="Model_LA, README command; accuracy = element-wise binary accuracy"),
    "umons-mosei-sentiment2": Recipe("UMONS", "mosei", "umons", "sentiment2", "acc2_has0", "LA", 99, 1e-4, 32,
                                     Published(0.8153, UMONS_README + ": Sentiment-2"), smoke_sizes=_UMONS_SMOKE),
    "umons-mosei-sentiment7": Recipe("UMONS", "mosei", "umons", "sentiment7", "acc7_bins", "LA", 99, 1e-4, 32,
                                     Published(0.4390, UMONS_README + ": Sentiment-7"), smoke_sizes=_UMONS_SMOKE),
    "fe2e-iemocap": Recipe("FE2E", "iemocap", "raw", "emotion", "wacc", "LAV", 40, 5e-5, 8,
                           Published(0.845, MESM_PAPER), smoke_sizes=_E2E_SMOKE,
                           note="the paper's 'accuracy' is weighted accuracy (Chapter 7)"),
    "mesm-iemocap": Recipe("MESM", "iemocap", "raw", "emotion", "wacc", "LAV", 40, 5e-5, 2,
                           Published(0.844, MESM_PAPER + ", p = 0.7"), top_p=0.7, smoke_sizes=_E2E_SMOKE),
    "fe2e-mosei": Recipe("FE2E", "mosei", "raw", "emotion", "wacc", "LAV", 40, 5e-5, 8, _MISSING,
                         smoke_sizes=_E2E_SMOKE),
    "mesm-mosei": Recipe("MESM", "mosei", "raw", "emotion", "wacc", "LAV", 40, 5e-5, 2, _MISSING, top_p=0.8,
                         smoke_sizes=_E2E_SMOKE, note="top_p 0.8 as the README's command"),
    "mult-mosei": Recipe("MulT", "mosei", "mult", "sentiment2", "acc2_non0", "LAV", 40, 1e-3, 24, _MISSING,
                         smoke_sizes=_MULT_SMOKE,
                         note="MulT's protocol: one output, L1 loss, plateau decay, lowest validation loss"),
}


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"reproduce: unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def _build(r: Recipe, first_batch: Mapping, n_emotions: int, *, smoke: bool, reference_bugs: bool,
           text_model: str):
    head = train.PROTOCOLS["mult"].sentiment_head if r.model == "MulT" else "classes"
    n_out = train.n_outputs(r.task, n_emotions, head=head)  # MulT regresses the score
    sizes = dict(r.smoke_sizes) if smoke else {}
    if r.model == "UMONS":
        cfg = umons.UmonsConfig.paper(reference_bugs=reference_bugs, **sizes)
        return umons.UmonsTransformer(r.modalities, n_out, config=cfg,
                                      input_dims=umons.input_dims_from(first_batch))
    if r.model in ("FE2E", "MESM"):
        cfg = mesm.MesmConfig.paper(r.model, reference_bugs=reference_bugs, **sizes)
        if r.top_p is not None and r.model == "MESM":
            cfg = cfg.mesm(r.top_p)
        return cfg.build(r.modalities, n_out, text_model=text_model or None)
    if r.model == "MulT":
        return baselines.MulT(r.modalities, umons.input_dims_from(first_batch), n_out,
                              **{**baselines.MULT_REFERENCE, **sizes})
    raise ValueError(f"reproduce: recipe model {r.model!r} has no preset")


def run_point(recipe: str, *, data_root: str = "", seed: int = 0, device="auto", output_dir=None,
              smoke: bool = False, reference_bugs: bool = True, text_model: str = "", epochs: int = 0,
              n_utterances: int = 0) -> dict:
    """Train ``recipe``'s preset for one ``seed`` with its authors' protocol and test it (one point of the
    page's sweeps). ``data_root``: the data in the recipe's form (empty: the synthetic corpus, raw
    layout, for a smoke check); ``epochs`` 0 = the authors'; ``smoke``: tiny sizes, one epoch. Writes
    ``metrics.json`` to ``output_dir`` (the shared shape, with ``recipe``, ``metric`` and ``published``)
    and returns its content."""
    r = _recipe(recipe)
    torch.manual_seed(seed)
    n = n_utterances or (40 if smoke else 600)
    root, fmt = protocol.chapter_data(data_root, r.data_format if data_root else "auto", n=n, seed=0,
                                      style=r.dataset)
    kind = "mesm" if r.model in ("FE2E", "MESM") else ("umons" if r.model == "UMONS" else "handcrafted")
    text = text_model or ("tiny" if smoke and kind == "mesm" else "")  # the tiny encoder is FE2E/MESM's
    sets, loaders = protocol.loaders(kind, root, dataset=r.dataset, batch_size=r.batch_size, seed=seed,
                                     data_format=fmt, text_model=text or None, progress=False,
                                     seq_len=r.smoke_sizes.get("seq_len", 60) if smoke else 60)
    n_emotions = len(protocol.emotion_names(sets["train"], r.dataset))
    torch.manual_seed(seed)
    model = _build(r, next(iter(loaders["train"])), n_emotions, smoke=smoke, reference_bugs=reference_bugs,
                   text_model=text)
    run_epochs = 1 if smoke else (epochs or r.epochs)
    row, _ = protocol.train_and_test(model, loaders, name=r.model, task=r.task, epochs=run_epochs, lr=r.lr,
                                     device=device, seed=seed, progress=False,
                                     protocol="paper")
    params = dict(recipe=recipe, data_root=str(data_root), seed=seed, smoke=smoke, reference_bugs=reference_bugs,
                  text_model=text, epochs=run_epochs, data_format=fmt)
    data = jsonable({"parameters": params, "results": [{**row, "recipe": recipe}], "metric": r.metric,
                     "published": {"value": r.published.value, "source": r.published.source}})
    check_metrics(data)
    if output_dir:
        atomic_write_json(Path(output_dir) / "metrics.json", data)
    return data


def commands(recipe: str, data_root: str, out: str, seeds: Sequence[int] = range(5), *,
             scheduler: str = "tcp://HOST:8786") -> str:
    """The command that runs ``recipe`` over ``seeds`` as a Dask sweep, one point per GPU (the page's recipe)."""
    _recipe(recipe)
    grid = ",".join(str(s) for s in seeds)
    return (f"python -m nbsupport.book.experiments run benchmarks/reproduce_point.ipynb --out {out} "
            f"-p recipe {recipe} -p data_root {data_root} --grid seed={grid} "
            f"--scheduler {scheduler} --resources GPU=1")


def comparison(*dirs, level: float = 0.95) -> pd.DataFrame:
    """One row per recipe found in the sweep folders ``dirs``: the published number and its source, the
    number of seeds, the measured mean of the recipe's metric over seeds with its t interval, and
    measured minus published (with the same interval shifted; NaN without a published number)."""
    table = collect(*dirs)
    if table.empty or "recipe" not in table.columns:
        raise ValueError(f"reproduce.comparison: no finished reproduction point in {', '.join(map(str, dirs))}")
    rows = []
    for name, g in table[table["status"] == "DONE"].groupby("recipe", sort=True):
        r = _recipe(name)
        vals = g.sort_values("seed")[r.metric].astype(float).to_numpy()
        est = evidence.seed_interval(vals, level=level)
        pub = r.published.value
        diff = (lambda v: v - pub) if pub is not None else (lambda v: float("nan"))
        rows.append({"recipe": name, "model": r.model, "dataset": r.dataset, "metric": r.metric,
                     "published": pub, "source": r.published.source, "n_seeds": len(vals),
                     "measured": est.value, "low": est.low, "high": est.high,
                     "difference": diff(est.value), "difference_low": diff(est.low),
                     "difference_high": diff(est.high)})
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table (percent with one decimal; intervals in brackets)."""
    def pct(v):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    lines = ["| recipe | metric | published | measured mean [95 % t CI] | measured − published | seeds | source |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.recipe} | {r.metric} | {pct(r.published)} | {pct(r.measured)} "
                     f"[{pct(r.low)}, {pct(r.high)}] | {pct(r.difference)} [{pct(r.difference_low)}, "
                     f"{pct(r.difference_high)}] | {r.n_seeds} | {r.source} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nbsupport.book.reproduce table DIR ... [--out table.md]`` or ``... commands RECIPE
    DATA_ROOT OUT``: the page's two commands."""
    p = argparse.ArgumentParser(prog="python -m nbsupport.book.reproduce", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="collect reproduction sweeps into the comparison table")
    t.add_argument("dirs", nargs="+")
    t.add_argument("--out", default=None, help="write the Markdown table here (default: print it)")
    c = sub.add_parser("commands", help="print the sweep command of a recipe")
    c.add_argument("recipe", choices=sorted(RECIPES))
    c.add_argument("data_root")
    c.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "commands":
        print(commands(args.recipe, args.data_root, args.out))
        return 0
    text = comparison_markdown(comparison(*args.dirs))
    if args.out:
        atomic_write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
