"""Raw videos + segment table + labels -> the MESM raw layout the end-to-end chapters read (Chapters 5-7).

The MESM authors' re-organised CMU-MOSEI / IEMOCAP data (Dai et al. 2021) can no longer be
downloaded; this preparer rebuilds that layout from what researchers hold -- the videos, the segment
table that cuts them into utterances, and the labels::

    python -m nbsupport.data.prepare --videos DIR --segments FILE --labels FILE --out ROOT \\
        --dataset mosei [--splits DIR] [--workers 4] [--img-interval 500]

Output (read by :class:`nbsupport.data.raw.RawSplit`)::

    ROOT/MOSEI_RAW_PROCESSED/<video>_<clip>/image_<k>.jpg   a frame every 500 ms, k = source frame index
    ROOT/MOSEI_RAW_PROCESSED/<video>_<clip>/audio.wav       16 kHz mono
    ROOT/MOSEI_RAW_PROCESSED/meta.pkl                       {id: {text, label (6 presence values),
                                                             sentiment, video, start, end, fps,
                                                             frame_times {k: s}}}
    ROOT/MOSEI_SPLIT/{train,valid,test}_split.txt
    ROOT/IEMOCAP_RAW_PROCESSED/<dialogue>/<id>/image_L_<k>.jpg, image_R_<k>.jpg, audio_L.wav, audio_R.wav
                                                            (left / right half of the frame and first /
                                                             second audio channel, as MESM's release)

Inputs
    ``--segments``: a CSV (``id`` or ``video_id`` + ``clip``, ``start``, ``end`` in seconds, optional
    ``text``), the UMONS repository's ``d_*.pkl`` rows (``['-6rXp3zJ3kc[0]', 14.468, 22.882]``), or
    CMU-MOSEI's segmented transcripts (``video___clip___start___end___text`` lines, ``.txt``).
    ``--labels``: a CSV (MOSEI: emotion columns by name, e.g. CMU's ``Answer.happiness``, rows of one
    utterance summed then > 0 as MESM does, optional ``sentiment``; IEMOCAP: ``id`` + ``label``
    class name) or CMU-MOSEI's label sequence ``.csd`` (row with the largest time overlap).
    Emotions are always matched by name. ``--splits``: a folder with ``{train,valid,test}_split.txt``
    of utterance or video ids (e.g. the SDK's standard folds); default: videos split 70/15/15 by a
    hash of their id (so no video spans two splits).

Video and audio are decoded with PyAV (its wheel bundles FFmpeg). Each utterance is written to a
temporary folder and renamed when complete, so a killed run leaves no half utterance, and a re-run
skips finished ones (resumable). Utterances run in parallel (``--workers``, processes) with a tqdm
progress bar. A bad video (unreadable, no audio track, segment past its end, corrupt frame) fails
that utterance with a message naming the file and the problem; the others go on, and the exit code
is non-zero with a summary when any failed (``prepare_report.json`` lists them).
"""
from __future__ import annotations

import argparse
import csv
import errno
import json
import hashlib
import math
import os
import pickle
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from nbsupport.base import ParameterError, WriteError, atomic_write, atomic_write_json, atomic_write_text, \
    child_path

from .common import EMOTIONS, SPLITS, DataError, check_dataset
from .formats import LABEL_COLUMNS, csd_emotion_labels
from .validate import SYNONYMS as _SYNONYMS, check_sentiment
from .safe_pickle import load_pickle

__all__ = ["Segment", "read_segments", "read_labels", "prepare", "prepare_utterance", "main", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".flv", ".m4v", ".mpg", ".mpeg")
_PREFIX = {"mosei": "MOSEI", "iemocap": "IEMOCAP"}
SR = 16000
#: Per-utterance record written inside each finished utterance folder (frame rate, frame count).
_INFO = ".prepare.json"
#: How far (s) a segment may end past the end of its video (transcript times are rounded).
END_TOLERANCE = 0.25


@dataclass
class Segment:
    """One utterance of a video: ``id`` (MOSEI ``<video>_<clip>``, IEMOCAP the utterance name), the
    ``video`` id, ``start`` / ``end`` in seconds, and the transcript ``text``."""

    id: str
    video: str
    start: float
    end: float
    text: str = ""


# ----------------------------------------------------------------------------------------------
# Reading the inputs
# ----------------------------------------------------------------------------------------------
def _col(row: dict, *names):
    for n in names:
        if n in row and row[n] not in (None, ""):
            return row[n]
    return None


