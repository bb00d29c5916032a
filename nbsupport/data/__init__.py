"""Multimodal emotion data for the book (Chapter 2; used by Chapters 3-8).

Public names
------------
Labels and errors
    ``EMOTIONS`` -- {"mosei": [anger, disgust, fear, happy, sad, surprise], "iemocap": [ang, exc, fru, hap, neu, sad]};
    ``DataError`` -- bad data on disk (message names the file/field and what was expected).
Corpus
    ``ensure_corpus(root=None, n=600, seed=0, style="mosei", **knobs) -> Path`` -- real data root or cached
    synthetic corpus; ``generate_corpus(out, n, seed, style, **knobs)`` and the CLI
    ``python -m nbsupport.data.synth`` (module :mod:`nbsupport.data.synth`, cue ground truth ``cue.pkl``);
    ``load_cues(root, dataset, utt_id)`` reads that ground truth.
Raw items (MESM raw layout, real or synthetic)
    ``load_split(root, dataset, split) -> RawSplit`` -- items {id, text, frames, frame_index, audio, sr,
    emotion (6,), sentiment}; ``load_umons_pickles(folder, split)`` -- UMONS's pre-extracted pickles.
Model-family datasets (features cached on disk per utterance) and collate functions
    ``mesm_dataset(root, dataset, split, *, tokenizer=None, max_text_len=50, img_interval=500)`` + ``collate_mesm``;
    ``umons_dataset(root, dataset, split, *, seq_len=60, glove=None)`` + ``collate_umons``;
    ``handcrafted_dataset(root, dataset, split)`` + ``collate_umons``;
    ``umons_pickle_dataset(folder, split)`` + ``collate_umons``.
Features (module :mod:`nbsupport.data.features`)
    ``mel_pieces``, ``umons_mel``, ``face_crop``, ``hog_features``, ``face_geometry``, ``prosody_windows``,
    ``get_tokenizer``, ``WordVectors``.
Probes (module :mod:`nbsupport.data.probe`, Chapter 2)
    ``probe_features``, ``run_probes``.
"""
from .common import DATASETS, EMOTIONS, SPLITS, DataError
from .corpus import corpus_cache_root, ensure_corpus
from .datasets import (FEATURE_VERSION, FeatureDataset, collate_mesm, collate_umons, feature_cache_root,
                       handcrafted_dataset, mesm_dataset, umons_dataset, umons_pickle_dataset)
from .features import (WordVectors, face_crop, face_geometry, get_tokenizer, hog_features, mel_pieces,
                       prosody_windows, umons_mel)
from .raw import RawSplit, load_split, load_umons_pickles, read_audio, read_frame, speaker_side

__all__ = ["DATASETS", "EMOTIONS", "SPLITS", "DataError", "ensure_corpus", "corpus_cache_root", "generate_corpus",
           "load_cues", "load_split", "RawSplit", "load_umons_pickles", "read_audio", "read_frame", "speaker_side",
           "mesm_dataset", "umons_dataset", "handcrafted_dataset", "umons_pickle_dataset", "collate_mesm",
           "collate_umons", "FeatureDataset", "FEATURE_VERSION", "feature_cache_root", "mel_pieces", "umons_mel",
           "face_crop", "hog_features", "face_geometry", "prosody_windows", "get_tokenizer", "WordVectors"]


def generate_corpus(*args, **kwargs):
    """Write a synthetic corpus (see :func:`nbsupport.data.synth.generate_corpus`)."""
    from .synth import generate_corpus as _gen

    return _gen(*args, **kwargs)


def load_cues(root, dataset: str, utt_id: str) -> dict:
    """Cue ground truth of a synthetic utterance (Chapter 2, Chapter 6's attention check).

    Returns the ``cue.pkl`` dict with ``au_mask`` unpacked to (frames, H, W) bool (union of the active
    action-unit regions per written frame, image coordinates), ``frame_index`` (30 fps indices),
    ``audio_box`` {t0, t1 (s), f0_hz, f1_hz}, ``active_aus``, ``carried`` {"L","A","V": bool}.
    """
    import pickle

    import numpy as np

    from pathlib import Path

    raw = RawSplit.__new__(RawSplit)  # reuse the folder lookup without reading a split
    raw.dataset = dataset
    raw.raw_dir = Path(root) / f"{'MOSEI' if dataset == 'mosei' else 'IEMOCAP'}_RAW_PROCESSED"
    folders = raw._folders()
    if utt_id not in folders:
        raise DataError(f"{raw.raw_dir / utt_id}: utterance folder missing")
    path = folders[utt_id] / "cue.pkl"
    if not path.is_file():
        raise DataError(f"{path}: no cue ground truth (only synthetic corpora have cue.pkl)")
    with open(path, "rb") as fh:
        cue = pickle.load(fh)
    h, w = cue["image_size"]
    cue["au_mask"] = np.unpackbits(cue.pop("au_mask_packed"), axis=-1, count=w).astype(bool)
    return cue
