"""Seed noise, the ``top_p`` effect and the knee of a sweep's quality-compute curve (Chapter 8).

MESM (Dai et al., 2021, Sec. 5) claims that the top-p selection keeps the dense model's quality for a
fraction of the feature-extraction compute. Chapter 8 answers it from a sweep of ``top_p`` x seeds,
where the seed changes the corpus, the split and the initial weights, so the spread over seeds is the
noise any ``top_p`` effect has to exceed:

* per ``top_p``: mean and standard deviation of the metric over seeds (:func:`per_value_stats`);
* seed noise: the pooled standard deviation over seeds (:func:`seed_noise`);
* the effect: the metric at the largest ``top_p`` minus the metric at the smallest, paired by seed (same
  data for both), with a t interval over seeds (``scipy.stats.ttest_rel``; :func:`paired_effect`); it
  exceeds seed noise when the interval excludes 0;
* the knee (:func:`knee`): the cheapest ``top_p`` (fewest MACs) whose mean is within one seed-noise SD of
  the reference's (the largest ``top_p``). With three or four points on the curve a geometric knee
  finder (Kneedle, the ``kneed`` package) would pick a point from the curve's shape alone, which with
  this few points is decided by noise; this rule instead ties "as good as dense" to the measured noise.

:func:`sweep_answer` puts them together with the sentence the chapter prints.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["per_value_stats", "seed_noise", "paired_effect", "knee", "sweep_answer", "effect_verdict"]


def _json_safe(obj):
    """NaN (an undefined SD or interval) as None, so ``metrics.json`` stays valid JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _check_columns(table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(f"sweep table has no column(s) {missing}; columns: {', '.join(map(str, table.columns))}")


def per_value_stats(table: pd.DataFrame, by: str = "top_p", seed: str = "seed", metric: str = "wacc",
                    costs: Sequence[str] = ("macs", "seconds")) -> pd.DataFrame:
    """One row per value of ``by``: number of seeds, mean and SD (``ddof=1``; NaN for one seed) of
    ``metric`` over seeds, and the mean of each cost column present. Sorted by ``by``."""
    _check_columns(table, [by, seed, metric])
    costs = [c for c in costs if c in table.columns]
    rows = []
    for value, g in table.dropna(subset=[metric]).groupby(by, sort=True):
        vals = g[metric].to_numpy(float)
        rows.append({by: value, "n_seeds": int(g[seed].nunique()), "mean": float(vals.mean()),
                     "sd": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
                     **{c: float(g[c].mean()) for c in costs}})
    return pd.DataFrame(rows)


def seed_noise(per_value: pd.DataFrame) -> float:
    """Pooled SD over seeds: ``sqrt(sum((n_i - 1) s_i^2) / sum(n_i - 1))`` over the values with two or
    more seeds (with equal seed counts, the root of the mean variance). NaN when no value has two seeds."""
    ok = per_value[(per_value["n_seeds"] > 1) & per_value["sd"].notna()]
    dof = (ok["n_seeds"] - 1).sum()
    return float(math.sqrt(((ok["n_seeds"] - 1) * ok["sd"] ** 2).sum() / dof)) if dof > 0 else float("nan")


def paired_effect(table: pd.DataFrame, a, b, *, by: str = "top_p", seed: str = "seed", metric: str = "wacc",
                  level: float = 0.95) -> dict:
    """``metric(by=a) - metric(by=b)`` paired by seed (the seeds both have), with the t interval of the
    mean difference over seeds (``scipy.stats.ttest_rel(...).confidence_interval``).

    Returns ``value`` (mean difference), ``low``, ``high``, ``level``, ``n`` (paired seeds), ``sd`` (of
    the differences) and ``pvalue``; the interval is NaN with fewer than two seeds."""
    _check_columns(table, [by, seed, metric])
    wide = table.dropna(subset=[metric]).pivot_table(index=seed, columns=by, values=metric, aggfunc="mean")
    if a not in wide.columns or b not in wide.columns:
        raise KeyError(f"paired_effect: {by}={a!r} or {by}={b!r} has no {metric} in the sweep table")
    both = wide[a].notna() & wide[b].notna()
    x, y = wide[a][both].to_numpy(float), wide[b][both].to_numpy(float)
    d = x - y
    out = {"a": a, "b": b, "value": float(d.mean()) if len(d) else float("nan"), "low": float("nan"),
           "high": float("nan"), "level": level, "n": int(len(d)),
           "sd": float(d.std(ddof=1)) if len(d) > 1 else float("nan"), "pvalue": float("nan"),
           "per_seed": [{"seed": s.item() if hasattr(s, "item") else s, "a": float(u), "b": float(v)}
                        for s, u, v in zip(wide.index[both], x, y)]}
    # without spread over seeds t is undefined: no interval, so no verdict
    if len(d) > 1 and not np.allclose(d, d[0]):
        res = stats.ttest_rel(x, y)
        ci = res.confidence_interval(confidence_level=level)
        out.update(low=float(ci.low), high=float(ci.high), pvalue=float(res.pvalue))
    return out


def knee(per_value: pd.DataFrame, noise: float, *, by: str = "top_p", cost: str = "macs", reference=None) -> dict:
    """The knee of the mean quality-cost curve: the cheapest value of ``by`` (lowest mean ``cost``) whose
    mean is at least ``mean(reference) - noise`` (``reference``: the largest value of ``by``, the densest).

    Returns ``{by: value, cost: its cost, "cost_ratio": cost / reference's cost, "reference": ...,
    "threshold": ...}``; ``{by: None, ...}`` when ``noise`` is NaN (a single seed: no noise measured)."""
    _check_columns(per_value, [by, "mean", cost])
    reference = per_value[by].max() if reference is None else reference
    ref = per_value[per_value[by] == reference]
    if ref.empty:
        raise KeyError(f"knee: reference {by}={reference!r} is not in the sweep")
    ref_mean, ref_cost = float(ref["mean"].iloc[0]), float(ref[cost].iloc[0])
    out = {by: None, cost: None, "cost_ratio": None, "reference": reference, "threshold": None}
    if not np.isfinite(noise):
        return out
    threshold = ref_mean - noise
    ok = per_value[per_value["mean"] >= threshold].sort_values(cost, kind="stable")
    best = ok.iloc[0]  # never empty: the reference itself qualifies
    out.update({by: best[by].item() if hasattr(best[by], "item") else best[by], cost: float(best[cost]),
                "cost_ratio": float(best[cost]) / ref_cost if ref_cost else None, "threshold": threshold})
    return out


def sweep_answer(table: pd.DataFrame, *, by: str = "top_p", seed: str = "seed", metric: str = "wacc",
                 cost: str = "macs", level: float = 0.95) -> dict:
    """Chapter 8's computed answer from a sweep table (one row per point: ``by``, ``seed``, ``metric``,
    ``cost``): per-value stats with each value's paired difference to the reference (the largest
    ``by``), the seed noise, the effect of the largest against the smallest ``by``, the knee, and the
    sentence that states them. Every number in the sentence comes from the returned values; an undefined
    value (the SD of one seed, the interval of one pair) is ``None``."""
    pv = per_value_stats(table, by, seed, metric, costs=(cost, "seconds"))
    if pv.empty:
        raise ValueError(f"sweep_answer: no point has a {metric} (did every point fail?)")
    noise = seed_noise(pv)
    ref, low = pv[by].max(), pv[by].min()
    diffs = [paired_effect(table, v, ref, by=by, seed=seed, metric=metric, level=level) for v in pv[by]]
    pv["diff_vs_ref"] = [d["value"] for d in diffs]
    pv["diff_low"] = [d["low"] for d in diffs]
    pv["diff_high"] = [d["high"] for d in diffs]
    kn = knee(pv, noise, by=by, cost=cost, reference=ref) if cost in pv.columns else {by: None}
    n_seeds = int(pv["n_seeds"].max())
    if ref == low:
        one = f"One {by} value only ({by}={ref}): no {by} effect to measure."
        none = {"a": ref, "b": low, "value": float("nan"), "low": float("nan"), "high": float("nan"),
                "level": level, "n": n_seeds}
        return _json_safe({"per_value": pv.to_dict("records"), "seed_noise_sd": noise, "effect": None, "knee": kn,
                           "sentence": one, "seed_verdict": effect_verdict(none, one, by=by, metric=metric)})
    eff = paired_effect(table, ref, low, by=by, seed=seed, metric=metric, level=level)
    pts = lambda v: f"{100 * v:+.1f}"  # noqa: E731 - percentage points
    head = (f"{metric} at {by}={ref} minus {by}={low}, paired by seed: {pts(eff['value'])} points")
    if not np.isfinite(eff["low"]):
        verdict = f"{head} over {eff['n']} seed(s); one seed gives no interval, so no verdict on seed noise."
    else:
        ci = f"{100 * level:.0f} % t interval over {eff['n']} seeds [{pts(eff['low'])}, {pts(eff['high'])}]"
        if eff["low"] > 0 or eff["high"] < 0:
            better = ref if eff["low"] > 0 else low
            verdict = (f"{head}, {ci}: the interval excludes 0, so the {by} effect exceeds seed noise "
                       f"({by}={better} scores higher).")
        else:
            verdict = (f"{head}, {ci}: the interval includes 0, so the {by} effect does not exceed seed noise.")
    verdict_fields = effect_verdict(eff, verdict, by=by, metric=metric)
    noise_txt = (f"Seed noise (pooled SD of {metric} over {n_seeds} seeds): {100 * noise:.1f} points."
                 if np.isfinite(noise) else "One seed per value: seed noise is not measured.")
    if kn.get(by) is None:
        knee_txt = "No knee without a measured seed noise."
    else:
        knee_txt = (f"Knee: {by}={kn[by]} is the cheapest setting whose mean {metric} is within one seed-noise SD "
                    f"of {by}={ref}'s, at {100 * kn['cost_ratio']:.0f} % of its {cost}.")
    return _json_safe({"per_value": pv.to_dict("records"), "seed_noise_sd": noise, "effect": eff, "knee": kn,
                       "sentence": " ".join([noise_txt, verdict, knee_txt]), "seed_verdict": verdict_fields})


def effect_verdict(effect: dict, sentence: str, *, by: str = "top_p", metric: str = "wacc") -> dict:
    """:func:`paired_effect`'s result in the book's ``seed_verdicts`` form (the fields of
    :meth:`nbsupport.evidence.SeedVerdict.as_dict`; Chapter 8's ``"top_p_effect"``): the two settings'
    names (``"top_p=1.0"``), per-seed values, the t interval over seeds and the ``decision`` (the higher
    setting's name when the interval excludes 0, else ``"undecided"``). Each sweep seed draws its own
    corpus and split, so the spread over seeds already holds the test sample's variance as well as
    training's: the plain t over seeds counts both."""
    a, b = f"{by}={effect['a']}", f"{by}={effect['b']}"
    low, high = effect["low"], effect["high"]
    decision = a if low > 0 else b if high < 0 else "undecided"  # NaN compares False: undecided
    per_seed = [{"seed": r["seed"], a: r["a"], b: r["b"], "difference": r["a"] - r["b"]}
                for r in effect.get("per_seed", [])]
    return _json_safe({"a": a, "b": b, "metric": metric, "n_seeds": effect["n"], "per_seed": per_seed,
                       "value": effect["value"], "low": low, "high": high, "level": effect["level"],
                       "interval": "t over seeds (scipy.stats.ttest_rel); each seed draws its own corpus, "
                                   "so the spread holds training and test-sample variance",
                       "decision": decision, "sentence": sentence})
