"""One validation of labels, ids and features for every data form (Chapter 2's data contract).

The raw layout, UMONS's, MMSA's and MulT's pickles and CMU-SDK ``.csd`` sequences all pass through
these checks, so a file that breaks a rule is refused the same way whatever its form, with a
:class:`~nbsupport.data.DataError` naming the file, the key or id and what was expected:

* sentiment in [-3, 3] (CMU-MOSEI, Zadeh et al. 2018); emotion intensities in [0, 3], never NaN --
  an emotion row that is all NaN is an error, not "no emotion";
* one class per utterance where the data set has one (IEMOCAP);
* ids: none repeated within a split, none in two splits;
* sequence lengths within the arrays (1 <= length <= padded length; never clipped);
* label intervals finite, with end >= start;
* features: -inf becomes 0 (the MMSA and MulT loaders' own convention for COVAREP's log features);
  NaN or +inf is an error.

It also holds the emotion names shared by the readers (:data:`SDK_MOSEI_LABELS`,
:func:`emotion_columns`), below both :mod:`~nbsupport.data.raw` and :mod:`~nbsupport.data.formats`.
"""
from __future__ import annotations

import numpy as np

from .common import EMOTIONS, DataError

__all__ = ["SENTIMENT_RANGE", "EMOTION_RANGE", "SDK_MOSEI_LABELS", "SYNONYMS", "emotion_columns",
           "check_sentiment", "check_emotions", "check_ids", "check_disjoint", "check_lengths",
           "check_intervals", "check_features"]

#: Sentiment scores of CMU-MOSEI lie in [-3, 3] (Zadeh et al. 2018); emotion intensities in [0, 3].
SENTIMENT_RANGE = (-3.0, 3.0)
EMOTION_RANGE = (0.0, 3.0)
#: Column order of CMU-MOSEI's "All Labels" sequence, as the SDK documents it (used when the file's
#: metadata has no "dimension names").
SDK_MOSEI_LABELS = ("sentiment", "happy", "sad", "anger", "surprise", "disgust", "fear")

#: Names the sources use for an emotion -> the book's name (EMOTIONS), per data set.
SYNONYMS = {
    "mosei": {"anger": "anger", "angry": "anger", "ang": "anger", "disgust": "disgust", "dis": "disgust",
              "fear": "fear", "fea": "fear", "happy": "happy", "happiness": "happy", "hap": "happy",
              "sad": "sad", "sadness": "sad", "surprise": "surprise", "sur": "surprise"},
    "iemocap": {"ang": "ang", "anger": "ang", "angry": "ang", "exc": "exc", "excited": "exc",
                "fru": "fru", "frustrated": "fru", "frustration": "fru", "hap": "hap", "happy": "hap",
                "happiness": "hap", "neu": "neu", "neutral": "neu", "sad": "sad", "sadness": "sad"},
}


def emotion_columns(names, dataset: str, where: str) -> list[tuple[int, str]]:
    """Match a source's label names to the book's emotions **by name** (never by position).

    Returns ``[(source column, book name)]`` in the book's order (:data:`~nbsupport.data.EMOTIONS`),
    for the emotions the source has; names that are not emotions (``sentiment``) are skipped.
    DataError when two columns name the same emotion."""
    syn = SYNONYMS.get(dataset, {})
    found: dict[str, int] = {}
    for j, n in enumerate(names):
        book = syn.get(str(n).strip().lower())
        if book is None:
            continue
        if book in found:
            raise DataError(f"{where}: columns {found[book]} and {j} both name emotion {book!r}")
        found[book] = j
    return [(found[n], n) for n in EMOTIONS[dataset] if n in found]


