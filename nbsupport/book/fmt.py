"""Numbers and tables for people: percent with one decimal, MACs in M or G, seconds to 2 significant digits.

Every chapter formats its measured answer with these, so a page never shows ``1.625023e+08`` or a
``pd.Series`` dump.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

__all__ = ["percent", "macs", "seconds", "count", "number", "table", "answer", "interval", "plain",
           "train_step_table", "mesm_answer"]


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def percent(x, digits: int = 1) -> str:
    """A fraction as a percentage with one decimal: 0.8374 -> '83.7 %'."""
    return "–" if _missing(x) else f"{100 * float(x):.{digits}f} %"


def macs(x) -> str:
    """Multiply-accumulates in K, M or G with one decimal: 162502300 -> '162.5 M'."""
    if _missing(x):
        return "–"
    x = float(x)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f}"


def seconds(x) -> str:
    """Seconds to two significant digits: 0.04567 -> '0.046 s', 123.4 -> '120 s'."""
    if _missing(x):
        return "–"
    x = float(x)
    if x == 0:
        return "0 s"
    return f"{float(f'{x:.2g}'):g} s"


def count(x) -> str:
    """An integer with thousands separators: 1234567 -> '1,234,567'."""
    return "–" if _missing(x) else f"{int(x):,}"


def number(x, digits: int = 3) -> str:
    """A plain number with ``digits`` decimals."""
    return "–" if _missing(x) else f"{float(x):.{digits}f}"


def table(rows, *, percent_cols: Sequence[str] = (), macs_cols: Sequence[str] = (),
          seconds_cols: Sequence[str] = (), count_cols: Sequence[str] = (), number_cols: Sequence[str] = (),
          columns: Sequence[str] | None = None, index: str | None = None) -> pd.DataFrame:
    """A DataFrame of formatted strings from ``rows`` (a DataFrame or a list of dicts): the chapters' tables.

    ``columns`` picks and orders columns (missing ones are skipped); ``index`` becomes the row labels.
    """
    df = rows.reset_index() if isinstance(rows, pd.DataFrame) and index and index not in rows.columns else rows
    df = pd.DataFrame(df).copy()
    if columns is not None:
        df = df[[c for c in ([index] if index else []) + list(columns) if c in df.columns]]
    for cols, fn in ((percent_cols, percent), (macs_cols, macs), (seconds_cols, seconds), (count_cols, count),
                     (number_cols, number)):
        for c in cols:
            if c in df.columns:
                df[c] = df[c].map(fn)
    return df.set_index(index) if index else df.reset_index(drop=True)


def answer(items: Mapping[str, str] | Iterable[tuple[str, str]]) -> pd.DataFrame:
    """A chapter's measured answer as a two-column table (what was measured, the value as formatted text)."""
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    return pd.DataFrame(pairs, columns=["measured", "value"]).set_index("measured")


def interval(est) -> str:
    """A metric with its interval, in percent: '83.7 % [80.1, 87.2]' (an :class:`nbsupport.evidence.Estimate`)."""
    return f"{100 * est.value:.1f} % [{100 * est.low:.1f}, {100 * est.high:.1f}]"


