"""Label sets and the data error type shared by the data package (Chapter 2)."""
from __future__ import annotations

__all__ = ["EMOTIONS", "DATASETS", "SPLITS", "DataError", "check_dataset", "check_split"]

#: Emotion label sets in the order of the labels' columns: MOSEI's six Ekman emotions (multi-label
#: presence) and the six IEMOCAP classes MESM uses (one-hot).
EMOTIONS = {"mosei": ["anger", "disgust", "fear", "happy", "sad", "surprise"],
            "iemocap": ["ang", "exc", "fru", "hap", "neu", "sad"]}
DATASETS = tuple(EMOTIONS)
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