def _iemocap_dialogue(uid: str) -> str:
    return uid.rsplit("_", 1)[0]


def _float(v, where: str, clamp: bool = False) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a number of seconds, got {v!r}") from None
    if clamp and math.isfinite(x) and x < 0:
        return 0.0
    if not math.isfinite(x) or x < 0:
        raise DataError(f"{where}: expected a time >= 0 s, got {v!r}")
    return x


def _segment(uid, video, start, end, text, dataset, where) -> Segment:
    # CMU-MOSEI's intervals may start before 0 (46 of the 4,662 rows of UMONS's d_test.pkl, down to
    # -0.49 s): such a segment starts at the video's start, as MESM's preprocessing cuts it
    s, e = _float(start, f"{where} start", clamp=True), _float(end, f"{where} end")
    if e <= s:
        raise DataError(f"{where}: end {e} s is not after start {s} s")
    return Segment(str(uid), str(video), s, e, "" if text is None else str(text).strip())


def _umons_row(key, value) -> list:
    """One row of a segment table stored as a dict: the value when it starts with the utterance name
    (UMONS's ``data/d_*.pkl``: row index -> ['<video>[<clip>]', start, end]), else [key, *value]
    (a table keyed by the name)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        value = list(np.asarray(value, dtype=object).reshape(-1))
        if value and isinstance(value[0], str):
            return value
        return [key, *value]
    return [key, value]


def read_segments(path, dataset: str = "mosei") -> list[Segment]:
    """The segment table at ``path`` (CSV, UMONS ``d_*.pkl`` rows, or CMU ``___`` transcripts) as
    :class:`Segment` s (Chapter 5's data). MOSEI ids become ``<video>_<clip>``; real ids may begin
    with '-'. DataError naming the file, the row and what was expected."""
    path, dataset = Path(path), check_dataset(dataset)
    if not path.is_file():
        raise DataError(f"{path}: segment table missing")
    out: list[Segment] = []
    if path.suffix in (".pkl", ".p", ".pickle"):
        rows = load_pickle(path, "segment table")
        if isinstance(rows, dict):  # UMONS's d_*.pkl: {0: ['-6rXp3zJ3kc[0]', np.float64(14.468), ...], ...}
            rows = [_umons_row(k, v) for k, v in rows.items()]
        if not isinstance(rows, (list, tuple)):
            raise DataError(f"{path}: expected a list of rows ['video[clip]', start, end], "
                            f"got {type(rows).__name__}")
        for i, r in enumerate(rows):
            r = list(np.asarray(r, dtype=object).reshape(-1)) if not isinstance(r, (list, tuple)) else list(r)
            m = re.fullmatch(r"(.+)\[(\d+)\]", str(r[0])) if r else None
            if not m or len(r) < 3:
                raise DataError(f"{path}: row {i} is {r!r}; expected ['<video>[<clip>]', start, end]")
            vid, clip = m.group(1), m.group(2)
            uid = f"{vid}_{clip}" if dataset == "mosei" else vid
            out.append(_segment(uid, vid if dataset == "mosei" else _iemocap_dialogue(vid), r[1], r[2],
                                r[3] if len(r) > 3 and isinstance(r[3], str) else "", dataset, f"{path} row {i}"))
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf8") as fh:
            reader = csv.DictReader(fh)
            cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            for i, row in enumerate(reader, 2):
                row = {k.strip().lower(): v for k, v in row.items() if k}
                video, clip, uid = _col(row, "video_id", "video"), _col(row, "clip", "clip_id"), _col(row, "id")
                if uid is None and video is not None and clip is not None:
                    uid = f"{video}_{clip}"
                if uid is None:
                    raise DataError(f"{path}: line {i} has no 'id' (nor 'video_id' + 'clip'); "
                                    f"columns: {list(cols)}")
                if video is None:
                    video = _iemocap_dialogue(uid) if dataset == "iemocap" else str(uid).rsplit("_", 1)[0]
                out.append(_segment(uid, video, _col(row, "start", "start_time"), _col(row, "end", "end_time"),
                                    _col(row, "text", "transcript"), dataset, f"{path} line {i}"))
    else:  # CMU-MOSEI segmented transcripts: video___clip___start___end___text
        for i, line in enumerate(path.read_text(encoding="utf8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("___")
            if len(parts) < 4:
                raise DataError(f"{path}: line {i} is not 'video___clip___start___end___text'")
            vid, clip = parts[0], parts[1]
            out.append(_segment(f"{vid}_{clip}", vid, parts[2], parts[3], "___".join(parts[4:]), dataset,
                                f"{path} line {i}"))
    if not out:
        raise DataError(f"{path}: the segment table lists no utterance")
    seen = set()
    for s in out:
        child_path(path.parent, s.id, what=f"{path}: utterance id", error=DataError)  # becomes a folder name
        if s.id in seen:
            raise DataError(f"{path}: utterance {s.id!r} listed twice")
        seen.add(s.id)
    return out


def _emotion_name(col: str, dataset: str):

    return _SYNONYMS[dataset].get(col.strip().lower().replace("answer.", ""))


def _sentiment_cell(v, where: str) -> float:
    """A CSV sentiment cell as a number in [-3, 3]; DataError naming the cell otherwise (an empty cell
    means no sentiment)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a sentiment score in [-3, 3] (or an empty cell), got {v!r}") from None
    return float(check_sentiment([x], where)[0])


def read_labels(path, dataset: str, segments: list[Segment], label_columns: str = "metadata") -> dict:
    """Labels of the segments -> {id: {"label": ..., "sentiment": float or None, "text": str or None}}.

    MOSEI ``label`` = 6 presence values in the book's order (matched by column name; several rows of
    one id -- one per annotator in CMU's CSVs -- summed, then > 0); IEMOCAP ``label`` = a class name of
    :data:`~nbsupport.data.EMOTIONS` (other IEMOCAP classes are left out, as MESM does). A ``.csd``
    label sequence gives each segment the row of its video that overlaps it most in time; its columns
    are named as ``label_columns`` says (:func:`nbsupport.data.formats.csd_emotion_labels`)."""
    path, dataset = Path(path), check_dataset(dataset)
    if not path.is_file():
        raise DataError(f"{path}: label file missing")
    names = EMOTIONS[dataset]
    out: dict = {}
    if path.suffix == ".csd":
        if dataset != "mosei":
            raise DataError(f"{path}: a .csd label sequence holds CMU-MOSEI labels, not {dataset}")

        table = csd_emotion_labels(path, "mosei", label_columns)
        if table.pop("__names__") != names:
            raise DataError(f"{path}: the label sequence does not name the six CMU-MOSEI emotions")
        for s in segments:
            if s.video not in table:
                continue
            iv, sent, emo = table[s.video]
            overlap = np.minimum(iv[:, 1], s.end) - np.maximum(iv[:, 0], s.start)
            k = int(np.argmax(overlap))
            if overlap[k] > 0.5 * min(iv[k, 1] - iv[k, 0], s.end - s.start):
                out[s.id] = {"label": [int(v > 0) for v in emo[k]],
                             "sentiment": None if sent is None else float(sent[k]), "text": None}
        return out
    if path.suffix != ".csv":
        raise DataError(f"{path}: labels must be a .csv or a CMU .csd label sequence")
    sums: dict = {}
    with open(path, newline="", encoding="utf8") as fh:
        reader = csv.DictReader(fh)
        fields = [f for f in (reader.fieldnames or []) if f]
        emo_cols = {f: _emotion_name(f, dataset) for f in fields}
        emo_cols = {f: n for f, n in emo_cols.items() if n}
        for i, row in enumerate(reader, 2):
            low = {k.strip().lower(): v for k, v in row.items() if k}
            uid = _col(low, "id", "uttr_id", "utterance")
            video = _col(low, "video_id", "input.video_id", "video")
            clip = _col(low, "clip", "clip_id", "input.clip")
            if uid is None and video is not None and clip is not None:
                uid = f"{str(video).split('/')[-1]}_{clip}"
            if uid is None:
                raise DataError(f"{path}: line {i} has no 'id' (nor 'video_id' + 'clip'); columns: {fields}")
            rec = sums.setdefault(uid, {"emo": np.zeros(6), "sent": [], "text": None, "label": None})
            if dataset == "iemocap":
                lab = _col(low, "label", "emotion")
                rec["label"] = _emotion_name(str(lab), dataset) if lab is not None else None
            else:
                if len(set(emo_cols.values())) != 6:
                    raise DataError(f"{path}: MOSEI labels need the six emotion columns by name ({names}); "
                                    f"found {sorted(set(emo_cols.values()))}")
                for f, n in emo_cols.items():
                    rec["emo"][names.index(n)] += _float(row[f] or 0, f"{path} line {i} column {f!r}")
            s = _col(low, "sentiment", "answer.sentiment")
            if s is not None:
                rec["sent"].append(_sentiment_cell(s, f"{path} line {i} column 'sentiment'"))
            rec["text"] = _col(low, "text") or rec["text"]
    for uid, rec in sums.items():
        if dataset == "iemocap":
            if rec["label"] is None:
                continue  # an IEMOCAP class outside the six (xxx, oth, sur, fea, dis)
            label = rec["label"]
        else:
            label = [int(v > 0) for v in rec["emo"]]
        out[uid] = {"label": label, "sentiment": float(np.mean(rec["sent"])) if rec["sent"] else None,
                    "text": rec["text"]}
    return out


# ----------------------------------------------------------------------------------------------
# One utterance
# ----------------------------------------------------------------------------------------------
def _utterance_dir(raw_dir: Path, dataset: str, uid: str) -> Path:
    """The utterance's folder under ``raw_dir``; DataError when the id would leave it (``../x``, ``/abs``)."""
    parent = child_path(raw_dir, _iemocap_dialogue(uid), what="IEMOCAP dialogue of utterance id",
                        error=DataError) if dataset == "iemocap" else raw_dir
    return child_path(parent, uid, what="utterance id", error=DataError)


def _decode_frames(container, stream, seg: Segment, interval_ms: float, where: str):
    """Frames nearest to start, start + interval, ... (< end) -> ([(k, t, BGR image)], fps), k = round(t * fps)
    the frame's index in the source video (made unique), t its timestamp (s) from the stream's start."""
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if fps <= 0:
        raise DataError(f"{where}: the video stream has no frame rate")
    tb = float(stream.time_base)
    t0 = (stream.start_time or 0) * tb
    targets = np.arange(seg.start, seg.end - 1e-9, interval_ms / 1000.0)  # (n,) seconds
    best: dict = {}  # target index -> (distance, k, image)
    half = interval_ms / 2000.0
    tol = min(half, 2.5 / fps)  # a kept frame lies within 2.5 frame periods of its target time
    container.seek(int(max(seg.start - 1.0, 0) / tb) + (stream.start_time or 0), stream=stream, backward=True)
    try:
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = frame.pts * tb - t0
            if t > seg.end + half:
                break
            j = int(np.argmin(np.abs(targets - t)))
            d = abs(targets[j] - t)
            if d <= tol and (j not in best or d < best[j][0]):
                best[j] = (d, t, frame.to_ndarray(format="bgr24"))
    except av.error.FFmpegError as e:
        raise DataError(f"{where}: corrupt video data near {seg.start:.2f}-{seg.end:.2f} s ({e})") from None
    missing = [f"{targets[j]:.2f}" for j in range(len(targets)) if j not in best]
    if missing:
        raise DataError(f"{where}: no decodable frame at {', '.join(missing[:5])} s (corrupt or missing frames)")
    out, used = [], set()
    for j in range(len(targets)):
        _, t, img = best[j]
        k = int(round(t * fps))
        while k in used:  # variable frame rate: two kept frames may round to one index
            k += 1
        used.add(k)
        out.append((k, t, img))
    return out, fps


def _decode_audio(container, stream, seg: Segment, channels: int, where: str) -> np.ndarray:
    """(channels, samples) float32 at 16 kHz of [start, end) (mono: a downmix; 2: the first two channels)."""
    tb = float(stream.time_base)
    t0 = (stream.start_time or 0) * tb
    resampler = av.AudioResampler(format="fltp", layout="mono" if channels == 1 else "stereo", rate=SR)
    container.seek(int(max(seg.start - 1.0, 0) / tb) + (stream.start_time or 0), stream=stream, backward=True)
    chunks, first = [], None
    try:
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = frame.pts * tb - t0
            if first is None:
                first = t
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
            if t > seg.end:
                break
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    except av.error.FFmpegError as e:
        raise DataError(f"{where}: corrupt audio data near {seg.start:.2f}-{seg.end:.2f} s ({e})") from None
    if first is None or not chunks:
        raise DataError(f"{where}: the audio track has no samples at {seg.start:.2f} s")
    wav = np.concatenate(chunks, axis=1)  # (C, n) from time `first`
    a, b = int(round((seg.start - first) * SR)), int(round((seg.end - first) * SR))
    if b - wav.shape[1] > END_TOLERANCE * SR:
        raise DataError(f"{where}: the audio track ends at {first + wav.shape[1] / SR:.2f} s, before the "
                        "segment's "
                        f"end {seg.end:.2f} s")
    return np.ascontiguousarray(wav[:, max(a, 0):b], dtype=np.float32)


def prepare_utterance(video_path, seg: Segment, out_dir, dataset: str = "mosei",
                      img_interval: float = 500) -> dict:
    """Cut one utterance out of its video into ``out_dir`` (atomic: a temporary folder, then a rename).

    Writes ``image_<k>.jpg`` (IEMOCAP: ``image_L_<k>.jpg`` / ``image_R_<k>.jpg``, the two halves of
    the frame) for the frames nearest to every ``img_interval`` ms from the segment start (k = the
    frame's index in the source video) and ``audio.wav`` 16 kHz mono (IEMOCAP: ``audio_L.wav`` /
    ``audio_R.wav``, the first and second channel). Returns ``{"fps", "frames", "frame_times"}``
    (``frame_times`` {k: timestamp in s}, what the reader samples by). DataError naming the
    video and the problem for an unreadable file, no audio track, a segment past the end of the
    video, or corrupt frames (Chapter 5's data, "Running on your data")."""
    video_path, out_dir = Path(video_path), Path(out_dir)
    where = f"{video_path} [{seg.id}]"
    try:
        container = av.open(str(video_path))
    except (av.error.FFmpegError, OSError) as e:
        raise DataError(f"{where}: cannot open the video ({e})") from None
    with container:
        if not container.streams.video:
            raise DataError(f"{where}: the file has no video stream")
        if not container.streams.audio:
            raise DataError(f"{where}: the video has no audio track")
        duration = container.duration / 1e6 if container.duration else None
        if duration is not None and (seg.start >= duration or seg.end > duration + END_TOLERANCE):
            raise DataError(f"{where}: segment {seg.start:.2f}-{seg.end:.2f} s is past the end of the video "
                            f"({duration:.2f} s)")
        frames, fps = _decode_frames(container, container.streams.video[0], seg, img_interval, where)
        wav = _decode_audio(container, container.streams.audio[0], seg, 2 if dataset == "iemocap" else 1, where)
    tmp = out_dir.parent / f".partial-{out_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    def image(name, img):
        if not cv2.imwrite(str(tmp / name), img):
            raise WriteError(errno.EIO, f"{tmp / name}: cannot write the frame (is the disk full or --out "
                             "read-only?)")

    def audio(name, samples):
        try:
            sf.write(tmp / name, samples, SR, subtype="PCM_16")
        except (OSError, RuntimeError) as e:  # libsndfile reports a full disk as "System error"
            raise WriteError(errno.EIO, f"{tmp / name}: cannot write the audio ({e}; is the disk full or --out "
                             "read-only?)") from None

    try:
        for k, _, img in frames:
            if dataset == "iemocap":
                w = img.shape[1] // 2
                image(f"image_L_{k}.jpg", img[:, :w])
                image(f"image_R_{k}.jpg", img[:, w:])
            else:
                image(f"image_{k}.jpg", img)
        if dataset == "iemocap":
            audio("audio_L.wav", wav[0])
            audio("audio_R.wav", wav[1])
        else:
            audio("audio.wav", wav[0])
        # per-utterance fields of meta.pkl, renamed with the folder: they survive a kill before meta.pkl
        atomic_write_json(tmp / _INFO, {"fps": fps, "frames": len(frames),
                                        "frame_times": {str(k): float(t) for k, t, _ in frames}})
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another run finished it first
            if not out_dir.is_dir():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"fps": fps, "frames": len(frames), "frame_times": {k: float(t) for k, t, _ in frames}}


