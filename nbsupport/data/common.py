"""Label sets and the data error type shared by the data package (Chapter 2)."""
from __future__ import annotations

__all__ = ["EMOTIONS", "MOSEI_SDK_EMOTIONS", "EMOTION_SYNONYMS", "DATASETS", "SPLITS", "DataError",
           "check_dataset", "check_split", "reorder_emotions"]

#: Emotion label sets in the order of the labels' columns: MOSEI's six Ekman emotions (multi-label
#: presence) and the six IEMOCAP classes MESM uses (one-hot).
EMOTIONS = {"mosei": ["anger", "disgust", "fear", "happy", "sad", "surprise"],
            "iemocap": ["ang", "exc", "fru", "hap", "neu", "sad"]}
DATASETS = tuple(EMOTIONS)
#: The column order of CMU-MOSEI's emotion labels in the CMU Multimodal SDK (and so in UMONS's
#: ``{split}_emotion.p`` pickles); MESM's re-organised ``meta.pkl`` and the book use :data:`EMOTIONS`.
MOSEI_SDK_EMOTIONS = ["happy", "sad", "anger", "surprise", "disgust", "fear"]
#: Other spellings of the MOSEI emotion names (MESM's raw annotation columns), mapped to the book's.
EMOTION_SYNONYMS = {"happiness": "happy", "sadness": "sad", "angry": "anger", "surprised": "surprise"}
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """Bad or missing data on disk; the message names the file or field and what was expected."""


def check_dataset(dataset) -> str:
    """Return ``dataset`` when it is ``"mosei"`` or ``"iemocap"``, else raise DataError."""
    if dataset not in EMOTIONS:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return dataset


def check_split(split) -> str:
    """Return ``split`` when it is train/valid/test, else raise DataError."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def reorder_emotions(values, names, dataset: str = "mosei", where: str = "emotion labels"):
    """Columns of ``values`` (..., len(names)) named ``names`` -> the book's order :data:`EMOTIONS`
    [dataset], matched by name (synonyms such as "happiness" accepted), so labels from any source
    (CMU-MOSEI SDK order, MESM's alphabetical order) mean the same emotion in every chapter (Chapter 2).
    A name that is missing, unknown or repeated raises DataError naming ``where``."""
    import numpy as np

    target = EMOTIONS[check_dataset(dataset)]
    canon = [EMOTION_SYNONYMS.get(str(n).lower(), str(n).lower()) for n in names]
    if sorted(canon) != sorted(target):
        raise DataError(f"{where}: emotion names {list(names)} must name each of {target} once")
    arr = np.asarray(values)
    if arr.shape[-1] != len(canon):
        raise DataError(f"{where}: {arr.shape[-1]} label columns for {len(canon)} emotion names")
    return arr[..., [canon.index(n) for n in target]]