def _numbers(values, where: str, what: str) -> np.ndarray:
    try:
        return np.asarray(values, np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {what} must be numbers") from None


def check_sentiment(values, where: str, *, allow_nan: bool = False) -> np.ndarray:
    """Sentiment scores as float32 after checking they lie in [-3, 3] (NaN only when ``allow_nan``:
    a form that marks "no sentiment" that way)."""
    s = _numbers(values, where, "sentiment scores").reshape(-1)
    lo, hi = SENTIMENT_RANGE
    nan = np.isnan(s)
    if nan.any() and not allow_nan:
        raise DataError(f"{where}: {int(nan.sum())} sentiment score(s) are NaN (rows "
                        f"{np.flatnonzero(nan)[:5].tolist()}); expected numbers in [{lo:g}, {hi:g}]")
    bad = ~nan & ~((s >= lo - 1e-6) & (s <= hi + 1e-6))
    if bad.any():
        raise DataError(f"{where}: sentiment must lie in [{lo:g}, {hi:g}]; rows {np.flatnonzero(bad)[:5].tolist()} "
                        f"hold {s[bad][:5].tolist()}")
    return s.astype(np.float32)


def check_emotions(values, where: str, *, one_class: bool = False) -> np.ndarray:
    """(N, E) emotion intensities or presence values as float32 after checking: finite (a NaN, also a
    row that is all NaN, is an error), in [0, 3], and one positive class per row when ``one_class``
    (IEMOCAP)."""
    e = _numbers(values, where, "emotion labels")
    if e.ndim != 2:
        raise DataError(f"{where}: emotion labels have shape {e.shape}, expected (utterances, emotions)")
    bad_rows = ~np.isfinite(e).all(1)
    if bad_rows.any():
        rows = np.flatnonzero(bad_rows)
        all_nan = int(np.isnan(e[rows]).all(1).sum())
        raise DataError(f"{where}: {len(rows)} utterance(s) have NaN/inf emotion labels ({all_nan} of them all NaN; "
                        f"rows {rows[:5].tolist()}); expected numbers in [0, 3] (an all-NaN row is not "
                        "'no emotion')")
    lo, hi = EMOTION_RANGE
    out = (e < lo) | (e > hi)
    if out.any():
        rows = np.flatnonzero(out.any(1))
        raise DataError(f"{where}: emotion labels must lie in [{lo:g}, {hi:g}]; rows {rows[:5].tolist()} hold "
                        f"{e[rows[0]].tolist()}")
    if one_class and e.shape[0]:
        k = (e > 0).sum(1)
        rows = np.flatnonzero(k != 1)
        if len(rows):
            raise DataError(f"{where}: each utterance must have exactly one emotion class; rows "
                            f"{rows[:5].tolist()} have {k[rows[:5]].tolist()}")
    return e.astype(np.float32)


def check_ids(ids, where: str, hint: str = "") -> list[str]:
    """``ids`` as strings after checking that none is repeated (DataError listing a few, then ``hint``)."""
    ids = [str(i) for i in ids]
    seen, dup = set(), []
    for u in ids:
        if u in seen and u not in dup:
            dup.append(u)
        seen.add(u)
    if dup:
        raise DataError(f"{where}: {len(dup)} id(s) listed more than once: {', '.join(map(repr, dup[:5]))}"
                        + (f" ({hint})" if hint else ""))
    return ids


def check_disjoint(ids_by_split: dict, where: str) -> None:
    """DataError when an id is in two splits (``{split: ids}``), naming both splits and a few ids."""
    names = list(ids_by_split)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            shared = set(map(str, ids_by_split[names[a]])) & set(map(str, ids_by_split[names[b]]))
            if shared:
                raise DataError(f"{where}: {len(shared)} id(s) are in both {names[a]!r} and {names[b]!r}: "
                                f"{', '.join(map(repr, sorted(shared)[:5]))} (splits must be disjoint)")


def check_lengths(lengths, max_len: int, where: str) -> np.ndarray:
    """Sequence lengths as int64 after checking each is a whole number in [1, ``max_len``] (the padded
    length): a length outside the array is an error, never clipped."""
    a = _numbers(lengths, where, "lengths").reshape(-1)
    bad = ~np.isfinite(a) | (a != np.round(a)) | (a < 1) | (a > max_len)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(f"{where}: lengths must be whole numbers in [1, {max_len}] (the padded length); rows "
                        f"{rows[:5].tolist()} hold {a[rows][:5].tolist()}")
    return a.astype(np.int64)


def check_intervals(iv, where: str) -> np.ndarray:
    """(n, 2) start/end times as float64 after checking they are finite with end >= start."""
    iv = _numbers(iv, where, "intervals")
    if iv.ndim != 2 or iv.shape[1] != 2:
        raise DataError(f"{where}: intervals have shape {iv.shape}, expected (n, 2) start/end")
    bad = ~np.isfinite(iv).all(1) | (iv[:, 1] < iv[:, 0])
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(f"{where}: intervals must be finite with end >= start; rows {rows[:5].tolist()} hold "
                        f"{iv[rows][:3].tolist()}")
    return iv


def check_features(x, where: str) -> np.ndarray:
    """Features as float32 with -inf set to 0 (MMSA's and MulT's convention for COVAREP's log features;
    in place when ``x`` is a writable float32 array, since a CMU-MOSEI pickle is several GB) after
    checking there is no NaN or +inf (DataError with the count: clean the file, or replace the values
    yourself and say so)."""
    x = np.asarray(x, np.float32)
    nan, pinf = np.isnan(x), np.isposinf(x)
    if nan.any() or pinf.any():
        raise DataError(f"{where}: features hold {int(nan.sum())} NaN and {int(pinf.sum())} +inf value(s); "
                        "expected finite numbers (-inf is read as 0, as MMSA and MulT do)")
    ninf = np.isneginf(x)
    if ninf.any():
        if not x.flags.writeable:
            x = x.copy()
        x[ninf] = 0.0
    return x
