"""Evaluation metrics of the two papers, on top of scikit-learn (Chapter 2; used by Chapters 3-8).

Emotions (multi-label, one binary decision per emotion, MESM Sec. 4.2 / UMONS Sec. 5):
per-emotion accuracy, weighted accuracy ``WAcc = (TP * N / P + TN) / (2N)`` (Tong et al. 2017, the
metric MOSEI emotion papers report), F1 (binary per emotion, and support-weighted), ROC AUC, and the
per-emotion decision threshold chosen on validation by F1 (MESM). Sentiment (CMU-MOSEI, scores in
[-3, 3]): Acc-2 (non-zero: neutral items dropped; and with zero counted as positive), Acc-5, Acc-7,
MAE and Pearson r (Zadeh et al. 2018 conventions).
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

__all__ = ["per_emotion_accuracy", "weighted_accuracy", "per_emotion_weighted_accuracy", "f1_per_emotion",
           "weighted_f1", "auc_per_emotion", "best_thresholds", "emotion_metrics", "sentiment_metrics",
           "acc2", "acc2_with_zero", "acc2_has0", "acc2_non0", "acc5", "acc7", "acc7_bins", "sentiment7_bins",
           "mae", "pearson_r", "sigmoid", "decisions", "is_score_output", "THRESHOLD_TIES"]

#: Tie rules of :func:`best_thresholds`: the threshold closest to 0.5 (book) or the lowest (MESM's code).
THRESHOLD_TIES = ("closest", "lowest")


def _as2d(a, name: str) -> np.ndarray:
    a = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (n,) or (n, classes), got {a.shape}")
    return a


def _pair(y_true, y_pred):
    t, p = _as2d(y_true, "y_true"), _as2d(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} must have the same shape")
    if t.shape[0] == 0:
        raise ValueError("metrics need at least one item (got 0)")
    return t > 0.5, p > 0.5


def sigmoid(x) -> np.ndarray:
    """Logistic function, numerically stable (logits -> probabilities)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


def per_emotion_accuracy(y_true, y_pred) -> np.ndarray:
    """Plain binary accuracy of each emotion column, (classes,)."""
    t, p = _pair(y_true, y_pred)
    return (t == p).mean(0)


def per_emotion_weighted_accuracy(y_true, y_pred) -> np.ndarray:
    """Weighted accuracy (TP * N / P + TN) / (2N) of each emotion column, (classes,).

    Equals balanced accuracy (TPR + TNR) / 2; NaN for a column with no positives or no negatives.
    """
    t, p = _pair(y_true, y_pred)
    P, N = t.sum(0), (~t).sum(0)
    tp, tn = (t & p).sum(0), (~t & ~p).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = (tp * N / P + tn) / (2 * N)
    return np.where((P > 0) & (N > 0), w, np.nan)


def weighted_accuracy(y_true, y_pred) -> float:
    """WAcc = (TP * N / P + TN) / (2N), averaged over emotion columns (one column: that column's)."""
    return float(np.nanmean(per_emotion_weighted_accuracy(y_true, y_pred)))


def f1_per_emotion(y_true, y_pred) -> np.ndarray:
    """Binary F1 of each emotion column (sklearn ``f1_score``; 0 when nothing is predicted or true)."""
    t, p = _pair(y_true, y_pred)
    return np.array([f1_score(t[:, j], p[:, j], zero_division=0) for j in range(t.shape[1])])


def weighted_f1(y_true, y_pred) -> float:
    """Support-weighted F1 over emotion columns (sklearn ``average="weighted"``, multi-label indicator)."""
    t, p = _pair(y_true, y_pred)
    return float(f1_score(t.astype(int), p.astype(int), average="weighted", zero_division=0))


def auc_per_emotion(y_true, scores) -> np.ndarray:
    """ROC AUC of each emotion column (sklearn); NaN where a column has a single class."""
    t = _as2d(y_true, "y_true") > 0.5
    s = _as2d(scores, "scores")
    out = []
    for j in range(t.shape[1]):
        out.append(roc_auc_score(t[:, j], s[:, j]) if 0 < t[:, j].sum() < len(t) else np.nan)
    return np.asarray(out)


