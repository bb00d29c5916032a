"""Per-utterance features with the field's libraries (Chapter 2; used by Chapters 3-7).

* MESM (Dai et al. 2021, Sec. 3): log-mel spectrogram, 16 kHz, n_fft = win = 400, hop 200, 128 mels,
  cut into 32-frame pieces with the last one padded (:func:`mel_pieces`); face crops 48x48 from frames
  sampled every ``img_interval`` ms (:func:`face_crop`, OpenCV's frontal-face LBP cascade as bundled
  with scikit-image -- OpenCV 5 wheels no longer ship cascades -- centre crop when no face is found).
* UMONS (Delbrouck et al. 2020, Sec. 4): 80-bin log-mel frames, at most 60 (:func:`umons_mel`), static
  word vectors (:class:`WordVectors`: GloVe file or the pretrained encoder's input embeddings),
  per-frame visual vectors (:func:`hog_features` of the face crop, a fixed-size stand-in for the
  paper's CNN features).
* Two-phase hand-crafted features (Chapter 7 baselines): MFCC and prosody statistics per window
  (:func:`prosody_windows`, librosa mfcc / rms / yin), facial appearance per frame (:func:`face_geometry`).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import cv2
import librosa  # cheap here: librosa loads its submodules (and numba) on first use
import numpy as np
import skimage.data  # cheap here: skimage loads hog and the cascade (~0.16 s) on first use
import skimage.feature

from .common import DataError
from .text import default_text_model, load_tokenizer

__all__ = ["SR", "MEL_DB_MEAN", "MEL_DB_STD", "log_mel", "mel_pieces", "umons_mel", "face_box", "face_crop", "hog_features",
           "face_geometry", "prosody_windows", "WordVectors", "split_words"]

SR = 16000
#: Fixed standardisation of log-mel dB values (measured on the synthetic corpus; a dataset-independent
#: affine map keeps loudness, an emotion cue, which per-utterance standardisation would erase).
MEL_DB_MEAN, MEL_DB_STD = -60.0, 20.0
_DB_FLOOR = -100.0


def log_mel(wave: np.ndarray, sr: int = SR, n_mels: int = 128, n_fft: int = 400,
            hop: int = 200) -> np.ndarray:
    """Standardised log-mel spectrogram (n_mels, frames) with librosa (power, dB re 1, floor
    -100 dB; MESM's audio input before it is cut into pieces, Dai et al. 2021, Sec. 3.1)."""
    m = librosa.feature.melspectrogram(y=np.asarray(wave, np.float32), sr=sr, n_fft=n_fft,
                                       win_length=n_fft, hop_length=hop, n_mels=n_mels, power=2.0)
    db = librosa.power_to_db(m, ref=1.0, amin=1e-10, top_db=None)
    return ((db - MEL_DB_MEAN) / MEL_DB_STD).astype(np.float32)


def mel_pieces(wave: np.ndarray, sr: int = SR, n_mels: int = 128, piece: int = 32) -> np.ndarray:
    """MESM's audio input: log-mel (n_fft = win = 400, hop 200) cut into ``piece``-frame pieces.

    Returns (P, n_mels, piece) float32; the last piece is padded with the value of silence.
    """
    spec = log_mel(wave, sr, n_mels)  # (n_mels, frames)
    n = spec.shape[1]
    P = max(1, -(-n // piece))
    pad = (_DB_FLOOR - MEL_DB_MEAN) / MEL_DB_STD
    out = np.full((n_mels, P * piece), pad, np.float32)
    out[:, :n] = spec
    return np.ascontiguousarray(out.reshape(n_mels, P, piece).transpose(1, 0, 2))  # (P, mels, T)


def umons_mel(wave: np.ndarray, sr: int = SR, n_mels: int = 80, seq_len: int = 60) -> np.ndarray:
    """UMONS's audio input: 80-bin log-mel frames, at most ``seq_len``.

    Longer spectrograms are average-pooled over ``seq_len`` equal time chunks (so the whole utterance
    is seen rather than its first 60 frames). Returns (min(frames, seq_len), n_mels) float32.
    """
    spec = log_mel(wave, sr, n_mels).T  # (frames, n_mels)
    return _pool_frames(spec, seq_len).astype(np.float32)


def _pool_frames(x: np.ndarray, seq_len: int) -> np.ndarray:
    """(frames, D) -> at most ``seq_len`` rows: longer inputs are average-pooled over ``seq_len`` equal
    time chunks (``np.array_split``: the first ``frames % seq_len`` chunks are one frame longer)."""
    if x.shape[0] > seq_len:
        return np.stack([c.mean(0) for c in np.array_split(x, seq_len, axis=0)])
    return x


@functools.lru_cache(maxsize=1)
def _face_detector():
    # OpenCV 5 moved the Haar/LBP cascades and HOGDescriptor out of the main wheel, so the bundled
    # detector here is scikit-image's copy of OpenCV's LBP frontal-face cascade (same algorithm family).
    return skimage.feature.Cascade(skimage.data.lbp_frontal_face_cascade_filename())


def face_box(img_bgr: np.ndarray, detect: bool = True) -> tuple[int, int, int, bool]:
    """``(x0, y0, side, found)``: the square that :func:`face_crop` cuts from a frame (MESM's face input).

    A bundled frontal-face cascade (OpenCV's LBP cascade, run by scikit-image) finds the largest face,
    and its box is widened by 20% so brows and chin stay in; when none is found (or ``detect`` is
    False) it is the central square of the frame, as MESM falls back to a centre crop. Chapter 6 draws
    attention maps back onto the frame with this box.
    """
    grey = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2GRAY) if img_bgr.ndim == 3 else img_bgr
    H, W = grey.shape
    if detect:
        m = max(24, min(H, W) // 4)
        faces = _face_detector().detect_multi_scale(grey, scale_factor=1.25, step_ratio=1.5, min_size=(m, m),
                                                    max_size=(min(H, W), min(H, W)), min_neighbor_number=2)
        if faces:
            f = max(faces, key=lambda d: d["width"] * d["height"])
            c_x, c_y = f["c"] + f["width"] / 2, f["r"] + f["height"] / 2
            s = int(max(f["width"], f["height"]) * 1.2)
            return int(max(0, c_x - s / 2)), int(max(0, c_y - s / 2)), s, True
    s = min(H, W)
    return (W - s) // 2, (H - s) // 2, s, False


def face_crop(img_bgr: np.ndarray, size: int = 48, detect: bool = True) -> tuple[np.ndarray, bool]:
    """A grey ``size`` x ``size`` uint8 face crop and whether a face was detected (MESM's face input).

    The square is :func:`face_box` (largest detected face, widened, or the central square), cut from
    the grey frame (clipped at the border) and resized with area interpolation.
    """
    grey = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2GRAY) if img_bgr.ndim == 3 else img_bgr
    x0, y0, s, found = face_box(grey, detect)
    return cv2.resize(grey[y0:y0 + s, x0:x0 + s], (size, size), interpolation=cv2.INTER_AREA), found


def hog_features(face: np.ndarray, cell: int = 8, block: int = 2, bins: int = 9) -> np.ndarray:
    """Histogram of oriented gradients (Dalal & Triggs 2005; ``skimage.feature.hog``, L2-Hys blocks)
    of a square uint8 face. 48x48 with the defaults gives 900 values (UMONS per-frame visual feature
    in this book, standing in for the paper's CNN features)."""
    return skimage.feature.hog(face, orientations=bins, pixels_per_cell=(cell, cell),
                               cells_per_block=(block, block), block_norm="L2-Hys",
                               feature_vector=True).astype(np.float32)


def face_geometry(face: np.ndarray) -> np.ndarray:
    """Hand-crafted per-frame face descriptor for the two-phase baselines (Chapter 7): coarse HOG
    (cells of 12 px, 324-d) plus a 4x4 grid of mean intensities and of vertical-gradient energy
    (brow/mouth edges move with action units), 356-d."""
    f = face.astype(np.float32) / 255.0
    gy = np.abs(cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3))
    n = face.shape[0] // 4
    grid = f[:4 * n, :4 * n].reshape(4, n, 4, n).mean((1, 3)).reshape(-1)
    ggrid = gy[:4 * n, :4 * n].reshape(4, n, 4, n).mean((1, 3)).reshape(-1)
    return np.concatenate([hog_features(face, cell=12), grid, ggrid]).astype(np.float32)


def prosody_windows(wave: np.ndarray, sr: int = SR, win_s: float = 0.25, hop_s: float = 0.125,
                    max_windows: int = 60) -> np.ndarray:
    """Two-phase audio features: per window, MFCC mean/std (13+13), RMS mean/std in dB, pitch (YIN)
    mean/std in semitones over voiced frames, voiced fraction, spectral centroid and flatness (33-d).

    librosa computes every frame-level descriptor at hop 160 (10 ms); the window statistics are plain
    numpy means. Returns (windows, 33) float32 with at most ``max_windows`` windows.
    """
    y = np.asarray(wave, np.float32)
    hop, nfft = 160, 400
    mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=13, n_fft=nfft, hop_length=hop, n_mels=40)  # (13, F)
    rms = librosa.feature.rms(y=y, frame_length=nfft, hop_length=hop)[0]
    f0 = librosa.yin(y, fmin=60, fmax=500, sr=sr, frame_length=800, hop_length=hop)
    cen = librosa.feature.spectral_centroid(y=y, sr=sr, n_fft=nfft, hop_length=hop)[0]
    flat = librosa.feature.spectral_flatness(y=y, n_fft=nfft, hop_length=hop)[0]
    F = min(mfcc.shape[1], rms.shape[0], f0.shape[0], cen.shape[0])
    rms_db = 20 * np.log10(rms[:F] + 1e-5)
    voiced = rms[:F] > max(0.05 * rms[:F].max(), 3 * np.percentile(rms[:F], 10))
    semis = 12 * np.log2(f0[:F] / 100.0)
    w, h = int(round(win_s * sr / hop)), int(round(hop_s * sr / hop))
    starts = list(range(0, max(1, F - w + 1), h))[:max_windows]
    rows = []
    for s in starts:
        sl = slice(s, s + w)
        v = voiced[sl]
        p = semis[sl][v] if v.any() else np.zeros(1)
        rows.append(np.concatenate([mfcc[:, sl].mean(1), mfcc[:, sl].std(1),
                                    [rms_db[sl].mean(), rms_db[sl].std(), p.mean(), p.std(), v.mean(),
                                     cen[sl].mean() / 1000.0, flat[sl].mean()]]))
    return np.asarray(rows, np.float32)


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
_WORD_RE = re.compile(r"[a-z0-9']+")