def _utterance_info(folder: Path) -> dict | None:
    """The ``.prepare.json`` record of a finished utterance folder (None when absent or unusable: the
    frame rate may then still come from an earlier ``meta.pkl``)."""
    f = folder / _INFO
    try:
        if f.stat().st_size > 1 << 20:  # a frame clock of hours of video is far smaller
            return None
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    fps = rec.get("fps") if isinstance(rec, dict) else None
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        return None
    times = rec.get("frame_times")
    try:  # JSON keys are strings: back to frame numbers (the reader checks the clock itself)
        rec["frame_times"] = None if times is None else {int(k): float(t) for k, t in times.items()}
    except (AttributeError, TypeError, ValueError):
        rec["frame_times"] = None
    return rec


def _job(args):
    video, seg, out_dir, dataset, interval = args
    try:
        return seg.id, prepare_utterance(video, seg, out_dir, dataset, interval), None
    except (DataError, WriteError) as e:
        return seg.id, None, str(e)
    except Exception as e:  # an unexpected decoder failure still only fails this utterance
        return seg.id, None, f"{video} [{seg.id}]: {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------
@dataclass
class PrepareReport:
    """What :func:`prepare` did: ids prepared now, skipped (already done), failed {id: message},
    unlabelled (no label row), the seconds it took and the utterances per second it prepared."""

    prepared: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    unlabelled: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        """Utterances prepared per second of wall time (the preparer's speed)."""
        return len(self.prepared) / self.seconds if self.seconds > 0 else 0.0


