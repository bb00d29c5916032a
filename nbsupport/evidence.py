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
           "difference_in_differences", "seed_interval", "seed_verdict", "seed_difference",
           "SeedVerdict", "compare_seeds", "compare_groups", "seed_difference_in_differences", "compare_gaps",
           "Comparison", "compare_best", "gap_change", "BOOTSTRAP_RESAMPLES"]

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


@dataclass(frozen=True)
class Comparison:
    """One run's paired comparison over test resamples (:func:`compare`, :func:`compare_best`,
    :func:`gap_change`): the difference with its bootstrap interval and the sentence computed from it. It
    describes one trained model per method (the luck of the test sample), not the method: the verdicts
    across training seeds are :class:`SeedVerdict`. Unpacks as ``difference, sentence``."""

    a: str
    b: str
    metric: str
    difference: Estimate
    sentence: str

    def __iter__(self):  # diff, sentence = evidence.compare(...)
        return iter((self.difference, self.sentence))

    @property
    def pair(self) -> tuple[str, str]:
        """``(a, b)``: the compared methods, e.g. a regime's pair for :func:`gap_change`."""
        return self.a, self.b

    def as_dict(self) -> dict:
        """For ``metrics.json``: the sentence and the interval (value, low, high, level)."""
        return {"sentence": self.sentence, **self.difference.as_dict()}


def compare(preds: dict[str, Predictions], a: str, b: str, name: str = "wacc", **kwargs) -> Comparison:
    """The paired difference ``name(a) - name(b)`` and the verdict sentence computed from it."""
    diff = paired_difference(preds[a], preds[b], name, **kwargs)
    return Comparison(a, b, name, diff, verdict(a, b, diff, name))


def _best_of_groups(caller: str, groups: dict, have, score: Callable[[str], float]) -> list[str]:
    """Per group (two ``label -> methods`` entries), its method among ``have`` with the highest ``score``
    (first in the group's order on a tie): how :func:`compare_best` and :func:`compare_groups` choose."""
    if len(groups) != 2:
        raise ValueError(f"nbsupport.evidence.{caller}: two groups, got {list(groups)}")
    best = []
    for label, methods in groups.items():
        present = [m for m in methods if m in have]
        if not present:
            raise ValueError(f"nbsupport.evidence.{caller}: group {label!r} has no runs among {methods}")
        best.append(max(present, key=score))
    return best


def compare_best(preds: dict[str, Predictions], valid, groups, name: str = "wacc", **kwargs) -> Comparison:
    """The best method of one group against the best of another in *one* run (Chapter 7, "One run,
    described": best end-to-end against best two-phase, Dai et al. 2021, Table 2). ``groups``: two
    ``label -> methods`` entries (methods without predictions are skipped); each group's best is its method
    with the highest *validation* score ``valid[method]``, so the test split decides only the comparison,
    never the choice. The paired bootstrap of :func:`compare` (``kwargs``: its ``seed`` etc.); across
    training seeds the same question is :func:`compare_groups`."""
    a, b = _best_of_groups("compare_best", groups, preds, lambda m: float(valid[m]))
    return compare(preds, a, b, name, **kwargs)


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


# ------------------------------------------------------------------------------------------------
# Method verdicts across training seeds, with the test sample's variance too (Chapters 4, 6, 7, 8)
# ------------------------------------------------------------------------------------------------
def _same_test_split(caller: str, runs) -> None:
    first = runs[0]
    if any(p.ids != first.ids for p in runs):
        raise ValueError(f"nbsupport.evidence.{caller}: the runs were tested on different utterances (ids "
                         f"differ); train every seed on one corpus and test split")


