"""Linear probes on the two-phase features: is each modality informative, and does fusion pay? (Chapter 2)

A probe is scikit-learn's ``LogisticRegression`` (one per emotion) on utterance-level vectors pooled
from :func:`nbsupport.data.handcrafted_dataset`: text = mean word vector, audio = mean and standard
deviation of the MFCC/prosody windows, video = mean and standard deviation of the per-frame face
descriptors; "LAV" concatenates the three (early fusion). Trained on ``train``, scored on ``test``
with :func:`nbsupport.metrics.emotion_metrics` (thresholds chosen on ``valid`` by F1).
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nbsupport.data import handcrafted_dataset
from nbsupport.metrics import best_thresholds, emotion_metrics

__all__ = ["probe_features", "run_probes"]


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
