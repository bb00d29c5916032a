"""Sparse and dense CNN layers of FE2E/MESM (Dai et al. 2021, Sec. 3.3; Chapters 5-6).

Dense and sparse twins share parameter names, so a ``state_dict`` moves between FE2E and MESM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backends import SpconvSubm, sparse_backend
from .engine import SparseTensor, choose_strategy, offset_major, sparse_max_pool2d, subm_conv2d

__all__ = ["SubMConv2d", "SparseConvBNReLU", "SparseMaxPool2d", "SparseVggBlock", "DenseConvBNReLU", "DenseVggBlock"]


class SubMConv2d(nn.Module):
    """Submanifold k x k convolution on a :class:`SparseTensor` (MESM sparse blocks, Chapter 6).

    The weight is kept in PyTorch's dense layout (C_out, C_in, k, k) under the name ``weight``, the same
    as ``nn.Conv2d``, so dense and sparse blocks share a ``state_dict``.  Backend: spconv on CUDA when
    available (weight converted on the fly), else :func:`subm_conv2d`.  ``last_backend`` tells which ran.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"SubMConv2d: 'kernel_size' must be odd, got {kernel_size}")
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)  # same init
        # Shape (C_out, C_in, k, k) and init of nn.Conv2d (state dicts are shared with DenseConvBNReLU), but
        # stored offset-major (k, k, C_in, C_out) in memory: the rulebook then needs no weight copies.
        self.weight = nn.Parameter(offset_major(ref.weight))
        self.bias = ref.bias
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.last_backend: str | None = None
        self.strategy = "auto"  # torch-rulebook execution plan: auto/pairs/dense/im2col/tiles (see subm_conv2d)
        self.last_strategy: str | None = None
        self.last_tile_cells: int | None = None  # output cells the "tiles" plan computed in the last call
        self._spconv = SpconvSubm(in_channels, out_channels, kernel_size)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"

    def forward(self, x: SparseTensor) -> SparseTensor:
        backend = sparse_backend(x.features.device)
        self.last_backend = backend
        if backend == "spconv" and x.num_sites > 0:
            self.last_strategy = None  # no CPU plan ran
            return x.replace(self._spconv(x, self.weight, self.bias))
        nbr = x.neighbours(self.kernel_size)
        strategy = self.strategy
        if strategy == "auto":
            key = ("strategy", self.kernel_size, self.in_channels, self.out_channels)
            if key not in x.cache:
                tiles = x.tile_count(self.kernel_size) if x.num_sites > 0 else None  # no plan built
                x.cache[key] = choose_strategy(nbr, x.spatial_shape, x.batch_size, tiles=tiles,
                                               channels=(self.in_channels, self.out_channels))
            strategy = x.cache[key]
        self.last_strategy = strategy
        pairs = x.pairs(self.kernel_size) if strategy == "pairs" else None
        tiles = x.tiles(self.kernel_size) if strategy == "tiles" and x.num_sites > 0 else None
        self.last_tile_cells = tiles.covered if tiles is not None else None  # for nbsupport.flops
        out = subm_conv2d(x.features, x.coords, self.weight, self.bias, neighbours=nbr, strategy=strategy,
                          pairs=pairs, tiles=tiles, spatial_shape=x.spatial_shape, batch_size=x.batch_size)
        return x.replace(out)



class SparseConvBNReLU(nn.Module):
    """Submanifold conv -> BatchNorm over active sites only (``nn.BatchNorm1d`` on the features) -> ReLU.

    Parameter names (``conv.weight``, ``bn.*``) match :class:`DenseConvBNReLU` so state dicts are
    interchangeable (Chapter 6)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = SubMConv2d(in_channels, out_channels, kernel_size)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        y = self.conv(x)
        if y.num_sites == 0:
            return y
        return y.replace(F.relu(self.bn(y.features)))


class SparseMaxPool2d(nn.Module):
    """2x2 (by default) sparse max-pool of a :class:`SparseTensor`; see :func:`sparse_max_pool2d`.

    Runs :func:`sparse_max_pool2d` on every device: measured on an H100, spconv's ``SparseMaxPool2d``
    (2.3.8) returned the right sites but values that differ from dense max-pool over active inputs, and
    pooling is a small share of the block's cost."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size

    def forward(self, x: SparseTensor) -> SparseTensor:
        h, w = x.spatial_shape
        k, s = self.kernel_size, self.stride
        shape = ((h - k) // s + 1, (w - k) // s + 1)
        f, c = sparse_max_pool2d(x.features, x.coords, k, s, spatial_shape=x.spatial_shape, batch_size=x.batch_size)
        return SparseTensor(f, c, shape, x.batch_size)


class SparseVggBlock(nn.Module):
    """MESM sparse block (Chapter 6): two submanifold 3x3 conv + BN + ReLU, then a 2x2 sparse max-pool.

    The rulebook is built once and reused by both convolutions.  ``state_dict`` keys equal
    :class:`DenseVggBlock`'s, so FE2E weights load into MESM and back."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = True):
        super().__init__()
        self.conv1 = SparseConvBNReLU(in_channels, out_channels)
        self.conv2 = SparseConvBNReLU(out_channels, out_channels)
        self.pool = SparseMaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.pool(self.conv2(self.conv1(x)))


class DenseConvBNReLU(nn.Module):
    """Dense twin of :class:`SparseConvBNReLU`: ``nn.Conv2d`` (padding k//2, no bias unless ``bias``) +
    BatchNorm2d + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class DenseVggBlock(nn.Module):
    """FE2E's VGG block (Chapters 5-6): two 3x3 conv + BN + ReLU, then 2x2 max-pool
    (``pool=False``: none, as in the two VGG-64 blocks of the dense stage).  Same parameter names as
    :class:`SparseVggBlock`. ``bias=True``: convolutions with a bias, as the MESM reference code's
    dense blocks (a no-op before BatchNorm, which subtracts it again; only the count changes)."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = True, bias: bool = False):
        super().__init__()
        self.conv1 = DenseConvBNReLU(in_channels, out_channels, bias=bias)
        self.conv2 = DenseConvBNReLU(out_channels, out_channels, bias=bias)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/2, W/2)
        return self.pool(self.conv2(self.conv1(x)))