def lift(value, low, high) -> str:
    """A lift over chance with its interval: '1.134 [0.981, 1.270]' (Chapter 6's cue regions; 1 = chance).
    Three decimals, so that an interval just above 1 does not print as [1.00, 1.01]."""
    if _missing(low) or _missing(high):
        return f"{value:.3f} [no interval]"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def lift_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (a :func:`nbsupport.interpret.lift_intervals` result) with the columns
    "attention lift [95 % CI]" and "kept-site lift [95 % CI]" formatted by :func:`lift` (Chapter 6)."""
    out = table.copy()
    for what, col in (("attention", "attention lift [95 % CI]"), ("kept", "kept-site lift [95 % CI]")):
        out[col] = [lift(v, lo, hi) for v, lo, hi in
                    zip(out[f"{what}_lift"], out[f"{what}_lift_low"], out[f"{what}_lift_high"])]
    return out


def plain(text) -> str:
    """``text`` safe for a matplotlib label: ``$`` escaped (MMSA ids look like ``video$_$clip``)."""
    return str(text).replace("$", r"\$")


def train_step_table(path: str | Path) -> pd.DataFrame:
    """The training-step benchmark's result file ``path`` (written by ``benchmarks/train_step.py``; Chapter 6
    reads the committed ``../benchmarks/results/train_step.json`` from its own folder) as a table: MESM's
    step time over FE2E's at each model size (and thread count), with the spread over interleaved rounds,
    MACs ratio and peak memory."""
    data = json.loads(Path(path).read_text())
    rows = []
    for r in data["rows"]:
        blocks = "/".join(str(c) for c in r["sizes"]["block_channels"])
        t = r["mesm_over_fe2e"]
        threads = f", {r['threads']} thread{'s' if r['threads'] > 1 else ''}" if "threads" in r else ""
        rows.append({"model size": f"{r['preset']} (stem {r['sizes']['stem_channels']}, blocks {blocks}{threads})",
                     "MESM / FE2E step time": f"{t['ratio']:.2f} [{t['ratio_min']:.2f}, {t['ratio_max']:.2f}]",
                     "MESM / FE2E extractor MACs": percent(r["extractor_macs"]["ratio"]),
                     "peak MB (MESM / FE2E)": f"{r['peak_mb']['mesm']:.0f} / {r['peak_mb']['fe2e']:.0f}"})
    return pd.DataFrame(rows).set_index("model size")


def bug_cost_tables(cost: Mapping) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The two tables of a reference bug's cost (:func:`nbsupport.protocol.reference_bug_cost`; Chapters
    4 and 6): the metric per seed without and with the bug and their difference, and each measured value
    (e.g. an attention lift) as its mean over seeds with the t interval, per setting and bug minus fixed
    (None without measures)."""
    metric = cost["metric"]
    per_seed = table([{"seed": r["seed"], f"{metric} without the bug": r["fixed"], f"{metric} with the bug": r["bug"],
                       "bug − fixed": r["bug"] - r["fixed"]} for r in cost["per_seed"]], index="seed",
                     percent_cols=[f"{metric} without the bug", f"{metric} with the bug", "bug − fixed"])
    if not cost.get("measures"):
        return per_seed, None
    def ci(e):
        if e["low"] is None:
            return f"{e['value']:.3f} (no interval)"
        return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"

    rows = [{"measure": k, "without the bug [95 % t CI]": ci(v["fixed"]), "with the bug [95 % t CI]": ci(v["bug"]),
             "bug − fixed [95 % t CI]": ci(v["difference"])} for k, v in cost["measures"].items()]
    return per_seed, pd.DataFrame(rows).set_index("measure")


def mesm_answer(rows: Iterable[Mapping], *, this_run=None, seed_verdicts: Mapping | None = None,
                cue_table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Chapter 6's measured answer (does MESM keep FE2E's quality at a fraction of its extractor MACs,
    Dai et al. 2021, Table 3; does its attention find the cues?) as :func:`answer`'s table, from the run's
    objects: ``rows`` (the result rows of MESM and, when trained, FE2E), ``this_run`` (MESM against FE2E
    on this run's test resamples, :func:`nbsupport.evidence.compare`), ``seed_verdicts`` (key -> a
    verdict's ``metrics.json`` dict, its ``sentence`` shown) and ``cue_table`` (the lift table of
    :func:`lift_columns`: per modality the attention lift of each layer and the layers whose interval
    lies above 1)."""
    by = {r["model"]: r for r in rows}
    mesm = by["MESM"]
    items = {"MESM wacc": percent(mesm["wacc"]), "MESM MACs per utterance": macs(mesm["macs"])}
    if "FE2E" in by:
        fe2e = by["FE2E"]
        items["FE2E wacc"] = percent(fe2e["wacc"])
        items["MESM MACs / FE2E MACs"] = percent(mesm["macs"] / fe2e["macs"])
        items["MESM train time / FE2E train time"] = f"{mesm['seconds'] / fe2e['seconds']:.2f}×"
        items["MESM against FE2E, this run (test resamples; a description)"] = \
            getattr(this_run, "sentence", this_run)
    for key, v in (seed_verdicts or {}).items():  # the verdicts, across training seeds
        items[f"across seeds: {key}"] = v["sentence"]
    for m, g in cue_table.groupby("modality") if cue_table is not None else ():
        items[f"{m}: attention lift, this run [95 % CI] (layers 1-3)"] = "; ".join(g["attention lift [95 % CI]"])
        above = [str(r.layer) for r in g.itertuples() if r.attention_lift_low > 1]
        no_ci = g["attention_lift_low"].isna().all()
        items[f"{m}: this run's layers with the interval above 1"] = \
            "no interval" if no_ci else (", ".join(above) or "none")
    return answer(items)
