"""Shared measuring tools of the benchmarks (the Performance page of the book).

Speed is only ever reported as ratios of variants timed in the same run: :func:`interleave` runs one
repetition of every variant in turn (rotating the order), so all of them see the same machine load, and
:func:`spread` reports the median and the range of the per-repetition ratios, not only the medians.
Memory: :func:`peak_rss_mb`, the growth of the process' peak resident memory during one call (after
handing freed memory back to the system; malloc's own settings are left alone, so timings are not
changed by the measurement).
"""
from __future__ import annotations

import ctypes
import os
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nbsupport import cost
from nbsupport import sparse as sp


def _release_free_memory() -> None:
    # glibc keeps freed blocks for reuse; give them back first, so that a step's peak resident memory is
    # its own allocations rather than memory freed by an earlier step (no-op elsewhere)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(key: str) -> int | None:
    try:
        m = re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def peak_rss_mb(fn: Callable[[], object]) -> float | None:
    """Peak resident memory added while ``fn()`` runs, in MB (Linux: the kernel's high-water mark VmHWM is
    reset through ``/proc/self/clear_refs``; PyTorch keeps no peak statistics for CPU memory).  None where
    the kernel does not allow it."""
    _release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    base = _status_bytes("VmRSS")
    fn()
    peak = _status_bytes("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0) / 2**20


def timed(fn: Callable[[], object]) -> float:
    """Wall time of ``fn()`` in seconds; on CUDA the queue is drained before and after."""
    return cost._timed(fn)


def interleave(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time every variant ``repeats`` times, one repetition of each in turn (order rotated every round),
    after ``warmup`` untimed rounds (:func:`nbsupport.cost.interleave`, which chapter 6 uses too)."""
    return cost.interleave(fns, repeats, warmup)


def spread(times: dict[str, list[float]], num: str, den: str) -> dict:
    """Median and range of the per-round ratio ``num / den`` (round i of one against round i of the other,
    both timed back to back), plus each variant's median seconds."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    seconds = {f"{k}_seconds": statistics.median(times[k]) for k in (num, den)}
    return dict(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios), **seconds)


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(label: str = "") -> dict:
    """Where and how a benchmark ran (stored in its JSON and shown with its plot)."""
    return dict(cpu=cpu_name(), python=sys.version.split()[0], torch=torch.__version__,
                threads=torch.get_num_threads(), cores=os.cpu_count(), load_average_before=os.getloadavg(),
                label=label)


# ------------------------------------------------------------------------------------------ attention
def peaked_prior(n: int, h: int, w: int, blob: float, gen: torch.Generator) -> torch.Tensor:
    """Log-prior (n, h, w): one Gaussian blob per frame at a random centre, width ``blob`` of the map."""
    cy = torch.rand(n, 1, 1, generator=gen) * h
    cx = torch.rand(n, 1, 1, generator=gen) * w
    yy = torch.arange(h).view(1, h, 1) + 0.5
    xx = torch.arange(w).view(1, 1, w) + 0.5
    return -(((yy - cy) / (blob * h)) ** 2 + ((xx - cx) / (blob * w)) ** 2) / 2


class PeakedAttention:
    """Benchmark scaffolding, not part of the model: adds a peaked log-prior to the score of every site
    (forward hooks on each cross-modal attention, which returns one score per site when called with
    ``frame=``), because an untrained attention is nearly uniform, unlike the maps MESM learns (one region
    per frame).  The model's own code runs unchanged.  ``sites[i]``: the (batch, y, x) of the rows scored
    before block i > 0 (set by hooks on the book's blocks, or by the SparseConvNet extractor); ``calls``
    counts the scores the prior was added to (a benchmark checks it, so a model change that bypasses the
    hooks cannot silently time uniform attention)."""

    def __init__(self, pathway: nn.Module, prior: torch.Tensor):
        self.prior, self.sites, self.calls = prior, {}, 0  # prior (N, H, W) at the first block's resolution
        self.handles = []
        for i, att in enumerate(pathway.cross_attention):
            self.handles.append(att.register_forward_hook(self._score_hook(i)))
        for i, block in enumerate(pathway.blocks[:-1]):
            self.handles.append(block.register_forward_hook(self._sites_hook(i + 1)))

    def check(self) -> None:
        """Raise when no score got the prior (the model no longer calls the hooked attention)."""
        if not self.calls:
            raise RuntimeError("PeakedAttention: no attention score got the prior; the benchmark would time "
                               "a nearly uniform attention")

    def _sites_hook(self, i):
        def hook(mod, inputs, out):
            if isinstance(out, sp.SparseTensor):
                self.sites[i] = out.coords
        return hook

    def _score_hook(self, i):
        def hook(mod, inputs, out):
            if not torch.is_tensor(out) or out.dim() != 1:  # not the per-site scores (frame= call)
                return out
            scale = 2 ** i
            h, w = self.prior.shape[1] // scale, self.prior.shape[2] // scale
            pm = F.adaptive_avg_pool2d(self.prior[:, None], (h, w))[:, 0]  # prior at this block's grid
            self.calls += 1
            if out.shape[0] == pm.numel():  # every site of the grid, in (frame, y, x) order
                return out + pm.reshape(-1)
            c = self.sites[i]  # the active sites of a sparse tensor
            return out + pm[c[:, 0], c[:, 1], c[:, 2]]
        return hook


# ------------------------------------------------------------------------------------------ site masks
#: The two kinds of site mask the sparse benchmarks time: uniformly scattered sites, and the compact
#: regions an attention keeps (what top-p selects from a peaked map: one blob per frame).
MASK_KINDS = ("random", "attention")


def site_masks(kind: str, n: int, h: int, w: int, density: float, gen: torch.Generator,
               blob: float = 0.25) -> torch.Tensor:
    """(n, h, w) bool masks with ``round(density * h * w)`` active sites per frame (at least one).
    ``"random"``: sites drawn uniformly; ``"attention"``: the sites of highest :func:`peaked_prior` (one
    Gaussian blob per frame at a random centre, slightly jittered so ties break at random), i.e. the
    compact region that top-p keeps from a peaked attention map at that density."""
    if kind not in MASK_KINDS:
        raise ValueError(f"site_masks: 'kind' must be one of {MASK_KINDS}, got {kind!r}")
    score = torch.rand(n, h * w, generator=gen)
    if kind == "attention":
        score = peaked_prior(n, h, w, blob, gen).reshape(n, -1) + 0.05 * score
    k = min(h * w, max(1, round(density * h * w)))
    mask = torch.zeros(n, h * w, dtype=torch.bool)
    mask.scatter_(1, score.topk(k, 1).indices, True)
    return mask.view(n, h, w)


def json_out(ap, out: str) -> Path:
    """The benchmarks' ``--out``: a path ending in .json (else ``ap.error`` naming the option)."""
    if not out.endswith(".json"):
        ap.error(f"--out must name a .json file, got {out!r}")
    return Path(out)


def listed(ap, option: str, text: str, allowed, noun: str) -> list[str]:
    """A comma-separated command-line list whose every entry must be one of ``allowed`` (else
    ``ap.error`` naming ``option`` and the ``noun`` of an entry); returns the entries."""
    entries = text.split(",")
    for e in entries:
        if e not in allowed:
            ap.error(f"{option}: unknown {noun} {e!r}, expected some of {', '.join(sorted(allowed))}")
    return entries


def site_prior(kind: str, n: int, h: int, w: int, blob: float, gen: torch.Generator) -> torch.Tensor:
    """Log-prior (n, h, w) added to the attention's scores by :class:`PeakedAttention`: ``"attention"``
    one blob per frame (:func:`peaked_prior`), ``"random"`` independent noise per site (std 2), so top-p
    keeps scattered sites."""
    if kind == "attention":
        return peaked_prior(n, h, w, blob, gen)
    if kind == "random":
        return 2.0 * torch.randn(n, h, w, generator=gen)
    raise ValueError(f"site_prior: 'kind' must be one of {MASK_KINDS}, got {kind!r}")