def split_words(text: str) -> list[str]:
    """Lower-cased words of a transcript (letters, digits, apostrophes), UMONS's word tokens."""
    return _WORD_RE.findall(text.lower())


class WordVectors:
    """Static word vectors for UMONS's text input (Chapter 3).

    With ``glove`` (a text file ``word v1 ... vD``, as GloVe ships) those vectors are used, unknown
    words get zeros. Otherwise the input (word-piece) embeddings of the pretrained encoder
    (``model``, default the bundled MiniLM) are averaged over each word's pieces.
    """

    def __init__(self, glove: str | None = None, model: str | None = None):
        self.glove, self.model = glove, model or (None if glove else default_text_model())
        self._table = None

    @property
    def key(self) -> str:
        """A string that identifies the vectors (part of the feature cache key)."""
        if self.glove:
            st = os.stat(self.glove)
            return f"glove:{os.path.abspath(self.glove)}:{st.st_size}:{int(st.st_mtime)}"
        return f"hf:{self.model}"

    def _load(self):
        if self._table is not None:
            return
        if self.glove:
            path = Path(self.glove)
            if not path.is_file():

                raise DataError(f"{path}: GloVe file missing")
            table = {}
            with open(path, encoding="utf8", errors="replace") as fh:
                for line_no, line in enumerate(fh, 1):
                    parts = line.rstrip().split(" ")
                    if len(parts) < 3:
                        continue
                    table[parts[0]] = np.asarray(parts[1:], np.float32)
            if not table:

                raise DataError(f"{path}: no word vectors found (expected lines 'word v1 v2 ...')")
            self.dim = len(next(iter(table.values())))
            self._table = table
        else:
            from transformers import AutoModel  # local: transformers costs ~0.6 s to import; only here

            emb = AutoModel.from_pretrained(self.model).get_input_embeddings().weight.detach().cpu().numpy()
            self._table, self.dim = emb.astype(np.float32), emb.shape[1]
            self._tok = load_tokenizer(self.model)

    def __call__(self, words: list[str]) -> np.ndarray:
        """(len(words), dim) float32 vectors."""
        self._load()
        out = np.zeros((len(words), self.dim), np.float32)
        for i, w in enumerate(words):
            if self.glove:
                v = self._table.get(w)
                if v is not None:
                    out[i] = v
            else:
                ids = self._tok(w, add_special_tokens=False)["input_ids"]
                if ids:
                    out[i] = self._table[ids].mean(0)
        return out
