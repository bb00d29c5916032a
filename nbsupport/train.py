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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from . import distributed as _dist
from . import metrics
from .base import atomic_write, count_parameters, resolve_device, seed_everything, to_device

__all__ = [
    "TASKS", "n_outputs", "labels_for", "targets_from_labels", "targets_for", "sentiment_classes", "pos_weight_from", "make_loader", "fit", "evaluate", "predict",
    "FitResult", "resolve_device", "to_device", "compute_metrics", "choose_thresholds", "count_parameters",
    "PROTOCOLS", "PROTOCOL_DEFAULT", "TrainProtocol", "resolve_protocol", "cpu_determinism",
    "CheckpointError", "run_fingerprint", "load_checkpoint",
]

#: Task name -> (number of outputs, metric monitored by early stopping).
TASKS = {"emotion": (None, "wacc"), "sentiment7": (7, "acc7"), "sentiment2": (2, "acc2")}


class _ProtocolDefault:
    """Marker of a :func:`fit` setting left to the protocol (:class:`TrainProtocol`); the same as leaving it out."""

    def __repr__(self) -> str:
        return "<protocol default>"


PROTOCOL_DEFAULT = _ProtocolDefault()


@dataclass(frozen=True)
class TrainProtocol:
    """How :func:`fit` trains and scores a model (Chapters 3-8, "Differences from the authors' code"):
    one frozen value, like :class:`~nbsupport.models.umons.UmonsConfig`. The defaults are the book's
    protocol; :data:`PROTOCOLS` names it and the authors' (jbdel/MOSEI_UMONS train.py;
    wenliangdai/Multimodal-End2end-Sparse main.py and emotiontrainer.py), and :meth:`named` picks one by
    name, "paper" being the model's own, with single settings changed.

    ``loss_reduction`` -- BCE/CE over the batch: "mean", or UMONS's "sum".
    ``pos_weight`` -- "auto" (neg/pos of the training labels), None (off) or a tensor; emotions only.
    ``monitor`` -- the validation metric that picks the best epoch: a name, ``{task: name}`` or None
    (:data:`TASKS`' default); "loss" is the validation loss, minimised.
    ``thresholds`` -- a number (0.5), or "validation": per-emotion thresholds chosen by F1 on the
    validation set every epoch (MESM), ``ties`` broken by ``threshold_ties``
    (:func:`nbsupport.metrics.best_thresholds`; "lowest" is MESM's code).
    ``grad_clip`` -- the gradient norm is clipped at this value (None: not clipped).
    ``lr_decay`` -- None or ``(factor, times)``: on a non-improving epoch reload the best weights and
    multiply the learning rate by factor, up to times, before patience counts (UMONS's code).
    ``patience`` -- epochs without improvement before training stops (None: never).
    ``sentiment_bins`` -- "round" (``round(clip(s)) + 3``) or "mosei" (CMU-MOSEI's 7 bins,
    :func:`nbsupport.metrics.sentiment7_bins`).
    ``sentiment_head`` -- "classes" (7 or 2 logits, cross-entropy on the classes) or "score" (one output,
    the sentiment score itself, L1 loss against the label; MulT's code, Tsai et al. 2019): the decisions
    are then the score (:func:`nbsupport.metrics.decisions`).
    ``plateau`` -- None or ``(factor, patience)``: ``ReduceLROnPlateau`` on the validation loss after
    every epoch (MulT's code: factor 0.1 after 20 epochs without improvement).
    """

    loss_reduction: str = "mean"
    pos_weight: Any = "auto"
    monitor: Any = None
    thresholds: Any = 0.5
    threshold_ties: str = "closest"
    grad_clip: float | None = 1.0
    lr_decay: tuple | None = None
    patience: int | None = None
    sentiment_bins: str = "round"
    sentiment_head: str = "classes"
    plateau: tuple | None = None

    def __post_init__(self):
        where = "nbsupport.train.TrainProtocol: parameter"
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"{where} 'loss_reduction' must be 'mean' or 'sum', got {self.loss_reduction!r}")
        if self.sentiment_bins not in ("round", "mosei"):
            raise ValueError(f"{where} 'sentiment_bins' must be 'round' or 'mosei', got {self.sentiment_bins!r}")
        if self.sentiment_head not in ("classes", "score"):
            raise ValueError(f"{where} 'sentiment_head' must be 'classes' or 'score', got {self.sentiment_head!r}")
        plateau = self.plateau
        if plateau is not None and (len(plateau) != 2 or not 0 < float(plateau[0]) < 1 or int(plateau[1]) < 0):
            raise ValueError(f"{where} 'plateau' must be None or (factor in (0, 1), patience >= 0), got {plateau!r}")
        decay = self.lr_decay
        if decay is not None and (len(decay) != 2 or not 0 < float(decay[0]) < 1 or int(decay[1]) < 0):
            raise ValueError(f"{where} 'lr_decay' must be None or (factor in (0, 1), times >= 0), got {decay!r}")
        if self.thresholds != "validation" and not isinstance(self.thresholds, (int, float)):
            raise ValueError(f"{where} 'thresholds' must be a number or 'validation', got {self.thresholds!r}")
        if isinstance(self.pos_weight, str) and self.pos_weight != "auto":
            raise ValueError(f"{where} 'pos_weight' must be 'auto', None or a tensor, got {self.pos_weight!r}")

    @classmethod
    def named(cls, protocol: "str | TrainProtocol" = "book", model: nn.Module | None = None,
              **settings) -> "TrainProtocol":
        """The protocol ``protocol`` -- a name of :data:`PROTOCOLS`, "paper" (``model``'s own,
        :func:`resolve_protocol`) or a :class:`TrainProtocol` -- with ``settings`` (fields) changed; a
        setting given as :data:`PROTOCOL_DEFAULT` keeps the protocol's value (Chapters 3-8)."""
        base = protocol if isinstance(protocol, cls) else PROTOCOLS[resolve_protocol(protocol, model)]
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"nbsupport.train: unknown protocol setting {', '.join(map(repr, unknown))}; "
                            f"the settings of TrainProtocol are {', '.join(names)}")
        return replace(base, **{k: v for k, v in settings.items() if v is not PROTOCOL_DEFAULT})

    def monitor_for(self, task: str) -> str:
        """The metric that picks the best epoch of ``task`` (its :data:`TASKS` default when not set)."""
        monitor = self.monitor.get(task) if isinstance(self.monitor, Mapping) else self.monitor
        return monitor or TASKS[task][1]

    def differences_from_book(self) -> dict:
        """The settings of an authors' protocol that differ from the book's, of those the checkpoint
        fingerprint does not already hold (:func:`run_fingerprint`)."""
        book = PROTOCOLS["book"]
        return {k: getattr(self, k) for k in ("loss_reduction", "threshold_ties", "lr_decay", "sentiment_bins",
                                                          "sentiment_head", "plateau")
                if getattr(self, k) != getattr(book, k)}