def best_thresholds(y_true, probs, grid=None, ties: str = "closest") -> np.ndarray:
    """Per-emotion threshold maximising binary F1 on validation (MESM's threshold selection).

    ``grid`` defaults to 0.05, 0.10, ..., 0.95. ``ties``: ``"closest"`` takes the threshold closest to
    0.5 among equal F1 (the book), ``"lowest"`` the lowest one (MESM's code, an argmax over the grid).
    """
    if ties not in THRESHOLD_TIES:
        raise ValueError(f"best_thresholds: parameter 'ties' must be one of {THRESHOLD_TIES}, got {ties!r}")
    t = _as2d(y_true, "y_true") > 0.5
    p = _as2d(probs, "probs")
    grid = np.arange(0.05, 0.951, 0.05) if grid is None else np.asarray(grid, dtype=np.float64)
    order = (np.argsort(np.abs(grid - 0.5), kind="stable") if ties == "closest"
             else np.argsort(grid, kind="stable"))
    out = np.empty(t.shape[1])
    for j in range(t.shape[1]):
        scores = [f1_score(t[:, j], p[:, j] > g, zero_division=0) for g in grid[order]]
        out[j] = grid[order][int(np.argmax(scores))]
    return out


def is_score_output(outputs) -> bool:
    """True when a sentiment model's outputs are one score per item, (N,) or (N, 1) (MulT's regression
    head, Tsai et al. 2019), rather than class logits (N, 7) or (N, 2)."""
    shape = tuple(outputs.shape)
    return len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)


def decisions(logits, task: str = "emotion", thresholds=None, *, probs: bool = False) -> np.ndarray:
    """The book's one rule from a model's outputs to its decisions (Chapters 3-8: metrics and evidence).

    ``emotion``: 1 where ``sigmoid(logit) > threshold`` (0.5, one per emotion from :func:`best_thresholds`,
    MESM's protocol; ``probs=True`` when ``logits`` already are probabilities), else 0, ``(n, emotions)``
    int8. ``sentiment7``: the predicted class minus 3, a score in -3..3. ``sentiment2``: +1 for class 1
    (non-negative), -1 for class 0. A one-output model (:func:`is_score_output`): the score itself, which
    the sentiment metrics clip and round (Acc-7) or compare by sign (Acc-2) as MulT's evaluation does.
    :func:`nbsupport.train.compute_metrics` and :func:`nbsupport.evidence.predictions_from` both decide
    through here.
    """
    s = np.asarray(logits.detach().cpu().numpy() if hasattr(logits, "detach") else logits, dtype=np.float64)
    if task == "emotion":
        th = 0.5 if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        return ((s if probs else sigmoid(s)) > th).astype(np.int8)
    if task not in ("sentiment7", "sentiment2"):
        raise ValueError(f"task must be 'emotion', 'sentiment7' or 'sentiment2', got {task!r}")
    if is_score_output(s):  # one output per item: the predicted score itself (MulT's regression head)
        return s.reshape(-1)
    pred = s.argmax(-1)
    return pred - 3.0 if task == "sentiment7" else np.where(pred == 1, 1.0, -1.0)


def emotion_metrics(logits, targets, thresholds=None, *, probs: bool = False) -> dict:
    """Shared metric names for emotions from (logits, 0/1 targets), both (n, classes) -- Chapters 3-8.

    Decisions are ``sigmoid(logits) > thresholds`` (default 0.5; pass :func:`best_thresholds` from the
    validation split for MESM's protocol; ``probs=True`` when ``logits`` already are probabilities).
    Returns ``wacc``, ``acc``, ``f1`` (each averaged over emotions), ``f1_weighted``, ``auc`` and the
    per-emotion lists ``wacc_per``, ``acc_per``, ``f1_per``, ``auc_per``.
    """
    s = _as2d(logits, "logits")
    pr = s if probs else sigmoid(s)
    pred = decisions(pr, "emotion", thresholds, probs=True)
    t = _as2d(targets, "targets")
    w = per_emotion_weighted_accuracy(t, pred)
    a = per_emotion_accuracy(t, pred)
    f = f1_per_emotion(t, pred)
    u = auc_per_emotion(t, pr)
    return {"wacc": float(np.nanmean(w)), "acc": float(a.mean()), "f1": float(f.mean()),
            "f1_weighted": weighted_f1(t, pred), "auc": float(np.nanmean(u)) if np.isfinite(u).any() else float("nan"),
            "wacc_per": w.tolist(), "acc_per": a.tolist(), "f1_per": f.tolist(), "auc_per": u.tolist()}


def _sent(y_true, y_pred):
    t = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"sentiment y_true {t.shape} and y_pred {p.shape} must have the same length")
    ok = np.isfinite(t)
    if not ok.any():
        raise ValueError("sentiment metrics need finite targets (got none)")
    return t[ok], p[ok]


