"""The shared trainer (Chapters 3-8): ``fit``, ``evaluate``, ``predict``.

Any ``nn.Module`` called as ``model(batch) -> logits (B, n_outputs)`` on a batch dict (book/design.md,
"Data flow") can be trained. Three tasks:

* ``"emotion"`` -- multi-label, one logit per emotion, BCE-with-logits with ``pos_weight = neg/pos``
  counted on the training labels (Dai et al. 2021, Sec. 4.3; also UMONS' binary-per-emotion setup);
* ``"sentiment7"`` -- 7 classes ``round(clip(s, -3, 3)) + 3``, cross-entropy (CMU-MOSEI Acc-7);
* ``"sentiment2"`` -- 2 classes, ``s >= 0`` (non-negative) vs ``s < 0``, cross-entropy (Acc-2, the
  "negative / non-negative" convention of Zadeh et al. 2018; the "non-zero" variant drops s == 0).

Reproducibility: every epoch re-seeds PyTorch's generator (and the loader's own shuffle generator)
from ``(seed, epoch)``, so the shuffle order and dropout masks of epoch ``e`` do not depend on what
ran before. On CPU, :func:`fit` also runs with PyTorch's deterministic algorithms
(:func:`cpu_determinism`): with more than one thread, some backward passes otherwise sum in the order
the threads finish. Together with the checkpoint (model, optimiser, epoch, best state, history, RNG states,
written atomically after every epoch) an interrupted run resumes to the same final result.
A checkpoint records the fingerprint of the run that wrote it (:func:`run_fingerprint`: model class,
architecture and parameter shapes, seed, optimiser settings, task, data sizes and ids); a resume whose
fingerprint differs stops with :class:`CheckpointError` naming the differing fields, and
``resume="fresh"`` moves the old files aside. Checkpoints hold tensors and plain containers only and
are read with ``torch.load(weights_only=True)``: a checkpoint file cannot run code.

Distributed training: when ``torch.distributed`` is initialised (``torchrun``), :func:`fit` wraps the
model in ``DistributedDataParallel``, :func:`make_loader` uses a ``DistributedSampler``, predictions
are gathered from all ranks before metrics, and only rank 0 writes checkpoints: all of it through
:mod:`nbsupport.distributed`. Without it all of these are the identity.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from . import distributed as _dist
from . import metrics
from .base import atomic_write, count_parameters, resolve_device, seed_everything, to_device

__all__ = [
    "TASKS", "n_outputs", "labels_for", "targets_from_labels", "targets_for", "sentiment_classes", "pos_weight_from", "make_loader", "fit", "evaluate", "predict",
    "FitResult", "resolve_device", "to_device", "compute_metrics", "choose_thresholds", "count_parameters",
    "PROTOCOLS", "resolve_protocol", "cpu_determinism",
    "CheckpointError", "run_fingerprint", "load_checkpoint",
]

#: Task name -> (number of outputs, metric monitored by early stopping).
TASKS = {"emotion": (None, "wacc"), "sentiment7": (7, "acc7"), "sentiment2": (2, "acc2")}

#: Training and evaluation protocols of :func:`fit` (Chapters 3-8, "Differences from the authors' code").
#: ``"book"`` is the book's one protocol; ``"umons"`` and ``"mesm"`` follow the authors' code
#: (jbdel/MOSEI_UMONS train.py; wenliangdai/Multimodal-End2end-Sparse main.py and emotiontrainer.py);
#: ``protocol="paper"`` picks the model's own (its ``paper_protocol`` attribute). Entries:
#: ``loss_reduction`` (BCE/CE over the batch: mean, or UMONS's sum); ``pos_weight`` ("auto" = neg/pos of
#: the training labels, None = off); ``monitor`` (per task; None = :data:`TASKS`' default); ``thresholds``
#: (0.5 or "validation"); ``threshold_ties`` (:func:`nbsupport.metrics.best_thresholds`); ``grad_clip``;
#: ``lr_decay`` ((factor, times): on a non-improving epoch reload the best weights and multiply the learning
#: rate by factor, up to times, before patience counts; UMONS's code); ``patience``; ``sentiment_bins``
#: ("round" = round(clip(s)) + 3, "mosei" = CMU-MOSEI's 7 bins, :func:`nbsupport.metrics.sentiment7_bins`).
PROTOCOLS = {
    "book": dict(loss_reduction="mean", pos_weight="auto", monitor=None, thresholds=0.5,
                 threshold_ties="closest", grad_clip=1.0, lr_decay=None, patience=None, sentiment_bins="round"),
    "umons": dict(loss_reduction="sum", pos_weight=None,
                  monitor={"emotion": "acc", "sentiment7": "acc7_bins", "sentiment2": "acc2_has0"},
                  thresholds=0.5, threshold_ties="closest", grad_clip=None, lr_decay=(0.5, 2), patience=3,
                  sentiment_bins="mosei"),
    "mesm": dict(loss_reduction="mean", pos_weight="auto", monitor={"emotion": "f1"}, thresholds="validation",
                 threshold_ties="lowest", grad_clip=None, lr_decay=None, patience=6, sentiment_bins="round"),
}


class _ProtocolDefault:
    """Marker of a :func:`fit` argument left to the protocol (:data:`PROTOCOLS`)."""

    def __repr__(self) -> str:
        return "<protocol default>"


PROTOCOL_DEFAULT = _ProtocolDefault()


def resolve_protocol(protocol: str, model: nn.Module | None = None) -> str:
    """Name in :data:`PROTOCOLS` of ``protocol``: "book", "umons", "mesm", or "paper" = the model's own
    (its ``paper_protocol`` attribute: UMONS -> "umons", FE2E/MESM -> "mesm"); Chapters 3-8."""
    if protocol == "paper":
        own = getattr(model, "paper_protocol", None)
        if own not in PROTOCOLS:
            raise ValueError(f"nbsupport.train: parameter 'protocol'='paper' needs a model with a paper "
                             f"protocol (UMONS, FE2E, MESM); {type(model).__name__} has none: use one of "
                             f"{', '.join(PROTOCOLS)}")
        return own
    if protocol not in PROTOCOLS:
        raise ValueError(f"nbsupport.train: parameter 'protocol' must be one of {', '.join(PROTOCOLS)} "
                         f"or 'paper', got {protocol!r}")
    return protocol


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"nbsupport.train: parameter 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def n_outputs(task: str, n_emotions: int = 6) -> int:
    """Size of the classifier for ``task``: ``n_emotions`` logits, 7 or 2 classes (Chapters 3-4)."""
    n = TASKS[_check_task(task)][0]
    return n_emotions if n is None else n


def sentiment_classes(sentiment: torch.Tensor, task: str, bins: str = "round") -> torch.Tensor:
    """Sentiment scores in [-3, 3] -> class ids: 7 classes ``round(clip(s,-3,3))+3`` (``bins="round"``) or
    CMU-MOSEI's bins (``"mosei"``, UMONS's code; :func:`nbsupport.metrics.sentiment7_bins`), or 2 classes
    ``s >= 0``."""
    s = torch.as_tensor(sentiment, dtype=torch.float32)
    if torch.isnan(s).any():
        raise ValueError(f"nbsupport.train: task {task!r} needs batch['sentiment'] but it holds NaN "
                         "(IEMOCAP has no sentiment; use task='emotion')")
    if task == "sentiment7" and bins == "mosei":

        return torch.from_numpy(metrics.sentiment7_bins(s.cpu().numpy())).to(s.device)
    if task == "sentiment7":
        return (torch.round(torch.clamp(s, -3.0, 3.0)) + 3).long()
    return (s >= 0).long()


def labels_for(batch: Mapping[str, Any], task: str) -> torch.Tensor:
    """The raw labels of ``task`` in a batch dict: ``emotion`` (B, E) 0/1 or ``sentiment`` scores (B,)."""
    _check_task(task)
    key = "emotion" if task == "emotion" else "sentiment"
    if key not in batch:
        raise KeyError(f"nbsupport.train: batch has no field {key!r} needed by task {task!r}; "
                       f"fields: {sorted(batch)}")
    labels = torch.as_tensor(batch[key], dtype=torch.float32)
    if task == "emotion" and labels.ndim == 2 and labels.shape[1] == 0:
        raise ValueError("nbsupport.train: task 'emotion' but the data has no emotion labels (MMSA / MulT "
                         "sentiment pickles: merge CMU-MOSEI's labels with `python -m nbsupport.data.formats "
                         "merge-emotions`, or use task='sentiment7' / 'sentiment2')")
    return labels


def targets_from_labels(labels: torch.Tensor, task: str, bins: str = "round") -> torch.Tensor:
    """Training targets from raw labels: emotions as floats, sentiment scores as class ids (``bins``: see
    :func:`sentiment_classes`)."""
    return labels.float() if task == "emotion" else sentiment_classes(labels, task, bins)


def targets_for(batch: Mapping[str, Any], task: str, bins: str = "round") -> torch.Tensor:
    """The training target of ``task`` in a batch dict: ``emotion`` (B, E) float or sentiment classes (B,)."""
    return targets_from_labels(labels_for(batch, task), task, bins)


def pos_weight_from(labels: torch.Tensor) -> torch.Tensor:
    """BCE ``pos_weight`` per emotion = negatives / positives on the training labels (Dai et al. 2021).

    An emotion with no positive example gets weight 1 (nothing to re-balance).
    """
    labels = torch.as_tensor(labels, dtype=torch.float64)
    pos = labels.sum(0)
    neg = labels.shape[0] - pos
    return torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos)).float()


def _reads_dataset_once(loader: Iterable) -> bool:
    """True when one pass over ``loader`` yields every item of ``loader.dataset`` exactly once (a plain
    ``DataLoader`` with its default sequential or random permutation sampler, no ``drop_last``)."""
    if not isinstance(loader, DataLoader) or loader.drop_last or type(loader.batch_sampler) is not BatchSampler:
        return False
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        return not sampler.replacement and sampler.num_samples == len(loader.dataset)
    return isinstance(sampler, SequentialSampler)


def _labels_of_loader(loader: Iterable, task: str) -> torch.Tensor:
    """All training targets of ``loader``, for the BCE ``pos_weight`` (Dai et al. 2021, Sec. 4.3).

    When the loader reads its whole dataset once and the dataset offers ``label_rows()`` (a batch-like
    dict of every item's ``emotion``/``sentiment`` labels, read without the features), the labels come
    from there; otherwise (and always under torchrun, where each rank sees a shard) from one pass over
    the loader, gathered from every rank. Both give the same rows, so the same counts.
    """
    label_rows = getattr(getattr(loader, "dataset", None), "label_rows", None)
    if callable(label_rows) and not _dist.is_distributed() and _reads_dataset_once(loader):
        return targets_for(label_rows(), task)
    return _dist.gather_predictions(torch.cat([targets_for(b, task) for b in loader]))


# ------------------------------------------------------------------------------------------------
# Loaders and per-epoch seeding (distributed pieces from nbsupport.distributed: identity without torchrun)
# ------------------------------------------------------------------------------------------------
def make_loader(dataset, *, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
                collate_fn: Callable | None = None, num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A seeded ``DataLoader`` (its own ``torch.Generator``); a ``DistributedSampler`` under torchrun.

    :func:`fit` re-seeds the loader's generator every epoch (``set_epoch`` for the distributed
    sampler), so the shuffle order of epoch ``e`` depends only on ``(seed, e)``.
    """
    if batch_size < 1:
        raise ValueError(f"nbsupport.train.make_loader: parameter 'batch_size' must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    sampler = _dist.distributed_sampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    if sampler is not None:  # under torchrun: this rank's share, shuffled per epoch via set_epoch
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                          num_workers=num_workers, generator=generator, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn,
                      num_workers=num_workers, generator=generator, drop_last=drop_last)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def _seed_epoch(loader, seed: int, epoch: int) -> None:
    """Fix the shuffle order and dropout of one epoch from ``(seed, epoch)`` alone (exact resume)."""
    s = _epoch_seed(seed, epoch)
    seed_everything(s)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(s)
    gen = getattr(sampler, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(s)


# ------------------------------------------------------------------------------------------------
# Metrics: through nbsupport.metrics
# ------------------------------------------------------------------------------------------------
def choose_thresholds(probs: np.ndarray, labels: np.ndarray, ties: str = "closest") -> np.ndarray:
    """Per-emotion probability threshold maximising F1 on validation (Dai et al. 2021, Sec. 4.3), via
    :func:`nbsupport.metrics.best_thresholds` (``ties="lowest"``: MESM's code)."""

    return np.asarray(metrics.best_thresholds(labels, probs, ties=ties), dtype=float)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, task: str,
                    thresholds: np.ndarray | float | None = None) -> dict:
    """Shared metric names from logits and the batch labels (``emotion`` 0/1 or ``sentiment`` scores),
    through :mod:`nbsupport.metrics` (Chapters 3-8).

    emotion: ``wacc, acc, f1, f1_weighted, auc`` averaged over emotions, and per emotion ``wacc_<k>``,
    ``acc_<k>``, ``f1_<k>``, ``auc_<k>`` (k = column index of ``nbsupport.data.EMOTIONS``); decisions
    ``sigmoid(logit) > thresholds`` (0.5 by default).
    sentiment7: ``acc7``/``acc5`` from the predicted class (class - 3 = score) and ``acc7_bins`` (CMU-MOSEI's
    bins of the labels against the predicted class, UMONS); ``acc2`` (non-zero protocol), ``acc2_zero``,
    ``acc2_non0``/``acc2_has0`` (the two Acc-2 conventions), ``mae``, ``corr`` from the expected score
    ``sum_c p_c (c - 3)``.
    sentiment2: ``acc2`` = ``acc2_non0`` (items with score 0 dropped) and ``acc2_zero`` = ``acc2_has0`` (0
    counted as non-negative, the convention the classes are trained with).
    """

    _check_task(task)
    logits = logits.detach().float().cpu()
    labels = labels.detach().float().cpu().numpy()
    if task == "emotion":
        out = metrics.emotion_metrics(logits.numpy(), labels, thresholds)
        for name in ("wacc", "acc", "f1", "auc"):  # flat per-emotion numbers for tables and metrics.json
            out.update({f"{name}_{k}": float(v) for k, v in enumerate(out.pop(f"{name}_per"))})
        return out
    score = metrics.decisions(logits, task)  # sentiment7: class - 3; sentiment2: +1 for class 1 (non-negative)
    if task == "sentiment7":
        expected = torch.softmax(logits, -1).numpy() @ np.arange(-3, 4, dtype=float)  # (N,) expected score
        out = metrics.sentiment_metrics(labels, expected)
        out.update(acc7=metrics.acc7(labels, score), acc5=metrics.acc5(labels, score),
                   acc7_bins=metrics.acc7_bins(labels, score))
        return out
    non0, has0 = metrics.acc2(labels, score), metrics.acc2_with_zero(labels, score)
    return {"acc2": non0, "acc2_zero": has0, "acc2_non0": non0, "acc2_has0": has0}


# ------------------------------------------------------------------------------------------------
# Predict / evaluate
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, task: str = "emotion", device="auto"):
    """Run ``model`` over ``loader`` in eval mode -> ``(logits (N, C), labels, ids)``, gathered over ranks.

    ``labels`` are the raw ``emotion`` (N, E) or ``sentiment`` (N,) values of the batches."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    logits, targets, ids = [], [], []
    for batch in loader:
        tgt = labels_for(batch, task)
        out = model(to_device(batch, device))
        logits.append(out.float().cpu())
        targets.append(tgt)
        ids.extend(batch.get("ids", [None] * len(tgt)) if isinstance(batch, Mapping) else [None] * len(tgt))
    model.train(was_training)
    if not logits:
        raise ValueError("nbsupport.train.predict: the loader yielded no batch")
    n_total = len(loader.dataset) if _dist.is_distributed() and hasattr(loader, "dataset") else None
    return (_dist.gather_predictions(torch.cat(logits), n_total), _dist.gather_predictions(torch.cat(targets), n_total),
            _dist.gather_list(ids, n_total))


def evaluate(model: nn.Module, loader: Iterable, *, task: str = "emotion", device="auto",
             thresholds: np.ndarray | float | str | None = None) -> dict:
    """Metrics with the shared names of ``model`` on ``loader`` (Chapters 3-8).

    ``thresholds``: None/0.5 default, an array of per-emotion thresholds (e.g. ``FitResult.thresholds``
    chosen on validation), or ``"validation"`` to choose them on this very loader (optimistic).
    """
    logits, targets, _ = predict(model, loader, task=task, device=device)
    if isinstance(thresholds, str):
        if thresholds != "validation":
            raise ValueError(f"nbsupport.train.evaluate: parameter 'thresholds' must be None, a number, an array "
                             f"or 'validation', got {thresholds!r}")
        thresholds = choose_thresholds(torch.sigmoid(logits).numpy(), targets.numpy()) if task == "emotion" else None
    return compute_metrics(logits, targets, task, thresholds)


# ------------------------------------------------------------------------------------------------
# Fit
# ------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """What :func:`fit` returns: the model with its best weights loaded, the history and the best epoch."""

    model: nn.Module
    history: pd.DataFrame
    best_epoch: int
    best_score: float
    monitor: str
    valid_metrics: dict
    thresholds: Any = None
    stopped_early: bool = False
    seconds: float = 0.0
    checkpoint: Path | None = None
    n_params: int = 0
    extra: dict = field(default_factory=dict)


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed: unreadable, of another run (fingerprint differs) or of another model.
    The message names the file and what differs (Chapters 3-8, ``fit(checkpoint_dir=...)``)."""


