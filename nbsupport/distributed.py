"""Scale-out helpers for ``torchrun`` / ``DistributedDataParallel`` (Chapter 8, "beyond one machine").

Data parallelism (Li et al., "PyTorch Distributed", VLDB 2020): every process (rank) holds a copy of
the model, sees ``1/W`` of each global batch through a ``DistributedSampler``, and DDP averages the
gradients over the ``W`` ranks with an all-reduce before each optimiser step. With equal local batches
of size ``b``, the averaged gradient equals the gradient of the mean loss over the global batch of
``W*b`` items, so ``W`` processes with batch ``b`` follow the same trajectory as one process with batch
``W*b`` (up to floating-point summation order) when the global batches hold the same items.

Launch a script that calls :func:`init_from_env` with::

    torchrun --nproc_per_node 2 script.py            # 2 CPU processes (gloo) or 2 GPUs (nccl)
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 4 script.py

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) every helper here is the identity, so the
same code runs in a notebook. ``nbsupport.train.fit`` picks up an initialised process group by itself
(DDP wrapper, distributed sampler in ``make_loader``, predictions gathered before metrics).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "DistInfo", "init_from_env", "shutdown", "is_distributed", "rank", "world_size", "local_rank", "is_main",
    "barrier", "distributed_sampler", "wrap_model", "all_reduce", "reduce_metrics", "gather_predictions",
    "gather_objects", "gather_list",
]


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, device, backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, prints and saves checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"nbsupport.distributed: environment variable {name} must be an integer, "
                         f"got {value!r}") from exc


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process' global rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK`` set by torchrun), used to pick the GPU."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on rank 0 (and always without a process group)."""
    return rank() == 0


def init_from_env(backend: str = "auto", device: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_*``).

    ``backend="auto"`` is NCCL when this rank runs on CUDA and gloo on CPU; ``device="auto"`` is the
    GPU ``LOCAL_RANK`` when CUDA is present, else the CPU. Without ``WORLD_SIZE`` (a plain ``python``
    or notebook run) nothing is initialised and a single-process :class:`DistInfo` is returned; under
    torchrun the group is joined even with one process, so one code path serves 1 and N ranks.
    Calling it again after initialisation returns the current state.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"nbsupport.distributed.init_from_env: parameter 'device' must be 'auto', 'cpu' or "
                         f"'cuda', got {device!r}")
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"nbsupport.distributed.init_from_env: parameter 'backend' must be 'auto', 'gloo' or "
                         f"'nccl', got {backend!r}")
    world = _env_int("WORLD_SIZE", 1)
    lrank = local_rank()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("nbsupport.distributed.init_from_env: device 'cuda' requested but no CUDA GPU is available")
    if use_cuda:
        if lrank >= torch.cuda.device_count():
            raise ValueError(f"nbsupport.distributed.init_from_env: LOCAL_RANK={lrank} but only "
                             f"{torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(lrank)
        dev = torch.device("cuda", lrank)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ValueError("nbsupport.distributed.init_from_env: backend 'nccl' needs CUDA; use 'gloo' on CPU")
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun sets both, even for 1 process
    if (world > 1 or under_launcher) and not is_distributed():
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if not is_distributed():
        return DistInfo(0, 1, 0, dev, None)
    return DistInfo(rank(), world_size(), lrank, dev, torch.distributed.get_backend())


def shutdown() -> None:
    """Leave the process group (end of a torchrun script); a no-op without one."""
    if is_distributed():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (e.g. before rank 0 reads files the others wrote); a no-op without a group."""
    if is_distributed():
        torch.distributed.barrier()


def distributed_sampler(dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
    """A ``DistributedSampler`` giving this rank its ``1/W`` share of ``dataset``, or None without a group.

    Pass it as ``DataLoader(sampler=...)`` and call ``sampler.set_epoch(epoch)`` every epoch so the
    shuffle differs per epoch but agrees across ranks. ``nbsupport.train.make_loader`` does both.
    """
    if not is_distributed():
        return None
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


def wrap_model(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``DistributedDataParallel(model)`` under a process group (gradients all-reduced), else ``model``."""
    if not is_distributed():
        return model
    device = device or next(model.parameters()).device
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _comm_device() -> torch.device:
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(value: Any, op: str = "sum") -> Any:
    """Sum (``op="sum"``), mean, max or min of a number or tensor over all ranks (identity without a group).

    Used for counts that must cover the whole dataset, e.g. BCE ``pos_weight = neg/pos`` from label
    counts summed over ranks rather than from one rank's shard.
    """
    ops = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}
    if op not in ops:
        raise ValueError(f"nbsupport.distributed.all_reduce: parameter 'op' must be one of {', '.join(ops)}, "
                         f"got {op!r}")
    is_tensor = isinstance(value, torch.Tensor)
    if not is_distributed():
        return value
    t = (value.detach().clone() if is_tensor else torch.tensor(value, dtype=torch.float64))
    orig_device = t.device
    t = t.to(_comm_device())
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, ops[op]))
    if op == "mean":
        t = t / world_size()
    t = t.to(orig_device)
    return t if is_tensor else t.item()


