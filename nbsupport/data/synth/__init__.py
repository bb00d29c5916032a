"""Synthetic multimodal emotion corpus in the MESM re-organised raw layout (Chapter 2).

The book cannot ship CMU-MOSEI or IEMOCAP, so this module draws a small corpus that goes through
exactly the code path of the real data (book/design.md, "Data flow") and, unlike the real sets,
records *where* each emotional cue is:

* **video** -- ``image_<k>.jpg`` frames numbered as 30 fps video (only the frames a 500 ms sampler
  reads are written, ``frame_step=15``) of a procedurally drawn face whose expression follows the
  facial action units (AUs, Ekman & Friesen's FACS) of the emotion, with an onset and an offset;
* **audio** -- ``audio.wav`` (16 kHz mono): a glottal pulse train with a pitch contour through formant
  filters (source-filter model of speech), syllable rhythm and pauses, whose prosody (pitch level and
  range, energy, tempo, jitter/shimmer, spectral tilt) follows the emotion inside a cue window;
* **text** -- a transcript from templates whose wording carries the emotion only some of the time;
* **cue ground truth** -- ``cue.pkl`` beside the frames: per written frame the union mask of the
  active AU regions (image coordinates, bit-packed) and the audio cue's time-frequency box.

Each modality carries the label's cue with its own probability (``p_text``, ``p_audio``,
``p_video``), raised by ``specialise`` for the emotions it expresses best (:data:`SPECIALTIES`: faces
the action-unit-salient ones, the voice the arousal-marked ones) and lowered by it for the others;
otherwise it is neutral or, with probability ``p_contradict``, shows another emotion.

``cue_gain`` (default 1) scales how strongly the face and voice express a shown emotion *inside the
recorded regions*: the AU motion (capped where the drawn face would leave its regions) plus, above 1, a
local-contrast boost inside the active AU regions only; the prosody/energy departure from neutral inside
the audio cue window (extrapolated past the profile above 1). 0 removes both cues. So every
modality is informative, none is enough, each emotion is best read in a different modality, and
fusion pays (measured in Chapter 2 with linear probes and in Chapter 4 with the UMONS models).

Layout written (``style="mosei"``; ``"iemocap"`` writes ``IEMOCAP_RAW_PROCESSED/<session>/<id>/``
with ``image_L_<k>.jpg`` / ``audio_L.wav`` speaker-tagged names as in the real release)::

    <out>/MOSEI_RAW_PROCESSED/meta.pkl            {id: {"text", "label", "sentiment", ...}}
    <out>/MOSEI_RAW_PROCESSED/<id>/image_<k>.jpg  frames, k = 30 fps index
    <out>/MOSEI_RAW_PROCESSED/<id>/audio.wav
    <out>/MOSEI_RAW_PROCESSED/<id>/cue.pkl        cue ground truth (synthetic only)
    <out>/MOSEI_SPLIT/{train,valid,test}_split.txt
    <out>/synth_info.json                         generator version and knobs (written last)

The corpus is written into ``<out>.partial-<pid>`` and renamed to ``<out>`` only when complete, so a
killed run never leaves a corpus that looks complete; the next run removes the ``<out>.partial-<pid>``
folders whose process is gone (``kill -9`` leaves them). Same seed and knobs give byte-identical files.

CLI: ``python -m nbsupport.data.synth --out DIR --n N --seed S --style mosei|iemocap``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
from scipy import signal
from tqdm.auto import tqdm

__all__ = ["GENERATOR_VERSION", "EMOTIONS", "STYLES", "SynthConfig", "generate_corpus", "AU_REGIONS",
           "CUE_PROFILES", "SPECIALTIES", "carry_probability", "cue_profile_for", "main",
           "clean_stale_partials"]

#: Bump when the generator's output changes; part of :func:`nbsupport.data.ensure_corpus`'s cache key.
GENERATOR_VERSION = 6

#: Largest ``SynthConfig.cue_gain``: past it the drawn face leaves its AU regions.
MAX_CUE_GAIN = 4.0
#: AU intensity the face drawing reaches at most; ``cue_gain`` above this adds contrast, not motion.
_MAX_AU = 1.5

from ..common import EMOTIONS

STYLES = tuple(EMOTIONS)

SR = 16000
FPS = 30
IMG = 96  # frame side in pixels

# ----------------------------------------------------------------------------------------------
# Emotion cue profiles: facial action units (FACS) with intensities, prosody, lexicon.
# Prosody: f0 = pitch scale, rng = pitch range scale, db = energy offset, rate = syllables scale,
# jit = jitter/shimmer amount, tilt = spectral tilt (one-pole low-pass coefficient: higher = darker).
# ----------------------------------------------------------------------------------------------
CUE_PROFILES = {
    "neutral":    dict(aus={}, f0=1.00, rng=1.0, db=0.0, rate=1.00, jit=0.005, tilt=0.55, val=0.0),
    "anger":      dict(aus={4: 1.0, 23: 1.0, 5: 0.4}, f0=1.12, rng=1.3, db=7.0, rate=1.20, jit=0.02, tilt=0.15, val=-1.6),
    "disgust":    dict(aus={9: 1.0, 10: 1.0, 15: 0.4}, f0=0.88, rng=0.7, db=-1.0, rate=0.85, jit=0.04, tilt=0.6, val=-1.5),
    "fear":       dict(aus={1: 1.0, 2: 1.0, 4: 0.6, 5: 1.0, 20: 1.0}, f0=1.30, rng=0.6, db=-4.0, rate=1.30, jit=0.05, tilt=0.45, val=-1.2),
    "happy":      dict(aus={12: 1.0, 6: 0.6}, f0=1.18, rng=1.7, db=3.0, rate=1.10, jit=0.01, tilt=0.35, val=2.0),
    "sad":        dict(aus={1: 1.0, 4: 0.7, 15: 1.0}, f0=0.84, rng=0.4, db=-7.0, rate=0.72, jit=0.015, tilt=0.85, val=-1.9),
    "surprise":   dict(aus={1: 1.0, 2: 1.0, 5: 1.0, 26: 1.0}, f0=1.25, rng=2.0, db=2.0, rate=1.00, jit=0.01, tilt=0.35, val=0.6),
    "excited":    dict(aus={12: 1.0, 26: 0.7, 2: 0.6, 6: 0.5}, f0=1.30, rng=1.9, db=6.0, rate=1.25, jit=0.015, tilt=0.2, val=2.2),
    "frustrated": dict(aus={4: 0.8, 15: 0.6, 23: 0.7, 9: 0.3}, f0=0.95, rng=0.8, db=2.5, rate=0.95, jit=0.03, tilt=0.4, val=-1.2),
}
_IEMOCAP_PROFILE = {"ang": "anger", "exc": "excited", "fru": "frustrated", "hap": "happy", "neu": "neutral",
                    "sad": "sad"}

#: Face regions of each AU in face-normalised coordinates (u, v in [-1, 1]: box u0, v0, u1, v1).
AU_REGIONS = {
    1: (-0.45, -0.75, 0.45, -0.22),   # inner brow raiser
    2: (-0.85, -0.80, 0.85, -0.25),   # outer brow raiser
    4: (-0.55, -0.55, 0.55, -0.20),   # brow lowerer
    5: (-0.62, -0.32, 0.62, 0.02),    # upper lid raiser
    6: (-0.75, -0.05, 0.75, 0.25),    # cheek raiser
    9: (-0.25, -0.20, 0.25, 0.32),    # nose wrinkler
    10: (-0.40, 0.25, 0.40, 0.52),    # upper lip raiser
    12: (-0.60, 0.25, 0.60, 0.75),    # lip corner puller
    15: (-0.60, 0.35, 0.60, 0.80),    # lip corner depressor
    20: (-0.70, 0.30, 0.70, 0.72),    # lip stretcher
    23: (-0.45, 0.32, 0.45, 0.70),    # lip tightener
    26: (-0.45, 0.35, 0.45, 1.20),    # jaw drop
}

_TOPICS = ["the movie", "the new phone", "my job", "the election", "the trip", "this product", "the weather",
           "my neighbour", "the restaurant", "the game", "the course", "the book", "the meeting", "the concert",
           "the flight", "our team", "the results", "the apartment", "the interview", "the show"]
_EMO_WORDS = {
    "anger": (["angry", "furious", "mad", "outraged", "livid"], ["infuriating", "outrageous", "unacceptable", "insulting"]),
    "disgust": (["disgusted", "sickened", "repulsed", "grossed out"], ["disgusting", "gross", "revolting", "nasty"]),
    "fear": (["scared", "afraid", "terrified", "nervous", "anxious"], ["frightening", "scary", "terrifying", "alarming"]),
    "happy": (["happy", "glad", "delighted", "thrilled", "pleased"], ["wonderful", "great", "lovely", "fantastic"]),
    "sad": (["sad", "heartbroken", "miserable", "down", "depressed"], ["depressing", "heartbreaking", "tragic", "gloomy"]),
    "surprise": (["surprised", "amazed", "astonished", "shocked", "stunned"], ["unexpected", "astonishing", "unbelievable", "surprising"]),
    "excited": (["excited", "pumped", "thrilled", "ecstatic", "overjoyed"], ["amazing", "awesome", "incredible", "exhilarating"]),
    "frustrated": (["frustrated", "annoyed", "fed up", "irritated", "tired of this"], ["annoying", "pointless", "exhausting", "ridiculous"]),
}
_EMO_FRAMES = ["i feel {a} about {t}", "honestly {t} made me {a}", "{t} is {b}", "i was so {a} when i heard about {t}",
               "{t} really leaves me {a}", "what a {b} thing {t} turned out to be", "i am {a} , {t} was {b}",
               "every time i think of {t} i get {a}", "you know {t} is just {b}", "i was {a} after {t}"]
_NEUTRAL_FRAMES = ["we talked about {t} yesterday", "{t} starts at nine tomorrow", "i read a report on {t}",
                   "let me tell you about {t}", "there is a meeting about {t} next week", "they moved {t} to monday",
                   "so {t} has three parts", "i think {t} was last year", "she asked me about {t}",
                   "the first thing about {t} is the price", "we will see how {t} goes", "{t} was on the list"]


@dataclass
class SynthConfig:
    """Knobs of the synthetic corpus (Chapter 2); defaults are the calibrated book corpus."""

    n: int = 600
    seed: int = 0
    style: str = "mosei"
    p_text: float = 0.55       # probability that the transcript carries the label's cue (before specialise)
    p_audio: float = 0.55      # ... that the prosody carries it
    p_video: float = 0.55      # ... that the face carries it
    specialise: float = 0.35   # each modality carries its SPECIALTIES with p + specialise, other emotions with p - specialise
    p_contradict: float = 0.35  # when a modality does not carry the cue: probability it shows another emotion
    p_second: float = 0.3      # mosei: probability of a second co-occurring emotion
    noise: float = 1.0         # scales image noise, audio background noise and cue-intensity jitter
    frame_step: int = 15       # write every frame_step-th 30 fps frame (15 = the frames 500 ms sampling reads)
    duration: tuple = (2.6, 3.4)  # seconds, uniform
    splits: tuple = (0.6, 0.1, 0.3)  # train/valid/test; a large test split keeps bootstrap intervals narrow
    cue_gain: float = 1.0      # scales the face AU cue and the audio prosody cue inside their regions
    hidden_cue: float = 0.0    # probability that a shown emotion takes the form hand-crafted features miss

    def check(self) -> "SynthConfig":
        """Raise ValueError naming the knob that is out of range."""
        if self.style not in STYLES:
            raise ValueError(f"synth: unknown style {self.style!r}; expected one of {', '.join(STYLES)}")
        if not isinstance(self.n, (int, np.integer)) or self.n < 6:
            raise ValueError(f"synth: n must be an integer >= 6 (two per split at least), got {self.n!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"synth: seed must be a non-negative integer, got {self.seed!r}")
        for k in ("p_text", "p_audio", "p_video", "p_contradict", "p_second"):
            v = getattr(self, k)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"synth: {k} must be a probability in [0, 1], got {v!r}")
        if not 0.0 <= float(self.specialise) <= 1.0:
            raise ValueError(f"synth: specialise must be in [0, 1], got {self.specialise!r}")
        if not 0.0 <= float(self.noise) <= 5.0:
            raise ValueError(f"synth: noise must be in [0, 5], got {self.noise!r}")
        if not 1 <= int(self.frame_step) <= 30:
            raise ValueError(f"synth: frame_step must be in [1, 30], got {self.frame_step!r}")
        if isinstance(self.cue_gain, bool) or not isinstance(self.cue_gain, (int, float, np.floating)) \
                or not 0.0 <= float(self.cue_gain) <= MAX_CUE_GAIN:
            raise ValueError(f"synth: cue_gain must be a number in [0, {MAX_CUE_GAIN:g}] "
                             f"(1 = the book corpus), "
                             f"got {self.cue_gain!r}")
        if isinstance(self.hidden_cue, bool) or not isinstance(self.hidden_cue, (int, float, np.floating)) \
                or not 0.0 <= float(self.hidden_cue) <= 1.0:
            raise ValueError(f"synth: hidden_cue must be a probability in [0, 1], got {self.hidden_cue!r}")
        sp = tuple(self.splits) if isinstance(self.splits, (tuple, list)) else ()
        if len(sp) != 3 or any(not 0.0 <= float(x) <= 1.0 for x in sp) or abs(sum(sp) - 1.0) > 1e-6 \
                or sp[0] <= 0 or sp[2] <= 0:
            raise ValueError(f"synth: splits must be three fractions (train, valid, test) summing to 1 with "
                             f"train and test > 0, got {self.splits!r}")
        return self


# ----------------------------------------------------------------------------------------------
# Labels and per-modality cue assignment
# ----------------------------------------------------------------------------------------------
_COOCCUR = {"anger": ["disgust", "sad"], "disgust": ["anger"], "fear": ["sad", "surprise"],
            "happy": ["surprise"], "sad": ["fear", "anger"], "surprise": ["happy", "fear"]}


def _draw_label(rng, cfg):
    """Return (label, active profile names, sentiment)."""
    names = EMOTIONS[cfg.style]
    if cfg.style == "iemocap":
        lab = names[int(rng.integers(6))]
        return lab, [_IEMOCAP_PROFILE[lab]], float("nan")
    first = names[int(rng.integers(6))]
    active = [first]
    if rng.random() < cfg.p_second:
        active.append(str(rng.choice(_COOCCUR[first])))
    val = np.mean([CUE_PROFILES[a]["val"] for a in active]) + rng.normal(0, 0.7)
    sentiment = float(np.clip(np.round(val * 3) / 3, -3, 3))
    return [1 if e in active else 0 for e in names], active, sentiment


#: The emotions each modality expresses most reliably (used with ``SynthConfig.specialise``): faces show
#: the action-unit-salient ones, the voice the arousal-marked ones, the words a mix. Every MOSEI emotion
#: is a specialty of at least one modality, so a model that fuses can read each emotion where it shows.
SPECIALTIES = {"L": ("anger", "sad", "surprise", "excited"),
               "A": ("anger", "sad", "fear", "frustrated"),
               "V": ("happy", "surprise", "disgust", "excited")}


def carry_probability(cfg: SynthConfig, modality: str, profile: str) -> float:
    """Probability that ``modality`` (L, A or V) shows the cue of emotion ``profile`` when it is in the label."""
    base = {"L": cfg.p_text, "A": cfg.p_audio, "V": cfg.p_video}[modality]
    shift = cfg.specialise if profile in SPECIALTIES[modality] else -cfg.specialise
    return float(np.clip(base + shift, 0.0, 1.0))


def _modality_profiles(rng, active, cfg, modality):
    """Which profiles ``modality`` (L, A or V) shows: the label's (carried), another emotion's, or neutral.

    With ``cfg.specialise`` > 0 each emotion of the label is shown on its own with
    :func:`carry_probability`; otherwise the label's profiles are shown together, with the modality's
    base probability (``carry_probability`` without specialisation, the same for every emotion)."""
    if active == ["neutral"]:
        if rng.random() < cfg.p_contradict * 0.5:
            return [str(rng.choice([k for k in CUE_PROFILES if k != "neutral"]))], False
        return ["neutral"], True
    if cfg.specialise > 0:
        shown = [p for p in active if rng.random() < carry_probability(cfg, modality, p)]
        if shown:
            return shown, True
    elif rng.random() < carry_probability(cfg, modality, active[0]):
        return list(active), True
    if rng.random() < cfg.p_contradict:
        pool = [k for k in (EMOTIONS["mosei"] if cfg.style == "mosei" else _IEMOCAP_PROFILE.values())
                if k not in active and k != "neutral"]
        return [str(rng.choice(pool))], False
    return ["neutral"], False


# ----------------------------------------------------------------------------------------------
# Video: a procedurally drawn face with action units
# ----------------------------------------------------------------------------------------------
def _background(rng):
    """Cluttered background with a lighting gradient (uint8, IMG x IMG x 3)."""
    base = rng.uniform(60, 200, size=3)
    gy, gx = np.mgrid[0:IMG, 0:IMG].astype(np.float32) / IMG
    light = 1.0 + rng.uniform(-0.35, 0.35) * (gx - 0.5) + rng.uniform(-0.35, 0.35) * (gy - 0.5)
    img = (base[None, None, :] * light[..., None]).clip(0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 8))):
        col = tuple(int(c) for c in rng.uniform(30, 230, size=3))
        if rng.random() < 0.5:
            p = rng.integers(0, IMG, size=4)
            cv2.rectangle(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), col, -1)
        else:
            c = rng.integers(0, IMG, size=2)
            cv2.circle(img, (int(c[0]), int(c[1])), int(rng.integers(4, 20)), col, -1, cv2.LINE_AA)
    return img


def _face_identity(rng):
    skin = np.array([rng.uniform(60, 140), rng.uniform(110, 190), rng.uniform(150, 240)])  # BGR
    skin = skin * rng.uniform(0.6, 1.1)
    return dict(
        cx=IMG / 2 + rng.uniform(-6, 6), cy=IMG / 2 + rng.uniform(-4, 6),
        a=rng.uniform(24, 31), b=rng.uniform(31, 39),  # half width, half height (pixels)
        skin=tuple(float(c) for c in skin.clip(0, 255)),
        hair=tuple(float(c) for c in rng.uniform(10, 90, size=3)),
        eye_gap=rng.uniform(0.34, 0.42), mouth_w=rng.uniform(0.3, 0.4), brow_thick=int(rng.integers(2, 4)),
        bg=_background(rng), light=rng.uniform(0.8, 1.2),
    )


def _pt(f, u, v, dx, dy):
    return (int(round((f["cx"] + dx + u * f["a"]) * 16)), int(round((f["cy"] + dy + v * f["b"]) * 16)))


def _draw_face(f, au, dx, dy):
    """Draw one frame: identity ``f``, AU intensities ``au`` (dict AU -> [0, 1]), head shift (dx, dy)."""
    img = f["bg"].copy()
    S = 16  # cv2 fixed-point shift=4 -> sub-pixel drawing
    g = lambda k: float(au.get(k, 0.0))
    c = (int(round((f["cx"] + dx) * S)), int(round((f["cy"] + dy) * S)))
    jaw = 0.12 * g(26)
    cv2.ellipse(img, (c[0], c[1] - int(0.25 * f["b"] * S)), (int(f["a"] * 1.05 * S), int(f["b"] * 0.8 * S)),
                0, 180, 360, f["hair"], -1, cv2.LINE_AA, 4)
    cv2.ellipse(img, c, (int(f["a"] * S), int(f["b"] * (1 + jaw) * S)), 0, 0, 360, f["skin"], -1, cv2.LINE_AA, 4)
    dark = (30, 30, 40)
    eg = f["eye_gap"]
    for s in (-1, 1):
        # brows: inner and outer ends move with AU1 (inner up), AU2 (outer up), AU4 (down + inward)
        iu, iv = s * (0.14 + 0.05 * g(4)), -0.40 - 0.16 * g(1) + 0.12 * g(4)
        ou, ov = s * 0.62, -0.44 - 0.16 * g(2) + 0.04 * g(4)
        mu, mv = (iu + ou) / 2, min(iv, ov) - 0.05
        pts = np.array([_pt(f, iu, iv, dx, dy), _pt(f, mu, mv, dx, dy), _pt(f, ou, ov, dx, dy)], np.int32)
        cv2.polylines(img, [pts], False, dark, f["brow_thick"], cv2.LINE_AA, 4)
        # eyes: AU5 widens, AU6 narrows from below
        opn = 0.07 * (1 + 1.3 * g(5) - 0.45 * g(6))
        cv2.ellipse(img, _pt(f, s * eg, -0.15, dx, dy), (int(0.15 * f["a"] * S), max(S, int(opn * f["b"] * S))),
                    0, 0, 360, (235, 235, 235), -1, cv2.LINE_AA, 4)
        cv2.circle(img, _pt(f, s * eg, -0.15, dx, dy), int(0.055 * f["a"] * S), dark, -1, cv2.LINE_AA, 4)
        if g(6) > 0.05:  # cheek raise: a crease under the eye
            pts = np.array([_pt(f, s * (eg - 0.15), 0.02, dx, dy), _pt(f, s * eg, 0.07 + 0.02 * g(6), dx, dy),
                            _pt(f, s * (eg + 0.17), 0.0, dx, dy)], np.int32)
            cv2.polylines(img, [pts], False, (60, 70, 110), 1, cv2.LINE_AA, 4)
    # nose, with AU9 wrinkles
    cv2.polylines(img, [np.array([_pt(f, 0.0, -0.08, dx, dy), _pt(f, 0.06, 0.18, dx, dy), _pt(f, -0.06, 0.2, dx, dy)],
                                 np.int32)], False, (70, 80, 110), 1, cv2.LINE_AA, 4)
    if g(9) > 0.05:
        for k in range(3):
            v = -0.08 + 0.07 * k
            cv2.line(img, _pt(f, -0.13, v, dx, dy), _pt(f, 0.13, v + 0.02, dx, dy), (50, 55, 90),
                     1 + int(g(9) > 0.6), cv2.LINE_AA, 4)
    # mouth: corners (AU12 up, AU15 down, AU20 out), upper lip (AU10 up), opening (AU26), thickness (AU23)
    mw = f["mouth_w"] * (1 + 0.35 * g(20) + 0.15 * g(12) - 0.1 * g(23))
    cv_ = 0.52 - 0.16 * g(12) + 0.16 * g(15) + 0.02 * g(20)
    mid_up = 0.50 - 0.10 * g(10) + 0.06 * g(12) - 0.04 * g(15)
    mid_lo = mid_up + 0.05 * (1 - 0.8 * g(23)) + 0.30 * g(26) + 0.05 * g(10)
    ts = np.linspace(-1, 1, 9)
    upper = [_pt(f, t * mw, cv_ + (mid_up - cv_) * (1 - t * t), dx, dy) for t in ts]
    lower = [_pt(f, t * mw, cv_ + (mid_lo - cv_) * (1 - t * t), dx, dy) for t in ts[::-1]]
    poly = np.array(upper + lower, np.int32)
    inner = (40, 30, 90) if g(26) > 0.2 else (80, 70, 150)
    cv2.fillPoly(img, [poly], inner, cv2.LINE_AA, 4)
    if g(10) > 0.3:  # teeth shown by the raised upper lip
        cv2.polylines(img, [np.array(upper, np.int32)], False, (230, 230, 230), 2, cv2.LINE_AA, 4)
    cv2.polylines(img, [poly], True, (50, 40, 120), 1 + int(g(23) < 0.5), cv2.LINE_AA, 4)
    return img


def _au_mask(f, aus, dx, dy):
    """Union mask (IMG x IMG bool) of the regions of the active action units."""
    m = np.zeros((IMG, IMG), np.uint8)
    for k in aus:
        u0, v0, u1, v1 = AU_REGIONS[k]
        x0, y0 = f["cx"] + dx + u0 * f["a"], f["cy"] + dy + v0 * f["b"]
        x1, y1 = f["cx"] + dx + u1 * f["a"], f["cy"] + dy + v1 * f["b"]
        cv2.rectangle(m, (int(np.floor(x0)), int(np.floor(y0))), (int(np.ceil(x1)), int(np.ceil(y1))), 1, -1)
    return m.astype(bool)


def _boost_contrast(img, mask, factor):
    """Scale the local contrast of ``img`` by ``factor`` inside ``mask`` only (``SynthConfig.cue_gain`` > 1):
    each pixel moves away from its Gaussian-blurred neighbourhood mean (sigma 3 px); outside the AU
    regions the frame is untouched, so ``cue.pkl``'s regions stay the places where the cue is."""
    x = img.astype(np.float32)
    mean = cv2.GaussianBlur(x, (0, 0), 3.0)
    out = np.where(mask[..., None], mean + (x - mean) * factor, x)
    return out.clip(0, 255).astype(np.uint8)