#: Format of ``last.pt``; a checkpoint of another format is refused with a message (never half-loaded).
CHECKPOINT_FORMAT = 2


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save through :func:`nbsupport.base.atomic_write`: a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def _plain(obj: Any) -> Any:
    """``obj`` with NumPy scalars/arrays turned into Python numbers/lists, so ``weights_only`` loading works."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain containers (``weights_only``)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {"python": [py_version, list(py_state), py_gauss],
             "numpy": {"bit_generator": np_state["bit_generator"],
                       "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dataset_fingerprint(loader) -> dict | None:
    """Size, batch size and a hash of the utterance ids of ``loader``'s dataset (when it has ``ids`` or
    ``raw.ids``), the data part of :func:`run_fingerprint`. None without a loader."""
    if loader is None:
        return None
    ds = getattr(loader, "dataset", None)
    out = {"batch_size": getattr(loader, "batch_size", None)}
    try:
        out["size"] = len(ds) if ds is not None else len(loader)
    except TypeError:
        out["size"] = None
    ids = None
    for holder in (ds, getattr(ds, "raw", None), getattr(ds, "split", None)):  # RawSplit, FeatureDataset, UMONS
        ids = getattr(holder, "ids", None)
        if isinstance(ids, (list, tuple)):
            break
    if isinstance(ids, (list, tuple)):
        out["ids_sha1"] = hashlib.sha1("\n".join(map(str, ids)).encode()).hexdigest()
    labels = _labels_digest(ds)
    if labels is not None:
        out["labels_sha1"] = labels
    return out


def _labels_digest(ds) -> str | None:
    """SHA-1 of every item's labels (``label_rows()``: emotion and sentiment, in item order), so a resume on
    the same ids with other (e.g. shuffled) labels is refused; None when the dataset does not offer them."""
    label_rows = getattr(ds, "label_rows", None)
    if not callable(label_rows):
        return None
    rows = label_rows()
    h = hashlib.sha1()
    for key in ("emotion", "sentiment"):
        if key in rows:
            h.update(key.encode())
            h.update(np.ascontiguousarray(torch.as_tensor(rows[key], dtype=torch.float64).numpy()).tobytes())
    return h.hexdigest()


def run_fingerprint(model: nn.Module, train_loader=None, valid_loader=None, **settings) -> dict:
    """What produced a checkpoint (Chapters 3-8, resumable ``fit``): the model's class, a hash of its
    architecture (``repr``: layer types, sizes, dropout) and its parameter/buffer names and shapes;
    the data (sizes, batch size, hash of the utterance ids when the datasets have them); and
    ``settings`` (seed, task, optimiser settings, loss weights, ...: numbers, strings, lists).
    Plain containers only, so it is stored in the checkpoint and compared on resume."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_architecture": hashlib.sha1(repr(model).encode()).hexdigest(),
            "model_parameters": shapes,
            "train_data": _dataset_fingerprint(train_loader), "valid_data": _dataset_fingerprint(valid_loader),
            **{k: _plain(v) for k, v in settings.items()}}


