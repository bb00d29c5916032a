"""Pictures of the corpus for Chapter 2: faces with their cue regions, audio per emotion, label statistics,
and a widget to browse utterances. Every function returns a matplotlib figure (or a widget)."""
from __future__ import annotations

import ipywidgets as W
import librosa
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.patches import Rectangle

from nbsupport.data.common import EMOTIONS
from nbsupport.data.features import log_mel
from nbsupport.data.raw import RawSplit, read_audio, read_cues, read_frame

from .widgets import figure_view, show_in

__all__ = ["examples_per_emotion", "face_gallery", "audio_gallery", "label_figure", "utterance_figure", "browser"]


def examples_per_emotion(raw: RawSplit) -> dict:
    """First item index whose label holds each emotion (single-label items preferred)."""
    out = {}
    for single in (True, False):
        for i, y in enumerate(raw.labels):
            if single and y.sum() != 1:
                continue
            for j in np.flatnonzero(y):
                out.setdefault(EMOTIONS[raw.dataset][j], i)
    return dict(sorted(out.items(), key=lambda kv: EMOTIONS[raw.dataset].index(kv[0])))


def _cue(raw, i):
    """The cue ground truth of item ``i`` (None for real corpora, which have no ``cue.pkl``)."""
    try:
        return read_cues(raw.folders[i])
    except Exception:
        return None


def face_gallery(raw: RawSplit, overlay: bool = True):
    """One frame per emotion, at the apex of the facial cue, with the action-unit regions outlined."""
    ex = examples_per_emotion(raw)
    fig, axes = plt.subplots(1, len(ex), figsize=(2.2 * len(ex), 2.6))
    for ax, (emo, i) in zip(np.atleast_1d(axes), ex.items()):
        paths, idx = raw.frames(i)
        cue = _cue(raw, i)
        k = int(np.argmax(cue["au_mask"].sum((1, 2)))) if cue is not None else len(paths) // 2
        ax.imshow(read_frame(paths[k])[..., ::-1])
        if overlay and cue is not None and cue["au_mask"][k].any():
            ax.contour(cue["au_mask"][k], levels=[0.5], colors="yellow", linewidths=1)
        carried = "" if cue is None else f"\nface cue: {'yes' if cue['carried']['V'] else 'no'}"
        ax.set_title(f"{emo}{carried}", fontsize=9)
        ax.axis("off")
    fig.suptitle("A frame per emotion (yellow: active action-unit regions, saved ground truth)", fontsize=10)
    fig.tight_layout()
    return fig


def audio_gallery(raw: RawSplit):
    """Waveform and log-mel spectrogram per emotion, with the saved audio cue box."""

    ex = examples_per_emotion(raw)
    fig, axes = plt.subplots(2, len(ex), figsize=(2.6 * len(ex), 4.2), sharey="row")
    axes = np.asarray(axes).reshape(2, -1)
    for c, (emo, i) in enumerate(ex.items()):
        wav, sr = read_audio(raw.audio_path(i))
        t = np.arange(len(wav)) / sr
        axes[0, c].plot(t, wav, lw=0.3)
        axes[0, c].set_title(emo, fontsize=9)
        spec = log_mel(wav, sr, 128)
        axes[1, c].imshow(spec, origin="lower", aspect="auto", extent=[0, t[-1], 0, 128], cmap="magma")
        cue = _cue(raw, i)
        if cue is not None:
            b = cue["audio_box"]
            mels = librosa.hz_to_mel([b["f0_hz"], b["f1_hz"]])
            top = librosa.hz_to_mel(sr / 2)
            y0, y1 = mels[0] / top * 128, mels[1] / top * 128
            axes[1, c].add_patch(Rectangle((b["t0"], y0), b["t1"] - b["t0"], y1 - y0, fill=False, ec="cyan", lw=1))
        axes[1, c].set_xlabel("time (s)")
    axes[0, 0].set_ylabel("amplitude")
    axes[1, 0].set_ylabel("mel bin")
    fig.suptitle("Audio per emotion (cyan: the saved time-frequency box of the prosodic cue)", fontsize=10)
    fig.tight_layout()
    return fig


def label_figure(raw: RawSplit):
    """Label co-occurrence heatmap and (MOSEI) sentiment histogram."""
    Y = np.stack(raw.labels)
    names = EMOTIONS[raw.dataset]
    s = np.asarray(raw.sentiments)
    has_s = np.isfinite(s).any()
    fig, axes = plt.subplots(1, 2 if has_s else 1, figsize=(10 if has_s else 5, 3.8))
    ax = np.atleast_1d(axes)
    sns.heatmap((Y.T @ Y).astype(int), annot=True, fmt="d", xticklabels=names, yticklabels=names, cmap="Blues",
                ax=ax[0], cbar=False)
    ax[0].set_title("label co-occurrence (diagonal: count)")
    if has_s:
        sns.histplot(s[np.isfinite(s)], bins=np.arange(-3.25, 3.5, 1 / 3), ax=ax[1])
        ax[1].set_xlabel("sentiment score")
        ax[1].set_title("sentiment in [-3, 3]")
    fig.tight_layout()
    return fig


def utterance_figure(raw: RawSplit, i: int, frame: int = 0, fig=None):
    """One utterance: the chosen frame (cue outlined), the log-mel spectrogram with a time marker, transcript, labels."""

    fig = fig or plt.figure(figsize=(9, 3))
    fig.clear()
    a0, a1 = fig.add_axes([0.02, 0.12, 0.26, 0.72]), fig.add_axes([0.36, 0.18, 0.6, 0.66])
    paths, idx = raw.frames(i)
    frame = int(np.clip(frame, 0, len(paths) - 1))
    a0.imshow(read_frame(paths[frame])[..., ::-1])
    cue = _cue(raw, i)
    if cue is not None and frame < len(cue["au_mask"]) and cue["au_mask"][frame].any():
        a0.contour(cue["au_mask"][frame], levels=[0.5], colors="yellow", linewidths=1)
    t = raw.frame_times(i, idx)[frame]  # s in the source video (recorded clock, else 30 fps)
    a0.set_title(f"frame {idx[frame]} (t = {t:.2f} s)", fontsize=9)
    a0.axis("off")
    wav, sr = read_audio(raw.audio_path(i))
    a1.imshow(log_mel(wav, sr), origin="lower", aspect="auto", extent=[0, len(wav) / sr, 0, 128], cmap="magma")
    a1.axvline(t - ((raw.timing[i] or {}).get("start") or 0.0), color="white", lw=1)  # audio starts there
    a1.set_xlabel("time (s)")
    a1.set_ylabel("mel bin")
    labels = [e for e, v in zip(EMOTIONS[raw.dataset], raw.labels[i]) if v]
    fig.suptitle(f"{raw.ids[i]}: \"{raw.texts[i]}\"\nlabels: {', '.join(labels)}", fontsize=9)
    return fig


def browser(raw: RawSplit):
    """ipywidgets browser: utterance and frame sliders redraw :func:`utterance_figure` (cheap callbacks)."""

    u = W.IntSlider(0, 0, len(raw) - 1, description="utterance")
    f = W.IntSlider(0, 0, 20, description="frame")
    view = figure_view(utterance_figure(raw, u.value, f.value))  # an Image widget: JupyterLab draws its value

    def draw(*_):
        show_in(view, utterance_figure(raw, u.value, f.value))

    u.observe(draw, "value")
    f.observe(draw, "value")
    return W.VBox([W.HBox([u, f]), view])
