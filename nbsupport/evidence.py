"""Intervals behind verdicts: bootstrap confidence intervals over test utterances (Chapters 3-8).

A chapter never says "A beats B" from two point estimates. It keeps each model's test predictions
(:class:`Predictions`, from :func:`nbsupport.protocol.train_and_test`), resamples the test utterances
with replacement (percentile bootstrap) and reports the metric with its 95 %
interval (:func:`bootstrap`), or the difference of two models scored on the *same* resampled
utterances (:func:`paired_difference`, which cancels the luck of the split that both share).
:func:`verdict` turns an interval into the sentence the chapter prints: a winner only when the
interval of the difference excludes 0.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import stats

from nbsupport import metrics

__all__ = ["Predictions", "Estimate", "predictions_from", "statistic", "bootstrap",
           "paired_difference", "verdict", "intervals", "compare", "ratio_interval", "lift_verdict",
           "difference_in_differences", "seed_interval", "seed_verdict",
           "BOOTSTRAP_RESAMPLES"]

#: Resamples per interval: the percentile interval's end points move by well under 0.5 point between
#: seeds at this count on the chapters' test splits.
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class Predictions:
    """One model's decisions on the test split: what every interval is computed from.

    ``decisions`` (N, E) 0/1 for emotions (``sigmoid(logit) > threshold``), or the predicted score
    (N,) for sentiment (class - 3 for 7 classes, +-1 for 2); ``labels`` as the batches hold them."""

    task: str
    decisions: np.ndarray
    labels: np.ndarray
    ids: list

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Estimate:
    """A metric (or a difference of metrics) with its bootstrap interval."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def points(self) -> str:
        """As percentage points: '83.7 [80.1, 87.2]'."""
        return f"{100 * self.value:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level}


def predictions_from(logits: torch.Tensor, labels: torch.Tensor, ids, *, task: str = "emotion",
                     thresholds=None) -> Predictions:
    """Decisions from a model's test logits, by the rule :func:`nbsupport.train.compute_metrics` uses
    (:func:`nbsupport.metrics.decisions`)."""
    labels = labels.detach().float().cpu().numpy()
    return Predictions(task, metrics.decisions(logits.detach().float(), task, thresholds), labels, list(ids))


#: Metric name -> function of (labels, decisions), the same functions :func:`nbsupport.train.compute_metrics` uses.
_METRICS: dict[str, Callable] = {
    "wacc": metrics.weighted_accuracy,
    "acc": lambda t, p: float(np.mean(metrics.per_emotion_accuracy(t, p))),
    "f1": lambda t, p: float(np.mean(metrics.f1_per_emotion(t, p))),
    "acc7": metrics.acc7,
    "acc2": metrics.acc2,
    "acc2_zero": metrics.acc2_with_zero,
}


def statistic(name: str) -> Callable:
    """The metric ``name`` as a function of (labels, decisions)."""
    if name not in _METRICS:
        raise ValueError(f"nbsupport.evidence: metric {name!r} has no bootstrap; known: {', '.join(_METRICS)}")
    return _METRICS[name]


def _interval(fn: Callable[[np.ndarray], float], n: int, resamples: int, level: float, seed: int) -> Estimate:
    """Percentile bootstrap over the ``n`` test utterances of the statistic ``fn(indices)``.

    Written out rather than with ``scipy.stats.bootstrap``: on small splits a resample can hold no
    positive of some emotion, where weighted accuracy is undefined (NaN), and scipy then returns a NaN
    interval; here such resamples are left out (the tests check the interval against scipy's where
    every resample is defined)."""
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # an undefined resample is expected here, and left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.array([fn(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    values = values[np.isfinite(values)]
    point = float(fn(np.arange(n)))
    if len(values) < resamples // 2:  # the statistic is undefined on most resamples: no interval
        return Estimate(point, float("nan"), float("nan"), level)
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return Estimate(point, float(low), float(high), level)


