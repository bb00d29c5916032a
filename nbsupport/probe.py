"""Linear probes on the two-phase features: is each modality informative, and does fusion pay? (Chapter 2)

A probe is scikit-learn's ``LogisticRegression`` (one per emotion) on utterance-level vectors pooled
from :func:`nbsupport.data.handcrafted_dataset`: text = mean word vector, audio = mean and standard
deviation of the MFCC/prosody windows, video = mean and standard deviation of the per-frame face
descriptors; "LAV" concatenates the three (early fusion). Trained on ``train``, scored on ``test``
with :func:`nbsupport.metrics.emotion_metrics` (thresholds chosen on ``valid`` by F1).

:func:`cue_form_probes` measures *where* the corpus plants each cue (Chapter 2, "What is planted where"):
on a corpus in which the face and the voice always show the one labelled emotion, cross-validated
probes on the hand-crafted features against probes on raw references (a rectified fine-scale
high-pass of the face crops, the 128-band log-mel inside the recorded audio cue box), for each
``hidden_cue`` setting of :class:`nbsupport.data.synth.SynthConfig`.
"""
from __future__ import annotations

import cv2
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from nbsupport.data import (SPLITS, ensure_corpus, face_crop, face_geometry, handcrafted_dataset, load_split,
                            read_audio, read_cues, read_frame)
from nbsupport.data.features import log_mel, prosody_windows
from nbsupport.metrics import best_thresholds, emotion_metrics

__all__ = ["probe_features", "run_probes", "CUE_PROBE_KNOBS", "cue_probe_corpus", "cue_form_features",
           "cue_form_probes", "cue_gain_contrast"]


def probe_features(root, dataset: str, split: str, progress: bool = True, **kwargs) -> dict:
    """Pooled hand-crafted vectors of a split: {"L": (n, Dl), "A": (n, 2Da), "V": (n, 2Dv), "y": (n, 6), "ids"}."""

    ds = handcrafted_dataset(root, dataset, split, **kwargs).precompute(progress=progress)
    L, A, V, Y = [], [], [], []
    for i in range(len(ds)):
        it = ds[i]
        L.append(it["text"].mean(0).numpy())
        A.append(np.concatenate([it["audio"].mean(0).numpy(), it["audio"].std(0, unbiased=False).numpy()]))
        V.append(np.concatenate([it["video"].mean(0).numpy(), it["video"].std(0, unbiased=False).numpy()]))
        Y.append(it["emotion"].numpy())
    return {"L": np.stack(L), "A": np.stack(A), "V": np.stack(V), "y": np.stack(Y), "ids": list(ds.raw.ids)}


def run_probes(root, dataset: str = "mosei", modalities=("L", "A", "V", "LAV"), C: float = 0.5, seed: int = 0,
               progress: bool = True) -> list[dict]:
    """Fit one probe per modality set and return metrics rows ``{"model": "probe-logreg", "modalities", wacc,
    acc, f1, auc, ...}`` measured on the test split (Chapter 2's "every modality informative, none enough")."""


    feats = {s: probe_features(root, dataset, s, progress=progress) for s in ("train", "valid", "test")}
    rows = []
    for mods in modalities:
        X = {s: np.concatenate([feats[s][m] for m in mods], axis=1) for s in feats}
        P = {s: np.zeros_like(feats[s]["y"]) for s in ("valid", "test")}
        for j in range(feats["train"]["y"].shape[1]):
            yj = feats["train"]["y"][:, j]
            if yj.min() == yj.max():  # a tiny corpus may lack an emotion in train: predict the constant
                for s in P:
                    P[s][:, j] = yj[0]
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, class_weight="balanced",
                                                                     random_state=seed))
            clf.fit(X["train"], yj)
            for s in P:
                P[s][:, j] = clf.predict_proba(X[s])[:, 1]
        th = best_thresholds(feats["valid"]["y"], P["valid"])
        m = emotion_metrics(P["test"], feats["test"]["y"], th, probs=True)
        clean = {k: (None if not np.isfinite(m[k]) else float(m[k])) for k in ("wacc", "acc", "f1", "auc")}
        rows.append({"model": "probe-logreg", "modalities": mods, **clean, "n_train": int(len(X["train"])), "n_test": int(len(X["test"]))})
    return rows


