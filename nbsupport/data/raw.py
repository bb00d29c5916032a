"""Readers for the MESM re-organised raw layout and the UMONS pre-extracted pickles (Chapter 2).

MESM raw layout (Dai et al., NAACL 2021, released data; our synthetic corpus writes the same)::

    <root>/MOSEI_RAW_PROCESSED/meta.pkl             {id: {"text": str, "label": 6 presence values, ...}}
    <root>/MOSEI_RAW_PROCESSED/<id>/image_<k>.jpg   frames, k = index in the 30 fps video
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
Labels: MOSEI ``label`` is 6 presence values (intensities > 0 count as present) and an optional
``sentiment`` in [-3, 3]; IEMOCAP ``label`` is a class name (or a one-hot of width 6).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import EMOTIONS, MOSEI_SDK_EMOTIONS, DataError, check_dataset, check_split, reorder_emotions

__all__ = ["load_split", "RawSplit", "read_frame", "read_audio", "list_frames", "sample_frame_positions",
           "speaker_side", "utterance_folders", "read_cues", "load_umons_pickles", "UmonsPickleSplit", "FPS"]

FPS = 30
_FRAME_RE = re.compile(r"^image_(?:(?P<s1>[LR])_)?(?P<k>\d+)(?:_(?P<s2>[LR]))?\.(?:jpe?g|png)$", re.IGNORECASE)
_PREFIX = {"mosei": "MOSEI", "iemocap": "IEMOCAP"}


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


def read_frame(path) -> np.ndarray:
    """Read one frame as a BGR uint8 array (OpenCV); DataError for a missing, empty or corrupt image."""
    import cv2

    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: frame file missing")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: frame file is empty (0 bytes)")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise DataError(f"{path}: cannot decode image (corrupt or not a JPEG/PNG)")
    return img


def read_audio(path, sr: int | None = 16000) -> tuple[np.ndarray, int]:
    """Read a wav as mono float32 (soundfile), resampled to ``sr`` with librosa when it differs.

    DataError for a missing, empty or corrupt file, or one with no samples.
    """
    import soundfile as sf

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
    wav = wav.mean(axis=1)
    if sr is not None and file_sr != sr:
        import librosa

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
    with open(path, "rb") as fh:
        cue = pickle.load(fh)
    _, w = cue["image_size"]
    cue["au_mask"] = np.unpackbits(cue.pop("au_mask_packed"), axis=-1, count=w).astype(bool)
    return cue


def _load_pickle(path: Path, what: str):
    if not path.exists():
        raise DataError(f"{path}: {what} missing")
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception as e:
        raise DataError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None


def _emotion_vector(dataset: str, label, where: str) -> np.ndarray:
    names = EMOTIONS[dataset]
    if isinstance(label, str):
        if dataset != "iemocap" or label not in names:
            raise DataError(f"{where}: label {label!r} is not one of {names}")
        v = np.zeros(6, np.float32)
        v[names.index(label)] = 1.0
        return v
    arr = np.asarray(label, dtype=np.float32).reshape(-1)
    if arr.shape[0] != 6:
        raise DataError(f"{where}: label has width {arr.shape[0]}, expected 6 ({', '.join(names)})")
    return (arr > 0).astype(np.float32)


class RawSplit(Dataset):
    """One split of a corpus in the MESM raw layout; items are dicts of raw inputs (Chapter 2).

    Item keys: ``id``, ``text``, ``frames`` (frame paths sorted by 30 fps index; read them with
    :func:`read_frame`), ``frame_index`` (their indices), ``audio`` (float32 mono waveform), ``sr``,
    ``emotion`` (6,) float tensor, ``sentiment`` (float, NaN when the set has none), ``folder``.
    """

    def __init__(self, root, dataset: str, split: str, *, sr: int = 16000):
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
        self.ids = [s.strip() for s in split_file.read_text().splitlines() if s.strip()]
        if not self.ids:
            raise DataError(f"{split_file}: split file lists no utterance ids")
        meta_path = self.raw_dir / "meta.pkl"
        meta = _load_pickle(meta_path, "meta.pkl")
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path}: expected a dict id -> {{'text', 'label', ...}}, got {type(meta).__name__}")
        self.sr = sr
        folders = utterance_folders(self.raw_dir, dataset)
        self.texts, self.labels, self.sentiments, self.folders = [], [], [], []
        for uid in self.ids:
            if uid not in meta:
                raise DataError(f"{meta_path}: id {uid!r} from {split_file.name} has no entry")
            m = meta[uid]
            if uid not in folders:
                raise DataError(f"{self.raw_dir / uid}: utterance folder missing (id listed in {split_file})")
            if not isinstance(m, dict) or "text" not in m or "label" not in m:
                raise DataError(f"{meta_path}: entry {uid!r} must be a dict with 'text' and 'label'")
            self.labels.append(_emotion_vector(dataset, m["label"], f"{meta_path} [{uid!r}]"))
            self.texts.append(str(m["text"]))
            s = m.get("sentiment", float("nan"))
            self.sentiments.append(float("nan") if s is None else float(s))
            self.folders.append(folders[uid])

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
        """(frame paths, 30 fps indices) of item ``i``."""
        return list_frames(self.folders[i], self.side(i))

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
    Keyword arguments go to :class:`RawSplit` (``sr``).
    """
    return RawSplit(root, dataset, split, **kwargs)