def _fingerprint_differences(old: dict, new: dict) -> list[str]:
    """Human-readable list of the fields where two :func:`run_fingerprint` dicts differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a == b:
            continue
        if key == "model_parameters" and isinstance(a, dict) and isinstance(b, dict):
            diff = [f"{k} {tuple(a.get(k, ())) or '-'} -> {tuple(b.get(k, ())) or '-'}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"model_parameters ({len(diff)} differ, e.g. {'; '.join(diff[:3])})")
        elif key == "model_architecture":
            out.append("model_architecture (layers or their settings differ)")
        else:
            out.append(f"{key} (checkpoint {a!r}, now {b!r})")
    return out


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`fit` (``last.pt`` or ``best.pt``) with
    ``torch.load(weights_only=True)`` (a checkpoint cannot run code); :class:`CheckpointError` naming the
    file when it is truncated, not a checkpoint, or holds objects other than tensors and plain containers."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated, not a checkpoint, or holding code "
                              f"that weights_only loading refuses): {type(e).__name__}: {first}. Delete it or "
                              "call fit(..., resume='fresh')") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint of nbsupport.train.fit (got {type(ckpt).__name__})")
    return ckpt


def _move_aside(ckpt_dir: Path) -> Path | None:
    """Move ``last.pt`` and ``best.pt`` of ``ckpt_dir`` into ``ckpt_dir/replaced-<UTC time>/``
    (``fit(resume='fresh')``); returns that folder, None when there was nothing to move."""
    olds = [ckpt_dir / n for n in ("last.pt", "best.pt") if (ckpt_dir / n).exists()]
    if not olds:
        return None
    dest = ckpt_dir / time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime())
    k = 1
    while dest.exists():
        dest, k = dest.with_name(f"{dest.name.split('.')[0]}.{k}"), k + 1
    dest.mkdir(parents=True)
    for p in olds:
        shutil.move(str(p), dest / p.name)
    return dest


def _resume_state(last_path: Path, fingerprint: dict, epochs: int, model: nn.Module, optimiser) -> dict:
    """Load ``last_path`` into ``model``/``optimiser`` and return the saved training state, after checking
    that the checkpoint was written by the same run (:func:`run_fingerprint`, ``epochs`` aside: a run may
    be extended, never shortened). :class:`CheckpointError` naming the file and the differing fields."""
    ckpt = load_checkpoint(last_path)
    fix = ("call fit(..., resume='fresh') to move the old files aside and start again, "
           "or use another checkpoint_dir")
    fmt = ckpt.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{last_path}: checkpoint format {fmt} was written by a newer nbsupport (this one "
                              f"reads format {CHECKPOINT_FORMAT}); update nbsupport, or {fix}")
    if fmt != CHECKPOINT_FORMAT or "fingerprint" not in ckpt:
        raise CheckpointError(f"{last_path}: checkpoint has no run fingerprint of format {CHECKPOINT_FORMAT} "
                              f"(written by an older nbsupport, format {fmt!r}); {fix}")
    diff = _fingerprint_differences(ckpt["fingerprint"], fingerprint)
    if diff:
        raise CheckpointError(f"{last_path}: checkpoint was written by a different run; differing: "
                              f"{'; '.join(diff)}. {fix.capitalize()}")
    done = ckpt["state"]["epoch"]
    if done > epochs:
        raise CheckpointError(f"{last_path}: checkpoint has trained {done} epochs, more than epochs={epochs}; "
                              f"{fix}")
    try:
        model.load_state_dict(ckpt["model"])
        optimiser.load_state_dict(ckpt["optimiser"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{last_path}: checkpoint does not fit this model/optimiser "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); {fix}") from None
    state = ckpt["state"]
    if state.get("best_thresholds") is not None and not isinstance(state["best_thresholds"], float):
        state["best_thresholds"] = np.asarray(state["best_thresholds"], dtype=float)
    _set_rng_state(ckpt["rng"])
    return state


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _param_groups(model: nn.Module, lr: float, weight_decay: float):
    """``model.param_groups(lr)`` when the model defines it (e.g. MESM's text encoder at lr/10), else all."""
    if hasattr(model, "param_groups") and callable(model.param_groups):
        groups = list(model.param_groups(lr))
        for g in groups:
            g.setdefault("weight_decay", weight_decay)
        return groups
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]