def reduce_metrics(metrics: Mapping[str, float], count: int | float = 1) -> dict:
    """Average per-rank scalar metrics over ranks, weighting each rank by its ``count`` of items.

    Right for additive metrics (mean loss, accuracy over items); for F1/AUC/weighted accuracy gather
    the predictions first (:func:`gather_predictions`) and compute once, as ``nbsupport.train`` does.
    """
    if not is_distributed():
        return {k: float(v) for k, v in metrics.items()}
    keys = sorted(metrics)
    vec = torch.tensor([float(metrics[k]) * count for k in keys] + [float(count)], dtype=torch.float64)
    vec = all_reduce(vec, "sum")
    return {k: float(vec[i] / vec[-1]) for i, k in enumerate(keys)}


def gather_objects(obj: Any) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_predictions(tensor: torch.Tensor, n_total: int | None = None) -> torch.Tensor:
    """Reassemble per-rank predictions ``(n_local, ...)`` into dataset order ``(n_total, ...)``.

    For a ``DistributedSampler(shuffle=False)``: rank ``r`` holds items ``r, r+W, r+2W, ...`` of the
    dataset padded to a multiple of ``W``, so interleaving the ranks' rows and cutting the padding
    restores the original order (same rule as ``nbsupport.train.predict``).
    """
    if not is_distributed():
        return tensor if n_total is None else tensor[:n_total]
    pieces = gather_objects(tensor.detach().cpu())
    if len({p.shape[0] for p in pieces}) != 1:
        raise ValueError("nbsupport.distributed.gather_predictions: ranks hold different numbers of rows "
                         f"({[p.shape[0] for p in pieces]}); use a DistributedSampler (it pads to equal shares)")
    out = torch.stack(pieces, dim=1).reshape(-1, *tensor.shape[1:])  # (n_local, W, ...) -> (n_local*W, ...)
    return out if n_total is None else out[:n_total]


def gather_list(items: Sequence[Any], n_total: int | None = None) -> list:
    """Reassemble per-rank lists (e.g. utterance ids) into dataset order, like :func:`gather_predictions`
    (data parallelism, Li et al. 2020: each rank predicted its own share of the evaluation set).

    The same interleaving rule for a ``DistributedSampler(shuffle=False)``: element ``i`` of rank ``r``
    is item ``i*W + r``; the padding past ``n_total`` is cut. Without a group: ``items`` as a list.
    """
    if not is_distributed():
        items = list(items)
        return items if n_total is None else items[:n_total]
    pieces = gather_objects(list(items))
    out = [piece[i] for i in range(len(pieces[0])) for piece in pieces]
    return out if n_total is None else out[:n_total]