def _envelope(t, on, off, ramp=0.25):
    """Cue intensity over time: 0 before ``on``, ramps to 1, back to 0 after ``off`` (onset/apex/offset)."""
    return np.clip(np.minimum((t - on) / ramp, (off - t) / ramp), 0.0, 1.0)


#: Hidden video form: a dot lattice over the whole frame (``SynthConfig.hidden_cue`` > 0), 3x3 px dots every
#: 6 px (dots of 1.5-2 px every 3-3.5 px in the 48 px face crop, well under a 12 px HOG cell); amplitude
#: in grey levels at ``cue_gain`` 1.
TEXTURE_PERIOD, TEXTURE_DOT, TEXTURE_AMP = 6, 3, 55.0


def _dot_lattice(ox: int, oy: int) -> np.ndarray:
    """(IMG, IMG) zero-mean lattice: -1 on the dots, a small positive value between them."""
    yy, xx = np.mgrid[0:IMG, 0:IMG]
    dots = (((xx - ox) % TEXTURE_PERIOD) < TEXTURE_DOT) & (((yy - oy) % TEXTURE_PERIOD) < TEXTURE_DOT)
    cover = TEXTURE_DOT ** 2 / TEXTURE_PERIOD ** 2
    return np.where(dots, -1.0, cover / (1.0 - cover)).astype(np.float32)