def _video_index(videos: Path) -> dict:
    if not videos.is_dir():
        raise DataError(f"{videos}: videos folder missing")
    index = {}
    for p in sorted(videos.rglob("*")):
        if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file():
            index.setdefault(p.stem, p)
    return index


def _default_splits(ids_by_video: dict) -> dict:
    """70/15/15 by a hash of the video id (no video spans two splits); by utterance below 3 videos."""
    keys = sorted(ids_by_video, key=lambda v: hashlib.sha1(v.encode()).hexdigest())
    if len(keys) < 3:
        units = sorted((u for v in keys for u in ids_by_video[v]),
                       key=lambda u: hashlib.sha1(u.encode()).hexdigest())
        groups = [[u] for u in units]
    else:
        groups = [ids_by_video[v] for v in keys]
    n = len(groups)
    n_tr = max(1, min(n - 2, int(round(0.7 * n))))
    n_va = max(1, min(n - n_tr - 1, int(round(0.15 * n))))
    cut = {"train": groups[:n_tr], "valid": groups[n_tr:n_tr + n_va], "test": groups[n_tr + n_va:]}
    return {s: [u for g in gs for u in g] for s, gs in cut.items()}


def _read_split_dir(folder: Path, segments: list[Segment]) -> dict:
    by_video: dict = {}
    for s in segments:
        by_video.setdefault(s.video, []).append(s.id)
    out = {}
    for split in SPLITS:
        f = folder / f"{split}_split.txt"
        if not f.is_file():
            raise DataError(f"{f}: split file missing (one utterance or video id per line)")
        ids = []
        for w in (x.strip() for x in f.read_text().splitlines()):
            if w:
                ids.extend(by_video.get(w, [w]))
        out[split] = ids
    return out