class UmonsPickleSplit(Dataset):
    """UMONS's pre-extracted CMU-MOSEI features (Delbrouck et al. 2020): ``{split}_sentences.p``,
    ``{split}_mels.p``, ``{split}_emotion.p``, ``{split}_sentiment.p`` in one folder (Chapter 3).

    Each pickle is a dict keyed by utterance id: sentences = list of words (or a string), mels = array
    (frames, 80), emotion = 6 values (presence when > 0), sentiment = a number in [-3, 3]. Ids are those
    of the emotion file. Items: ``id``, ``words``, ``mel`` (frames, 80) float32, ``emotion`` (6,),
    ``sentiment``. The emotion columns are in ``emotion_order`` (default: the CMU-MOSEI SDK's, happy,
    sad, anger, surprise, disgust, fear) and are mapped by name to the book's order ``EMOTIONS["mosei"]``.
    """

    def __init__(self, folder, split: str, emotion_order=tuple(MOSEI_SDK_EMOTIONS)):
        check_split(split)
        folder = Path(folder)
        self.sentences = _load_pickle(folder / f"{split}_sentences.p", "UMONS sentences pickle")
        self.mels = _load_pickle(folder / f"{split}_mels.p", "UMONS mel pickle")
        emo_path = folder / f"{split}_emotion.p"
        self.emotion = _load_pickle(emo_path, "UMONS emotion pickle")
        sent_path = folder / f"{split}_sentiment.p"
        self.sentiment = _load_pickle(sent_path, "UMONS sentiment pickle") if sent_path.exists() else {}
        for name, d in (("sentences", self.sentences), ("mels", self.mels), ("emotion", self.emotion)):
            if not isinstance(d, dict):
                raise DataError(f"{folder / f'{split}_{name}.p'}: expected a dict keyed by utterance id")
        self.ids = list(self.emotion.keys())
        self.labels = []  # (6,) presence vectors, validated once here, in the order of ids
        for uid in self.ids:
            for name, d in (("sentences", self.sentences), ("mels", self.mels)):
                if uid not in d:
                    raise DataError(f"{folder / f'{split}_{name}.p'}: id {uid!r} of {emo_path.name} missing")
            where = f"{emo_path} [{uid!r}]"
            self.labels.append(_emotion_vector("mosei", reorder_emotions(
                np.asarray(self.emotion[uid], dtype=np.float32).reshape(-1), emotion_order, where=where), where))
        self.folder = folder

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        uid = self.ids[i]
        words = self.sentences[uid]
        words = words.split() if isinstance(words, str) else [str(w) for w in words]
        mel = np.asarray(self.mels[uid], dtype=np.float32)
        if mel.ndim != 2:
            raise DataError(f"{self.folder}: mel of {uid!r} must be 2-D (frames, bins), got shape {mel.shape}")
        s = self.sentiment.get(uid, float("nan"))
        return {"id": uid, "words": words, "mel": mel,
                "emotion": torch.from_numpy(self.labels[i].copy()),
                "sentiment": float(np.asarray(s, dtype=np.float64).reshape(-1)[0])}


def load_umons_pickles(folder, split: str, emotion_order=tuple(MOSEI_SDK_EMOTIONS)) -> UmonsPickleSplit:
    """Read UMONS's pre-extracted pickles of one split (see :class:`UmonsPickleSplit`; emotion columns in
    ``emotion_order``, the CMU-MOSEI SDK's by default, mapped by name to the book's order)."""
    return UmonsPickleSplit(folder, split, emotion_order)