def _video(rng, cfg, profiles, dur, hidden=False, lattice=None):
    """Frames (list of (k, jpg bytes)), per-frame AU masks, cue window and AUs.

    ``lattice`` (``hidden_cue`` > 0): every frame carries the dot lattice, dark dots everywhere. ``hidden``:
    the face keeps a neutral geometry and the shown AUs' regions get the same lattice with its sign
    flipped (bright dots) instead: gradient magnitudes, unsigned gradient orientations and cell means are
    those of the dark lattice, so HOG and the face-geometry grids see no difference, while a fine-scale
    rectified filter (a CNN's first layer) tells bright dots from dark ones."""
    f = _face_identity(rng)
    aus = {}
    for p in profiles:
        for k, w in CUE_PROFILES[p]["aus"].items():
            aus[k] = max(aus.get(k, 0.0), w)
    strength = float(np.clip(rng.uniform(0.75, 1.0) - 0.1 * cfg.noise * rng.random(), 0.3, 1.0))
    on = rng.uniform(0.1, 0.3) * dur
    off = on + rng.uniform(0.45, 0.65) * dur
    ks = np.arange(0, int(dur * FPS), cfg.frame_step)
    frames, masks = [], []
    drift = rng.normal(0, 1.0, size=(len(ks), 2)).cumsum(0) * 0.6  # head jitter (pixels)
    gain = float(cfg.cue_gain)
    for j, k in enumerate(ks):
        e = float(_envelope(k / FPS, on, off)) * strength
        au_now = {a: min(w * e * gain, _MAX_AU) for a, w in aus.items()}  # cue_gain scales the AU motion
        img = _draw_face(f, {} if hidden else au_now, *drift[j])
        active = [a for a, w in au_now.items() if w > 0.2]
        mask = _au_mask(f, active, *drift[j])
        if gain > 1.0 and mask.any() and not hidden:
            img = _boost_contrast(img, mask, 1.0 + 0.5 * (gain - 1.0) * e)
        if lattice is not None:
            sign = np.where(mask, -1.0, 1.0).astype(np.float32) if hidden else 1.0
            tex = TEXTURE_AMP * min(gain, 2.0) * lattice * sign
            img = (img.astype(np.float32) + tex[..., None]).clip(0, 255).astype(np.uint8)
        noise = rng.normal(0, 6.0 * cfg.noise, size=img.shape)
        img = (img.astype(np.float32) * f["light"] + noise).clip(0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        frames.append((int(k), buf.tobytes()))
        masks.append(mask)
    return frames, np.stack(masks), (float(on), float(off)), sorted(aus)


# ----------------------------------------------------------------------------------------------
# Audio: source-filter speech-like signal with emotional prosody
# ----------------------------------------------------------------------------------------------
_VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
           (440, 1020, 2240), (660, 1720, 2410)]  # (F1, F2, F3) Hz, Peterson & Barney averages