def _auxiliary_loss(model: nn.Module, batch: Mapping[str, Any], criterion: Callable,
                    target: torch.Tensor) -> torch.Tensor | None:
    """Extra training loss of models that define ``auxiliary_loss(batch, criterion)`` (hook of :func:`fit`).

    ``criterion`` is handed to the model as ``logits -> scalar`` with this batch's targets bound, so
    a model can score any auxiliary logits (B, n_outputs) with the task's own loss (BCE with
    ``pos_weight`` or cross-entropy) without knowing the task. Used by the UMONS per-modality
    auxiliary heads (deep supervision, Chapter 4). Called after the forward of the same batch;
    returns a scalar tensor or None (no extra loss). Never used for evaluation.
    """
    hook = getattr(model, "auxiliary_loss", None)
    if not callable(hook):
        return None
    aux = hook(batch, lambda logits: criterion(logits, target))
    if aux is not None and (not torch.is_tensor(aux) or aux.dim() != 0):
        raise ValueError(f"nbsupport.train.fit: {type(model).__name__}.auxiliary_loss must return a scalar "
                         f"tensor or None, got {type(aux).__name__}"
                         f"{'' if not torch.is_tensor(aux) else ' of shape ' + str(tuple(aux.shape))}")
    return aux


@contextlib.contextmanager
def cpu_determinism(device: str | torch.device = "cpu"):
    """While inside, PyTorch's deterministic algorithms on a CPU ``device`` (reproducible runs: same seed,
    same metrics), restored afterwards; on other devices nothing changes.

    Why: ``index_put_(accumulate=True)``, the backward of indexing with repeated indices (an embedding
    lookup, for one), sums on CPU in the order its threads finish. Measured on 2 cores with
    ``OMP_NUM_THREADS=2``: 30 of 30 repeats of one such sum differed bitwise while another process
    loaded the machine, and three identical 2-epoch trainings of Chapter 7's MESM run at once gave
    three different sets of weights; with deterministic algorithms, one (at about 4 % more time per
    epoch). A CPU op without a deterministic version would raise here rather than vary silently. CUDA is
    left to the caller: several CUDA kernels have no deterministic version, and they need
    ``CUBLAS_WORKSPACE_CONFIG`` set before the first cuBLAS call.
    """
    if resolve_device(device).type != "cpu":
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _deterministic_on_cpu(train_fn):
    """Run ``train_fn`` (keyword ``device``) inside :func:`cpu_determinism` for that device."""

    @functools.wraps(train_fn)
    def wrapper(*args, **kwargs):
        with cpu_determinism(kwargs.get("device", "auto")):
            return train_fn(*args, **kwargs)

    return wrapper