def bootstrap(preds: Predictions, name: str = "wacc", *, resamples: int = BOOTSTRAP_RESAMPLES,
              level: float = 0.95, seed: int = 0) -> Estimate:
    """``name`` on the test split with its bootstrap interval over utterances (percentile method)."""
    fn = statistic(name)
    return _interval(lambda i: fn(preds.labels[i], preds.decisions[i]), len(preds), resamples, level, seed)


def paired_difference(a: Predictions, b: Predictions, name: str = "wacc", *,
                      resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95, seed: int = 0) -> Estimate:
    """``name(a) - name(b)`` with a paired bootstrap interval: both models scored on the same resampled
    utterances. The two must hold predictions for the same utterances in the same order."""
    return _contrast("paired_difference", [(1, a), (-1, b)], name, resamples, level, seed)


def _contrast(caller: str, terms, name: str, resamples: int, level: float, seed: int) -> Estimate:
    """``sum(sign * name(model))`` over ``terms`` [(sign, Predictions)], every model scored on the same
    resampled utterances (the paired bootstrap behind :func:`paired_difference` and
    :func:`difference_in_differences`); all must hold the same utterance ids in the same order."""
    first = terms[0][1]
    if any(p.ids != first.ids for _, p in terms):
        raise ValueError(f"nbsupport.evidence.{caller}: the models were tested on different utterances (ids "
                         f"differ); compare them on one test split")
    fn = statistic(name)
    return _interval(lambda i: sum(sign * fn(p.labels[i], p.decisions[i]) for sign, p in terms), len(first),
                     resamples, level, seed)


def difference_in_differences(a1: Predictions, b1: Predictions, a2: Predictions, b2: Predictions,
                              name: str = "wacc", *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                              seed: int = 0) -> Estimate:
    """``(name(a1) - name(b1)) - (name(a2) - name(b2))`` with a paired bootstrap interval (Chapter 7).

    Does the gap between two kinds of model change between two conditions (two corpus regimes drawn
    for the same utterance ids)? All four hold predictions for the same utterances in the same order,
    and every resample scores all four on the same utterances; the gap changes only when the interval
    of this difference excludes 0."""
    return _contrast("difference_in_differences", [(1, a1), (-1, b1), (-1, a2), (1, b2)], name, resamples,
                     level, seed)