def _resonator(x, fc, bw):
    """Second-order formant resonator (Klatt 1980) via scipy.signal.lfilter."""
    r = np.exp(-np.pi * bw / SR)
    a = [1.0, -2 * r * np.cos(2 * np.pi * fc / SR), r * r]
    return signal.lfilter([1 - r], a, x)


def _mix(profiles, key):
    """Prosody value ``key`` of several profiles shown together: arithmetic mean of the additive ones
    (``db`` offset, ``tilt`` coefficient), geometric mean of the scale factors."""
    if key in ("db", "tilt"):
        return float(np.mean([CUE_PROFILES[p][key] for p in profiles]))
    return float(np.exp(np.mean([np.log(CUE_PROFILES[p][key]) for p in profiles])))


def _prosody_at(neutral, target, amount, key):
    """Prosody value ``key`` moved from ``neutral`` towards ``target`` by ``amount`` (0 = neutral, 1 = the
    profile, above 1 = further, the ``cue_gain`` > 1 extrapolation): additive for ``db``, ``tilt`` and
    ``jit``, geometric for the scale factors; kept in each value's physical range."""
    if key in ("db", "tilt", "jit"):
        v = neutral + (target - neutral) * amount
        return np.clip(v, 0.0, 1.0) if key == "tilt" else (np.maximum(v, 0.0) if key == "jit" else v)
    return neutral * (target / neutral) ** amount


