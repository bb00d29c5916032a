"""Pre-extracted CMU-MOSEI, CMU-MOSI and IEMOCAP features in the forms researchers hold them (Chapter 2).

The two-phase chapters (3, 4 and 7) train on feature sequences. Besides the book's own layouts
(the MESM raw layout, ``"raw"``, whose features :mod:`nbsupport.data.datasets` computes, and UMONS's
pickles, ``"umons"``) this module reads the three forms in which the field passes those features on:

* ``"mmsa"`` -- the MMSA toolkit's ``aligned_50.pkl`` / ``unaligned_50.pkl``: ``{train, valid, test}``,
  each with ``raw_text``, ``text`` (N, Lt, 768 BERT features), ``text_bert`` (N, 3, Lt: ids, mask,
  segment), ``audio`` / ``vision`` (N, L, D) padded, ``audio_lengths`` / ``vision_lengths`` (unaligned
  only), ``id`` ("video$_$clip"), ``regression_labels`` (sentiment in [-3, 3]). No emotion labels:
  :func:`merge_emotions` adds CMU-MOSEI's, each clip matched to the SDK utterance its id names (CLI below).
* ``"mult"`` -- the MulT pickles ``mosei_senti_data[_noalign].pkl``, ``mosi_data[_noalign].pkl``,
  ``iemocap_data[_noalign].pkl`` (Tsai et al. 2019): ``vision``, ``text`` (300-d GloVe), ``audio``,
  ``labels``, ``id``. IEMOCAP's ``labels`` are (N, 4, 2): four emotions in MulT's order
  (:data:`MULT_IEMOCAP_EMOTIONS`), each a two-way choice (index 1 = present).
* ``"csd"`` -- CMU-MultimodalSDK computational sequences (HDF5): ``<sequence name>/data/<video id>/
  {features, intervals}`` plus ``metadata``. Utterances are the rows of the label sequence, numbered
  ``<video>[k]`` as the SDK's ``align()`` numbers them (stored row order); each modality contributes the
  rows whose time interval overlaps the utterance's. Label columns are named by the file's metadata.

Every loader returns a :class:`FeatureSplit` whose items have the keys the UMONS and two-phase models
read (:func:`nbsupport.data.collate_umons`): ``id``, ``text`` / ``audio`` / ``video`` float tensors
(T, D), ``emotion`` (E,) presence in the book's order (:data:`~nbsupport.data.EMOTIONS`) and
``sentiment`` in [-3, 3] (NaN when the source has none). Emotion columns are always matched **by
name**: the SDK's label order (sentiment, happy, sad, anger, surprise, disgust, fear) is not MESM's
(anger, disgust, fear, happy, sad, surprise), and mixing the two by position silently swaps emotions.

``data_format="auto"`` (:func:`detect_format`) tells the forms apart from the files. Pickles are read
with :mod:`nbsupport.data.safe_pickle`: plain containers and NumPy arrays only, never code.

CLI::

    python -m nbsupport.data.formats inspect ROOT [--dataset mosei] [--columns sdk-default] [--sequence video=NAME]
    python -m nbsupport.data.formats merge-emotions unaligned_50.pkl --emotions CMU_MOSEI_Labels.csd \\
        --out unaligned_50_emotions.pkl [--segments Transcript/Segmented/Combined] [--columns sdk-default]
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import pickle
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from nbsupport.base import ParameterError, WriteError, atomic_write

from .common import EMOTIONS, SPLITS, DataError, check_split
from .datasets import umons_pickle_dataset
from .features import _pool_frames
from .hdf5_safe import open_hdf5
from .safe_pickle import load_pickle
from .validate import SDK_MOSEI_LABELS, SYNONYMS as _SYNONYMS, check_disjoint, check_emotions, check_features, \
    check_ids, check_intervals, check_lengths, check_sentiment, emotion_columns

__all__ = ["DATA_FORMATS", "FEATURE_FORMATS", "LABEL_COLUMNS", "MULT_IEMOCAP_EMOTIONS", "SDK_MOSEI_LABELS",
           "SDK_EPSILON", "FeatureSplit", "detect_format", "resolve_format", "feature_dataset", "load_mmsa",
           "load_mult", "load_csd", "read_csd", "csd_emotion_labels", "sdk_utterance_rows",
           "sdk_overlapping_rows", "merge_emotions",
           "read_transcript_segments", "emotion_columns", "main"]

#: Values of the ``data_format`` parameter (``"raw"``: the MESM raw layout; ``"umons"``: UMONS's pickles).
DATA_FORMATS = ("auto", "raw", "umons", "mmsa", "mult", "csd")
#: The forms that hold pre-extracted features (two-phase models only; no frames or waveforms).
FEATURE_FORMATS = ("umons", "mmsa", "mult", "csd")
#: MulT's IEMOCAP label order ("Neutral", "Happy", "Sad", "Angry" in its evaluation code), as book names.
MULT_IEMOCAP_EMOTIONS = ("neu", "hap", "sad", "ang")
#: Column order of the SDK's six-column "Emotion Labels" sequence (no sentiment), as its author gives it.
SDK_EMOTION_LABELS = SDK_MOSEI_LABELS[1:]
#: How a label sequence's columns are named (parameter ``columns`` / ``label_columns``): ``"metadata"``
#: reads its "dimension names" and stops when they are missing, unreadable or unknown; ``"sdk-default"``
#: then takes the SDK's documented order (:data:`SDK_MOSEI_LABELS`, 6 columns: without sentiment).
LABEL_COLUMNS = ("metadata", "sdk-default")
#: The SDK's ``epsilon`` (mmdatasdk/dataset/dataset.py): ``align()`` makes no utterance of a label row
#: whose interval is shorter than this (seconds).
SDK_EPSILON = 10e-4
logger = logging.getLogger(__name__)
_SPLIT_KEYS = {"train": ("train",), "valid": ("valid", "dev", "val"), "test": ("test",)}
_MMSA_NAMES = ("unaligned_50.pkl", "aligned_50.pkl")
_MULT_RE = re.compile(r"^(mosei_senti|mosi|iemocap)_data(_noalign)?\.pkl$")


# ----------------------------------------------------------------------------------------------
# Safe pickles and HDF5
# ----------------------------------------------------------------------------------------------
_PICKLES: dict = {}


def _cached_pickle(path: Path):
    """One read of a (large) pickle for its three splits: cached by path, size and mtime."""
    if not path.is_file():
        raise DataError(f"{path}: data pickle missing")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _PICKLES:
        _PICKLES.clear()  # keep at most one corpus in memory
        _PICKLES[key] = load_pickle(path, "data pickle")
    return _PICKLES[key]


_MAX_METADATA_CHARS = 1 << 20


def _metadata_value(raw):
    """One ``.csd`` metadata value in any form the CMU-MultimodalSDK versions wrote (Chapter 2).

    Each value is a one-element string dataset. The current SDK writes ``json.dumps(value)``
    (file_ops.write_CSD); the PyPI release 0.0.6 writes ``str(value)``, so a list of column names is a
    Python literal such as ``"['sentiment', 'happy', ...]"``; h5py returns either as bytes. A value the
    current SDK could not parse and wrote back is the JSON of such a literal. Literals are parsed with
    :func:`ast.literal_eval` (data only, nothing is evaluated); text that is neither JSON nor a literal
    (a plain string written with ``str``) stays text."""
    if isinstance(raw, np.ndarray):
        raw = raw.reshape(-1)[0] if raw.size else ""
    if isinstance(raw, (bytes, np.bytes_)):
        raw = bytes(raw).decode("utf8", "replace")
    if isinstance(raw, np.generic):
        return raw.item()
    value = raw
    for _ in range(3):  # JSON of a str() literal: two layers
        if not isinstance(value, str) or len(value) > _MAX_METADATA_CHARS:
            break
        text = value.strip()
        try:
            new = json.loads(text)
        except RecursionError:
            break
        except ValueError:
            if not text or text[0] not in "[({'\"u":
                break
            try:
                new = ast.literal_eval(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                break
        if new == value:
            break
        value = new
    return value


def read_csd(path, videos=None) -> tuple[str, dict, dict]:
    """Read a CMU-MultimodalSDK computational sequence (``.csd``, HDF5 via h5py) -> ``(name, data, metadata)``.

    ``data`` = {video id: (features (n, D), intervals (n, 2) seconds)} for every video, or only those
    in ``videos`` (a full COVAREP sequence is gigabytes); ``metadata`` = {key: value} decoded from every
    form the SDK versions wrote (:func:`_metadata_value`). ``"__width__"`` in ``metadata`` is the
    feature width D. DataError naming the file and the key for anything else (Chapter 2)."""
    path = Path(path)
    fh, safe = open_hdf5(path, "computational sequence")  # links and storage checked (hdf5_safe)
    with fh:
        roots = list(fh.keys())
        if len(roots) != 1:
            raise DataError(f"{path}: expected one top-level group (the sequence name), found {roots}")
        name = roots[0]
        grp = fh[name]
        if "data" not in grp:
            raise DataError(f"{path}: key '{name}/data' missing (expected <name>/data/<video id>/{{features, "
                            "intervals}})")
        data, width = {}, None
        for vid, entry in grp["data"].items():
            if width is None and "features" in entry:
                width = int(np.prod(entry["features"].shape[1:]))
            if videos is not None and vid not in videos:
                continue
            for k in ("features", "intervals"):
                if k not in entry:
                    raise DataError(f"{path}: key '{name}/data/{vid}/{k}' missing")
            key = f"{name}/data/{vid}"
            feats = safe.read(entry["features"], f"{key}/features")
            iv = np.asarray(safe.read(entry["intervals"], f"{key}/intervals"), np.float64)
            if iv.ndim != 2 or iv.shape[1] != 2 or feats.shape[0] != iv.shape[0]:
                raise DataError(f"{path}: '{name}/data/{vid}': features {feats.shape} and intervals {iv.shape} "
                                "must be (n, D) and (n, 2)")
            data[vid] = (feats, iv)
        meta = {k: _metadata_value(safe.read(ds, f"{name}/metadata/{k}", numeric=False))
                for k, ds in (grp["metadata"].items() if "metadata" in grp else [])}
        meta["__width__"] = width
    return name, data, meta


# ----------------------------------------------------------------------------------------------
# Items
# ----------------------------------------------------------------------------------------------
class FeatureSplit(Dataset):
    """One split of pre-extracted features (Chapters 3, 4, 7), any source form.

    Holds per utterance ``text`` / ``audio`` / ``video`` arrays (T, D) without padding (absent
    modalities are None), ``emotion`` (N, E) presence in the order of ``emotion_names`` (a subset of
    the book's order; E = 0 when the source has no emotion labels), ``sentiment`` (N,) in [-3, 3] or
    NaN. Items: ``id``, the modalities as float32 tensors cut to at most ``seq_len`` positions (text
    truncated, audio and video average-pooled over ``seq_len`` chunks, as :func:`umons_dataset`),
    ``emotion``, ``sentiment``; batch them with :func:`~nbsupport.data.collate_umons`.
    """

    def __init__(self, ids, modalities: dict, emotion, emotion_names, sentiment, *, source: str, data_format: str,
                 split: str, seq_len: int = 60, texts=None):
        if seq_len < 1:
            raise ParameterError(f"parameter 'seq_len' must be >= 1, got {seq_len!r}")
        self.ids, self.modalities, self.source, self.data_format, self.split = list(ids), modalities, source, \
            data_format, split
        self.emotion = np.asarray(emotion, np.float32).reshape(len(self.ids), -1)
        self.emotion_names = list(emotion_names)
        self.sentiment = np.asarray(sentiment, np.float32).reshape(-1)
        self.seq_len, self.texts = seq_len, texts
        self.left_out: list[str] = []  # ids a split listed that the labels do not hold (load_csd)
        if not self.ids:
            raise DataError(f"{source}: split {split!r} holds no utterance")

    def __len__(self) -> int:
        return len(self.ids)

    def feature_dims(self) -> dict:
        """{"text": Dt, "audio": Da, "video": Dv} of the modalities present."""
        return {k: int(v[0].shape[1]) for k, v in self.modalities.items() if v is not None}

    def __getitem__(self, i: int) -> dict:

        item = {"id": self.ids[i], "emotion": torch.from_numpy(self.emotion[i].copy()),
                "sentiment": float(self.sentiment[i])}
        for key, seqs in self.modalities.items():
            if seqs is None:
                continue
            x = seqs[i][:self.seq_len] if key == "text" else _pool_frames(seqs[i], self.seq_len)
            item[key] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (T, D)
        return item

    def label_rows(self) -> dict:
        """Every item's labels without touching features (``ids``, ``emotion`` (N, E), ``sentiment`` (N,)),
        the rows :func:`nbsupport.train.fit` counts the BCE pos_weight from."""
        return {"ids": list(self.ids), "emotion": torch.from_numpy(self.emotion.copy()),
                "sentiment": torch.from_numpy(self.sentiment.copy())}


def _finite(x: np.ndarray, where: str) -> np.ndarray:
    """float32 with -inf (MMSA/MulT audio) set to 0, as the authors' loaders do; NaN or +inf is an error
    (:func:`~nbsupport.data.validate.check_features`). In place when ``x`` is already a writable float32
    array (a full CMU-MOSEI pickle is several GB); the loaded pickle is not reused for anything else."""
    return check_features(x, where)


def _unpad(x: np.ndarray, length=None) -> np.ndarray:
    """(L, D) padded -> the real rows: the first ``length`` rows when the source gives lengths (padding
    at the end), else the rows that are not all zero (MulT/aligned data pad at the front); at least one."""
    if length is not None:
        return x[:int(length)]  # validated by check_lengths: 1 <= length <= x.shape[0]
    keep = np.abs(x).sum(1) > 0
    return x[keep] if keep.any() else x[:1]


def _masked_rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The rows of ``x`` where ``mask`` is True (BERT's attention mask: a prefix, so a view), at least one."""
    n = int(mask.sum())
    if n == 0:
        return x[:1]
    return x[:n] if mask[:n].all() else x[mask]


def _split_dict(top, split: str, path: Path) -> dict:
    if not isinstance(top, dict):
        raise DataError(f"{path}: expected a dict {{train, valid, test}}, got {type(top).__name__}")
    for k in _SPLIT_KEYS[split]:
        if k in top:
            if not isinstance(top[k], dict):
                raise DataError(f"{path}: key {k!r} must be a dict of arrays, got {type(top[k]).__name__}")
            return top[k]
    raise DataError(f"{path}: key {split!r} missing (top-level keys: {sorted(map(str, top))})")


def _array(d: dict, key: str, path: Path, split: str, ndim=None, n=None) -> np.ndarray:
    if key not in d:
        raise DataError(f"{path}: key [{split!r}][{key!r}] missing (keys: {sorted(map(str, d))})")
    try:
        a = np.asarray(d[key])
    except Exception as e:
        raise DataError(f"{path}: [{split!r}][{key!r}] is not an array ({e})") from None
    if ndim is not None and a.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise DataError(f"{path}: [{split!r}][{key!r}] has shape {a.shape}, expected {ndim}-D")
    if n is not None and a.shape[0] != n:
        raise DataError(f"{path}: [{split!r}][{key!r}] has {a.shape[0]} rows, expected {n} (one per utterance)")
    return a


def _text(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf8", "replace")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _text(v.item())
    return str(v)


def _sentiment(a: np.ndarray, path: Path, split: str, key: str) -> np.ndarray:
    s = np.asarray(a, np.float64).reshape(a.shape[0], -1)
    if s.shape[1] != 1:
        raise DataError(f"{path}: [{split!r}][{key!r}] has shape {a.shape}, expected one sentiment per utterance")
    s = s[:, 0]
    if not np.isfinite(s).all() or np.abs(s).max(initial=0) > 3 + 1e-6:
        raise DataError(f"{path}: [{split!r}][{key!r}] must be sentiment scores in [-3, 3], "
                        f"got range [{np.nanmin(s):.3g}, {np.nanmax(s):.3g}]")
    return s.astype(np.float32)


def _check_dataset(dataset) -> str:
    if dataset not in ("mosei", "mosi", "iemocap"):
        raise ParameterError(f"parameter 'dataset' must be 'mosei', 'mosi' or 'iemocap', got {dataset!r}")
    return dataset


# ----------------------------------------------------------------------------------------------
# MMSA
# ----------------------------------------------------------------------------------------------
def _mmsa_ids(top: dict, split: str, path: Path) -> list[str]:
    """The ``id`` column of ``split``, checked: no id repeated, none shared with another split."""
    ids = {}
    for s in SPLITS:
        if s == split or any(k in top for k in _SPLIT_KEYS[s]):
            d = _split_dict(top, s, path)
            ids[s] = check_ids([_text(v) for v in _array(d, "id", path, s, ndim=1)], f"{path}: [{s!r}]['id']")
    check_disjoint(ids, f"{path}: ['id']")
    return ids[split]


def _mmsa_emotion_rows(emotion: np.ndarray, ids: list, where: str) -> np.ndarray:
    """Rows to keep: those with emotion labels. A row that is all NaN is one ``merge_emotions`` could not
    match: it is dropped, with a warning naming how many and which; a row that is only partly NaN is an
    error (a damaged label, not a missing one)."""
    nan = np.isnan(emotion)
    partial = nan.any(1) & ~nan.all(1)
    if partial.any():
        check_emotions(emotion[partial], where)  # raises, naming the rows
    keep = ~nan.all(1) if emotion.shape[1] else np.ones(len(ids), bool)
    if not keep.any():
        raise DataError(f"{where} matched no utterance (every row is NaN)")
    if not keep.all():
        gone = [ids[i] for i in np.flatnonzero(~keep)]
        logger.warning("%s: %d of %d utterances have no emotion labels (all NaN: merge-emotions found no "
                       "matching row) and are left out: %s", where, len(gone), len(ids),
                       ", ".join(map(repr, gone[:5])) + (" ..." if len(gone) > 5 else ""))
    return keep


def load_mmsa(path, split: str, *, dataset: str = "mosei", seq_len: int = 60) -> FeatureSplit:
    """One split of an MMSA pickle (``aligned_50.pkl`` / ``unaligned_50.pkl``) as a :class:`FeatureSplit`.

    ``text`` = the BERT features (real tokens from ``text_bert``'s mask row, else non-zero rows),
    ``audio`` / ``video`` = ``audio`` / ``vision`` cut to ``audio_lengths`` / ``vision_lengths`` when
    given (else non-zero rows), -inf set to 0 as MMSA does; ``sentiment`` = ``regression_labels``.
    Emotions only when the pickle was merged with CMU-MOSEI's labels (:func:`merge_emotions` adds
    ``emotion_labels`` and ``emotion_names``); rows whose emotions could not be matched are dropped.
    """
    path, split, dataset = Path(path), check_split(split), _check_dataset(dataset)
    if dataset == "iemocap":
        raise DataError(f"{path}: MMSA's pickles hold CMU-MOSI, CMU-MOSEI or CH-SIMS, not dataset='iemocap'")
    top = _cached_pickle(path)
    d = _split_dict(top, split, path)
    ids = _mmsa_ids(top, split, path)
    n = len(ids)
    sent = _sentiment(_array(d, "regression_labels", path, split, n=n), path, split, "regression_labels")
    mods: dict = {}
    if "text" in d:
        text = _finite(_array(d, "text", path, split, ndim=3, n=n), f"{path}: [{split!r}]['text']")
        mask = None
        if "text_bert" in d:
            tb = _array(d, "text_bert", path, split, ndim=3, n=n)
            if tb.shape[1] != 3 or tb.shape[2] != text.shape[1]:
                raise DataError(f"{path}: [{split!r}]['text_bert'] has shape {tb.shape}, expected (N, 3, "
                                f"{text.shape[1]}) (ids, mask, segment ids)")
            mask = tb[:, 1] > 0
        mods["text"] = [_masked_rows(text[i], mask[i]) if mask is not None else _unpad(text[i]) for i in range(n)]
    for key, src in (("audio", "audio"), ("video", "vision")):
        if src in d:
            x = _finite(_array(d, src, path, split, ndim=3, n=n), f"{path}: [{split!r}][{src!r}]")
            lens = check_lengths(_array(d, f"{src}_lengths", path, split, n=n), x.shape[1],
                                 f"{path}: [{split!r}]['{src}_lengths']") if f"{src}_lengths" in d else None
            mods[key] = [_unpad(x[i], None if lens is None else lens[i]) for i in range(n)]
    if not mods:
        raise DataError(f"{path}: [{split!r}] has none of 'text', 'audio', 'vision'")
    emotion, names = np.zeros((n, 0), np.float32), []
    if "emotion_labels" in d:
        names = [_text(v) for v in _array(d, "emotion_names", path, split, ndim=1)]
        cols = emotion_columns(names, "mosei" if dataset == "mosi" else dataset,
                               f"{path} [{split!r}]['emotion_names']")
        emo = np.asarray(_array(d, "emotion_labels", path, split, ndim=2, n=n), np.float32)
        emotion = emo[:, [j for j, _ in cols]]
        names = [b for _, b in cols]
        keep = _mmsa_emotion_rows(emotion, ids, f"{path}: [{split!r}]['emotion_labels']")
        idx = np.flatnonzero(keep)
        ids, sent = [ids[i] for i in idx], sent[idx]
        emotion = (check_emotions(emotion[idx], f"{path}: [{split!r}]['emotion_labels']") > 0).astype(np.float32)
        mods = {k: [v[i] for i in idx] for k, v in mods.items()}
        texts = [_text(d["raw_text"][i]) for i in idx] if "raw_text" in d else None
    else:
        texts = [_text(v) for v in d["raw_text"]] if "raw_text" in d else None
    return FeatureSplit(ids, mods, emotion, names, sent, source=str(path), data_format="mmsa", split=split,
                        seq_len=seq_len, texts=texts)


# ----------------------------------------------------------------------------------------------
# MulT
# ----------------------------------------------------------------------------------------------
def _mult_ids(d: dict, n: int, split: str) -> list[str]:
    if "id" not in d:
        return [f"{split}-{i}" for i in range(n)]
    raw = np.asarray(d["id"])
    rows = raw.reshape(n, -1) if raw.size else np.empty((n, 0))
    ids = ["_".join(_text(v) for v in r) if r.size else f"{split}-{i}" for i, r in enumerate(rows)]
    seen: dict = {}
    for i, u in enumerate(ids):  # keep ids unique (a video id alone repeats over its segments)
        if u in seen:
            ids[i] = f"{u}#{i}"
        seen[u] = True
    return ids


def load_mult(path, split: str, *, dataset: str | None = None, seq_len: int = 60) -> FeatureSplit:
    """One split of a MulT pickle (Tsai et al. 2019) as a :class:`FeatureSplit` (Chapters 3, 4, 7).

    ``labels`` (N, 1[, 1]) = sentiment (CMU-MOSEI / MOSI); (N, 4, 2) = IEMOCAP's four emotions in
    MulT's order (:data:`MULT_IEMOCAP_EMOTIONS`), class 1 = present, re-ordered by name into the book's
    order (ang, hap, neu, sad). Padding rows (all zero, MulT pads at the front) are dropped; -inf in the
    audio set to 0 as MulT does. ``dataset`` (optional) must agree with the labels.
    """
    path, split = Path(path), check_split(split)
    d = _split_dict(_cached_pickle(path), split, path)
    labels = _array(d, "labels", path, split)
    n = labels.shape[0]
    mods = {}
    for key, src in (("text", "text"), ("audio", "audio"), ("video", "vision")):
        if src in d:
            x = _finite(_array(d, src, path, split, ndim=3, n=n), f"{path}: [{split!r}][{src!r}]")
            mods[key] = [_unpad(x[i]) for i in range(n)]
    if not mods:
        raise DataError(f"{path}: [{split!r}] has none of 'text', 'audio', 'vision'")
    if labels.ndim == 3 and labels.shape[1:] == (4, 2):
        if dataset not in (None, "iemocap"):
            raise DataError(f"{path}: [{split!r}]['labels'] are IEMOCAP's (N, 4, 2) emotions but "
                            f"dataset={dataset!r}")
        pairs = np.asarray(labels, np.float64)
        bad = ~np.isin(pairs, (0.0, 1.0)).all((1, 2)) | (pairs.sum(-1) != 1).any(1)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise DataError(f"{path}: [{split!r}]['labels'] must hold, per emotion, a one-hot pair [absent, present] "
                            f"of 0/1; rows {rows[:5].tolist()} hold {pairs[rows[0]].tolist()}")
        present = np.argmax(labels, axis=-1).astype(np.float32)  # (N, 4), 1 = emotion present
        cols = emotion_columns(MULT_IEMOCAP_EMOTIONS, "iemocap", str(path))
        emotion, names = present[:, [j for j, _ in cols]], [b for _, b in cols]
        sent = np.full(n, np.nan, np.float32)
    elif labels.size == n:
        if dataset == "iemocap":
            raise DataError(f"{path}: [{split!r}]['labels'] hold one sentiment per utterance, not IEMOCAP "
                            "emotions")
        sent, emotion, names = _sentiment(labels, path, split, "labels"), np.zeros((n, 0), np.float32), []
    else:
        raise DataError(f"{path}: [{split!r}]['labels'] has shape {labels.shape}; expected (N, 1, 1) sentiment or "
                        "(N, 4, 2) IEMOCAP emotions")
    return FeatureSplit(_mult_ids(d, n, split), mods, emotion, names, sent, source=str(path), data_format="mult",
                        split=split, seq_len=seq_len)


# ----------------------------------------------------------------------------------------------
# CMU-MultimodalSDK computational sequences
# ----------------------------------------------------------------------------------------------
_CSD_ROLES = (("labels", re.compile(r"label", re.I)),
              ("text", re.compile(r"glove|word_?vector|wordvector|bert", re.I)),
              ("audio", re.compile(r"covarep|opensmile|acoustic|audio", re.I)),
              ("video", re.compile(r"facet|openface|visual|vision", re.I)))


def _csd_roles(folder: Path, sequences=None) -> dict:
    """{role: path} of the ``.csd`` files in ``folder``, by file or sequence name (labels, text, audio, video).

    ``sequences`` ({role: file name, file stem or sequence name}) picks a role's file where the folder
    holds several (the SDK's high-level download has FACET and OpenFace2, two word-vector sequences);
    without it such a folder stops with a DataError listing them."""
    sequences = dict(sequences or {})
    bad = [r for r in sequences if r not in ("labels", "text", "audio", "video")]
    if bad:
        raise ParameterError(f"parameter 'csd_sequences': unknown role(s) {bad}; known: labels, text, audio, video")
    files, seq_names = sorted(folder.glob("*.csd")), {}
    for p in files:
        try:
            with h5py.File(p, "r") as fh:
                seq_names[p] = " ".join(fh.keys())
        except Exception as e:  # OSError, or RuntimeError/KeyError from a damaged file's groups
            raise DataError(f"{p}: not an HDF5 computational sequence ({e})") from None
    roles: dict = {}
    for role, want in sequences.items():
        hits = [p for p in files if want in (p.name, p.stem, seq_names[p])]
        if len(hits) != 1:
            raise DataError(f"{folder}: csd_sequences[{role!r}] = {want!r} names {len(hits)} of the sequences "
                            f"{[f'{p.name} ({seq_names[p]})' for p in files]}; give a file name or sequence name")
        roles[role] = hits[0]
    candidates: dict = {}
    for p in files:
        if p in roles.values():
            continue
        for role, pattern in _CSD_ROLES:
            if pattern.search(p.name) or pattern.search(seq_names[p]):
                candidates.setdefault(role, []).append(p)
                break
    several = {r: found for r, found in candidates.items() if r not in roles and len(found) > 1}
    if several:
        listed = "; ".join(f"several {r} sequences: " + ", ".join(f"{p.name} (sequence {seq_names[p]!r})"
                                                                for p in found) for r, found in several.items())
        example = {r: found[0].name for r, found in several.items()}
        raise DataError(f"{folder}: {listed}; choose with the parameter csd_sequences, e.g. {example}")
    for role, found in candidates.items():
        roles.setdefault(role, found[0])  # a role chosen by csd_sequences keeps its choice
    if "labels" not in roles:
        raise DataError(f"{folder}: no label sequence among {[p.name for p in files]} (expected e.g. "
                        "CMU_MOSEI_Labels.csd, sequence 'All Labels')")
    return roles


def _check_columns(columns) -> str:
    if columns not in LABEL_COLUMNS:
        raise ParameterError(f"parameter 'columns' (label_columns) must be one of {', '.join(LABEL_COLUMNS)}, "
                             f"got {columns!r}")
    return columns


def _label_names(path: Path, meta: dict, width: int, dataset: str = "mosei", columns: str = "metadata") -> list[str]:
    """Names of a label sequence's ``width`` columns, from its "dimension names" metadata.

    Names that are missing, cannot be read as a list of strings, do not fit ``width``, or are not
    ``sentiment`` nor an emotion of ``dataset`` stop with a DataError naming the file, unless
    ``columns="sdk-default"`` chooses the SDK's documented order instead (one column, with no names:
    the sentiment, which no order can swap). Readable, known names always win over that choice."""
    _check_columns(columns)
    raw = meta.get("dimension names")
    known = _SYNONYMS.get(dataset, {})
    if raw is None:
        problem = "has no 'dimension names' metadata"
    elif not (isinstance(raw, (list, tuple)) and all(isinstance(n, str) for n in raw)):
        problem = f"has 'dimension names' metadata that is not a list of names ({str(raw)[:80]!r})"
    elif len(raw) != width:
        problem = f"names {len(raw)} columns ({list(raw)}) but holds {width}"
    else:
        unknown = [n for n in raw if n.strip().lower() != "sentiment" and n.strip().lower() not in known]
        if not unknown:
            return [str(n) for n in raw]
        problem = f"names columns {unknown} that are neither 'sentiment' nor a {dataset} emotion"
    if columns == "sdk-default":
        default = {len(SDK_MOSEI_LABELS): SDK_MOSEI_LABELS, len(SDK_EMOTION_LABELS): SDK_EMOTION_LABELS,
                   1: ("sentiment",)}.get(width)
        if default is None:
            raise DataError(f"{path}: the label sequence {problem}, and the SDK's order has no {width}-column "
                            f"form (7 = {list(SDK_MOSEI_LABELS)}, 6 = without sentiment, 1 = sentiment)")
        return list(default)
    if width == 1 and raw is None:
        return ["sentiment"]
    raise DataError(f"{path}: the label sequence {problem}, so its emotion columns cannot be matched by name; "
                    f"pass columns='sdk-default' (parameter label_columns) to read them in the SDK's documented "
                    f"order {list(SDK_MOSEI_LABELS)} (without 'sentiment' for 6 columns)")


def csd_emotion_labels(path, dataset: str = "mosei", columns: str = "metadata") -> dict:
    """CMU's label sequence -> {video id: (intervals (n, 2), sentiment (n,) or None, intensity (n, E))}.

    Rows stay in the file's stored order: row ``k`` is the SDK's utterance ``<video>[k]``
    (:func:`sdk_utterance_rows`), which is not time order in the real label file. Columns are matched to
    the book's emotion names **by name** from the file's "dimension names" (:func:`_label_names`;
    ``columns="sdk-default"`` when the file does not name them). Also returns ``"__names__"``: the book
    names of the E columns.
    """
    path = Path(path)
    _, data, meta = read_csd(path)
    if not data:
        raise DataError(f"{path}: the label sequence has no video")
    width = next(iter(data.values()))[0].shape[1]
    names = _label_names(path, meta, width, dataset, columns)
    cols = emotion_columns(names, dataset, str(path))
    s_col = [j for j, n in enumerate(names) if str(n).strip().lower() == "sentiment"]
    out = {"__names__": [b for _, b in cols]}
    for vid, (feats, iv) in data.items():
        feats = np.asarray(feats, np.float64)
        if feats.shape[1] != width:
            raise DataError(f"{path}: '{vid}' has {feats.shape[1]} label columns, expected {width}")
        where = f"{path}: '{vid}'"
        iv = check_intervals(iv, f"{where} label intervals")  # stored order kept: row k is v[k]
        sent = check_sentiment(feats[:, s_col[0]], f"{where} sentiment") if s_col else None
        out[vid] = (iv, sent, check_emotions(feats[:, [j for j, _ in cols]], f"{where} emotions"))
    return out


def sdk_utterance_rows(intervals) -> list[int]:
    """The label rows that the SDK's ``mmdataset.align()`` turns into utterances, as it numbers them.

    ``align()`` walks the reference (label) sequence's rows in their **stored** order and names row
    ``k`` of video ``v`` ``v[k]``; it skips (without renumbering) a row whose interval is shorter than
    :data:`SDK_EPSILON`. So utterance ``v[k]`` is stored row ``k`` (Chapter 2, CMU-MultimodalSDK
    mmdatasdk/dataset/dataset.py)."""
    iv = np.asarray(intervals, np.float64).reshape(-1, 2)
    return [k for k in range(iv.shape[0]) if not abs(iv[k, 0] - iv[k, 1]) < SDK_EPSILON]


def sdk_overlapping_rows(intervals, start: float, end: float) -> np.ndarray:
    """Rows of a feature sequence that the SDK's ``align()`` gives the utterance ``[start, end]``.

    It reads the sequence in time order (rows sorted by start, stably) and keeps a row whose interval,
    clipped to the utterance's, is longer than :data:`SDK_EPSILON` (``__intersect_and_copy`` in
    mmdatasdk/dataset/dataset.py). Returns the row indices in that order."""
    iv = np.asarray(intervals, np.float64).reshape(-1, 2)
    order = np.argsort(iv[:, 0], kind="stable")
    iv = iv[order]
    near = (iv[:, 0] < end + SDK_EPSILON) & (iv[:, 1] > start - SDK_EPSILON)
    clipped = np.minimum(iv[:, 1], end) - np.maximum(iv[:, 0], start)
    return order[near & (np.abs(clipped) > SDK_EPSILON)]


def _read_split_ids(folder: Path, split: str) -> list[str]:
    f = folder / f"{split}_split.txt"
    if not f.is_file():
        raise DataError(f"{f}: split file missing (one video id, e.g. from the SDK's standard folds, or one "
                        "utterance id 'video[k]' per line)")
    ids = [s.strip() for s in f.read_text().splitlines() if s.strip()]
    if not ids:
        raise DataError(f"{f}: split file lists no id")
    return ids


def _csd_utterances(labels: dict, wanted: list[str], split_file: Path, labels_name: str):
    """(utterance id, video, row) for the ids of a split file, and the listed ids that were left out."""
    utts, left_out = [], []
    for w in wanted:
        m = re.fullmatch(r"(.+)\[(\d+)\]", w)
        vid, row = (m.group(1), int(m.group(2))) if m else (w, None)
        if vid not in labels:
            left_out.append(w)
            continue
        iv = labels[vid][0]
        rows = sdk_utterance_rows(iv)
        if row is not None:
            if row >= len(iv):
                raise DataError(f"{split_file}: {w!r} but {vid!r} has {len(iv)} labelled segments in {labels_name}")
            if row not in rows:
                left_out.append(f"{w} (zero-length segment: the SDK makes no utterance of it)")
                continue
            rows = [row]
        utts += [(f"{vid}[{k}]", vid, k) for k in rows]
    check_ids([u for u, _, _ in utts], str(split_file))
    return utts, left_out


def load_csd(folder, split: str, *, dataset: str = "mosei", seq_len: int = 60, columns: str = "metadata",
             sequences=None) -> FeatureSplit:
    """One split of CMU-MultimodalSDK computational sequences in ``folder`` as a :class:`FeatureSplit`.

    ``folder`` holds the label sequence (e.g. ``CMU_MOSEI_Labels.csd``), any of the word-vector
    (text), COVAREP/openSMILE (audio) and FACET/OpenFace (video) sequences, and
    ``{train,valid,test}_split.txt`` listing video ids (the SDK's standard folds) or utterance ids.
    Utterance ``<video>[<k>]`` is the SDK's own (:func:`sdk_utterance_rows`: stored row ``k`` of the
    video's labels); its features are the rows the SDK's ``align()`` gives it from each sequence
    (:func:`sdk_overlapping_rows`; an utterance a sequence does not cover gets one zero row, where the
    SDK leaves it out of that sequence). Emotions are matched by
    name (``columns``: :func:`_label_names`); presence = intensity > 0. ``sequences`` picks the file of
    a role where the folder holds several (:func:`_csd_roles`). Ids of the split file whose video is
    not in the labels (the SDK's standard folds list some) are left out, printed with their count, and
    kept in ``left_out``.
    """
    folder, split, dataset = Path(folder), check_split(split), _check_dataset(dataset)
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a folder of .csd files")
    roles = _csd_roles(folder, sequences)
    labels = csd_emotion_labels(roles["labels"], "mosei" if dataset == "mosi" else dataset, columns)
    names = labels.pop("__names__")
    wanted = _read_split_ids(folder, split)
    split_file = folder / f"{split}_split.txt"
    utts, left_out = _csd_utterances(labels, wanted, split_file, roles["labels"].name)
    if left_out:
        shown = ", ".join(left_out[:50]) + (f", and {len(left_out) - 50} more" if len(left_out) > 50 else "")
        print(f"{split_file.name}: {len(left_out)} of {len(wanted)} listed ids are not utterances of "
              f"{roles['labels'].name}, left out: {shown}")
    if not utts:
        raise DataError(f"{split_file}: none of its {len(wanted)} ids is a video of {roles['labels'].name}")
    others = {s: _csd_utterances(labels, _read_split_ids(folder, s), folder / f"{s}_split.txt",
                                 roles["labels"].name)[0]
              for s in SPLITS if s != split and (folder / f"{s}_split.txt").is_file()}
    check_disjoint({s: [u for u, _, _ in (utts if s == split else others[s])]
                    for s in SPLITS if s == split or s in others}, f"{folder}: split files")
    mods = {}
    for key in ("text", "audio", "video"):
        if key not in roles:
            continue
        _, data, meta = read_csd(roles[key], videos={v for _, v, _ in utts})
        dim = meta["__width__"] or 1
        seqs = []
        for _, vid, k in utts:
            s, e = labels[vid][0][k]
            if vid in data:
                feats, iv = data[vid]
                rows = sdk_overlapping_rows(iv, s, e)
                x = _finite(np.asarray(feats[rows], np.float32), f"{roles[key]}: '{vid}' features") \
                    if len(rows) else np.zeros((1, dim), np.float32)
            else:
                x = np.zeros((1, dim), np.float32)
            seqs.append(x.reshape(x.shape[0], -1))
        mods[key] = seqs
    if not mods:
        raise DataError(f"{folder}: no feature sequence (text, audio or video) beside {roles['labels'].name}")
    emotion = (np.stack([labels[v][2][k] for _, v, k in utts]) > 0).astype(np.float32) if names else \
        np.zeros((len(utts), 0), np.float32)
    sent = np.asarray([np.nan if labels[v][1] is None else labels[v][1][k] for _, v, k in utts], np.float32)
    out = FeatureSplit([u for u, _, _ in utts], mods, emotion, names, sent, source=str(folder), data_format="csd",
                       split=split, seq_len=seq_len)
    out.left_out = left_out
    return out


# ----------------------------------------------------------------------------------------------
# Merging CMU-MOSEI's emotions into MMSA data
# ----------------------------------------------------------------------------------------------
#: Seconds within which a transcript segment and a label row are the same interval (merge_emotions).
_SEGMENT_TOLERANCE = 0.01
#: MMSA's sentiment and the label row's may differ by rounding only (MOSEI sentiments are steps of 1/3).
_SENTIMENT_TOLERANCE = 0.05
#: Above this share of identified clips whose sentiment differs, the numbering itself is wrong: stop.
_MAX_SENTIMENT_DIFFER = 0.05
_SENTIMENT_DIFFERS = "the label row's sentiment differs from MMSA's (another utterance)"


def read_transcript_segments(path) -> dict:
    """CMU-MOSEI's segmented transcripts -> {(video, segment number): (start, end)} (merge_emotions).

    ``path`` is one transcript or the folder of them (``Raw/Transcript/Segmented/Combined``): lines
    ``<video>___<segment>___<start>___<end>___<text>``, the segments MMSA cut its MOSEI clips from
    (MMSA's ``Raw/<video>/<clip>.mp4`` and ids ``<video>$_$<clip>``)."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{path}: no transcript (.txt lines '<video>___<segment>___<start>___<end>___<text>')")
    out: dict = {}
    for f in files:
        for i, line in enumerate(f.read_text(encoding="utf8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("___", 4)
            try:
                vid, seg, start, end = parts[0].strip(), int(parts[1]), float(parts[2]), float(parts[3])
            except (IndexError, ValueError):
                raise DataError(f"{f}: line {i} is not '<video>___<segment>___<start>___<end>___<text>': "
                                f"{line[:80]!r}") from None
            out[(vid, seg)] = (start, end)
    return out


def _label_row_of_clip(vid: str, clip: int, labels: dict, segments) -> tuple[str, list[int]]:
    """Label rows that identify MMSA clip ``clip`` of ``vid``: the SDK's utterance ``vid[clip]`` (stored
    row ``clip``, :func:`sdk_utterance_rows`), or with ``segments`` the rows whose interval is the
    clip's transcript segment. Returns ``(reason, rows)``; ``reason`` says why none fits."""
    iv = labels[vid][0]
    rows = sdk_utterance_rows(iv)
    if segments is None:
        return ("no SDK utterance with that clip number", [clip] if clip in rows else [])
    seg = segments.get((vid, clip))
    if seg is None:
        return ("no transcript segment with that number", [])
    hits = [k for k in rows if abs(iv[k, 0] - seg[0]) <= _SEGMENT_TOLERANCE and abs(iv[k, 1] - seg[1])
            <= _SEGMENT_TOLERANCE]
    return ("no label row with the segment's interval", hits)


def merge_emotions(mmsa_path, labels_csd, out=None, *, columns: str = "metadata", segments=None) -> dict:
    """Add CMU-MOSEI's emotion labels to an MMSA pickle, matched by what identifies an utterance (Chapters 3-4).

    MMSA ids are ``"<video>$_$<clip>"`` (MMSA builds them from ``video_id`` and ``clip_id``). Clip
    ``c`` is the label row that names the same utterance: by default the SDK's utterance ``video[c]``
    (stored row ``c``; :func:`sdk_utterance_rows`); with ``segments`` (CMU-MOSEI's segmented
    transcripts, :func:`read_transcript_segments`) the row whose interval is transcript segment ``c``'s.
    Never by position or by an equal sentiment. MMSA's own ``regression_labels`` is then a check only:
    a row whose sentiment differs is another utterance, and the clip is left out; when that happens for
    more than 5% of the identified clips the numbering is not the one assumed and nothing is merged
    (DataError). Several rows with different labels for one interval make the clip ambiguous; it is
    left out and listed.

    Adds to every split ``emotion_labels`` (N, 6) (intensities, NaN where nothing matched) and
    ``emotion_names``; writes the result to ``out`` atomically when given. Returns ``{split: {"total",
    "matched", "left_out": {reason: [ids]}, "ambiguous": [ids]}}``.
    """
    mmsa_path = Path(mmsa_path)
    top = dict(load_pickle(mmsa_path, "MMSA pickle"))
    labels = csd_emotion_labels(labels_csd, "mosei", columns)
    names = labels.pop("__names__")
    if len(names) != 6:
        raise DataError(f"{labels_csd}: the label sequence names {names}, not the six CMU-MOSEI emotions")
    segs = None if segments is None else read_transcript_segments(segments)
    report = {}
    for split in SPLITS:
        d = dict(_split_dict(top, split, mmsa_path))
        ids = [_text(v) for v in _array(d, "id", mmsa_path, split, ndim=1)]
        sent = _sentiment(_array(d, "regression_labels", mmsa_path, split, n=len(ids)), mmsa_path, split,
                          "regression_labels")
        emo = np.full((len(ids), 6), np.nan, np.float32)
        left: dict = {}
        ambiguous = []
        for i, uid in enumerate(ids):
            vid, sep, clip = uid.rpartition("$_$")
            if not sep or not clip.strip().isdigit():
                left.setdefault("id is not '<video>$_$<clip number>'", []).append(uid)
                continue
            if vid not in labels:
                left.setdefault("video not in the label sequence", []).append(uid)
                continue
            reason, rows = _label_row_of_clip(vid, int(clip), labels, segs)
            if not rows:
                left.setdefault(reason, []).append(uid)
                continue
            iv, row_sent, row_emo = labels[vid]
            if len({tuple(row_emo[k].tolist()) for k in rows}) > 1:
                ambiguous.append(uid)
                continue
            k = rows[0]
            if row_sent is not None and abs(float(row_sent[k]) - float(sent[i])) > _SENTIMENT_TOLERANCE:
                left.setdefault(_SENTIMENT_DIFFERS, []).append(uid)
                continue
            emo[i] = row_emo[k]
        d["emotion_labels"], d["emotion_names"] = emo, np.asarray(names)
        key = next(k for k in _SPLIT_KEYS[split] if k in top)
        top[key] = d
        report[split] = {"total": len(ids), "matched": int(np.isfinite(emo).all(1).sum()), "left_out": left,
                         "ambiguous": ambiguous}
    differ = sum(len(r["left_out"].get(_SENTIMENT_DIFFERS, [])) for r in report.values())
    found = differ + sum(r["matched"] for r in report.values())
    if differ > _MAX_SENTIMENT_DIFFER * max(found, 1):
        how = "the SDK's utterance numbers" if segs is None else "the transcripts' segment numbers"
        raise DataError(f"{mmsa_path}: for {differ} of {found} clips the label row their id names has another "
                        f"sentiment than MMSA's regression label, so the clip numbers are not {how}; nothing "
                        "was merged" + ("; pass segments (CMU-MOSEI's segmented transcripts) to match clips "
                                        "by interval" if segs is None else ""))
    if out is not None:
        atomic_write(out, lambda fh: pickle.dump(top, fh, protocol=4), "wb")
    return report


def _print_merge_report(report: dict) -> None:
    """The counts of :func:`merge_emotions`, its reasons for leaving clips out, and every ambiguous clip."""
    for split, r in report.items():
        n_left = sum(map(len, r["left_out"].values()))
        print(f"{split}: {r['matched']} of {r['total']} clips matched ({100.0 * r['matched'] / max(r['total'], 1):.1f}%)"
              f", {n_left} left out, {len(r['ambiguous'])} ambiguous")
        for reason, ids in r["left_out"].items():
            print(f"  left out, {reason}: {len(ids)} (e.g. {', '.join(ids[:3])})")
        if r["ambiguous"]:
            print(f"  ambiguous (several label rows with different labels): {', '.join(r['ambiguous'])}")


# ----------------------------------------------------------------------------------------------
# Format detection and the one entry point
# ----------------------------------------------------------------------------------------------
def _pickle_kind(path: Path) -> str:
    if path.name in _MMSA_NAMES:
        return "mmsa"
    if _MULT_RE.match(path.name):
        return "mult"
    top = _cached_pickle(path)
    d = _split_dict(top, "train", path)
    if "regression_labels" in d:
        return "mmsa"
    if "labels" in d:
        return "mult"
    raise DataError(f"{path}: a pickle with neither MMSA's 'regression_labels' nor MulT's 'labels' in ['train']")


def detect_format(root, dataset: str = "mosei") -> tuple[str, Path]:
    """Which form the data at ``root`` is in -> ``(data_format, path to read)`` (``data_format="auto"``).

    A file: ``.pkl`` = MMSA or MulT (by name, else by keys), ``.csd`` = its folder. A folder:
    ``<PREFIX>_RAW_PROCESSED/`` = ``"raw"``, ``train_emotion.p`` = ``"umons"``, ``*.csd`` = ``"csd"``, one
    MMSA / MulT pickle = that pickle (for MulT, the one of ``dataset``). DataError listing what was
    found when nothing matches or several pickles do."""
    root = Path(root)
    if root.is_file():
        if root.suffix == ".csd":
            return "csd", root.parent
        if root.suffix in (".pkl", ".pickle", ".p"):
            return _pickle_kind(root), root
        raise DataError(f"{root}: unknown data file (expected an MMSA/MulT .pkl or a folder)")
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist")
    prefix = {"mosei": "MOSEI", "iemocap": "IEMOCAP"}.get(dataset, "MOSEI")
    if (root / f"{prefix}_RAW_PROCESSED").is_dir():
        return "raw", root
    if (root / "train_emotion.p").is_file():
        return "umons", root
    if any(root.glob("*.csd")):
        return "csd", root
    want = {"mosei": "mosei_senti", "mosi": "mosi", "iemocap": "iemocap"}.get(dataset)
    pickles = [p for p in sorted(root.glob("*.pkl"))
               if p.name in _MMSA_NAMES or (_MULT_RE.match(p.name) and _MULT_RE.match(p.name).group(1) == want)]
    if len(pickles) == 1:
        return _pickle_kind(pickles[0]), pickles[0]
    if len(pickles) > 1:
        raise DataError(f"{root}: several data pickles ({', '.join(p.name for p in pickles)}); pass the one "
                        "to read "
                        "as data_root")
    raise DataError(f"{root}: no data found: expected {prefix}_RAW_PROCESSED/ (raw), train_emotion.p (umons), "
                    "*.csd (csd), aligned_50.pkl / unaligned_50.pkl (mmsa) or <set>_data[_noalign].pkl (mult); "
                    f"found {sorted(p.name for p in root.iterdir())[:10]}")


def resolve_format(root, data_format: str = "auto", dataset: str = "mosei") -> tuple[str, Path]:
    """Check ``data_format`` (one of :data:`DATA_FORMATS`) and return ``(format, path)``; ``"auto"`` detects."""
    if data_format not in DATA_FORMATS:
        raise ParameterError(f"parameter 'data_format' must be one of {', '.join(DATA_FORMATS)}, "
                             f"got {data_format!r}")
    if data_format == "auto":
        return detect_format(root, dataset)
    root = Path(root)
    if data_format in ("mmsa", "mult") and root.is_dir():
        fmt, path = detect_format(root, dataset)
        if fmt != data_format:
            raise DataError(f"{root}: data_format={data_format!r} but the folder holds {fmt!r} data ({path.name})")
        return fmt, path
    if data_format == "csd" and root.is_file():
        return "csd", root.parent
    return data_format, root


def feature_dataset(root, split: str, *, data_format: str = "auto", dataset: str = "mosei", seq_len: int = 60,
                    text_model: str | None = None, label_columns: str = "metadata",
                    csd_sequences=None) -> Dataset:
    """Pre-extracted features of one split in any :data:`FEATURE_FORMATS` form (Chapters 3, 4, 7).

    Items as :class:`FeatureSplit` (UMONS pickles: :func:`~nbsupport.data.umons_pickle_dataset`), batched
    by :func:`~nbsupport.data.collate_umons`. ``"raw"`` data is not pre-extracted: read it with
    :func:`~nbsupport.data.umons_dataset` / :func:`~nbsupport.data.handcrafted_dataset`.
    ``label_columns`` and ``csd_sequences`` are :func:`load_csd`'s ``columns`` and ``sequences``.
    """
    fmt, path = resolve_format(root, data_format, dataset)
    _check_columns(label_columns)
    if fmt == "mmsa":
        return load_mmsa(path, split, dataset=dataset, seq_len=seq_len)
    if fmt == "mult":
        return load_mult(path, split, dataset=dataset, seq_len=seq_len)
    if fmt == "csd":
        return load_csd(path, split, dataset=dataset, seq_len=seq_len, columns=label_columns,
                        sequences=csd_sequences)
    if fmt == "umons":
        if dataset != "mosei":
            raise DataError(f"{path}: UMONS's pickles hold CMU-MOSEI, not dataset={dataset!r}")
        return umons_pickle_dataset(path, split, seq_len=seq_len, text_model=text_model)
    raise DataError(f"{path}: data_format {fmt!r} holds raw videos, not pre-extracted features")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """``inspect`` a data root (form, splits, feature sizes, labels) or ``merge-emotions`` into an MMSA pickle."""
    ap = argparse.ArgumentParser(prog="python -m nbsupport.data.formats", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("inspect", help="print what the book reads from ROOT")
    ins.add_argument("root")
    ins.add_argument("--dataset", default="mosei", choices=("mosei", "mosi", "iemocap"))
    ins.add_argument("--format", default="auto", choices=DATA_FORMATS)
    mer = sub.add_parser("merge-emotions", help="add CMU-MOSEI's emotion labels to an MMSA pickle")
    mer.add_argument("mmsa")
    mer.add_argument("--emotions", required=True, help="CMU-MOSEI label sequence (CMU_MOSEI_Labels.csd)")
    mer.add_argument("--out", required=True, help="where to write the merged pickle")
    mer.add_argument("--segments", default=None,
                     help="CMU-MOSEI's segmented transcripts (file or folder): match clips by interval")
    ins.add_argument("--sequence", action="append", default=[], metavar="ROLE=NAME",
                     help=".csd: the file or sequence name of a role (text, audio, video) among several")
    for p in (ins, mer):
        p.add_argument("--columns", default="metadata", choices=LABEL_COLUMNS,
                       help="label column names: the file's 'dimension names', or the SDK's documented order")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "merge-emotions":
            _print_merge_report(merge_emotions(args.mmsa, args.emotions, args.out, columns=args.columns,
                                               segments=args.segments))
            print(f"wrote {args.out}")
            return 0
        fmt, path = resolve_format(args.root, args.format, args.dataset)
        print(f"{path}: data_format {fmt!r}")
        if fmt == "raw":
            return 0
        seqs = {}
        for v in args.sequence:
            role, sep, name = v.partition("=")
            if not sep:
                raise ParameterError(f"--sequence {v!r}: expected ROLE=NAME, e.g. 'video=FACET 4.2'")
            seqs[role.strip()] = name.strip()
        for split in SPLITS:
            ds = feature_dataset(path, split, data_format=fmt, dataset=args.dataset, label_columns=args.columns,
                                 csd_sequences=seqs)
            dims = ds.feature_dims() if hasattr(ds, "feature_dims") else {}
            names = getattr(ds, "emotion_names", EMOTIONS["mosei"])
            sent = getattr(ds, "sentiment", None)
            labels = f"emotions {', '.join(names)}" if names else "no emotion labels (merge-emotions adds them)"
            if sent is not None and np.isfinite(sent).any():
                labels += f"; sentiment in [{np.nanmin(sent):.2f}, {np.nanmax(sent):.2f}]"
            print(f"  {split}: {len(ds)} utterances, features {dims}, {labels}")
        return 0
    except (DataError, ParameterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:  # merge-emotions' --out on a full disk or a read-only folder
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