#: The trainer's protocols by name (:class:`TrainProtocol`; ``fit(protocol=...)``): ``"book"``, the
#: book's one protocol, and the authors' training code, ``"umons"`` and ``"mesm"``.
PROTOCOLS = {
    "book": TrainProtocol(),
    "umons": TrainProtocol(loss_reduction="sum", pos_weight=None,
                           monitor={"emotion": "acc", "sentiment7": "acc7_bins", "sentiment2": "acc2_has0"},
                           grad_clip=None, lr_decay=(0.5, 2), patience=3, sentiment_bins="mosei"),
    "mesm": TrainProtocol(monitor={"emotion": "f1"}, thresholds="validation", threshold_ties="lowest",
                          grad_clip=None, patience=6),
    # MulT's src/train.py for CMU-MOSEI sentiment: one output, L1 loss, Adam (= AdamW at weight decay 0),
    # gradient norm clipped at 1.0, ReduceLROnPlateau(factor 0.1, patience 20) on the validation loss, the
    # epoch with the lowest validation loss kept, no early stop
    "mult": TrainProtocol(pos_weight=None, monitor="loss", sentiment_head="score", plateau=(0.1, 20)),
}


def resolve_protocol(protocol: str, model: nn.Module | None = None) -> str:
    """Name in :data:`PROTOCOLS` of ``protocol``: "book", "umons", "mesm", "mult", or "paper" = the model's
    own (its ``paper_protocol`` attribute: UMONS -> "umons", FE2E/MESM -> "mesm", MulT -> "mult");
    Chapters 3-8."""
    if protocol == "paper":
        own = getattr(model, "paper_protocol", None)
        if own not in PROTOCOLS:
            raise ValueError(f"nbsupport.train: parameter 'protocol'='paper' needs a model with a paper "
                             f"protocol (UMONS, FE2E, MESM, MulT); {type(model).__name__} has none: use one of "
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


def n_outputs(task: str, n_emotions: int = 6, *, head: str = "classes") -> int:
    """Size of the classifier for ``task``: ``n_emotions`` logits, 7 or 2 classes (Chapters 3-4), or one
    output, the sentiment score, under a protocol whose ``sentiment_head`` is "score" (MulT's)."""
    n = TASKS[_check_task(task)][0]
    if n is not None and head == "score":
        return 1
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


def targets_from_labels(labels: torch.Tensor, task: str, bins: str = "round",
                        head: str = "classes") -> torch.Tensor:
    """Training targets from raw labels: emotions as floats, sentiment scores as class ids (``bins``: see
    :func:`sentiment_classes`), or the scores themselves for a ``head="score"`` model (MulT's)."""
    if task == "emotion" or head == "score":
        return labels.float()
    return sentiment_classes(labels, task, bins)


def targets_for(batch: Mapping[str, Any], task: str, bins: str = "round", head: str = "classes") -> torch.Tensor:
    """The training target of ``task`` in a batch dict: ``emotion`` (B, E) float, sentiment classes (B,),
    or sentiment scores (B,) for ``head="score"``."""
    return targets_from_labels(labels_for(batch, task), task, bins, head)


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
    if metrics.is_score_output(logits):  # one output, the score itself (MulT's head): every sentiment metric
        return metrics.sentiment_metrics(labels, score)
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


class _ScoreL1(nn.Module):
    """L1 loss between a one-output model's scores (B, 1) and the sentiment labels (B,): MulT's
    ``nn.L1Loss`` on ``preds`` against ``batch_Y.squeeze(-1)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.l1_loss(output.reshape(-1), target.reshape(-1).to(output.dtype),
                                     reduction=self.reduction)


class _Trainer:
    """The pieces of one :func:`fit` call, resolved once, and its steps: set up (device, seed,
    optimiser, loss), train one epoch, validate, keep the best epoch, write the checkpoint."""

    def __init__(self, model: nn.Module, train_loader, *, task: str, lr: float, weight_decay: float,
                 device, seed: int, protocol: TrainProtocol):
        self.task, self.seed, self.protocol = task, seed, protocol
        self.monitor = protocol.monitor_for(task)
        self.maximise = self.monitor != "loss"
        self.device = resolve_device(device)
        torch.manual_seed(seed)
        self.model = model.to(self.device)
        self.net = _dist.wrap_model(self.model, self.device)
        self.optimiser = torch.optim.AdamW(_param_groups(self.model, lr, weight_decay), lr=lr,
                                           weight_decay=weight_decay)
        self.pos_weight, self.criterion = self._loss(train_loader)
        factor_patience = protocol.plateau
        self.plateau = None if factor_patience is None else torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimiser, mode="min", factor=float(factor_patience[0]), patience=int(factor_patience[1]))

    def schedule(self, state: dict, row: dict) -> None:
        """After an epoch's validation: the protocol's plateau schedule steps on the validation loss (its
        state travels in ``state``, so a resumed run continues the same schedule)."""
        if self.plateau is not None and "valid_loss" in row:
            self.plateau.step(row["valid_loss"])
            state["plateau"] = self.plateau.state_dict()

    def _loss(self, train_loader):
        """``(pos_weight, criterion)``: BCE-with-logits (with ``pos_weight``) for emotions, else cross-entropy
        on the classes, or L1 on the score for a "score" head (MulT's code)."""
        reduction = self.protocol.loss_reduction
        if self.task != "emotion" and self.protocol.sentiment_head == "score":
            return None, _ScoreL1(reduction)
        if self.task != "emotion":
            return None, nn.CrossEntropyLoss(reduction=reduction)
        pos_weight = self.protocol.pos_weight
        if isinstance(pos_weight, str):  # "auto"
            pos_weight = pos_weight_from(_labels_of_loader(train_loader, self.task))
        weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32).to(self.device)
        return pos_weight, nn.BCEWithLogitsLoss(pos_weight=weight, reduction=reduction)

    def train_epoch(self, loader, epoch: int) -> float:
        """One pass over ``loader`` seeded by ``(seed, epoch)``; the mean training loss per item."""
        _seed_epoch(loader, self.seed, epoch)
        self.net.train()
        total, count = 0.0, 0
        grad_clip, bins = self.protocol.grad_clip, self.protocol.sentiment_bins
        for batch in loader:
            target = targets_for(batch, self.task, bins, self.protocol.sentiment_head).to(self.device)
            batch_dev = to_device(batch, self.device)
            loss = self.criterion(self.net(batch_dev), target)
            aux = _auxiliary_loss(self.model, batch_dev, self.criterion, target)
            if aux is not None:  # e.g. UMONS per-modality heads (deep supervision), training only
                loss = loss + aux
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            self.optimiser.step()
            total += float(loss.detach()) * (len(target) if self.protocol.loss_reduction == "mean" else 1)
            count += len(target)
        return total / max(count, 1)

    def validate(self, loader, row: dict):
        """Validation loss and metrics into ``row``; returns ``(metrics, thresholds, score)`` where the
        thresholds are the protocol's (chosen on ``loader`` under "validation") and ``score`` the monitor's."""
        task, proto = self.task, self.protocol
        logits, labels, _ = predict(self.model, loader, task=task, device=self.device)
        targets = targets_from_labels(labels, task, proto.sentiment_bins, proto.sentiment_head)
        row["valid_loss"] = float(self.criterion(logits.to(self.device), targets.to(self.device)))
        th = None
        if task == "emotion" and proto.thresholds == "validation":
            th = choose_thresholds(torch.sigmoid(logits).numpy(), labels.numpy(), proto.threshold_ties)
        elif task == "emotion":
            th = float(proto.thresholds)
        scores = compute_metrics(logits, labels, task, th)
        row.update({f"valid_{k}": v for k, v in scores.items()})
        score = row["valid_loss"] if self.monitor == "loss" else scores.get(self.monitor)
        if score is None:
            raise ValueError(f"nbsupport.train.fit: parameter 'monitor'={self.monitor!r} is not a validation "
                             f"metric of task {task!r}; available: loss, {', '.join(scores)}")
        return scores, th, score

    def keep_best(self, state: dict, row: dict, epoch: int, score: float, scores: dict, th) -> bool:
        """Select the best epoch: an improvement of ``score`` keeps these weights; otherwise UMONS's
        learning-rate decay from the best weights (``lr_decay``), then patience counts. True if improved."""
        improved = score > state["best_score"] if self.maximise else score < state["best_score"]
        lr_decay = self.protocol.lr_decay
        if improved:
            state.update(best_score=float(score), best_epoch=epoch, best_state=_cpu_state(self.model),
                         best_metrics=scores, best_thresholds=th, bad_epochs=0)
        elif lr_decay is not None and state.get("lr_decays", 0) < int(lr_decay[1]):
            # UMONS's code: back to the best weights at a lower learning rate, before patience counts
            state["lr_decays"] = state.get("lr_decays", 0) + 1
            self.model.load_state_dict(state["best_state"])
            for group in self.optimiser.param_groups:
                group["lr"] *= float(lr_decay[0])
            row["lr_decay"] = state["lr_decays"]
        else:
            state["bad_epochs"] += 1
        patience = self.protocol.patience
        if patience is not None and state["bad_epochs"] >= patience:
            state["stopped_early"] = True
        return improved

    def fresh_state(self) -> dict:
        """The training state before epoch 1 (what ``last.pt`` holds after each epoch)."""
        return {"epoch": 0, "history": [], "best_state": _cpu_state(self.model),
                "best_score": -math.inf if self.maximise else math.inf, "best_epoch": 0, "best_metrics": {},
                "best_thresholds": None, "bad_epochs": 0, "stopped_early": False, "seconds": 0.0, "lr_decays": 0}

    def fingerprint(self, train_loader, valid_loader, lr: float, weight_decay: float) -> dict:
        """:func:`run_fingerprint` of this run: a resume from another run's checkpoint is refused."""
        proto, pos_weight = self.protocol, self.pos_weight
        return run_fingerprint(
            self.model, train_loader, valid_loader, seed=self.seed, task=self.task, optimiser="AdamW", lr=lr,
            weight_decay=weight_decay, param_group_lrs=[g["lr"] for g in self.optimiser.param_groups],
            grad_clip=proto.grad_clip, patience=proto.patience, monitor=self.monitor, thresholds=proto.thresholds,
            pos_weight=None if self.task != "emotion" or pos_weight is None
            else [round(float(w), 6) for w in torch.as_tensor(pos_weight).reshape(-1)],
            **proto.differences_from_book())

    def save(self, ckpt_dir: Path, fingerprint: dict, state: dict, improved: bool, th) -> None:
        """``last.pt`` (everything a resume needs) and, after an improvement, ``best.pt``; rank 0 only."""
        if _dist.rank() != 0:
            return
        _atomic_save({"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "model": _cpu_state(self.model),
                      "optimiser": self.optimiser.state_dict(), "state": _plain(state), "rng": _rng_state(),
                      "task": self.task, "seed": self.seed}, ckpt_dir / "last.pt")
        if improved:
            _atomic_save({"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "model": state["best_state"],
                          "epoch": state["epoch"], "score": state["best_score"], "thresholds": _plain(th)},
                         ckpt_dir / "best.pt")


def _check_run(epochs, lr, resume) -> None:
    """Clear errors for the run arguments of :func:`fit` (the protocol's are checked by :class:`TrainProtocol`)."""
    if resume not in (True, False, "fresh"):
        raise ValueError(f"nbsupport.train.fit: parameter 'resume' must be True, False or 'fresh', got {resume!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"nbsupport.train.fit: parameter 'epochs' must be an integer >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"nbsupport.train.fit: parameter 'lr' must be > 0, got {lr!r}")


def _epoch_bar(first: int, epochs: int, progress: bool, desc: str):
    """The epochs still to run, as a tqdm bar on rank 0 when ``progress`` (else a plain range)."""
    epochs_left = range(first, epochs + 1)
    if not progress or _dist.rank() != 0:
        return epochs_left
    return tqdm(epochs_left, desc=desc, initial=first - 1, total=epochs, leave=False)


@_deterministic_on_cpu
def fit(model: nn.Module, train_loader, valid_loader=None, *, task: str = "emotion", epochs: int = 10,
        lr: float = 1e-3, weight_decay: float = 0.0, device="auto", seed: int = 0,
        protocol: str | TrainProtocol = "book", checkpoint_dir: str | os.PathLike | None = None,
        resume: bool | str = True, progress: bool = True, callbacks: Sequence[Callable] = (),
        desc: str | None = None, **settings) -> FitResult:
    """Train ``model`` on ``train_loader``, early-stop on ``valid_loader``, keep the best weights (Ch. 3-8).

    ``protocol`` (:class:`TrainProtocol`, or its name in :data:`PROTOCOLS`: "book" (default), "umons",
    "mesm", or "paper" = the model's own) says how: loss, ``pos_weight``, gradient clipping, the metric
    that picks the best epoch, thresholds, learning-rate decay, patience, sentiment bins. ``settings``
    change single fields of it (``grad_clip=None``, ``patience=3``, ``thresholds="validation"``, ...);
    a setting given explicitly wins over the protocol. The "book" values are the ones this function
    always had: BCE-with-logits with ``pos_weight`` = neg/pos of the training labels for
    ``task="emotion"``, cross-entropy for ``sentiment7``/``sentiment2``; gradient norm clipped at 1;
    best epoch by ``wacc``, ``acc7`` or ``acc2``; decisions at 0.5; no early stop.
    Optimiser: AdamW over ``model.param_groups(lr)`` when defined. ``thresholds="validation"``
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
    """
    _check_task(task)
    proto = TrainProtocol.named(protocol, model, **settings)
    _check_run(epochs, lr, resume)
    run = _Trainer(model, train_loader, task=task, lr=lr, weight_decay=weight_decay, device=device, seed=seed,
                   protocol=proto)
    state, ckpt_dir, fingerprint = run.fresh_state(), None, None
    if checkpoint_dir is not None:
        ckpt_dir = Path(checkpoint_dir)
        fingerprint = run.fingerprint(train_loader, valid_loader, lr, weight_decay)
        if resume is True and (ckpt_dir / "last.pt").exists():
            state = _resume_state(ckpt_dir / "last.pt", fingerprint, epochs, run.model, run.optimiser)
            if run.plateau is not None and state.get("plateau"):
                run.plateau.load_state_dict(state["plateau"])
        elif resume is not True and _dist.rank() == 0:
            _move_aside(ckpt_dir)

    bar = _epoch_bar(state["epoch"] + 1, epochs, progress, desc or f"fit {task}")
    for epoch in bar:
        if state["stopped_early"]:
            break
        t0 = time.perf_counter()
        row = {"epoch": epoch, "train_loss": run.train_epoch(train_loader, epoch)}
        if valid_loader is not None:
            scores, th, score = run.validate(valid_loader, row)
        else:
            scores, th, score = {}, None, -row["train_loss"] if run.maximise else row["train_loss"]
        improved = run.keep_best(state, row, epoch, score, scores, th)
        run.schedule(state, row)
        state["seconds"] += time.perf_counter() - t0
        row["seconds"] = time.perf_counter() - t0
        state["history"].append(row)
        state["epoch"] = epoch
        if ckpt_dir is not None:
            run.save(ckpt_dir, fingerprint, state, improved, th)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"
                             and isinstance(v, float) and k in ("train_loss", f"valid_{run.monitor}")})
        for cb in callbacks:
            cb(epoch, dict(row))
        if state["stopped_early"]:
            break
    if hasattr(bar, "close"):
        bar.close()

    model.load_state_dict(state["best_state"])
    return FitResult(model=model, history=pd.DataFrame(state["history"]), best_epoch=state["best_epoch"],
                     best_score=state["best_score"], monitor=run.monitor, valid_metrics=state["best_metrics"],
                     thresholds=state["best_thresholds"], stopped_early=state["stopped_early"],
                     seconds=state["seconds"], checkpoint=ckpt_dir / "last.pt" if ckpt_dir else None,
                     n_params=count_parameters(model))