def seed_difference(a_runs, b_runs, name: str = "wacc", *, resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> Estimate:
    """``name(A) - name(B)`` averaged over training seeds, with an interval that counts both sources of
    variance: training again (initialisation and data order) and the luck of the test sample.

    ``a_runs[s]`` and ``b_runs[s]``: the two methods' test :class:`Predictions` trained with seed ``s``,
    on one corpus and test split. With ``d_s`` the per-seed difference and ``S`` seeds, the variance of
    the mean is ``var_s(d_s) / S`` (training: the sample variance over seeds) plus the variance of the
    seed-averaged difference under a bootstrap over test utterances (one resample of indices shared by
    every seed and both methods, so the pairing is kept). The interval is ``mean ± t(S-1) * sqrt(sum)``:
    Student's t with ``S - 1`` degrees of freedom because the training term is estimated from ``S``
    values, which a bootstrap over 5 seeds would under-cover. The sum counts the seed-by-utterance
    interaction twice, so the interval is slightly conservative; a verdict from it is not over-confident.
    NaN interval with fewer than two seeds."""
    return _seed_contrast("seed_difference", [(1, a_runs), (-1, b_runs)], name, resamples=resamples,
                          level=level, seed=seed)


@dataclass(frozen=True)
class SeedVerdict:
    """A method comparison decided across training seeds (:func:`compare_seeds`): the per-seed scores,
    the difference with its interval (:func:`seed_difference`), the decision and its sentence."""

    a: str
    b: str
    metric: str
    seeds: tuple
    a_values: tuple
    b_values: tuple
    difference: Estimate
    chosen_from: tuple = ()  # group comparisons: the two groups the methods were chosen from

    @property
    def pair(self) -> tuple[str, str]:
        """``(a, b)``: the compared methods, e.g. a regime's pair for :func:`compare_gaps`."""
        return self.a, self.b

    @property
    def decision(self) -> str:
        """``a``'s or ``b``'s name when the interval excludes 0, else ``"undecided"`` (also without one)."""
        if self.difference.low > 0:
            return self.a
        if self.difference.high < 0:
            return self.b
        return "undecided"

    @property
    def sentence(self) -> str:
        """The verdict a chapter prints, computed from the interval across seeds."""
        d, n = self.difference, len(self.seeds)
        pts = f"{100 * d.value:+.1f} points"
        head = f"{self.a} against {self.b} on {self.metric} over {n} training seeds: {pts}"
        if not np.isfinite(d.low):
            return f"{head}; fewer than two seeds (or undefined scores), so no interval and no verdict."
        ci = f"{100 * d.level:.0f} % interval [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
        if self.decision == "undecided":
            return f"{head}, {ci}: not distinguishable across training seeds."
        loser = self.b if self.decision == self.a else self.a
        return f"{self.decision} beats {loser} on {self.metric} across training seeds: {pts}, {ci}."

    def as_dict(self) -> dict:
        """For ``metrics.json``: per-seed values, the interval (null where undefined), the decision."""
        def plain(v):
            return None if isinstance(v, float) and not np.isfinite(v) else v
        per_seed = [{"seed": s, self.a: plain(float(x)), self.b: plain(float(y)),
                     "difference": plain(float(x - y))}
                    for s, x, y in zip(self.seeds, self.a_values, self.b_values)]
        return {"a": self.a, "b": self.b, "metric": self.metric, "n_seeds": len(self.seeds),
                "per_seed": per_seed, **{k: plain(v) for k, v in self.difference.as_dict().items()},
                "interval": "t over seeds, training + test-sample variance (evidence.seed_difference)",
                "decision": self.decision, "sentence": self.sentence,
                **({"chosen_from": list(self.chosen_from)} if self.chosen_from else {})}


def compare_seeds(runs, a: str, b: str, name: str = "wacc", *, chosen_from=(), **kwargs) -> SeedVerdict:
    """Method ``a`` against method ``b`` across training seeds. ``runs[method][seed]``: the test
    :class:`Predictions` of ``method`` trained with ``seed``; the two are paired on the seeds both have
    (each must have every seed the other has)."""
    for m in (a, b):
        if m not in runs:
            raise KeyError(f"nbsupport.evidence.compare_seeds: no runs of {m!r}; have {sorted(runs)}")
    seeds = sorted(runs[a])
    if seeds != sorted(runs[b]):
        raise ValueError(f"nbsupport.evidence.compare_seeds: {a!r} has seeds {seeds} and {b!r} "
                         f"{sorted(runs[b])}; pair them on the same seeds")
    fn = statistic(name)
    score = lambda p: float(fn(p.labels, p.decisions))  # noqa: E731
    diff = seed_difference([runs[a][s] for s in seeds], [runs[b][s] for s in seeds], name, **kwargs)
    return SeedVerdict(a, b, name, tuple(seeds), tuple(score(runs[a][s]) for s in seeds),
                       tuple(score(runs[b][s]) for s in seeds), diff, tuple(chosen_from))


def compare_groups(runs, valid, groups, name: str = "wacc", **kwargs) -> SeedVerdict:
    """The best method of one group against the best of another, across seeds (Chapters 4 and 7: fusion
    against the best single modality, end-to-end against two-phase). ``groups``: two ``label -> methods``
    entries; each group's best is the method with the highest mean *validation* score over seeds
    (``valid[method][seed]``), so the test split decides only the comparison, never the choice."""
    best = _best_of_groups("compare_groups", groups, runs,
                           lambda m: float(np.mean([valid[m][s] for s in runs[m]])))
    return compare_seeds(runs, best[0], best[1], name, chosen_from=tuple(groups), **kwargs)


# ------------------------------------------------------------------------------------------------
# A change of a gap between two corpora, across training seeds (Chapter 7's two regimes)
# ------------------------------------------------------------------------------------------------
def seed_difference_in_differences(a2_runs, b2_runs, a1_runs, b1_runs, name: str = "wacc", *,
                                   resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """``[name(A2) - name(B2)] - [name(A1) - name(B1)]`` averaged over training seeds (Chapter 7: does the
    end-to-end minus two-phase gap change between the regimes?), with the two sources of variance of
    :func:`seed_difference`: ``var_s(c_s) / S`` over the ``S`` per-seed contrasts ``c_s`` (training
    again) plus the bootstrap variance of the seed-averaged contrast over test utterances, and a
    Student t(S-1) interval. ``x_runs[s]``: the test :class:`Predictions` of that run with seed ``s``.
    All four must hold the same utterance ids in the same order (two corpora that differ only in their
    faces and voices, as Chapter 7's regimes): one resample of utterance indices is shared by every run,
    as :func:`difference_in_differences` does for one run. NaN interval with fewer than two seeds."""
    return _seed_contrast("seed_difference_in_differences",
                          [(1, a2_runs), (-1, b2_runs), (-1, a1_runs), (1, b1_runs)], name, resamples=resamples,
                          level=level, seed=seed)


def _seed_contrast(caller: str, terms, name: str, *, resamples: int, level: float, seed: int) -> Estimate:
    """``sum(sign * name(run_s))`` over ``terms`` [(sign, runs per seed)], averaged over seeds, with the
    two-variance t(S-1) interval of :func:`seed_difference` (which is this contrast with the terms
    ``[(1, a_runs), (-1, b_runs)]``); every run scored on one shared resample of the test utterances."""
    signs, groups = [t[0] for t in terms], [list(t[1]) for t in terms]
    if len({len(g) for g in groups}) != 1 or not groups[0]:
        raise ValueError(f"nbsupport.evidence.{caller}: one run per seed for each method, got "
                         f"{[len(g) for g in groups]}")
    _same_test_split(caller, [p for g in groups for p in g])
    fn = statistic(name)

    def contrasts(i):
        return np.array([sum(sign * fn(p.labels[i], p.decisions[i]) for sign, p in zip(signs, runs))
                         for runs in zip(*groups)], dtype=float)

    n = len(groups[0][0])
    per_seed = contrasts(np.arange(n))
    value, n_seeds = float(np.mean(per_seed)), len(per_seed)
    if n_seeds < 2 or not np.all(np.isfinite(per_seed)):
        return Estimate(value, float("nan"), float("nan"), level)
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # an undefined resample (no positive of an emotion) is left out
        warnings.simplefilter("ignore", RuntimeWarning)
        boot = np.array([np.mean(contrasts(rng.integers(0, n, n))) for _ in range(resamples)])
    boot = boot[np.isfinite(boot)]
    if len(boot) < resamples // 2:
        return Estimate(value, float("nan"), float("nan"), level)
    half = float(stats.t.ppf(0.5 + level / 2, n_seeds - 1)
                 * np.sqrt(np.var(per_seed, ddof=1) / n_seeds + np.var(boot, ddof=1)))
    return Estimate(value, value - half, value + half, level)


def compare_gaps(runs2, pair2, runs1, pair1, name: str = "wacc", *, labels=("second", "first"),
                 **kwargs) -> dict:
    """Does the gap ``name(a) - name(b)`` change between two corpora, across training seeds (Chapter 7:
    end-to-end minus two-phase, hidden regime against visible)? ``runs2[method][seed]`` and ``runs1``:
    test :class:`Predictions` per corpus, ``pair2 = (a2, b2)``, ``pair1 = (a1, b1)`` the compared methods
    (e.g. each regime's best end-to-end and best two-phase), paired on the seeds all four have.
    Returns the fields every verdict of ``metrics.json`` has (``decision`` is ``"<label> gap"`` of the
    larger gap or ``"undecided"``, ``sentence``, ``value``, ``low``, ``high``, ``n_seeds``, ``per_seed``
    with both gaps), from :func:`seed_difference_in_differences` (``kwargs``: its ``resamples`` etc.)."""
    (a2, b2), (a1, b1), (l2, l1) = pair2, pair1, labels
    seeds = sorted(set(runs2[a2]) & set(runs2[b2]) & set(runs1[a1]) & set(runs1[b1]))
    if any(sorted(r[m]) != seeds for r, m in ((runs2, a2), (runs2, b2), (runs1, a1), (runs1, b1))):
        raise ValueError(f"nbsupport.evidence.compare_gaps: the four methods must have the same seeds; "
                         f"{a2}, {b2} ({l2}) and {a1}, {b1} ({l1}) differ")
    diff = seed_difference_in_differences(*([r[m][s] for s in seeds] for r, m in
                                            ((runs2, a2), (runs2, b2), (runs1, a1), (runs1, b1))),
                                          name, **kwargs)
    fn = statistic(name)

    def gap(runs, a, b, s):
        return float(fn(runs[a][s].labels, runs[a][s].decisions) - fn(runs[b][s].labels, runs[b][s].decisions))

    def plain(v):
        return None if isinstance(v, float) and not np.isfinite(v) else v

    per_seed = [{"seed": s, f"{l2} gap": plain(gap(runs2, a2, b2, s)), f"{l1} gap": plain(gap(runs1, a1, b1, s)),
                 "difference": plain(gap(runs2, a2, b2, s) - gap(runs1, a1, b1, s))} for s in seeds]
    head = f"{_gap_what(name, pair2, pair1, labels)}, over {len(seeds)} training seeds: {100 * diff.value:+.1f} points"
    if not np.isfinite(diff.low):
        decision, sentence = "undecided", f"{head}; fewer than two seeds, so no interval and no verdict."
    else:
        ci = f"{100 * diff.level:.0f} % interval [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"
        decision = f"{l2} gap" if diff.low > 0 else f"{l1} gap" if diff.high < 0 else "undecided"
        sentence = (f"{head}, {ci}: not distinguishable across training seeds." if decision == "undecided"
                    else f"{head}, {ci}: the {decision} is larger, across training seeds.")
    return {"a": f"{l2} gap", "b": f"{l1} gap", "metric": name, "pairs": {l2: list(pair2), l1: list(pair1)},
            "n_seeds": len(seeds), "per_seed": per_seed, **{k: plain(v) for k, v in diff.as_dict().items()},
            "interval": "t over seeds, training + test-sample variance "
                        "(evidence.seed_difference_in_differences)",
            "decision": decision, "sentence": sentence}


def _gap_what(name: str, pair2, pair1, labels) -> str:
    """What :func:`compare_gaps` and :func:`gap_change` measure, in words."""
    (a2, b2), (a1, b1), (l2, l1) = pair2, pair1, labels
    return f"the gap {name}({a2}) - {name}({b2}) in {l2} minus {name}({a1}) - {name}({b1}) in {l1}"


def gap_change(preds2: dict[str, Predictions], pair2, preds1: dict[str, Predictions], pair1, name: str = "wacc",
               *, labels=("second", "first"), **kwargs) -> Comparison:
    """Does the gap ``name(a) - name(b)`` change between two corpora, in *one* run (Chapter 7: end-to-end
    minus two-phase, hidden regime against visible)? ``preds2``/``preds1``: each corpus's test
    :class:`Predictions` per method, ``pair2 = (a2, b2)`` and ``pair1 = (a1, b1)`` the compared methods.
    :func:`difference_in_differences` (one resample of the utterances shared by all four) with its
    sentence: a description of one trained model per method; the verdict across training seeds is
    :func:`compare_gaps`."""
    (a2, b2), (a1, b1) = pair2, pair1
    diff = difference_in_differences(preds2[a2], preds2[b2], preds1[a1], preds1[b1], name, **kwargs)
    sentence = (f"this run, test resamples: {_gap_what(name, pair2, pair1, labels)}: "
                f"{100 * diff.value:+.1f} points, {100 * diff.level:.0f} % CI "
                f"[{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]; a description only")
    return Comparison(f"{labels[0]} gap", f"{labels[1]} gap", name, diff, sentence)