#: Hidden audio form: one 40-band mel segment (between two adjacent centres of the MFCC filter bank:
#: librosa, 16 kHz, n_fft 400, 40 Slaney mels) per emotion index, every other segment from 2.4 kHz.
TONE_SEGMENTS = ((2376.0, 2564.0), (2766.0, 2984.0), (3219.0, 3472.0), (3746.0, 4041.0), (4360.0, 4704.0),
                 (5074.0, 5474.0))
TONE_AMP = 0.006  # amplitude of each split tone at cue_gain 1 (the voice is 0.08 RMS while voiced)


def _tone_bed(rng_h, cfg, seg_on, env, n):
    """Steady tones in :data:`TONE_SEGMENTS` (``hidden_cue`` > 0): one tone of amplitude sqrt(2)*A at each
    segment's centre, which crossfades (``env``, power kept) into a pair of tones of amplitude A at a quarter
    and three quarters of the segment in the segments ``seg_on`` (the shown emotions, hidden form).

    Both forms put the same power into each triangular (linear in Hz) MFCC mel filter and have the same
    power-weighted mean frequency, so MFCCs, RMS energy and spectral centroid do not change; a 128-band
    mel spectrogram resolves one peak from two."""
    t = np.arange(n) / SR
    A = TONE_AMP * min(float(cfg.cue_gain), 2.0)
    out = np.zeros(n)
    for j, (lo, hi) in enumerate(TONE_SEGMENTS):
        mid, q = (lo + hi) / 2, (hi - lo) / 4
        c = np.clip(env, 0.0, 1.0) if j in seg_on else np.zeros(n)
        ph = rng_h.uniform(0, 2 * np.pi, size=3)
        out += A * np.sqrt(2.0) * np.sqrt(1 - c) * np.sin(2 * np.pi * mid * t + ph[0])
        out += A * np.sqrt(c) * (np.sin(2 * np.pi * (mid - q) * t + ph[1])
                                 + np.sin(2 * np.pi * (mid + q) * t + ph[2]))
    return out


