"""Readers for the MESM re-organised raw layout and the UMONS pre-extracted pickles (Chapter 2).

MESM raw layout (Dai et al., NAACL 2021, released data; our synthetic corpus writes the same)::

    <root>/MOSEI_RAW_PROCESSED/meta.pkl             {id: {"text": str, "label": 6 presence values, ...}}
    <root>/MOSEI_RAW_PROCESSED/<id>/image_<k>.jpg   frames, k = frame index in the source video
    <root>/MOSEI_RAW_PROCESSED/<id>/audio.wav
    <root>/MOSEI_SPLIT/{train,valid,test}_split.txt one id per line
    <root>/IEMOCAP_RAW_PROCESSED/meta.pkl           {id: {"text": str, "label": "ang"|"exc"|...}}
    <root>/IEMOCAP_RAW_PROCESSED/<session>/<id>/    (or directly <id>/)
    <root>/IEMOCAP_SPLIT/{train,valid,test}_split.txt

Frame names accepted (``.jpg``, ``.jpeg`` or ``.png``, any case): ``image_<k>``, and the IEMOCAP
speaker-tagged ``image_L_<k>`` / ``image_R_<k>`` (also ``image_<k>_L``). IEMOCAP dyadic sessions film
both speakers; the speaker of utterance ``Ses01F_impro01_M003`` is on the left (``L``) when the session's
gender letter (``F`` in ``Ses01F``) equals the utterance's (``M``), else on the right, as in the release.
Audio: ``audio.wav`` or the speaker-tagged ``audio_L.wav`` / ``audio_R.wav``.
Labels: MOSEI ``label`` is 6 presence values (intensities in [0, 3]; > 0 counts as present) and an
optional ``sentiment`` in [-3, 3] (absent, None or NaN: no sentiment); IEMOCAP ``label`` is a class name (or a
one-hot of width 6); ``text`` is a string. All are checked when a split is loaded: NaN, out-of-range or
wrongly typed values raise :class:`~nbsupport.data.DataError` naming the file, the id and the field.
Splits: an id listed twice in a split, or in two splits, is an error unless ``allow_overlap=True``.
Frame times: ``meta.pkl`` entries written by :mod:`nbsupport.data.prepare` record ``fps`` (the source
video's frame rate), ``start`` / ``end`` (s) and ``frame_times`` ({k: s}, each kept frame's timestamp,
so variable-frame-rate video is read right); frames are then sampled by time
(:meth:`RawSplit.sample_frames`). Entries without ``fps`` (older roots, the MESM release) are read as
30 fps video as before, with one warning per root; the synthetic corpus is 30 fps by construction.
Pickles (``meta.pkl``, UMONS ``*.p``, ``cue.pkl``) are read with :mod:`nbsupport.data.safe_pickle`
(no code from the data runs); truncated media (wav shorter than its header, cut images) are errors.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import struct
import warnings
from pathlib import Path

import cv2
import librosa
import numpy as np
import soundfile as sf
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from nbsupport.base import ParameterError, child_path

from .common import EMOTIONS, SPLITS, DataError, check_dataset, check_split
from .safe_pickle import load_pickle
from .validate import EMOTION_RANGE, SDK_MOSEI_LABELS, SENTIMENT_RANGE, check_ids, emotion_columns

__all__ = ["load_split", "RawSplit", "read_frame", "read_audio", "list_frames", "sample_frame_positions",
           "speaker_side", "utterance_folders", "read_cues", "load_umons_pickles", "UmonsPickleSplit", "FPS",
           "read_split_ids", "UMONS_MEL_BINS", "sample_frame_times", "frame_timing"]

FPS = 30
#: Mel bins of UMONS's pre-extracted audio features (Delbrouck et al. 2020, Sec. 4).
UMONS_MEL_BINS = 80
_FRAME_RE = re.compile(r"^image_(?:(?P<s1>[LR])_)?(?P<k>\d+)(?:_(?P<s2>[LR]))?\.(?:jpe?g|png)$", re.IGNORECASE)
_PREFIX = {"mosei": "MOSEI", "iemocap": "IEMOCAP"}
_WARNED_NO_FPS: set = set()  # roots whose missing frame rate was reported (once per process)


def speaker_side(utt_id: str) -> str:
    """'L' or 'R': which speaker of an IEMOCAP session says ``utt_id`` (session vs utterance gender letter)."""
    parts = utt_id.split("_")
    if len(parts) < 2 or not parts[0] or not parts[-1]:
        return "L"
    return "L" if parts[0][-1].upper() == parts[-1][0].upper() else "R"


def list_frames(folder, side: str | None = None) -> tuple[list[str], list[int]]:
    """Frame files of an utterance folder sorted by their 30 fps index, for speaker ``side`` when tagged.

    Returns (paths, indices). Untagged ``image_<k>`` frames are used when no tagged frame of ``side``
    exists. Raises DataError when the folder has no frame at all.
    """
    folder = Path(folder)
    tagged: dict[str, list] = {"L": [], "R": []}
    plain = []
    for name in os.listdir(folder):
        m = _FRAME_RE.match(name)
        if not m:
            continue
        s = (m.group("s1") or m.group("s2") or "").upper()
        (tagged[s] if s else plain).append((int(m.group("k")), str(folder / name)))
    chosen = tagged.get(side or "", []) or plain or (tagged["L"] if side is None else [])
    if not chosen:
        what = f" for speaker {side}" if side else ""
        raise DataError(f"{folder}: no frames{what} (expected image_<k>.jpg or image_L_<k>.jpg / image_R_<k>.jpg)")
    chosen.sort()
    return [p for _, p in chosen], [k for k, _ in chosen]


def sample_frame_positions(indices, interval_ms: float, duration_s: float | None = None, fps: int = FPS) -> list[int]:
    """Positions into ``indices`` of the frames read every ``interval_ms`` ms (MESM's ``img_interval``).

    Targets are t = 0, interval, 2*interval, ... up to the clip's end (``duration_s`` or the last
    frame); each takes the stored frame nearest to frame index round(t * fps / 1000). Duplicates are
    dropped, so a corpus that stores only some frames (the synthetic one) is read the same way.
    """
    if interval_ms <= 0:
        raise DataError(f"img_interval must be > 0 ms, got {interval_ms!r}")
    idx = np.asarray(indices)
    end = duration_s * 1000.0 if duration_s is not None else idx[-1] * 1000.0 / fps
    targets = np.arange(0.0, max(end, 0.0) + 1e-9, float(interval_ms)) * fps / 1000.0
    pos = np.clip(np.searchsorted(idx, targets), 0, len(idx) - 1)
    prev = np.clip(pos - 1, 0, len(idx) - 1)
    pos = np.where(np.abs(idx[prev] - targets) <= np.abs(idx[pos] - targets), prev, pos)
    return sorted(set(int(p) for p in pos))


def sample_frame_times(times_s, interval_ms: float, start_s: float | None = None,
                       end_s: float | None = None) -> list[int]:
    """Positions into ``times_s`` (sorted frame timestamps, s) of the frames nearest in time to
    ``start_s``, ``start_s + interval``, ... (MESM's ``img_interval`` sampling, Dai et al. 2021, Sec. 3.1).

    Targets run from ``start_s`` (default: the first frame's time) while below ``end_s`` (default: up to
    and including the last frame's time); each takes the frame nearest in time (the earlier one on a tie),
    duplicates dropped. With every frame of a constant-rate video stored, each target lands within half a
    frame period of its frame, at any rate (24, 25, 29.97, 30, 50, 60 fps) and for variable rate."""
    if interval_ms <= 0:
        raise DataError(f"img_interval must be > 0 ms, got {interval_ms!r}")
    t = np.asarray(times_s, dtype=np.float64)
    if t.size == 0:
        return []
    t0 = float(t[0]) if start_s is None else float(start_s)
    if end_s is None:
        targets = t0 + np.arange(0.0, max(float(t[-1]) - t0, 0.0) + 1e-9, interval_ms / 1000.0)
    else:
        targets = t0 + np.arange(0.0, max(float(end_s) - t0 - 1e-9, 1e-12), interval_ms / 1000.0)
    pos = np.clip(np.searchsorted(t, targets), 0, len(t) - 1)
    prev = np.clip(pos - 1, 0, len(t) - 1)
    pos = np.where(np.abs(t[prev] - targets) <= np.abs(t[pos] - targets) + 1e-9, prev, pos)
    return sorted(set(int(p) for p in pos))


def frame_timing(entry, where: str = "meta.pkl") -> dict | None:
    """The frame clock of one ``meta.pkl`` entry: ``{"fps", "start", "end", "frame_times"}`` (floats;
    ``start`` / ``end`` None when absent, ``frame_times`` {k: s} or None) when it records ``fps``, else
    None (frames numbered as 30 fps video: older roots, the MESM release). DataError naming ``where``
    and the field for an ``fps`` that is not a positive number, a ``start``/``end`` that is not a finite
    number, or ``frame_times`` that is not a dict of frame index -> finite seconds."""
    if not isinstance(entry, dict) or "fps" not in entry:
        return None
    fps = entry["fps"]
    if not _is_number(fps) or isinstance(fps, (bool, np.bool_)) or not (math.isfinite(fps) and fps > 0):
        raise DataError(f"{where}: field 'fps' must be the video's frame rate (a number > 0), got {fps!r}")
    out = {"fps": float(fps)}
    for field in ("start", "end"):
        v = entry.get(field)
        if v is not None and (not _is_number(v) or not math.isfinite(v)):
            raise DataError(f"{where}: field '{field}' must be a time in seconds, got {v!r}")
        out[field] = None if v is None else float(v)
    times = entry.get("frame_times")
    if times is not None:
        ok = isinstance(times, dict) and all(
            _is_number(k) and math.isfinite(k) and float(k) == int(k) and _is_number(v) and math.isfinite(v) for k, v in times.items())
        if not ok:
            raise DataError(f"{where}: field 'frame_times' must map frame indices to times in seconds "
                            f"({{k: s}}), got {times!r:.120}")
        times = {int(k): float(v) for k, v in times.items()}
    out["frame_times"] = times or None
    return out


def _check_image_complete(path: str) -> None:
    """DataError when the image at ``path`` is truncated or corrupt.

    OpenCV's ``imread`` decodes a JPEG cut in half into grey rows and only prints libjpeg's warning, so
    the file is decoded once more with Pillow, which raises on a truncated stream
    (``ImageFile.LOAD_TRUNCATED_IMAGES`` False, its default, is forced here for this decode)."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL.UnidentifiedImageError, OSError("image file is truncated ..."), SyntaxError
        raise DataError(f"{path}: truncated or corrupt image ({type(e).__name__}: {e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def read_frame(path) -> np.ndarray:
    """Read one frame as a BGR uint8 array (OpenCV); DataError for a missing, empty, truncated or corrupt
    image (Chapter 2)."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: frame file missing")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: frame file is empty (0 bytes)")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise DataError(f"{path}: cannot decode image (corrupt or not a JPEG/PNG)")
    _check_image_complete(path)
    return img


def _wav_header_frames(path: str) -> int | None:
    """Frames a RIFF/WAVE file's header declares (``data`` chunk size / block align), None when unknown.

    libsndfile (soundfile) silently shrinks its frame count to what the file holds, so neither
    ``soundfile.read`` nor ``soundfile.info`` reveals a wav cut short; and the standard library's ``wave``
    reads PCM only. Hence this small walk over the RIFF chunks. Streaming placeholders (size 0 or
    0xFFFFFFFF) and RF64 files give None (nothing to compare)."""
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = None
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"fmt ":
                body = fh.read(size)
                if len(body) < 14:
                    return None
                block_align = struct.unpack("<H", body[12:14])[0]
                if size % 2:
                    fh.read(1)
            elif cid == b"data":
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            else:
                fh.seek(size + (size % 2), os.SEEK_CUR)


def read_audio(path, sr: int | None = 16000) -> tuple[np.ndarray, int]:
    """Read a wav as mono float32 (soundfile), resampled to ``sr`` with librosa when it differs (Chapter 2).

    DataError naming the file for a missing, empty or corrupt file, one with no samples, one with fewer
    samples than its header declares (truncated), or one holding NaN/inf samples.
    """
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: audio file missing")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: audio file is empty (0 bytes)")
    try:
        wav, file_sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for bad headers
        raise DataError(f"{path}: cannot decode audio ({e})") from None
    if wav.shape[0] == 0:
        raise DataError(f"{path}: audio has no samples")
    declared = _wav_header_frames(path)
    if declared is not None and wav.shape[0] < declared:
        raise DataError(f"{path}: audio is truncated: the header declares {declared} samples per channel, "
                        f"the file holds {wav.shape[0]}")
    if not np.isfinite(wav).all():
        bad = int((~np.isfinite(wav)).any(axis=1).sum())
        raise DataError(f"{path}: audio holds {bad} NaN/inf samples (expected finite values)")
    wav = wav.mean(axis=1)
    if sr is not None and file_sr != sr:
        wav = librosa.resample(wav, orig_sr=file_sr, target_sr=sr).astype(np.float32)
        file_sr = sr
    return np.ascontiguousarray(wav, dtype=np.float32), int(file_sr)


def utterance_folders(raw_dir, dataset: str) -> dict:
    """{utterance id: folder} of every utterance folder under ``raw_dir`` (``<PREFIX>_RAW_PROCESSED``).

    MOSEI utterance folders sit directly in ``raw_dir``; IEMOCAP ones may also sit one level down in
    session folders (both levels are listed)."""
    out = {}
    for entry in os.scandir(raw_dir):
        if not entry.is_dir():
            continue
        out[entry.name] = Path(entry.path)
        if dataset == "iemocap":  # session folders hold utterance folders
            for sub in os.scandir(entry.path):
                if sub.is_dir():
                    out[sub.name] = Path(sub.path)
    return out


def read_cues(folder) -> dict:
    """Cue ground truth ``cue.pkl`` of the synthetic utterance in ``folder`` (Chapter 2, Chapter 6's attention check).

    Returns the ``cue.pkl`` dict with ``au_mask`` unpacked to (frames, H, W) bool (union of the active
    action-unit regions per written frame, image coordinates), ``frame_index`` (30 fps indices),
    ``audio_box`` {t0, t1 (s), f0_hz, f1_hz}, ``active_aus``, ``carried`` {"L","A","V": bool}.
    DataError when the folder has no ``cue.pkl`` (real corpora have none).
    """
    path = Path(folder) / "cue.pkl"
    if not path.is_file():
        raise DataError(f"{path}: no cue ground truth (only synthetic corpora have cue.pkl)")
    cue = load_pickle(path, "cue ground truth")
    if not isinstance(cue, dict) or "image_size" not in cue or "au_mask_packed" not in cue:
        raise DataError(f"{path}: expected a dict with 'image_size' and 'au_mask_packed'")
    _, w = cue["image_size"]
    cue["au_mask"] = np.unpackbits(cue.pop("au_mask_packed"), axis=-1, count=w).astype(bool)
    return cue


def _is_number(v) -> bool:
    return isinstance(v, (numbers.Real, np.number, np.bool_)) and not isinstance(v, (str, bytes))


def _emotion_vector(dataset: str, label, where: str, field: str = "label") -> np.ndarray:
    """The (6,) presence vector of one label; DataError naming ``where`` and ``field`` for a label that
    is not 6 finite numbers in [0, 3] (or, for IEMOCAP, a class name)."""
    names = EMOTIONS[dataset]
    if isinstance(label, str):
        if dataset != "iemocap" or label not in names:
            raise DataError(f"{where}: field '{field}' = {label!r} is not one of {names}")
        v = np.zeros(6, np.float32)
        v[names.index(label)] = 1.0
        return v
    values = np.asarray(label, dtype=object).reshape(-1) if not isinstance(label, (bytes, dict)) else None
    if values is None or not all(_is_number(v) for v in values):
        raise DataError(f"{where}: field '{field}' must be 6 numbers ({', '.join(names)}), got {label!r}")
    arr = values.astype(np.float64)
    if arr.shape[0] != 6:
        raise DataError(f"{where}: field '{field}' has width {arr.shape[0]}, expected 6 ({', '.join(names)})")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: field '{field}' holds NaN/inf ({list(label)}); expected 6 numbers in [0, 3]")
    lo, hi = EMOTION_RANGE
    if (arr < lo).any() or (arr > hi).any():
        raise DataError(f"{where}: field '{field}' = {arr.tolist()} is outside [{lo:g}, {hi:g}] "
                        "(presence 0/1 or intensities 0-3)")
    if dataset == "iemocap" and (arr > 0).sum() != 1:
        raise DataError(f"{where}: field '{field}' = {arr.tolist()} must mark exactly one class of {names} "
                        "(IEMOCAP has one emotion per utterance)")
    return (arr > 0).astype(np.float32)


def _sentiment_value(value, where: str, field: str = "sentiment") -> float:
    """A sentiment score in [-3, 3] as float; None, NaN or an absent field is NaN = no sentiment (IEMOCAP,
    whose synthetic ``meta.pkl`` stores NaN). DataError naming ``where`` and ``field`` for strings, inf or
    values out of range."""
    if value is None:
        return float("nan")
    if isinstance(value, (np.ndarray, list, tuple)):  # UMONS stores some scores as (1, 1) arrays
        flat = np.asarray(value, dtype=object).reshape(-1)
        if flat.size == 1:
            value = flat[0]
    if not _is_number(value) or isinstance(value, (bool, np.bool_)):
        raise DataError(f"{where}: field '{field}' must be a number in [-3, 3] (or None), got {value!r}")
    s = float(value)
    lo, hi = SENTIMENT_RANGE
    if math.isnan(s):
        return s
    if not math.isfinite(s):
        raise DataError(f"{where}: field '{field}' is {s} "
                        "(leave it out or use None when there is no sentiment)")
    if not lo <= s <= hi:
        raise DataError(f"{where}: field '{field}' = {s:g} is outside [{lo:g}, {hi:g}]")
    return s


def _text_value(value, where: str, field: str = "text") -> str:
    """The transcript as a string; DataError naming ``where`` and ``field`` for None or a non-string."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string (the transcript), got {value!r}")
    return value


def read_split_ids(split_file, *, allow_overlap: bool = False) -> list[str]:
    """Utterance ids of a split file (one per line, blank lines skipped), Chapter 2's data contract.

    DataError naming the file and the ids when an id is listed twice, unless ``allow_overlap`` (a data
    set that repeats ids on purpose, e.g. oversampling)."""
    split_file = Path(split_file)
    ids = [s.strip() for s in split_file.read_text().splitlines() if s.strip()]
    for uid in ids:  # an id names a folder of the layout: it must not leave it
        child_path(split_file.parent, uid, what=f"{split_file}: utterance id", error=DataError)
    if not allow_overlap:
        check_ids(ids, str(split_file), hint="pass allow_overlap=True if this is on purpose")
    return ids


def _few(ids, k: int = 5) -> str:
    ids = sorted(ids)
    more = f" and {len(ids) - k} more" if len(ids) > k else ""
    return ", ".join(repr(i) for i in ids[:k]) + more


class RawSplit(Dataset):
    """One split of a corpus in the MESM raw layout; items are dicts of raw inputs (Chapter 2).

    Item keys: ``id``, ``text``, ``frames`` (frame paths sorted by frame index; read them with
    :func:`read_frame`), ``frame_index`` (their indices), ``audio`` (float32 mono waveform), ``sr``,
    ``emotion`` (6,) float tensor, ``sentiment`` (float, NaN when the set has none), ``folder``.
    :meth:`sample_frames` picks the frames read every ``img_interval`` ms by their recorded times.
    """

    def __init__(self, root, dataset: str, split: str, *, sr: int = 16000, allow_overlap: bool = False):
        self.dataset, self.split = check_dataset(dataset), check_split(split)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data root is not a folder")
        prefix = _PREFIX[dataset]
        self.raw_dir = self.root / f"{prefix}_RAW_PROCESSED"
        if not self.raw_dir.is_dir():
            raise DataError(f"{self.raw_dir}: folder missing (expected the MESM raw layout {prefix}_RAW_PROCESSED/)")
        split_file = self.root / f"{prefix}_SPLIT" / f"{split}_split.txt"
        if not split_file.is_file():
            raise DataError(f"{split_file}: split file missing")
        self.ids = read_split_ids(split_file, allow_overlap=allow_overlap)
        if not self.ids:
            raise DataError(f"{split_file}: split file lists no utterance ids")
        if not allow_overlap:
            for other in SPLITS:
                other_file = split_file.with_name(f"{other}_split.txt")
                if other == split or not other_file.is_file():
                    continue
                shared = set(self.ids) & set(read_split_ids(other_file, allow_overlap=True))
                if shared:
                    raise DataError(f"{split_file}: {len(shared)} id(s) also in {other_file.name}: "
                                    f"{_few(shared)} "
                                    "(splits must be disjoint; pass allow_overlap=True if this is on purpose)")
        meta_path = self.raw_dir / "meta.pkl"
        meta = load_pickle(meta_path, "meta.pkl")
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path}: expected a dict id -> {{'text', 'label', ...}}, got {type(meta).__name__}")
        self.sr = sr
        folders = utterance_folders(self.raw_dir, dataset)
        self.texts, self.labels, self.sentiments, self.folders = [], [], [], []
        self.timing = []  # frame_timing() of each item, None: numbered as 30 fps video
        for uid in self.ids:
            if uid not in meta:
                raise DataError(f"{meta_path}: id {uid!r} from {split_file.name} has no entry")
            m = meta[uid]
            if uid not in folders:
                raise DataError(f"{self.raw_dir / uid}: utterance folder missing (id listed in {split_file})")
            if not isinstance(m, dict) or "text" not in m or "label" not in m:
                raise DataError(f"{meta_path}: entry {uid!r} must be a dict with 'text' and 'label'")
            where = f"{meta_path} [id {uid!r}]"
            self.labels.append(_emotion_vector(dataset, m["label"], where))
            self.texts.append(_text_value(m["text"], where))
            self.sentiments.append(_sentiment_value(m.get("sentiment"), where))
            self.folders.append(folders[uid])
            self.timing.append(frame_timing(m, where))
        self._warn_without_fps(meta_path)

    def _warn_without_fps(self, meta_path: Path) -> None:
        """One warning per root (per process) when real utterances record no frame rate."""
        n = sum(t is None for t in self.timing)
        if not n or (self.root / "synth_info.json").is_file():  # the synthetic corpus is 30 fps
            return
        key = str(self.raw_dir.resolve())
        if key in _WARNED_NO_FPS:
            return
        _WARNED_NO_FPS.add(key)
        warnings.warn(f"{meta_path}: {n} of {len(self.timing)} utterances of split {self.split!r} record no "
                      f"frame rate ('fps'); their frames image_<k> are read as {FPS} fps video (frame k at "
                      f"k/{FPS} s), as before. Prepare them again with python -m nbsupport.data.prepare to "
                      "sample frames by their timestamps.", UserWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.ids)

    def side(self, i: int) -> str | None:
        """Speaker side 'L'/'R' of item ``i`` for IEMOCAP, None for MOSEI."""
        return speaker_side(self.ids[i]) if self.dataset == "iemocap" else None

    def audio_path(self, i: int) -> Path:
        """The utterance's wav: ``audio_<side>.wav`` when present (IEMOCAP), else ``audio.wav``."""
        folder, side = self.folders[i], self.side(i)
        if side and (folder / f"audio_{side}.wav").exists():
            return folder / f"audio_{side}.wav"
        return folder / "audio.wav"

    def frames(self, i: int) -> tuple[list[str], list[int]]:
        """(frame paths, frame indices) of item ``i``, sorted by index."""
        return list_frames(self.folders[i], self.side(i))

    def frame_times(self, i: int, idx=None) -> np.ndarray:
        """Timestamps (s, in the source video) of the frames of item ``i`` (indices ``idx``, default
        :meth:`frames`): the preparer's recorded ``frame_times``, else index / ``fps``, else index / 30
        (roots without ``fps``)."""
        idx = self.frames(i)[1] if idx is None else idx
        timing = self.timing[i]
        if timing is None:
            return np.asarray(idx, dtype=np.float64) / FPS
        recorded = timing["frame_times"] or {}
        return np.asarray([recorded.get(k, k / timing["fps"]) for k in idx], dtype=np.float64)

    def sample_frames(self, i: int, interval_ms: float) -> tuple[list[str], list[int]]:
        """(all frame paths, positions of those read every ``interval_ms`` ms) of item ``i`` (MESM's
        ``img_interval``, Chapters 2-7). With a recorded frame clock the targets run from the segment's
        ``start`` to its ``end`` and each takes the frame nearest in time (:func:`sample_frame_times`);
        without one, frames are numbered as 30 fps video from t = 0 (:func:`sample_frame_positions`)."""
        paths, idx = self.frames(i)
        timing = self.timing[i]
        if timing is None:
            return paths, sample_frame_positions(idx, interval_ms)
        return paths, sample_frame_times(self.frame_times(i, idx), interval_ms, timing["start"], timing["end"])

    def timing_key(self, i: int) -> str | None:
        """A digest of item ``i``'s recorded frame clock (None without one): part of the feature cache's
        fingerprint, so features sampled under another clock are recomputed."""
        timing = self.timing[i]
        if timing is None:
            return None
        text = json.dumps({**timing, "frame_times": sorted((timing["frame_times"] or {}).items())})
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def __getitem__(self, i: int) -> dict:
        paths, idx = self.frames(i)
        audio, sr = read_audio(self.audio_path(i), self.sr)
        return {"id": self.ids[i], "text": self.texts[i],
                "frames": paths,
                "frame_index": idx, "audio": audio, "sr": sr,
                "emotion": torch.from_numpy(self.labels[i].copy()), "sentiment": self.sentiments[i],
                "folder": str(self.folders[i])}


def load_split(root, dataset: str, split: str, **kwargs) -> RawSplit:
    """Raw items of one split of a corpus in the MESM raw layout (real or synthetic) -- Chapter 2.

    ``dataset`` is ``"mosei"`` or ``"iemocap"``, ``split`` is ``"train"``, ``"valid"`` or ``"test"``.
    Real data drops in by pointing ``root`` at the folder holding ``MOSEI_RAW_PROCESSED`` etc.
    Keyword arguments go to :class:`RawSplit` (``sr``; ``allow_overlap=True`` accepts ids listed twice or
    shared with another split, which are errors by default).
    """
    return RawSplit(root, dataset, split, **kwargs)


class UmonsPickleSplit(Dataset):
    """UMONS's pre-extracted CMU-MOSEI features (Delbrouck et al. 2020): ``{split}_sentences.p``,
    ``{split}_mels.p``, ``{split}_emotion.p``, ``{split}_sentiment.p`` in one folder (Chapter 3).

    Each pickle is a dict keyed by utterance id: sentences = list of words (or a string), mels = array
    (frames, 80), emotion = 6 values (presence when > 0), sentiment = a number in [-3, 3]. Ids are those
    of the emotion file. Items: ``id``, ``words``, ``mel`` (frames, 80) float32, ``emotion`` (6,),
    ``sentiment``. Every entry is checked on load (DataError naming the file, the id and the field); the
    pickles are read with :mod:`nbsupport.data.safe_pickle`. The emotion columns are in ``emotion_order``
    (default: the CMU-MOSEI SDK's, happy, sad, anger, surprise, disgust, fear) and are mapped by name to
    the book's order ``EMOTIONS["mosei"]`` (:func:`nbsupport.data.formats.emotion_columns`).
    """

    def __init__(self, folder, split: str, emotion_order=None):
        check_split(split)
        folder = Path(folder)
        emotion_order = list(SDK_MOSEI_LABELS[1:] if emotion_order is None else emotion_order)
        columns = emotion_columns(emotion_order, "mosei", "UmonsPickleSplit: parameter 'emotion_order'")
        if len(columns) != 6 or len(emotion_order) != 6:
            raise ParameterError(f"UmonsPickleSplit: parameter 'emotion_order' must name the 6 emotions "
                                 f"{EMOTIONS['mosei']} once each, got {list(emotion_order)}")
        order = [j for j, _ in columns]  # source column of each book emotion
        sen_path, mel_path = folder / f"{split}_sentences.p", folder / f"{split}_mels.p"
        self.sentences = load_pickle(sen_path, "UMONS sentences pickle")
        self.mels = load_pickle(mel_path, "UMONS mel pickle")
        emo_path = folder / f"{split}_emotion.p"
        self.emotion = load_pickle(emo_path, "UMONS emotion pickle")
        sent_path = folder / f"{split}_sentiment.p"
        self.sentiment = load_pickle(sent_path, "UMONS sentiment pickle") if sent_path.exists() else {}
        for path, d in ((sen_path, self.sentences), (mel_path, self.mels), (emo_path, self.emotion),
                        (sent_path, self.sentiment)):
            if not isinstance(d, dict):
                raise DataError(f"{path}: expected a dict keyed by utterance id, got {type(d).__name__}")
        self.ids = list(self.emotion.keys())
        self.labels, self.words, self.scores = [], [], []  # validated once here, in the order of ids
        for uid in self.ids:
            for path, d in ((sen_path, self.sentences), (mel_path, self.mels)):
                if uid not in d:
                    raise DataError(f"{path}: id {uid!r} of {emo_path.name} missing")
            where = f"[id {uid!r}]"
            presence = _emotion_vector("mosei", self.emotion[uid], f"{emo_path} {where}", "emotion")
            self.labels.append(presence[order])  # source order -> the book's, by name
            self.scores.append(_sentiment_value(self.sentiment.get(uid), f"{sent_path} {where}"))
            self.words.append(self._words(self.sentences[uid], f"{sen_path} {where}"))
            self._check_mel(self.mels[uid], f"{mel_path} {where}")
        self.folder = folder

    @staticmethod
    def _words(words, where: str) -> list[str]:
        if isinstance(words, str):
            return words.split()
        if isinstance(words, (list, tuple, np.ndarray)) and all(isinstance(w, (str, np.str_)) for w in words):
            return [str(w) for w in words]
        raise DataError(f"{where}: field 'sentences' must be a string or a list of words, got {words!r:.80}")

    @staticmethod
    def _check_mel(mel, where: str) -> None:
        if isinstance(mel, (list, tuple)):
            try:
                mel = np.asarray(mel)
            except ValueError:  # ragged rows
                pass
        if not isinstance(mel, np.ndarray) or mel.dtype.kind not in "fiu":
            raise DataError(f"{where}: field 'mels' must be a numeric array (frames, {UMONS_MEL_BINS}), "
                            f"got {type(mel).__name__}")
        if mel.ndim != 2 or mel.shape[1] != UMONS_MEL_BINS:
            raise DataError(f"{where}: field 'mels' has shape {mel.shape}, expected (frames, {UMONS_MEL_BINS}) "
                            f"with {UMONS_MEL_BINS} mel bins")
        if not np.isfinite(mel).all():
            raise DataError(f"{where}: field 'mels' holds NaN/inf values")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        uid = self.ids[i]
        return {"id": uid, "words": list(self.words[i]), "mel": np.asarray(self.mels[uid], dtype=np.float32),
                "emotion": torch.from_numpy(self.labels[i].copy()), "sentiment": self.scores[i]}


def load_umons_pickles(folder, split: str, emotion_order=None) -> UmonsPickleSplit:
    """Read UMONS's pre-extracted pickles of one split (see :class:`UmonsPickleSplit`; emotion columns in
    ``emotion_order``, the CMU-MOSEI SDK's by default, mapped by name to the book's order)."""
    return UmonsPickleSplit(folder, split, emotion_order)
