"""The bottom layer every other module may use: errors, atomic writes, seeding, device choice.

Nothing here knows about notebooks, models or data formats. Content modules (``attention``,
``data``, ``models``, ``sparse``, ``metrics``, ``flops``) take these from here, never from the book
tooling in :mod:`nbsupport.book` (see the book's *Design* page, "Layers").
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from nbsupport import distributed

__all__ = ["ParameterError", "UnsafePathError", "WriteError", "child_path", "check_modalities",
           "atomic_write", "atomic_write_text", "atomic_write_json",
           "jsonable", "seed_everything", "resolve_device", "count_parameters", "to_device"]


class ParameterError(ValueError):
    """A parameter has the wrong type or value; the message names it and what was expected."""


class UnsafePathError(ValueError):
    """A name that becomes a path (an utterance id, a cache entry, a sweep point) would leave its folder."""


def child_path(folder: str | os.PathLike, name: Any, *, what: str = "id", error: type = UnsafePathError) -> Path:
    """``folder / name`` for a ``name`` that stays inside ``folder``: the one check for every id that
    becomes a path (preparer ``--out`` utterances, raw layout, feature caches, checkpoints, sweep points).

    ``name`` must be a non-empty string that is one plain path component: no ``/`` or ``\\``, not ``.``
    or ``..``, no NUL or other control character, not absolute; and the joined path, with any symbolic
    link already on disk resolved, must lie inside ``folder``. Raises ``error`` (a ``ValueError``;
    callers pass their own family, e.g. ``DataError``) naming ``what``, the name and the folder."""
    folder = Path(folder)
    bad = None
    if not isinstance(name, str) or not name:
        bad = f"must be a non-empty string, got {name!r:.80}"
    elif name in (".", "..") or any(c in name for c in "/\\") or os.path.isabs(name):
        bad = "must be one path component (no '/', '\\', '.' or '..')"
    elif not name.isprintable():
        bad = "holds control characters"
    if bad is None:
        path = folder / name
        base = folder.resolve()
        if not path.resolve().is_relative_to(base):
            bad = f"resolves to {path.resolve()}, outside the folder (a symbolic link?)"
        else:
            return path
    raise error(f"{what} {name!r:.120} {bad}: it would become a path outside {folder}")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_modalities(name: str, value: Any, *, need_text: bool = False) -> str:
    """Check a modality string over L (language), A (audio), V (vision) and return it in L, A, V order.

    ``need_text`` enforces MESM's rule that the text CLS vector drives the cross-modal attention
    (Dai et al. 2021, Sec. 3.2). Raises :class:`ParameterError` naming ``name``."""
    if not isinstance(value, str) or not value or set(value) - set("LAV") or len(set(value)) != len(value):
        raise ParameterError(
            f"parameter '{name}' must be a string of distinct letters from 'L', 'A', 'V' (e.g. 'LAV'), "
            f"got {_describe(value)}")
    if need_text and "L" not in value:
        raise ParameterError(f"parameter '{name}' must include 'L' (text drives the attention), got {value!r}")
    return "".join(m for m in "LAV" if m in value)


class WriteError(OSError):
    """A file could not be written (full disk, read-only folder, ...); the message names the path."""


class _WatchedFile:
    """A file object that remembers the OSError its writes raised (a writer such as ``torch.save`` may
    report a failed write as its own unrelated error)."""

    def __init__(self, fh):
        self._fh, self.error = fh, None

    def write(self, data):
        try:
            return self._fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _write_error(path: Path, e: BaseException) -> WriteError:
    code = getattr(e, "errno", None)
    why = getattr(e, "strerror", None) or str(e)
    return WriteError(code or 0, f"{path}: cannot write ({why}; is the disk full or the folder read-only?)")


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Create ``path`` through a temporary file in the same folder, then rename: never half-written.

    ``write(fh)`` fills the open temporary file (``mode`` ``"w"`` or ``"wb"``); on any error the
    temporary file is removed and nothing appears at ``path``. A failed write or rename (full disk,
    read-only folder) raises :class:`WriteError` naming ``path``. Every file the book writes (metrics,
    figures, checkpoints, feature caches, stamps) goes through here.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    watched = None
    try:
        with os.fdopen(fd, mode) as fh:
            watched = _WatchedFile(fh)
            write(watched)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failed = watched.error if watched is not None and watched.error is not None else e
        if isinstance(failed, OSError) and not isinstance(failed, WriteError):
            raise _write_error(path, failed) from e
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(text))


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy/torch scalars and arrays turned into plain JSON values (lists, numbers, strings)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # torch scalars
        return obj.item()
    return str(obj)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (temporary name, then rename)."""
    return atomic_write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")


def seed_everything(seed: int) -> None:
    """Fix Python's, NumPy's and PyTorch's random generators (reproducible runs: same seed, same metrics)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(device: Any = "auto"):
    """Map ``"auto"`` to CUDA when a GPU is present, else CPU; ``"cuda"`` without a GPU is an error.

    The one device rule of the book (the chapters' ``device`` parameter, the trainer): under
    torch.distributed, ``"auto"``/``"cuda"`` on CUDA is this rank's GPU (``LOCAL_RANK``, the data
    parallelism of Chapter 8). Raises :class:`ParameterError` naming ``device``."""
    asked = device
    if isinstance(device, torch.device):
        device = device.type if device.index is None else str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError("parameter 'device' is 'cuda' but no CUDA GPU is available (use 'auto' or 'cpu')")
    if asked in ("auto", "cuda") and device == "cuda" and distributed.is_distributed():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(device)


def count_parameters(model) -> int:
    """Number of trainable parameters of a ``torch.nn.Module`` (the papers' "#params" column)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def to_device(batch: Any, device) -> Any:
    """A batch (tensor, dict, or list of tensors; other values such as utterance ids pass through) on ``device``.

    The one place where the chapters' batch dicts (UMONS, MESM, baselines) move to the training device."""
    device = torch.device(device)
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