def _segments_of(cfg, profiles):
    """Indices into :data:`TONE_SEGMENTS` of the shown emotion profiles (neutral has none)."""
    names = [cue_profile_for(e) for e in EMOTIONS[cfg.style]]
    return sorted({names.index(p) for p in profiles if p != "neutral" and p in names})


def _audio(rng, cfg, profiles, dur, female, hidden=False, rng_h=None):
    """Waveform and cue box. ``hidden``: the prosody stays neutral and the shown emotions' tone segments
    split inside the cue window instead (:func:`_tone_bed`, present whenever ``hidden_cue`` > 0)."""
    shown = profiles
    if hidden:
        profiles = ["neutral"]
    n = int(dur * SR)
    t = np.arange(n) / SR
    on = rng.uniform(0.05, 0.3) * dur
    off = min(dur, on + rng.uniform(0.5, 0.75) * dur)
    strength = float(np.clip(rng.uniform(0.6, 1.0) - 0.1 * cfg.noise * rng.random(), 0.3, 1.0))
    env = _envelope(t, on, off, ramp=0.15) * strength  # (n,) how much emotion is in the prosody
    P = {k: _mix(profiles, k) for k in ("f0", "rng", "db", "rate", "jit", "tilt")}
    N = CUE_PROFILES["neutral"]
    g_env = env * float(cfg.cue_gain)  # cue_gain scales the prosody/energy departure inside the cue box
    lerp = lambda k: _prosody_at(N[k], P[k], g_env, k)
    base = rng.uniform(180, 240) if female else rng.uniform(95, 140)
    # syllables: durations set by the tempo at their start, with pauses
    rate_now = lerp("rate")
    bounds, voiced = [], np.zeros(n)
    pos = rng.uniform(0.05, 0.2)
    vowel_of = np.zeros(n, np.int64)
    accent = np.zeros(n)
    while pos < dur - 0.15:
        i0 = int(pos * SR)
        r = 4.5 * rate_now[min(i0, n - 1)]
        d = rng.uniform(0.7, 1.3) / r
        i1 = min(n, int((pos + 0.75 * d) * SR))
        w = np.hanning(i1 - i0) ** 0.7 if i1 - i0 > 2 else np.ones(i1 - i0)
        voiced[i0:i1] = np.maximum(voiced[i0:i1], w * rng.uniform(0.7, 1.0))
        vowel_of[i0:i1] = rng.integers(len(_VOWELS))
        accent[i0:i1] = rng.normal(0, 1)
        bounds.append((i0, i1))
        pos += d + (rng.uniform(0.12, 0.3) if rng.random() < 0.12 else 0.0)
    # pitch contour: declination + syllable accents scaled by the range; surprise-like profiles rise
    semis = (1.5 * accent - 2.0 * t / dur) * lerp("rng")
    rise = 4.0 * env * (t - on) / max(off - on, 1e-3) * (P["rng"] > 1.8)
    jit = lerp("jit")
    slow = signal.lfilter([0.02], [1, -0.98], rng.normal(0, 1, n)) * 3
    f0 = base * lerp("f0") * 2 ** ((semis + rise) / 12) * (1 + jit * slow)
    phase = np.cumsum(2 * np.pi * f0 / SR)
    src = (np.mod(phase, 2 * np.pi) / np.pi - 1.0)  # sawtooth glottal source (rich harmonics)
    src = src * (1 + 2 * jit * slow) + 0.05 * rng.normal(0, 1, n)  # shimmer + aspiration
    # spectral tilt: time-varying one-pole low-pass mixed with the flat source
    a = 0.5 + 0.45 * lerp("tilt")
    dark = signal.lfilter([1 - 0.9], [1, -0.9], src)
    src = src * (1 - a) + dark * a * 3
    out = np.zeros(n)
    for (i0, i1) in bounds:
        seg = src[i0:i1]
        F = _VOWELS[vowel_of[i0]]
        y = sum(_resonator(seg, fc, 60 + 30 * j) * (1.0, 0.6, 0.3)[j] for j, fc in enumerate(F))
        out[i0:i1] = y
    out = out * voiced
    out = out / (np.sqrt(np.mean(out[voiced > 0.1] ** 2)) + 1e-9)  # unit RMS while voiced, then the energy cue
    out = out * 0.08 * 10 ** (lerp("db") / 20)
    # background noise: pink-ish noise at a random SNR, plus a low hum
    bg = signal.lfilter([0.05], [1, -0.95], rng.normal(0, 1, n))
    bg = bg / (bg.std() + 1e-9) * 0.01 * cfg.noise * rng.uniform(0.5, 2.0)
    hum = 0.003 * cfg.noise * np.sin(2 * np.pi * rng.choice([50, 60]) * t)
    if rng_h is not None:
        segs = _segments_of(cfg, shown) if hidden else []
        out = out + _tone_bed(rng_h, cfg, segs, _envelope(t, on, off, ramp=0.15) * strength, n)
    wav = (out + bg + hum).clip(-1, 1).astype(np.float32)
    if hidden:
        segs = _segments_of(cfg, shown) or [0]
        box = dict(t0=float(on), t1=float(off), f0_hz=TONE_SEGMENTS[segs[0]][0],
                   f1_hz=TONE_SEGMENTS[segs[-1]][1])
        return wav, box
    f_lo = float(max(50.0, base * float(P["f0"]) ** float(cfg.cue_gain) * 0.7))
    box = dict(t0=float(on), t1=float(off), f0_hz=f_lo, f1_hz=3500.0)
    return wav, box


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
def _text(rng, profiles):
    t = _TOPICS[int(rng.integers(len(_TOPICS)))]
    if profiles == ["neutral"]:
        return _NEUTRAL_FRAMES[int(rng.integers(len(_NEUTRAL_FRAMES)))].format(t=t)
    parts = []
    for p in profiles:
        a_words, b_words = _EMO_WORDS[p]
        fr = _EMO_FRAMES[int(rng.integers(len(_EMO_FRAMES)))]
        parts.append(fr.format(t=t, a=a_words[int(rng.integers(len(a_words)))],
                               b=b_words[int(rng.integers(len(b_words)))]))
    if rng.random() < 0.4:  # a neutral clause dilutes the emotional wording
        parts.insert(int(rng.integers(len(parts) + 1)),
                     _NEUTRAL_FRAMES[int(rng.integers(len(_NEUTRAL_FRAMES)))].format(t=t))
    return " and ".join(parts)


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------
def _utterance_id(style, i, rng_speaker):
    """(session folder or None, utterance id) of utterance ``i``: MOSEI ids sit directly in the raw folder,
    IEMOCAP ids in their session's dialogue folder."""
    if style == "mosei":
        return None, f"syn{i // 8:04d}_{i % 8}"
    ses = 1 + i % 5
    side = "F" if (i // 5) % 2 == 0 else "M"  # session's left-speaker gender
    spk = side if rng_speaker < 0.5 else ("M" if side == "F" else "F")
    folder = f"Ses{ses:02d}{side}_impro{(i // 10) % 8 + 1:02d}"
    return folder, f"{folder}_{spk}{i:03d}"


def _one(cfg: SynthConfig, i: int):
    """Generate utterance ``i`` (independent random stream per utterance: SeedSequence([seed, i]))."""
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(i), GENERATOR_VERSION]))
    label, active, sentiment = _draw_label(rng, cfg)
    dur = float(rng.uniform(*cfg.duration))
    text_p, text_c = _modality_profiles(rng, active, cfg, "L")
    aud_p, aud_c = _modality_profiles(rng, active, cfg, "A")
    vid_p, vid_c = _modality_profiles(rng, active, cfg, "V")
    spk_draw = rng.random()
    female = rng.random() < 0.5
    text = _text(rng, text_p)
    # hidden forms: their own random stream, so a corpus with hidden_cue > 0 has the same labels, faces and
    # voices as the default one and differs only in the form the cues take
    rng_h = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(i), GENERATOR_VERSION, 7]))
    draw_v, draw_a, ox, oy = rng_h.random(), rng_h.random(), *rng_h.integers(0, TEXTURE_PERIOD, size=2)
    hidden_on = float(cfg.hidden_cue) > 0
    hid_v = hidden_on and draw_v < cfg.hidden_cue and vid_p != ["neutral"]
    hid_a = hidden_on and draw_a < cfg.hidden_cue and aud_p != ["neutral"]
    lattice = _dot_lattice(int(ox), int(oy)) if hidden_on else None
    frames, masks, (von, voff), aus = _video(rng, cfg, vid_p, dur, hid_v, lattice)
    wav, box = _audio(rng, cfg, aud_p, dur, female, hid_a, rng_h if hidden_on else None)
    folder, uid = _utterance_id(cfg.style, i, spk_draw)
    cue = dict(
        version=GENERATOR_VERSION, frame_index=[k for k, _ in frames], image_size=(IMG, IMG),
        au_mask_packed=np.packbits(masks, axis=-1), active_aus=aus, video_window_s=(von, voff),
        audio_box=box, carried={"L": text_c, "A": aud_c, "V": vid_c},
        shown={"L": text_p, "A": aud_p, "V": vid_p}, profiles=active, cue_gain=float(cfg.cue_gain),
        form={"A": "tones" if hid_a else "prosody", "V": "texture" if hid_v else "geometry"},
    )
    meta = dict(text=text, label=label, sentiment=sentiment, duration=dur, cue_form=dict(cue["form"]))
    return uid, folder, meta, frames, wav, cue