def ratio_interval(numerators, denominators, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                   seed: int = 0) -> Estimate:
    """``sum(numerators) / sum(denominators)`` with a percentile bootstrap interval over the units (rows).

    Chapter 6's attention *lift* is such a ratio: per test utterance, the attention share on the cue
    regions summed over its frames (numerator) and the chance share summed likewise (denominator);
    resampling utterances, not frames, keeps the frames of one utterance together. Both arrays hold one
    value per unit, in the same order. Uses ``scipy.stats.bootstrap`` with paired samples (every
    resample is defined here as long as the chance sum is positive)."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"nbsupport.evidence.ratio_interval: numerators {num.shape} and denominators "
                         f"{den.shape} must be 1-d arrays of the same length (one value per unit)")
    if len(num) == 0 or den.sum() <= 0:
        return Estimate(float("nan"), float("nan"), float("nan"), level)
    point = float(num.sum() / den.sum())
    if len(num) < 2:
        return Estimate(point, float("nan"), float("nan"), level)

    def ratio(n, d, axis=-1):
        return n.sum(axis=axis) / np.maximum(d.sum(axis=axis), 1e-12)

    res = stats.bootstrap((num, den), ratio, paired=True, vectorized=True, n_resamples=resamples,
                          confidence_level=level, method="percentile", random_state=np.random.default_rng(seed))
    return Estimate(point, float(res.confidence_interval.low), float(res.confidence_interval.high), level)


def lift_verdict(what: str, lift: Estimate) -> str:
    """The sentence for a lift over chance (1 = chance), computed from its interval (Chapter 6)."""
    ci = f"{lift.value:.3f}, {100 * lift.level:.0f} % CI [{lift.low:.3f}, {lift.high:.3f}]"
    if not np.isfinite(lift.low):
        return f"{what}: lift {lift.value:.3f}; too few utterances with a cue for an interval, so no verdict."
    if lift.low > 1:
        return f"{what} prefers the cue regions: lift {ci}, above 1."
    if lift.high < 1:
        return f"{what} avoids the cue regions: lift {ci}, below 1."
    return f"{what} is not distinguishable from chance on the cue regions: lift {ci}."


def verdict(name_a: str, name_b: str, diff: Estimate, metric: str = "wacc") -> str:
    """The sentence a chapter prints, computed from the interval of ``metric(A) - metric(B)``."""
    ci = (f"{100 * diff.value:+.1f} points, {100 * diff.level:.0f} % CI "
          f"[{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]")
    if not np.isfinite(diff.low):
        return f"{name_a} against {name_b} on {metric}: {100 * diff.value:+.1f} points; the test split is too " \
               f"small for an interval, so no verdict."
    if diff.low > 0:
        return f"{name_a} beats {name_b} on {metric}: {ci}."
    if diff.high < 0:
        return f"{name_b} beats {name_a} on {metric}: {ci}."
    return f"{name_a} and {name_b} are not distinguishable on {metric} with this test split: {ci}."


def intervals(preds: dict[str, Predictions], name: str = "wacc", **kwargs) -> dict[str, Estimate]:
    """:func:`bootstrap` for every model of ``preds`` (model name -> its test predictions)."""
    return {model: bootstrap(p, name, **kwargs) for model, p in preds.items()}


def compare(preds: dict[str, Predictions], a: str, b: str, name: str = "wacc", **kwargs) -> tuple[Estimate, str]:
    """The paired difference ``name(a) - name(b)`` and the verdict sentence computed from it."""
    diff = paired_difference(preds[a], preds[b], name, **kwargs)
    return diff, verdict(a, b, diff, name)


# ------------------------------------------------------------------------------------------------
# Across training seeds: the variance of training the model again (Chapters 4 and 6, the bug costs)
# ------------------------------------------------------------------------------------------------
def seed_interval(a, b=None, *, level: float = 0.95) -> Estimate:
    """Mean of ``a - b`` paired by seed (``b=None``: the mean of ``a``) with its t interval over seeds
    (``scipy.stats.ttest_rel`` / ``ttest_1samp``): an interval that includes the seed-to-seed variance of
    training, which a bootstrap over one run's test utterances does not (the reference bugs' costs,
    Chapters 4 and 6). ``a``, ``b``: one value per seed, in the same seed order. The interval is NaN with
    fewer than two seeds or no spread between them (then t is undefined: no verdict)."""
    x = np.asarray(a, dtype=float)
    if x.ndim != 1 or (b is not None and np.shape(b) != x.shape):
        raise ValueError(f"seed_interval: 'a' and 'b' must be 1-D with one value per seed, got shapes "
                         f"{x.shape} and {np.shape(b) if b is not None else None}")
    d = x - np.asarray(b, dtype=float) if b is not None else x
    value = float(d.mean()) if d.size else float("nan")
    if d.size < 2 or np.allclose(d, d[0]):
        return Estimate(value, float("nan"), float("nan"), level)
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(confidence_level=level)
    return Estimate(value, float(ci.low), float(ci.high), level)


def seed_verdict(name_a: str, name_b: str, diff: Estimate, n_seeds: int, metric: str = "wacc",
                 scale: float = 100.0, unit: str = " points") -> str:
    """The sentence for ``metric(A) - metric(B)`` paired by seed (:func:`seed_interval`), from its interval."""
    f = lambda v: f"{scale * v:+.1f}" if scale == 100.0 else f"{scale * v:+.3f}"  # noqa: E731
    head = f"{name_a} minus {name_b} on {metric}, paired by seed over {n_seeds} seeds: {f(diff.value)}{unit}"
    if not np.isfinite(diff.low):
        return f"{head}; without two seeds that differ there is no interval, so no verdict."
    ci = f"{100 * diff.level:.0f} % t interval [{f(diff.low)}, {f(diff.high)}]"
    if diff.low > 0:
        return f"{head}, {ci}: {name_a} is higher, across training seeds."
    if diff.high < 0:
        return f"{head}, {ci}: {name_b} is higher, across training seeds."
    return f"{head}, {ci}: not distinguishable across training seeds."
