"""Model-family datasets that stream per-utterance features cached on disk, and their collate functions.

* MESM / FE2E (Chapters 5-6): :func:`mesm_dataset` -> :func:`collate_mesm`.
* UMONS (Chapters 3-4): :func:`umons_dataset` -> :func:`collate_umons`.
* Two-phase hand-crafted baselines (Chapter 7): :func:`handcrafted_dataset` -> :func:`collate_umons`.

Features are computed once per utterance and saved as ``<cache>/<id>.pt`` (written to a temporary
name, then renamed); items are loaded from disk on demand, so a corpus is never held in memory. The
cache folder is keyed by the corpus (absolute root, and the generator version of a synthetic one), the
dataset, the feature kind, its settings and :data:`FEATURE_VERSION`. Each entry also records what it
was computed from -- the utterance id and every source file's identity (path, size, ``mtime_ns`` and a
hash of its first and last MiB; the transcript's hash when the entry holds text) -- and is checked
against the files on every load: an entry whose sources changed, that holds another utterance, lacks a
feature or cannot be read is recomputed and the recomputation is logged (logger
``nbsupport.data.datasets``, with the file name). Entries are read with ``torch.load(weights_only=True)``,
so a cache file cannot run code. ``$NBSUPPORT_CACHE`` moves the cache root (default
``<repo>/data_cache/features``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from nbsupport.base import atomic_write, child_path

from . import features as F
from .common import DataError
from .text import load_tokenizer
from .raw import RawSplit, load_umons_pickles, read_audio, read_frame

logger = logging.getLogger(__name__)

__all__ = ["FEATURE_VERSION", "FeatureDataset", "mesm_dataset", "umons_dataset", "handcrafted_dataset",
           "umons_pickle_dataset", "collate_mesm", "collate_umons", "feature_cache_root", "file_identity"]

FEATURE_VERSION = 1
_ENTRY_FORMAT = 2  # layout of a cache entry: {"format", "id", "fingerprint", "features"}
_HASH_SPAN = 1 << 20  # bytes hashed at each end of a source file
_IDENTITY_MEMO: dict = {}  # (path, size, mtime_ns, ctime_ns, inode) -> hash: each unchanged file hashed once


def feature_cache_root() -> Path:
    """Where feature caches live: ``$NBSUPPORT_CACHE`` or ``<repo>/data_cache/features``."""
    env = os.environ.get("NBSUPPORT_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data_cache" / "features"


def file_identity(path, relative_to=None) -> list:
    """``[path, size, mtime_ns, hash]`` of a source file of the feature cache (Chapter 2's data contract).

    ``hash`` is a BLAKE2b digest of the first and last MiB (the whole file when smaller), so a file
    re-exported with the same size and time, or copied from another utterance, is told apart too; it is
    computed once per process for a given (path, size, mtime_ns, ctime_ns, inode) -- ctime changes with
    every write and ``utime``, so a file rewritten in place is hashed again. ``path`` is written relative to
    ``relative_to`` when given."""
    path = Path(path)
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)  # ctime: any write or utime
    digest = _IDENTITY_MEMO.get(memo_key)
    if digest is None:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            h.update(fh.read(_HASH_SPAN))
            if st.st_size > 2 * _HASH_SPAN:
                fh.seek(-_HASH_SPAN, os.SEEK_END)
            h.update(fh.read(_HASH_SPAN))
        digest = _IDENTITY_MEMO[memo_key] = h.hexdigest()
    name = os.path.relpath(path, relative_to) if relative_to is not None else str(path)
    return [name, int(st.st_size), int(st.st_mtime_ns), digest]


def _generator_version(root: Path):
    """The synthetic corpus generator version recorded in ``<root>/synth_info.json``, None for real data."""
    info = root / "synth_info.json"
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text()).get("version")
    except (ValueError, OSError, AttributeError):
        return "unreadable"


def _sampled_faces(raw: RawSplit, i: int, img_interval: float, max_frames: int | None = None) -> np.ndarray:
    """Face crops (T, 48, 48) uint8 of the frames read every ``img_interval`` ms (at most ``max_frames``,
    evenly spread)."""
    paths, pos = raw.sample_frames(i, img_interval)  # by the recorded frame times (RawSplit)
    if max_frames is not None and len(pos) > max_frames:
        pos = [pos[j] for j in np.linspace(0, len(pos) - 1, max_frames).round().astype(int)]
    return np.stack([F.face_crop(read_frame(paths[p]))[0] for p in pos])


def _waveform(raw: RawSplit, i: int) -> tuple[np.ndarray, int]:
    """The 16 kHz waveform of item ``i`` of a raw split."""
    return read_audio(raw.audio_path(i), F.SR)


class FeatureDataset(Dataset):
    """A split whose items are computed by ``compute(raw, i) -> dict of tensors`` and cached on disk.

    ``finish(i, cached) -> item`` turns the cached tensors into the model family's item (adds ids,
    labels, tokens). ``keys`` are the tensors every entry must hold; ``text_in_cache`` says whether an
    entry depends on the transcript (then its hash is part of the entry's fingerprint). :meth:`precompute`
    fills (and checks) the cache with a progress bar. Stale or damaged entries are recomputed (module
    docstring).
    """

    def __init__(self, raw: RawSplit, kind: str, settings: dict, compute, finish, cache_dir=None, *,
                 keys: tuple = (), text_in_cache: bool = False):
        self.raw, self.kind, self.settings = raw, kind, settings
        self._compute, self._finish = compute, finish
        self.keys, self.text_in_cache = tuple(keys), text_in_cache
        self.generator_version = _generator_version(raw.root)
        self._settings_key = json.dumps(settings, sort_keys=True, default=str)
        key = json.dumps(dict(root=str(raw.root.resolve()), generator=self.generator_version,
                              dataset=raw.dataset, kind=kind, settings=settings, v=FEATURE_VERSION),
                         sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        base = Path(cache_dir) if cache_dir else feature_cache_root()
        self.cache_dir = base / f"{raw.dataset}-{kind}-{digest}"

    def __len__(self) -> int:
        return len(self.raw)

    def cache_path(self, i: int) -> Path:
        """The cache file of item ``i``."""
        return child_path(self.cache_dir, f"{self.raw.ids[i]}.pt", what="feature cache entry of utterance",
                          error=DataError)

    def fingerprint(self, i: int) -> dict:
        """What the cache entry of item ``i`` is computed from: feature version, kind and settings, corpus
        generator version, the identity (:func:`file_identity`) of the audio file and of every frame, the
        transcript's hash when the entry holds text, and the digest of the recorded frame clock
        (``frame_times``, :meth:`RawSplit.timing_key`) when the root records one. Plain containers
        (``weights_only`` loadable)."""
        root = self.raw.root
        paths, _ = self.raw.frames(i)
        sources = [file_identity(self.raw.audio_path(i), root)] + [file_identity(p, root) for p in paths]
        text = hashlib.sha1(self.raw.texts[i].encode()).hexdigest() if self.text_in_cache else None
        out = {"feature_version": FEATURE_VERSION, "kind": self.kind, "settings": self._settings_key,
               "generator": self.generator_version, "sources": sources, "text": text}
        clock = self.raw.timing_key(i)  # frames sampled by recorded times: entries made without them are stale
        if clock is not None:
            out["frame_times"] = clock
        return out

    def _stale(self, entry, i: int, expected: dict) -> str | None:
        """Why a loaded cache entry cannot serve item ``i`` (None when it can)."""
        uid = self.raw.ids[i]
        if not isinstance(entry, dict) or entry.get("format") != _ENTRY_FORMAT or "features" not in entry:
            return "not a cache entry of this format (written by an older version?)"
        if entry.get("id") != uid:
            return f"it holds utterance {entry.get('id')!r}, not {uid!r}"
        feats = entry["features"]
        missing = [k for k in self.keys if not isinstance(feats, dict) or not torch.is_tensor(feats.get(k))]
        if missing:
            return f"it lacks the feature(s) {', '.join(missing)}"
        old = entry.get("fingerprint")
        if old == expected:
            return None
        if not isinstance(old, dict):
            return "it has no fingerprint"
        changed = [k for k in expected if k != "sources" and old.get(k) != expected[k]]
        old_src = {s[0]: s[1:] for s in old.get("sources", []) if isinstance(s, list) and s}
        new_src = {s[0]: s[1:] for s in expected["sources"]}
        changed += [f"source {name} (new, removed or changed)" for name in sorted(set(old_src) | set(new_src))
                    if old_src.get(name) != new_src.get(name)]
        return "what it was computed from changed: " + ", ".join(changed or ["fingerprint"])

    def features(self, i: int) -> dict:
        """Cached tensors of item ``i``: loaded (``weights_only=True``) and checked against its sources,
        else computed and saved (atomically); a recomputation of an existing entry is logged."""
        path = self.cache_path(i)
        expected = self.fingerprint(i)
        if path.exists():
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated, not a torch file, or refused by weights_only (code inside)
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "empty or cut short"
                reason = f"unreadable ({type(e).__name__}: {first})"
            else:
                reason = self._stale(entry, i, expected)
                if reason is None:
                    return entry["features"]
            logger.warning("%s: feature cache entry recomputed: %s", path, reason)
        feats = self._compute(self.raw, i)
        entry = {"format": _ENTRY_FORMAT, "id": self.raw.ids[i], "fingerprint": expected, "features": feats}
        atomic_write(path, lambda fh: torch.save(entry, fh), "wb")
        return feats

    def precompute(self, progress: bool = True) -> "FeatureDataset":
        """Compute every missing or stale cache entry now (tqdm progress bar; every entry is checked as in
        :meth:`features`); returns self."""
        for i in tqdm(range(len(self)), desc=f"{self.kind} features ({self.raw.split})", disable=not progress,
                      leave=False):
            self.features(i)
        return self

    def __getitem__(self, i: int) -> dict:
        return self._finish(i, self.features(i))

    def label_rows(self) -> dict:
        """Labels of every item in dataset order, read from the raw split without loading any cached
        feature: ``ids``, ``emotion`` (N, 6) float32 and ``sentiment`` (N,) float32, the values a
        collated batch of all items holds. :func:`nbsupport.train.fit` counts the BCE ``pos_weight``
        (Dai et al. 2021, Sec. 4.3) from them instead of reading the training set once more."""
        return _labels_batch([self._labels(i) for i in range(len(self))])

    def _labels(self, i: int) -> dict:
        return {"id": self.raw.ids[i], "emotion": torch.from_numpy(self.raw.labels[i].copy()),
                "sentiment": float(self.raw.sentiments[i])}


# ----------------------------------------------------------------------------------------------
# MESM family
# ----------------------------------------------------------------------------------------------
def mesm_dataset(root, dataset: str, split: str, *, tokenizer=None, max_text_len: int = 50,
                 img_interval: float = 500, cache_dir=None, allow_overlap: bool = False) -> FeatureDataset:
    """MESM / FE2E inputs (Dai et al. 2021, Sec. 3.1; Chapters 5-6) streamed from the feature cache.

    Item: ``id``, ``input_ids`` (Lt,) long subword ids (``tokenizer``: a tokenizer object, a local
    folder / model id, or None for the bundled MiniLM), ``pad_id``, ``faces`` (T, 48, 48) float in
    [0, 1] from frames every ``img_interval`` ms, ``mel`` (P, 128, 32) float pieces, ``emotion`` (6,),
    ``sentiment``. Batch with :func:`collate_mesm`. ``allow_overlap`` goes to :class:`RawSplit`.
    """
    raw = RawSplit(root, dataset, split, allow_overlap=allow_overlap)
    if max_text_len < 2:
        raise DataError(f"max_text_len must be >= 2 (CLS and SEP), got {max_text_len!r}")
    tok = tokenizer if (tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike))) else \
        load_tokenizer(str(tokenizer) if tokenizer else None)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def compute(raw, i):
        faces = _sampled_faces(raw, i, img_interval)
        wav, sr = _waveform(raw, i)
        return {"faces": torch.from_numpy(faces),  # (T, 48, 48) uint8
                "mel": torch.from_numpy(F.mel_pieces(wav, sr)).to(torch.float16)}  # (P, 128, 32)

    def finish(i, c):
        ids = tok(raw.texts[i], truncation=True, max_length=max_text_len)["input_ids"]
        return {**ds._labels(i), "input_ids": torch.tensor(ids, dtype=torch.long), "pad_id": int(pad_id),
                "faces": c["faces"].float() / 255.0, "mel": c["mel"].float()}

    ds = FeatureDataset(raw, "mesm", dict(img_interval=float(img_interval), n_mels=128, piece=32), compute, finish,
                        cache_dir, keys=("faces", "mel"))
    return ds


def _pad(seqs: list[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length tensors (L_i, ...) into (B, L, ...) plus a (B, L) bool mask True=real."""
    L = max(max(s.shape[0] for s in seqs), 1)
    out = seqs[0].new_full((len(seqs), L, *seqs[0].shape[1:]), value)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for b, s in enumerate(seqs):
        out[b, :s.shape[0]] = s
        mask[b, :s.shape[0]] = True
    return out, mask


def _labels_batch(items) -> dict:
    return {"ids": [it["id"] for it in items],
            "emotion": torch.stack([it["emotion"].float() for it in items]),  # (B, 6)
            "sentiment": torch.tensor([float(it["sentiment"]) for it in items], dtype=torch.float32)}  # (B,)


def collate_mesm(items: list[dict]) -> dict:
    """Batch MESM items: ``input_ids``/``attention_mask`` (B, Lt) long, ``faces`` (B, T, 48, 48),
    ``faces_mask`` (B, T) bool, ``mel`` (B, P, 128, 32), ``mel_mask`` (B, P) bool, ``emotion`` (B, 6),
    ``sentiment`` (B,), ``ids`` (Chapters 5-6)."""
    if not items:
        raise DataError("collate_mesm: empty batch")
    pad_id = items[0].get("pad_id", 0)
    input_ids, am = _pad([it["input_ids"] for it in items], pad_id)
    faces, fm = _pad([it["faces"] for it in items])
    mel, mm = _pad([it["mel"] for it in items])
    return {**_labels_batch(items), "input_ids": input_ids, "attention_mask": am.long(),
            "faces": faces, "faces_mask": fm, "mel": mel, "mel_mask": mm}


# ----------------------------------------------------------------------------------------------
# UMONS family and two-phase features
# ----------------------------------------------------------------------------------------------
_WORD_VECTORS: dict = {}


def _word_vectors(glove, text_model) -> F.WordVectors:
    key = (glove, text_model)
    if key not in _WORD_VECTORS:
        _WORD_VECTORS[key] = F.WordVectors(glove=glove, model=text_model)
    return _WORD_VECTORS[key]


def _words_item(raw, i, wv, seq_len):
    words = F.split_words(raw.texts[i])[:seq_len] or ["<empty>"]
    return torch.from_numpy(wv(words)).to(torch.float16)  # (Lt, Dw)


def _lav_dataset(root, dataset: str, split: str, kind: str, audio_fn, video_fn, *, seq_len: int, glove, text_model,
                 img_interval: float, cache_dir, allow_overlap: bool = False) -> FeatureDataset:
    """A cached text / audio / video dataset (``kind`` "umons" or "handcrafted"): ``text`` word vectors,
    ``audio = audio_fn(wav, sr, seq_len)`` and ``video`` = ``video_fn`` of each sampled face crop
    (at most ``seq_len`` frames, every ``img_interval`` ms). The cache key holds ``kind``, ``seq_len``,
    the word vectors and ``img_interval``."""
    raw = RawSplit(root, dataset, split, allow_overlap=allow_overlap)
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len!r}")
    wv = _word_vectors(glove, text_model)

    def compute(raw, i):
        faces = _sampled_faces(raw, i, img_interval, max_frames=seq_len)
        wav, sr = _waveform(raw, i)
        return {"text": _words_item(raw, i, wv, seq_len),
                "audio": torch.from_numpy(audio_fn(wav, sr, seq_len)),
                "video": video_fn(faces)}

    ds = FeatureDataset(raw, kind, dict(seq_len=seq_len, words=wv.key, img_interval=float(img_interval)),
                        compute, lambda i, c: {**ds._labels(i), **{k: c[k].float() for k in ("text", "audio", "video")}},
                        cache_dir, keys=("text", "audio", "video"), text_in_cache=True)
    return ds