def prepare(videos, segments, labels, out, *, dataset: str = "mosei", splits=None, workers: int = 1,
            img_interval: float = 500, progress: bool = True, label_columns: str = "metadata") -> PrepareReport:
    """Build the MESM raw layout under ``out`` from videos, a segment table and labels (Chapters 5-7).

    Finished utterance folders are skipped (resumable); ``workers`` > 1 runs utterances in that many
    processes. ``meta.pkl`` and the split files list every finished utterance (including those of
    earlier runs), written atomically at the end. Returns a :class:`PrepareReport`; also written as
    ``<out>/prepare_report.json``."""
    t_start = time.perf_counter()
    dataset = check_dataset(dataset)
    if img_interval <= 0:
        raise DataError(f"img_interval must be > 0 ms, got {img_interval!r}")
    segs = read_segments(segments, dataset)
    labs = read_labels(labels, dataset, segs, label_columns)
    index = _video_index(Path(videos))
    out = Path(out)
    raw_dir = out / f"{_PREFIX[dataset]}_RAW_PROCESSED"
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(raw_dir / ".write-test", "")
        (raw_dir / ".write-test").unlink()
    except OSError as e:
        raise ParameterError(f"parameter --out {out}: cannot write there ({getattr(e, 'strerror', None) or e}); "
                             "expected a writable folder") from None
    report = PrepareReport()
    jobs = []
    for s in segs:
        if s.id not in labs:
            report.unlabelled.append(s.id)
            continue
        target = _utterance_dir(raw_dir, dataset, s.id)
        if target.is_dir():
            report.skipped.append(s.id)
        elif s.video not in index:
            report.failed[s.id] = f"{videos}: no video file for {s.video!r} ({'/'.join(VIDEO_EXTENSIONS)})"
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(index[s.video]), s, str(target), dataset, img_interval))
    info: dict = {}
    bar = tqdm(total=len(jobs), desc="preparing utterances", unit="utt", disable=not progress or not jobs)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_job, j) for j in jobs]
            for fut in as_completed(futures):
                uid, res, err = fut.result()
                (report.failed.__setitem__(uid, err) if err else info.__setitem__(uid, res))
                bar.update(1)
    else:
        for j in jobs:
            uid, res, err = _job(j)
            (report.failed.__setitem__(uid, err) if err else info.__setitem__(uid, res))
            bar.update(1)
    bar.close()
    report.prepared = [s.id for s in segs if s.id in info]
    done = {s.id: s for s in segs if s.id in labs and _utterance_dir(raw_dir, dataset, s.id).is_dir()}
    meta = {}
    for uid, s in done.items():
        lab = labs[uid]
        m = {"text": lab["text"] if not s.text and lab.get("text") else s.text, "label": lab["label"],
             "video": s.video, "start": s.start, "end": s.end}
        if lab.get("sentiment") is not None:
            m["sentiment"] = lab["sentiment"]
        rec = info.get(uid) or _utterance_info(_utterance_dir(raw_dir, dataset, uid))
        if rec is not None:
            m["fps"] = rec["fps"]
            if rec.get("frame_times") is not None:
                m["frame_times"] = rec["frame_times"]
        meta[uid] = m
    old = raw_dir / "meta.pkl"
    if old.is_file():  # keep the frame clocks recorded by earlier runs
        prev = load_pickle(old, "meta.pkl")
        for uid, m in meta.items():
            earlier = prev.get(uid) if isinstance(prev, dict) else None
            if "fps" not in m and isinstance(earlier, dict) and "fps" in earlier:
                m.update({k: earlier[k] for k in ("fps", "frame_times") if k in earlier})
    atomic_write(old, lambda fh: pickle.dump(meta, fh, protocol=4), "wb")
    if splits is not None:
        split_ids = _read_split_dir(Path(splits), segs)
    else:
        by_video: dict = {}
        for s in segs:
            by_video.setdefault(s.video, []).append(s.id)
        split_ids = _default_splits(by_video)
    split_dir = out / f"{_PREFIX[dataset]}_SPLIT"
    for split, ids in split_ids.items():
        atomic_write_text(split_dir / f"{split}_split.txt", "".join(f"{u}\n" for u in ids if u in meta))
    report.seconds = time.perf_counter() - t_start
    atomic_write_json(out / "prepare_report.json", {**asdict(report), "per_second": report.per_second})
    return report