def _write_utterance(udir: Path, style, uid, frames, wav, cue):
    udir.mkdir(parents=True)
    if style == "mosei":
        img_name, wav_name = "image_{}.jpg", "audio.wav"
    else:  # IEMOCAP: speaker-tagged names; the speaker is 'L' when the id's gender letters agree
        side = "L" if uid.split("_")[0][-1] == uid.split("_")[-1][0] else "R"
        img_name, wav_name = f"image_{side}_{{}}.jpg", f"audio_{side}.wav"
    for k, buf in frames:
        (udir / img_name.format(k)).write_bytes(buf)
    sf.write(str(udir / wav_name), wav, SR, subtype="PCM_16", format="WAV")
    with open(udir / "cue.pkl", "wb") as fh:
        pickle.dump(cue, fh, protocol=4)


def _pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but belongs to someone else, or cannot tell: keep it
        return True
    return True


def clean_stale_partials(out) -> list[Path]:
    """Remove ``<out>.partial-<pid>`` folders left by generator runs that died (``kill -9``), Chapter 2.

    Only folders whose ``pid`` is not a running process on this machine are removed (a live run's
    folder is left alone; on a folder shared by several machines a pid is only checked locally).
    Returns the removed paths; each removal is reported on stderr."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in sorted(out.parent.glob(f"{out.name}.partial-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
            print(f"synth: removed {p} left by a generator run that died (pid {pid})", file=sys.stderr)
    return removed


def generate_corpus(out, n: int = 600, seed: int = 0, style: str = "mosei", *, overwrite: bool = False,
                    progress: bool = True, **knobs) -> Path:
    """Write a synthetic corpus in the MESM raw layout to ``out`` and return its path (Chapter 2).

    Atomic: everything goes to ``<out>.partial-<pid>`` first and is renamed to ``out`` when complete,
    with ``synth_info.json`` (generator version, knobs, counts) written last inside it; partial folders
    of dead runs are removed first (:func:`clean_stale_partials`). ``knobs`` are
    the other :class:`SynthConfig` fields (``p_text``, ``p_audio``, ``p_video``, ``p_contradict``,
    ``p_second``, ``noise``, ``frame_step``, ``cue_gain``, ``hidden_cue``, ``splits``). Deterministic: same
    arguments, byte-identical files.
    """
    cfg = SynthConfig(n=n, seed=seed, style=style, **knobs).check()
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"synth: output folder {out} exists (pass overwrite=True / --overwrite)")
    clean_stale_partials(out)
    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    prefix = "MOSEI" if style == "mosei" else "IEMOCAP"
    raw = tmp / f"{prefix}_RAW_PROCESSED"
    raw.mkdir(parents=True)
    t0 = time.perf_counter()
    meta, ids = {}, []
    try:
        it = tqdm(range(cfg.n), desc=f"synth {style}", disable=not progress, leave=False)
        for i in it:
            uid, folder, m, frames, wav, cue = _one(cfg, i)
            udir = raw / uid if folder is None else raw / folder / uid
            _write_utterance(udir, style, uid, frames, wav, cue)
            meta[uid] = m
            ids.append(uid)
        with open(raw / "meta.pkl", "wb") as fh:
            pickle.dump(meta, fh, protocol=4)
        # splits: deterministic shuffle of the ids
        order = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 10**6])).permutation(len(ids))
        n_tr = int(round(cfg.splits[0] * len(ids)))
        n_va = int(round(cfg.splits[1] * len(ids)))
        parts = {"train": order[:n_tr], "valid": order[n_tr:n_tr + n_va], "test": order[n_tr + n_va:]}
        (tmp / f"{prefix}_SPLIT").mkdir()
        for name, idx in parts.items():
            (tmp / f"{prefix}_SPLIT" / f"{name}_split.txt").write_text("".join(ids[j] + "\n" for j in sorted(idx)))
        info = dict(generator="nbsupport.data.synth", version=GENERATOR_VERSION, config=asdict(cfg),
                    emotions=EMOTIONS[style], counts={k: len(v) for k, v in parts.items()})
        (tmp / "synth_info.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            if (out / "synth_info.json").is_file() and not overwrite:  # another process finished first
                shutil.rmtree(tmp)
                return out
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "synth_info.json").is_file():
                raise
            shutil.rmtree(tmp)  # lost a race against an identical generator
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"synth: wrote {cfg.n} {style} utterances to {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def cue_profile_for(label_name: str) -> str:
    """Name of the cue profile drawn for an emotion label of either style."""
    return _IEMOCAP_PROFILE.get(label_name, label_name)


#: The float knobs of :class:`SynthConfig` the CLI exposes (``--p-text`` ...); ``--frame-step`` is the int one.
_FLOAT_KNOBS = ("p_text", "p_audio", "p_video", "specialise", "p_contradict", "p_second", "noise", "cue_gain",
                "hidden_cue")


def main(argv=None) -> int:
    """CLI entry point: ``python -m nbsupport.data.synth --out DIR --n N --seed S --style mosei|iemocap``."""
    ap = argparse.ArgumentParser(prog="python -m nbsupport.data.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", default="mosei", choices=STYLES)
    ap.add_argument("--overwrite", action="store_true")
    for k in _FLOAT_KNOBS:
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=float, default=getattr(SynthConfig, k))
    ap.add_argument("--frame-step", dest="frame_step", type=int, default=SynthConfig.frame_step)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    knobs = {k: getattr(a, k) for k in (*_FLOAT_KNOBS, "frame_step")}
    try:
        generate_corpus(a.out, a.n, a.seed, a.style, overwrite=a.overwrite, progress=not a.quiet, **knobs)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