#: Corpus knobs of the cue-placement probes: face and voice always show the one labelled emotion.
CUE_PROBE_KNOBS = dict(p_audio=1.0, p_video=1.0, specialise=0.0, p_contradict=0.0, p_second=0.0)


def cue_probe_corpus(n: int = 120, seed: int = 0, *, hidden_cue: float = 0.0, cue_gain: float = 1.0,
                     progress: bool = True):
    """A cached synthetic corpus for :func:`cue_form_features` (Chapter 2): :data:`CUE_PROBE_KNOBS` plus the
    two placement knobs of :class:`nbsupport.data.synth.SynthConfig`."""
    return ensure_corpus(None, n, seed, "mosei", progress=progress, hidden_cue=hidden_cue, cue_gain=cue_gain,
                         **CUE_PROBE_KNOBS)


def _fine_sign_cells(crops: np.ndarray, grid: int = 6) -> np.ndarray:
    """Raw-pixel reference for the hidden face cue: per ``grid`` x ``grid`` cell of each 48 px crop, mean
    squared positive minus mean squared negative part of a fine high-pass (crop minus its Gaussian blur,
    sigma 0.7 px), i.e. what one rectified 3x3 filter (a CNN's first layer) sees; each frame minus the
    first, cue-free frame, pooled by max and mean over the later frames. (frames, 48, 48) -> (2 grid^2,)."""
    z = []
    for f in crops.astype(np.float32):
        hp = f - cv2.GaussianBlur(f, (0, 0), 0.7)
        pos = cv2.resize(np.maximum(hp, 0) ** 2, (grid, grid), interpolation=cv2.INTER_AREA)
        neg = cv2.resize(np.maximum(-hp, 0) ** 2, (grid, grid), interpolation=cv2.INTER_AREA)
        z.append((pos - neg).ravel())
    z = np.stack(z)
    d = z[1:] - z[0] if len(z) > 1 else z
    return np.concatenate([d.max(0), d.mean(0)])


def cue_form_features(root, dataset: str = "mosei", progress: bool = True) -> dict:
    """Per utterance of every split of a synthetic corpus (Chapter 2): hand-crafted vectors as the two-phase
    models get them (``V_hand``: mean and std over frames of :func:`~nbsupport.data.face_geometry` on the
    48 px crops; ``A_hand``: mean and std of :func:`~nbsupport.data.features.prosody_windows`), raw
    references (``V_raw``: :func:`_fine_sign_cells`; ``A_raw``: 128-band log-mel averaged over the recorded
    cue box's time span), ``y`` (index of the first labelled emotion) and ``form`` (the cue forms drawn)."""
    out = {k: [] for k in ("V_hand", "V_raw", "A_hand", "A_raw", "y", "form_V", "form_A")}
    for split in SPLITS:
        raw = load_split(root, dataset, split)
        for i in tqdm(range(len(raw)), desc=f"cue probes {split}", disable=not progress, leave=False):
            cue = read_cues(raw.folders[i])
            paths, _ = raw.frames(i)
            crops = np.stack([face_crop(read_frame(p))[0] for p in paths])  # (frames, 48, 48)
            g = np.stack([face_geometry(c) for c in crops])
            out["V_hand"].append(np.concatenate([g.mean(0), g.std(0)]))
            out["V_raw"].append(_fine_sign_cells(crops))
            wav, sr = read_audio(raw.audio_path(i))
            pw = prosody_windows(wav, sr)
            out["A_hand"].append(np.concatenate([pw.mean(0), pw.std(0)]))
            mel = log_mel(wav, sr)  # (128, frames), hop 200
            b = cue["audio_box"]
            f0 = min(int(b["t0"] * sr / 200), mel.shape[1] - 1)
            f1 = max(f0 + 1, int(b["t1"] * sr / 200))
            out["A_raw"].append(mel[:, f0:f1].mean(1))
            out["y"].append(int(np.argmax(raw.labels[i])))
            form = cue.get("form", {"V": "geometry", "A": "prosody"})
            out["form_V"].append(form["V"])
            out["form_A"].append(form["A"])
    return {k: (np.stack(v) if k not in ("form_V", "form_A") else v) for k, v in out.items()}