def acc2(y_true, y_pred) -> float:
    """Binary sentiment accuracy, non-zero protocol: items with target 0 are dropped, sign compared."""
    t, p = _sent(y_true, y_pred)
    nz = t != 0
    return float(((t[nz] > 0) == (p[nz] > 0)).mean()) if nz.any() else float("nan")


def acc2_with_zero(y_true, y_pred) -> float:
    """Binary sentiment accuracy with zero counted as non-negative: (target >= 0) == (pred >= 0)."""
    t, p = _sent(y_true, y_pred)
    return float(((t >= 0) == (p >= 0)).mean())


def acc2_non0(y_true, y_pred) -> float:
    """Acc-2, "Non0" convention: utterances labelled 0 are dropped, the signs compared (= :func:`acc2`;
    MulT's and MESM's ``exclude_zero=True``)."""
    return acc2(y_true, y_pred)


def acc2_has0(y_true, y_pred) -> float:
    """Acc-2, "Has0" convention: 0 counts as non-negative, ``(y >= 0) == (pred >= 0)`` (=
    :func:`acc2_with_zero`; UMONS's ``cmumosei_2`` classes)."""
    return acc2_with_zero(y_true, y_pred)


def sentiment7_bins(scores) -> np.ndarray:
    """CMU-MOSEI's 7 sentiment classes, as the SDK's instructions and UMONS's code bin them (Chapters 3-4):
    ``s < -2`` -> 0, ``[-2, -1)`` -> 1, ``[-1, 0)`` -> 2, ``0`` -> 3, ``(0, 1]`` -> 4, ``(1, 2]`` -> 5,
    ``s > 2`` -> 6. Unlike ``round(clip(s, -3, 3)) + 3`` it never sends a non-zero score to class 3, so
    labels at one-third steps (-7/3, -4/3, -1/3, 1/3, 4/3, 7/3) land one class away from rounding."""
    s = np.asarray(scores, dtype=np.float64)
    neg = np.select([s < -2, s < -1, s < 0], [0, 1, 2], 3)
    pos = np.select([s > 2, s > 1, s > 0], [6, 5, 4], 3)
    return np.where(s < 0, neg, pos).astype(np.int64)


def acc7_bins(y_true, y_pred) -> float:
    """7-class sentiment accuracy with CMU-MOSEI's class bins (:func:`sentiment7_bins`) for both, as UMONS
    scores it; integer scores -3..3 (a predicted class minus 3) map to themselves + 3."""
    t, p = _sent(y_true, y_pred)
    return float((sentiment7_bins(t) == sentiment7_bins(p)).mean())


def _acck(t, p, lim):
    return float((np.round(np.clip(t, -lim, lim)) == np.round(np.clip(p, -lim, lim))).mean())


def acc5(y_true, y_pred) -> float:
    """5-class sentiment accuracy: both clipped to [-2, 2] and rounded to the nearest integer."""
    return _acck(*_sent(y_true, y_pred), 2)


def acc7(y_true, y_pred) -> float:
    """7-class sentiment accuracy: both clipped to [-3, 3] and rounded to the nearest integer."""
    return _acck(*_sent(y_true, y_pred), 3)


def mae(y_true, y_pred) -> float:
    """Mean absolute error of sentiment scores."""
    t, p = _sent(y_true, y_pred)
    return float(np.abs(t - p).mean())


def pearson_r(y_true, y_pred) -> float:
    """Pearson correlation of sentiment scores (NaN when either is constant)."""
    t, p = _sent(y_true, y_pred)
    if t.std() == 0 or p.std() == 0:
        return float("nan")
    return float(np.corrcoef(t, p)[0, 1])


def sentiment_metrics(y_true, y_pred) -> dict:
    """Shared sentiment metric names: ``acc2`` (= ``acc2_non0``), ``acc2_zero`` (= ``acc2_has0``), both
    Acc-2 conventions under their own names, ``acc5``, ``acc7`` (rounding), ``acc7_bins`` (CMU-MOSEI's
    bins, UMONS), ``mae``, ``corr``."""
    non0, has0 = acc2(y_true, y_pred), acc2_with_zero(y_true, y_pred)
    return {"acc2": non0, "acc2_zero": has0, "acc2_non0": non0, "acc2_has0": has0,
            "acc5": acc5(y_true, y_pred), "acc7": acc7(y_true, y_pred), "acc7_bins": acc7_bins(y_true, y_pred),
            "mae": mae(y_true, y_pred), "corr": pearson_r(y_true, y_pred)}