def umons_dataset(root, dataset: str, split: str, *, seq_len: int = 60, glove: str | None = None,
                  text_model: str | None = None, img_interval: float = 100, cache_dir=None,
                  allow_overlap: bool = False) -> FeatureDataset:
    """UMONS inputs (Delbrouck et al. 2020, Sec. 4; Chapters 3-4) streamed from the feature cache.

    Item: ``text`` (Lt, Dw) word vectors (GloVe file ``glove`` or the encoder's input embeddings),
    ``audio`` (La, 80) log-mel frames, ``video`` (Lv, 900) HOG of the 48x48 face crop per frame (frames
    every ``img_interval`` ms), each at most ``seq_len`` long; ``emotion`` (6,), ``sentiment``.
    Batch with :func:`collate_umons`. ``allow_overlap`` goes to :class:`RawSplit`.
    """
    return _lav_dataset(
        root, dataset, split, "umons", lambda wav, sr, n: F.umons_mel(wav, sr, 80, n),
        lambda faces: torch.from_numpy(np.stack([F.hog_features(f) for f in faces])).to(torch.float16),
        seq_len=seq_len, glove=glove, text_model=text_model, img_interval=img_interval, cache_dir=cache_dir,
        allow_overlap=allow_overlap)


def handcrafted_dataset(root, dataset: str, split: str, *, seq_len: int = 60, glove: str | None = None,
                        text_model: str | None = None, img_interval: float = 100, cache_dir=None,
                        allow_overlap: bool = False) -> FeatureDataset:
    """Two-phase hand-crafted features (MESM's LF-LSTM / LF-Transformer baselines; Chapter 7).

    Same item keys as :func:`umons_dataset`: ``text`` word vectors, ``audio`` (W, 33) MFCC/prosody
    statistics per 250 ms window (:func:`~nbsupport.data.features.prosody_windows`), ``video`` (Lv, 356)
    face descriptors per frame (:func:`~nbsupport.data.features.face_geometry`), each at most
    ``seq_len`` long. Batch with :func:`collate_umons`; ``allow_overlap`` as for :func:`umons_dataset`.
    """
    return _lav_dataset(
        root, dataset, split, "handcrafted", lambda wav, sr, n: F.prosody_windows(wav, sr, max_windows=n),
        lambda faces: torch.from_numpy(np.stack([F.face_geometry(f) for f in faces])),
        seq_len=seq_len, glove=glove, text_model=text_model, img_interval=img_interval, cache_dir=cache_dir,
        allow_overlap=allow_overlap)