def cue_form_probes(feats: dict, folds: int = 5, C: float = 0.1, seed: int = 0) -> list[dict]:
    """Cross-validated logistic-regression accuracy of the labelled emotion from each feature set of
    :func:`cue_form_features` (Chapter 2): rows ``{"modality", "features" ("hand-crafted"|"raw"),
    "acc" (mean over folds), "acc_sd" (sd over folds), "chance" (majority class share), "folds"}``."""
    y = feats["y"]
    k = int(min(folds, np.bincount(y)[np.bincount(y) > 0].min()))
    if k < 2:
        raise ValueError(f"cue_form_probes: every emotion needs >= 2 utterances for cross-validation "
                         f"(counts {np.bincount(y).tolist()}); generate a larger corpus (n)")
    cv = StratifiedKFold(k, shuffle=True, random_state=seed)
    chance = float(np.bincount(y).max() / len(y))
    rows = []
    for mod, name in (("V", "face"), ("A", "voice")):
        for kind, label in (("hand", "hand-crafted"), ("raw", "raw")):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
            s = cross_val_score(clf, feats[f"{mod}_{kind}"], y, cv=cv)
            rows.append({"modality": name, "features": label, "acc": float(s.mean()),
                         "acc_sd": float(s.std(ddof=1)), "chance": chance, "folds": k})
    return rows


def cue_gain_contrast(gains=(0.0, 1.0, 2.0, 3.0), n: int = 8, seed: int = 0,
                      progress: bool = True) -> list[dict]:
    """How strongly ``cue_gain`` plants the face cue, and where (Chapter 2): corpora identical but for the
    gain (same seed, same faces and noise), each frame compared with the gain-0 frame (no cue): mean
    absolute grey-level change inside the recorded AU regions (``cue.pkl``) and outside them.
    Rows ``{"cue_gain", "inside", "outside", "frames"}``."""
    roots = {g: cue_probe_corpus(n, seed, cue_gain=float(g), progress=progress)
             for g in sorted(set(gains) | {0.0})}
    ref = {s: load_split(roots[0.0], "mosei", s) for s in SPLITS}
    rows = []
    for g in gains:
        inside, outside = [], []
        for s in SPLITS:
            raw = load_split(roots[g], "mosei", s)
            for i in range(len(raw)):
                cue = read_cues(raw.folders[i])
                paths, _ = raw.frames(i)
                ref_paths, _ = ref[s].frames(i)
                for j, (p, q) in enumerate(zip(paths, ref_paths)):
                    m = cue["au_mask"][j]
                    if m.sum() < 50:  # frames outside the cue window
                        continue
                    d = np.abs(cv2.cvtColor(read_frame(p), cv2.COLOR_BGR2GRAY).astype(np.float32)
                               - cv2.cvtColor(read_frame(q), cv2.COLOR_BGR2GRAY).astype(np.float32))
                    inside.append(d[m].mean())
                    outside.append(d[~m].mean())
        # no frame with a cue region (gain 0 draws no cue): no measurement, not a zero
        rows.append({"cue_gain": float(g), "inside": float(np.mean(inside)) if inside else float("nan"),
                     "outside": float(np.mean(outside)) if outside else float("nan"), "frames": len(inside)})
    return rows