@_deterministic_on_cpu
def fit(model: nn.Module, train_loader, valid_loader=None, *, task: str = "emotion", epochs: int = 10,
        lr: float = 1e-3, weight_decay: float = 0.0, device="auto", seed: int = 0,
        grad_clip: float | None = PROTOCOL_DEFAULT, patience: int | None = PROTOCOL_DEFAULT,
        monitor: str | None = PROTOCOL_DEFAULT, checkpoint_dir: str | os.PathLike | None = None,
        resume: bool | str = True, thresholds: str | float = PROTOCOL_DEFAULT,
        pos_weight: str | torch.Tensor | None = PROTOCOL_DEFAULT, progress: bool = True,
        callbacks: Sequence[Callable] = (), desc: str | None = None, protocol: str = "book",
        loss_reduction: str = PROTOCOL_DEFAULT, threshold_ties: str = PROTOCOL_DEFAULT,
        lr_decay: tuple | None = PROTOCOL_DEFAULT, sentiment_bins: str = PROTOCOL_DEFAULT) -> FitResult:
    """Train ``model`` on ``train_loader``, early-stop on ``valid_loader``, keep the best weights (Ch. 3-8).

    Loss: BCE-with-logits with ``pos_weight`` = neg/pos of the training labels for ``task="emotion"``
    (``pos_weight=None`` switches it off, a tensor sets it), cross-entropy for ``sentiment7``/``sentiment2``.
    Optimiser: AdamW over ``model.param_groups(lr)`` when defined; gradient norm clipped at ``grad_clip``.
    Early stopping: after ``patience`` epochs without improvement of ``monitor`` (default ``wacc``,
    ``acc7`` or ``acc2`` by task; ``"loss"`` = validation loss, minimised). ``thresholds="validation"``
    tunes per-emotion thresholds on the validation set by F1 every epoch (MESM); the best epoch's are
    returned in ``FitResult.thresholds`` for the test set.
    ``checkpoint_dir``: ``last.pt`` (everything needed to resume) and ``best.pt`` (best weights) are
    written there atomically after each epoch; with ``resume=True`` an existing ``last.pt`` is loaded
    and training continues from the next epoch, ending where an uninterrupted run would have. The
    checkpoint must come from the same run: its :func:`run_fingerprint` (model, seed, lr, weight decay,
    grad_clip, task, monitor, patience, thresholds, pos_weight, data) must match, and it may not have
    trained more than ``epochs`` (a larger ``epochs`` extends it: no schedule depends on ``epochs``);
    otherwise :class:`CheckpointError` names the file and the differing fields. ``resume="fresh"`` (or
    ``False``) moves an existing ``last.pt``/``best.pt`` into ``checkpoint_dir/replaced-<time>/`` and
    trains from scratch.
    ``callbacks``: functions ``cb(epoch, row_dict)`` called after each epoch (after the checkpoint).
    Auxiliary losses: when the (unwrapped) model defines ``auxiliary_loss(batch, criterion)``, its
    scalar is added to the training loss of each batch (``criterion``: logits -> loss with the batch's
    targets bound; see :func:`_auxiliary_loss`); ``train_loss`` in the history includes it, validation
    and evaluation do not.
    ``protocol``: "book" (default), "umons", "mesm" or "paper" (the model's own), see :data:`PROTOCOLS`;
    it sets every argument left at its default: ``grad_clip``, ``patience``, ``monitor``, ``thresholds``,
    ``pos_weight``, ``loss_reduction``, ``threshold_ties``, ``lr_decay``, ``sentiment_bins``. An argument
    given explicitly wins over the protocol. The "book" values are the ones this function always had.
    """
    _check_task(task)
    proto = PROTOCOLS[resolve_protocol(protocol, model)]
    given = dict(grad_clip=grad_clip, patience=patience, monitor=monitor, thresholds=thresholds,
                 pos_weight=pos_weight, loss_reduction=loss_reduction, threshold_ties=threshold_ties,
                 lr_decay=lr_decay, sentiment_bins=sentiment_bins)
    opts = {k: (proto[k] if v is PROTOCOL_DEFAULT else v) for k, v in given.items()}
    if isinstance(opts["monitor"], dict):
        opts["monitor"] = opts["monitor"].get(task)
    grad_clip, patience, monitor, thresholds, pos_weight = (
        opts[k] for k in ("grad_clip", "patience", "monitor", "thresholds", "pos_weight"))
    bins, ties, lr_decay = opts["sentiment_bins"], opts["threshold_ties"], opts["lr_decay"]
    if opts["loss_reduction"] not in ("mean", "sum"):
        raise ValueError(f"nbsupport.train.fit: parameter 'loss_reduction' must be 'mean' or 'sum', "
                         f"got {opts['loss_reduction']!r}")
    if bins not in ("round", "mosei"):
        raise ValueError(f"nbsupport.train.fit: parameter 'sentiment_bins' must be 'round' or 'mosei', "
                         f"got {bins!r}")
    if lr_decay is not None and (len(lr_decay) != 2 or not 0 < float(lr_decay[0]) < 1
                                 or int(lr_decay[1]) < 0):
        raise ValueError(f"nbsupport.train.fit: parameter 'lr_decay' must be None or (factor in (0, 1), "
                         f"times >= 0), got {lr_decay!r}")
    if resume not in (True, False, "fresh"):
        raise ValueError(f"nbsupport.train.fit: parameter 'resume' must be True, False or 'fresh', "
                         f"got {resume!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"nbsupport.train.fit: parameter 'epochs' must be an integer >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"nbsupport.train.fit: parameter 'lr' must be > 0, got {lr!r}")
    if thresholds != "validation" and not isinstance(thresholds, (int, float)):
        raise ValueError(f"nbsupport.train.fit: parameter 'thresholds' must be a number or 'validation', "
                         f"got {thresholds!r}")
    monitor = monitor or TASKS[task][1]
    maximise = monitor != "loss"
    device = resolve_device(device)
    torch.manual_seed(seed)
    model = model.to(device)
    net = _dist.wrap_model(model, device)
    optimiser = torch.optim.AdamW(_param_groups(model, lr, weight_decay), lr=lr, weight_decay=weight_decay)

    if task == "emotion":
        if isinstance(pos_weight, str):
            if pos_weight != "auto":
                raise ValueError(f"nbsupport.train.fit: parameter 'pos_weight' must be 'auto', None or a tensor, "
                                 f"got {pos_weight!r}")
            pos_weight = pos_weight_from(_labels_of_loader(train_loader, task))
        criterion = nn.BCEWithLogitsLoss(pos_weight=None if pos_weight is None else
                                         torch.as_tensor(pos_weight, dtype=torch.float32).to(device),
                                         reduction=opts["loss_reduction"])
    else:
        criterion = nn.CrossEntropyLoss(reduction=opts["loss_reduction"])

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last_path = ckpt_dir / "last.pt" if ckpt_dir else None
    state = {"epoch": 0, "history": [], "best_state": _cpu_state(model), "best_score": -math.inf if maximise
             else math.inf, "best_epoch": 0, "best_metrics": {}, "best_thresholds": None, "bad_epochs": 0,
             "stopped_early": False, "seconds": 0.0, "lr_decays": 0}
    fingerprint = None
    if last_path is not None:
        # settings of the authors' protocols enter the fingerprint only where they differ from the book's
        extra = {k: opts[k] for k in ("loss_reduction", "threshold_ties", "lr_decay", "sentiment_bins")
                 if opts[k] != PROTOCOLS["book"][k]}
        fingerprint = run_fingerprint(
            model, train_loader, valid_loader, seed=seed, task=task, optimiser="AdamW", lr=lr,
            weight_decay=weight_decay, param_group_lrs=[g["lr"] for g in optimiser.param_groups],
            grad_clip=grad_clip, patience=patience, monitor=monitor, thresholds=thresholds,
            pos_weight=None if task != "emotion" or pos_weight is None
            else [round(float(w), 6) for w in torch.as_tensor(pos_weight).reshape(-1)], **extra)
        if resume is True and last_path.exists():
            state = _resume_state(last_path, fingerprint, epochs, model, optimiser)
        elif resume is not True and _dist.rank() == 0:
            _move_aside(ckpt_dir)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    epoch_bar = range(state["epoch"] + 1, epochs + 1)
    if progress and tqdm is not None and _dist.rank() == 0:
        epoch_bar = tqdm(epoch_bar, desc=desc or f"fit {task}", initial=state["epoch"], total=epochs, leave=False)

    for epoch in epoch_bar:
        if state["stopped_early"]:
            break
        t0 = time.perf_counter()
        _seed_epoch(train_loader, seed, epoch)
        net.train()
        total, count = 0.0, 0
        for batch in train_loader:
            target = targets_for(batch, task, bins).to(device)
            batch_dev = to_device(batch, device)
            logits = net(batch_dev)
            loss = criterion(logits, target)
            aux = _auxiliary_loss(model, batch_dev, criterion, target)
            if aux is not None:  # e.g. UMONS per-modality heads (deep supervision), training only
                loss = loss + aux
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimiser.step()
            total += float(loss.detach()) * (len(target) if opts["loss_reduction"] == "mean" else 1)
            count += len(target)
        row = {"epoch": epoch, "train_loss": total / max(count, 1)}
        th = None
        if valid_loader is not None:
            v_logits, v_targets, _ = predict(model, valid_loader, task=task, device=device)
            row["valid_loss"] = float(criterion(v_logits.to(device),
                                                targets_from_labels(v_targets, task, bins).to(device)))
            if task == "emotion" and thresholds == "validation":
                th = choose_thresholds(torch.sigmoid(v_logits).numpy(), v_targets.numpy(), ties)
            elif task == "emotion":
                th = float(thresholds)
            metrics = compute_metrics(v_logits, v_targets, task, th)
            row.update({f"valid_{k}": v for k, v in metrics.items()})
            score = row["valid_loss"] if monitor == "loss" else metrics.get(monitor)
            if score is None:
                raise ValueError(f"nbsupport.train.fit: parameter 'monitor'={monitor!r} is not a validation "
                                 f"metric of task {task!r}; available: loss, {', '.join(metrics)}")
        else:
            metrics, score = {}, -row["train_loss"] if maximise else row["train_loss"]
        improved = score > state["best_score"] if maximise else score < state["best_score"]
        if improved:
            state.update(best_score=float(score), best_epoch=epoch, best_state=_cpu_state(model),
                         best_metrics=metrics, best_thresholds=th, bad_epochs=0)
        elif lr_decay is not None and state.get("lr_decays", 0) < int(lr_decay[1]):
            # UMONS's code: back to the best weights at a lower learning rate, before patience counts
            state["lr_decays"] = state.get("lr_decays", 0) + 1
            model.load_state_dict(state["best_state"])
            for group in optimiser.param_groups:
                group["lr"] *= float(lr_decay[0])
            row["lr_decay"] = state["lr_decays"]
        else:
            state["bad_epochs"] += 1
        state["seconds"] += time.perf_counter() - t0
        row["seconds"] = time.perf_counter() - t0
        state["history"].append(row)
        state["epoch"] = epoch
        if patience is not None and state["bad_epochs"] >= patience:
            state["stopped_early"] = True
        if last_path is not None and _dist.rank() == 0:
            _atomic_save({"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "model": _cpu_state(model),
                          "optimiser": optimiser.state_dict(), "state": _plain(state), "rng": _rng_state(),
                          "task": task, "seed": seed}, last_path)
            if improved:
                _atomic_save({"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint,
                              "model": state["best_state"], "epoch": epoch, "score": state["best_score"], "thresholds": _plain(th)},
                             ckpt_dir / "best.pt")
        if hasattr(epoch_bar, "set_postfix"):
            epoch_bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"
                                   and isinstance(v, float) and k in ("train_loss", f"valid_{monitor}")})
        for cb in callbacks:
            cb(epoch, dict(row))
        if state["stopped_early"]:
            break
    if hasattr(epoch_bar, "close"):
        epoch_bar.close()

    model.load_state_dict(state["best_state"])
    return FitResult(model=model, history=pd.DataFrame(state["history"]), best_epoch=state["best_epoch"],
                     best_score=state["best_score"], monitor=monitor, valid_metrics=state["best_metrics"],
                     thresholds=state["best_thresholds"], stopped_early=state["stopped_early"],
                     seconds=state["seconds"], checkpoint=last_path, n_params=count_parameters(model))