class _UmonsPickleItems(Dataset):
    def __init__(self, split, wv, seq_len):
        self.split, self.wv, self.seq_len = split, wv, seq_len

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        it = self.split[i]
        words = it["words"][:self.seq_len] or ["<empty>"]
        mel = F._pool_frames(it["mel"], self.seq_len)
        return {"id": it["id"], "emotion": it["emotion"], "sentiment": it["sentiment"],
                "text": torch.from_numpy(self.wv(words)), "audio": torch.from_numpy(np.ascontiguousarray(mel))}


def umons_pickle_dataset(folder, split: str, *, seq_len: int = 60, glove: str | None = None,
                         text_model: str | None = None) -> Dataset:
    """UMONS items (``text``, ``audio``; no ``video``) from UMONS's pre-extracted pickles (Chapter 3);
    batch with :func:`collate_umons`."""
    return _UmonsPickleItems(load_umons_pickles(folder, split), _word_vectors(glove, text_model), seq_len)


def collate_umons(items: list[dict]) -> dict:
    """Batch UMONS / hand-crafted items: ``text`` (B, Lt, Dw), ``audio`` (B, La, Da), ``video`` (B, Lv, Dv)
    floats with (B, L) bool masks ``text_mask``, ``audio_mask``, ``video_mask`` (True = real), plus
    ``emotion`` (B, 6), ``sentiment`` (B,), ``ids``. Keys absent from the items (``video`` for the
    pickles) are absent from the batch (Chapters 3-4, 7)."""
    if not items:
        raise DataError("collate_umons: empty batch")
    out = _labels_batch(items)
    for key in ("text", "audio", "video"):
        if key in items[0]:
            out[key], out[f"{key}_mask"] = _pad([it[key].float() for it in items])
    return out