def main(argv=None) -> int:
    """CLI of :func:`prepare`; exit code 1 when any utterance failed (summary on stderr), 2 on bad input."""
    ap = argparse.ArgumentParser(prog="python -m nbsupport.data.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--videos", required=True,
                    help="folder of videos named <video id>.<ext> (searched recursively)")
    ap.add_argument("--segments", required=True, help="segment table: .csv, UMONS d_*.pkl, or CMU ___ transcripts")
    ap.add_argument("--labels", required=True, help="labels: .csv (emotion columns by name) or CMU-MOSEI .csd")
    ap.add_argument("--out", required=True, help="data root to write (MOSEI_RAW_PROCESSED/, MOSEI_SPLIT/, ...)")
    ap.add_argument("--dataset", default="mosei", choices=tuple(EMOTIONS))
    ap.add_argument("--splits", default=None,
                    help="folder with {train,valid,test}_split.txt (utterance/video ids)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--img-interval", type=float, default=500.0, help="ms between kept frames (MESM: 500)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--label-columns", default="metadata", choices=LABEL_COLUMNS,
                    help=".csd labels: column names from the file, or the SDK's documented order")
    args = ap.parse_args(argv)
    try:
        rep = prepare(args.videos, args.segments, args.labels, args.out, dataset=args.dataset, splits=args.splits,
                      workers=args.workers, img_interval=args.img_interval, progress=not args.no_progress,
                      label_columns=args.label_columns)
    except (DataError, ParameterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:  # a full disk while writing meta.pkl or the split files
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"prepared {len(rep.prepared)} utterances ({rep.per_second:.2f}/s), skipped {len(rep.skipped)} already "
          f"done, {len(rep.unlabelled)} without labels, {len(rep.failed)} failed")
    for uid, msg in rep.failed.items():
        print(f"FAILED {uid}: {msg}", file=sys.stderr)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
