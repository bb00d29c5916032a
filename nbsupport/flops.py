"""Multiply-accumulates (MACs) of a feature extractor *as it ran* (MESM's compute claim, Chapters 5-6).

MESM (Dai et al. 2021, Sec. 4) claims to keep FE2E's quality with about half the feature-extraction
compute.  We count what actually ran: a dense convolution costs ``H_out * W_out * C_in/groups * C_out
* k_h * k_w`` MACs per image, a submanifold convolution costs ``C_in * C_out`` per (active output site,
active neighbour) pair -- the size of the rulebook it executed -- and a linear layer
``in_features * out_features`` per row.  :class:`MacCounter` / :func:`count_macs` install forward
hooks on ``nn.Conv2d``, ``nn.Linear`` and :class:`nbsupport.sparse.SubMConv2d` and return one row per
call, with the dense-equivalent MACs of each sparse layer next to its real ones (MESM's fused site
scores, ``AdditiveAttention(..., frame=)``, are counted as the ``W_k`` and ``v`` layers they run).  Attention matmuls
and elementwise ops (BN, ReLU, pooling) are not counted: they are small next to the convolutions and
are the same for FE2E and MESM.

Hand-written because the usual counters (thop, fvcore, ptflops) are not installed here, and none of
them knows our rulebook convolution.
"""
from __future__ import annotations

from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from . import sparse as sp
from .attention import AdditiveAttention

__all__ = ["dense_conv_macs", "subm_conv_macs", "linear_macs", "MacCounter", "count_macs", "summarize_macs"]


