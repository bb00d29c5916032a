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
    ``load_cues(root, dataset, utt_id)`` reads that ground truth (``read_cues(folder)`` from an
    utterance folder, e.g. ``RawSplit.folders[i]``).
Raw items (MESM raw layout, real or synthetic)
    ``load_split(root, dataset, split, allow_overlap=False) -> RawSplit`` -- items {id, text, frames,
    frame_index, audio, sr, emotion (6,), sentiment}, labels/text/splits/media checked (DataError naming
    file, id, field); ``load_umons_pickles(folder, split)`` -- UMONS's pre-extracted pickles. Every pickle
    is read by :mod:`nbsupport.data.safe_pickle` (plain containers and NumPy arrays only: no code runs).
Model-family datasets (features cached on disk per utterance) and collate functions
    ``mesm_dataset(root, dataset, split, *, tokenizer=None, max_text_len=50, img_interval=500)`` + ``collate_mesm``;
    ``umons_dataset(root, dataset, split, *, seq_len=60, glove=None)`` + ``collate_umons``;
    ``handcrafted_dataset(root, dataset, split)`` + ``collate_umons``;
    ``umons_pickle_dataset(folder, split)`` + ``collate_umons``.
Real data in the field's forms (module :mod:`nbsupport.data.formats`; CLI ``python -m nbsupport.data.formats``)
    ``formats.feature_dataset(root, split, data_format="auto"|"umons"|"mmsa"|"mult"|"csd", dataset, seq_len)``
    -> items for ``collate_umons`` (emotions matched by name); ``formats.detect_format(root)``;
    ``formats.merge_emotions(mmsa_pkl, labels_csd, out)`` adds CMU-MOSEI's emotions to MMSA pickles.
Videos -> raw layout (module :mod:`nbsupport.data.prepare`; CLI ``python -m nbsupport.data.prepare``)
    ``prepare(videos, segments, labels, out, dataset=..., splits=None, workers=1)``.
Features (module :mod:`nbsupport.data.features`)
    ``mel_pieces``, ``umons_mel``, ``face_crop``, ``hog_features``, ``face_geometry``, ``prosody_windows``,
    ``load_tokenizer`` (module :mod:`nbsupport.data.text`), ``WordVectors``.
"""
from pathlib import Path

from .common import DATASETS, EMOTIONS, SPLITS, DataError, check_dataset
from .corpus import corpus_cache_root, ensure_corpus
from .datasets import (FEATURE_VERSION, FeatureDataset, collate_mesm, collate_umons, feature_cache_root,
                       handcrafted_dataset, mesm_dataset, umons_dataset, umons_pickle_dataset)
from .features import (WordVectors, face_crop, face_geometry, hog_features, mel_pieces,
                       prosody_windows, umons_mel)
from .text import load_tokenizer
from .raw import (_PREFIX, RawSplit, load_split, load_umons_pickles, read_audio, read_cues, read_frame,
                  speaker_side, utterance_folders)

__all__ = ["DATASETS", "EMOTIONS", "SPLITS", "DataError", "ensure_corpus", "corpus_cache_root", "generate_corpus",
           "load_cues", "read_cues", "load_split", "RawSplit", "load_umons_pickles", "read_audio", "read_frame",
           "speaker_side",
           "mesm_dataset", "umons_dataset", "handcrafted_dataset", "umons_pickle_dataset", "collate_mesm",
           "collate_umons", "FeatureDataset", "FEATURE_VERSION", "feature_cache_root", "mel_pieces", "umons_mel",
           "face_crop", "hog_features", "face_geometry", "prosody_windows", "load_tokenizer", "WordVectors"]


def generate_corpus(*args, **kwargs):
    """Write a synthetic corpus (see :func:`nbsupport.data.synth.generate_corpus`)."""
    from .synth import generate_corpus as _gen

    return _gen(*args, **kwargs)


def load_cues(root, dataset: str, utt_id: str) -> dict:
    """Cue ground truth of a synthetic utterance (Chapter 2, Chapter 6's attention check).

    Finds the utterance's folder under ``root`` and reads its ``cue.pkl`` with
    :func:`~nbsupport.data.raw.read_cues`: ``au_mask`` unpacked to (frames, H, W) bool (union of the
    active action-unit regions per written frame, image coordinates), ``frame_index`` (30 fps
    indices), ``audio_box`` {t0, t1 (s), f0_hz, f1_hz}, ``active_aus``, ``carried`` {"L","A","V": bool}.
    With a loaded split, ``read_cues(raw.folders[i])`` skips the folder lookup.
    """
    dataset = check_dataset(dataset)
    raw_dir = Path(root) / f"{_PREFIX[dataset]}_RAW_PROCESSED"
    folders = utterance_folders(raw_dir, dataset)
    if utt_id not in folders:
        raise DataError(f"{raw_dir / utt_id}: utterance folder missing")
    return read_cues(folders[utt_id])