def dense_conv_macs(height: int, width: int, c_in: int, c_out: int, kernel_size: int | tuple[int, int] = 3,
                    n_images: int = 1, groups: int = 1) -> int:
    """MACs of a dense 2-D convolution with output size ``height x width``: ``n * H * W * C_in/groups * C_out * kh * kw``."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return int(n_images) * int(height) * int(width) * (int(c_in) // int(groups)) * int(c_out) * int(kh) * int(kw)


def subm_conv_macs(sites: Any, c_in: int, c_out: int, kernel_size: int = 3,
                   spatial_shape=None, batch_size: int | None = None) -> int:
    """MACs of a submanifold convolution = (active neighbour pairs in the rulebook) * C_in * C_out.

    ``sites``: a :class:`nbsupport.sparse.SparseTensor` (its cached rulebook is used), or coordinates
    (N, 3) ``(batch, y, x)`` with ``spatial_shape``/``batch_size``.
    """
    x = sites
    if isinstance(x, sp.SparseTensor):
        nbr = x.neighbours(kernel_size)
    elif torch.is_tensor(x) and x.dim() == 2 and x.shape[1] == 3:
        if spatial_shape is None or batch_size is None:
            raise ValueError("nbsupport.flops.subm_conv_macs: coordinates need 'spatial_shape' and 'batch_size'")
        nbr = sp.neighbour_table(x, spatial_shape, batch_size, kernel_size)
    else:
        raise TypeError("nbsupport.flops.subm_conv_macs: 'sites' must be a SparseTensor or (N, 3) coordinates, "
                        f"got {type(x).__name__}")
    pairs = int((nbr < nbr.shape[0]).sum())
    return pairs * int(c_in) * int(c_out)


def linear_macs(rows: int, in_features: int, out_features: int) -> int:
    """MACs of ``nn.Linear`` applied to ``rows`` vectors."""
    return int(rows) * int(in_features) * int(out_features)


class MacCounter:
    """Context manager counting MACs per layer call with forward hooks (Chapters 5-6).

    >>> with MacCounter(model) as mc:
    ...     model(batch)
    >>> mc.table()   # DataFrame: layer, kind, macs, dense_macs, executed_macs, sites, dense_sites, density

    ``kind`` is ``conv2d``, ``subm_conv2d`` or ``linear``.  ``macs`` of a submanifold layer is its
    rulebook size (what a sparse engine such as spconv executes); ``dense_macs`` is what a dense layer
    costs on the full grid (equal to ``macs`` for dense layers); ``executed_macs`` is what the CPU plan
    really multiplied (:func:`nbsupport.sparse.choose_strategy` runs oneDNN's dense conv on the
    zero-filled grid when most of it is active, then ``executed_macs == dense_macs``; the block-sparse
    plan computes every output cell of its active tiles).  ``include``
    filters layer names.
    """

    def __init__(self, module: nn.Module, include: Callable[[str], bool] | None = None):
        self.module = module
        self.include = include
        self.rows: list[dict] = []
        self._handles = []

    def __enter__(self) -> "MacCounter":
        for name, mod in self.module.named_modules():
            if self.include is not None and not self.include(name):
                continue
            if isinstance(mod, (nn.Conv2d, nn.Linear, sp.SubMConv2d)):
                self._handles.append(mod.register_forward_hook(self._hook(name or type(mod).__name__)))
            elif isinstance(mod, AdditiveAttention):
                pre, post = self._site_scores_hooks(name)
                self._handles += [mod.register_forward_pre_hook(pre),
                                  mod.register_forward_hook(post, with_kwargs=True)]
        return self

    def _site_scores_hooks(self, name: str):
        # MESM's packed-site scores (AdditiveAttention(..., frame=)) run W_k and v fused, not as nn.Linear
        # calls: count them as the two linear layers they are, under those layers' names (unless those
        # layers ran, and were counted, during this call)
        start: list[int] = []  # rows recorded before each (possibly nested) call

        def pre(mod, args):
            start.append(len(self.rows))

        def hook(mod, args, kwargs, output):
            first = start.pop()
            w_key = f"{name}.w_key" if name else "w_key"
            if kwargs.get("frame") is None or any(r["layer"] == w_key for r in self.rows[first:]):
                return
            rows = args[1].shape[0]  # keys (M, d_k): one row per site
            for layer in ("w_key", "v"):
                lin = getattr(mod, layer)
                macs = linear_macs(rows, lin.in_features, lin.out_features)
                self.rows.append(dict(layer=f"{name}.{layer}" if name else layer, kind="linear", macs=macs,
                                      dense_macs=macs, executed_macs=macs, sites=rows, dense_sites=rows,
                                      density=1.0 if rows else 0.0))
        return pre, hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(mod, inputs, output):
            if isinstance(mod, sp.SubMConv2d):
                x = inputs[0]
                k = mod.kernel_size
                macs = subm_conv_macs(x, mod.in_channels, mod.out_channels, k)
                cells = x.batch_size * x.spatial_shape[0] * x.spatial_shape[1]
                dense = dense_conv_macs(*x.spatial_shape, mod.in_channels, mod.out_channels, k, x.batch_size)
                plan = mod.last_strategy  # None when spconv ran
                per_cell = k * k * mod.in_channels * mod.out_channels
                executed = {"dense": dense, "im2col": x.num_sites * per_cell,
                            "tiles": (mod.last_tile_cells or 0) * per_cell}.get(plan, macs)
                row = dict(layer=name, kind="subm_conv2d", macs=macs, dense_macs=dense, executed_macs=executed,
                           sites=x.num_sites, dense_sites=cells)
            elif isinstance(mod, nn.Conv2d):
                b, c_out, h, w = output.shape if output.dim() == 4 else (1, *output.shape)
                macs = dense_conv_macs(h, w, mod.in_channels, mod.out_channels, mod.kernel_size, b, mod.groups)
                row = dict(layer=name, kind="conv2d", macs=macs, dense_macs=macs, executed_macs=macs, sites=b * h * w,
                           dense_sites=b * h * w)
            else:  # nn.Linear
                rows = output.numel() // mod.out_features
                macs = linear_macs(rows, mod.in_features, mod.out_features)
                row = dict(layer=name, kind="linear", macs=macs, dense_macs=macs, executed_macs=macs, sites=rows,
                           dense_sites=rows)
            row["density"] = row["sites"] / row["dense_sites"] if row["dense_sites"] else 0.0
            self.rows.append(row)
        return hook

    def table(self) -> pd.DataFrame:
        """One row per layer call, in execution order."""
        cols = ["layer", "kind", "macs", "dense_macs", "executed_macs", "sites", "dense_sites", "density"]
        return pd.DataFrame(self.rows, columns=cols)

    @property
    def total(self) -> int:
        """Sum of ``macs`` over every recorded layer call."""
        return int(sum(r["macs"] for r in self.rows))


def count_macs(module: nn.Module, *inputs: Any, include: Callable[[str], bool] | None = None,
               **kwargs: Any) -> pd.DataFrame:
    """Run ``module(*inputs, **kwargs)`` once under ``torch.no_grad`` and return its per-layer MAC table
    (see :class:`MacCounter`); ``include(name)`` restricts the layers (e.g. to the feature extractor)."""
    with torch.no_grad(), MacCounter(module, include) as mc:
        module(*inputs, **kwargs)
    return mc.table()


def summarize_macs(table: pd.DataFrame) -> dict:
    """Totals of a MAC table: ``macs``, ``dense_macs`` and their ratio (MESM's 'half the compute' check)."""
    macs, dense = int(table["macs"].sum()), int(table["dense_macs"].sum())
    return {"macs": macs, "dense_macs": dense, "ratio": macs / dense if dense else float("nan")}
