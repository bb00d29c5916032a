"""Sparse tensors, top-p site selection and submanifold sparse convolution (MESM, Chapter 6).

Four modules, one concern each: :mod:`~nbsupport.sparse.topp` (top-p selection),
:mod:`~nbsupport.sparse.engine` (sparse tensor, rulebook, submanifold convolution, pooling),
:mod:`~nbsupport.sparse.backends` (spconv on CUDA and its self-check) and
:mod:`~nbsupport.sparse.layers` (the modules FE2E/MESM are built from). Their public names are
re-exported here.

MESM (Dai, Cahyawijaya et al., NAACL 2021, Sec. 3.3) scores every spatial site of a feature map with
cross-modal attention from the text, keeps per frame (or mel piece) the *nucleus* of sites whose
attention mass reaches ``top_p`` (:func:`top_p_mask`) and runs the following CNN blocks only on
those sites, as a sparse tensor: submanifold 3x3 convolutions (Graham & van der Maaten, 2017) that
compute outputs only at active sites and read only active neighbours (:func:`subm_conv2d`), then
a 2x2 max-pool over active inputs (:func:`sparse_max_pool2d`).

Two backends, chosen automatically and visible through :func:`sparse_backend`:

* ``"spconv"`` on CUDA tensors when ``spconv`` (``spconv-cu12x``) is installed: spconv's
  ``SubMConv2d`` runs with *our* weights (dense PyTorch layout, converted on the fly; the sparse
  max-pool stays in PyTorch, see :class:`SparseMaxPool2d`), so a dense and a sparse block share one ``state_dict``; before spconv is trusted on a
  device, :func:`spconv_selfcheck` compares it once with dense ``conv2d`` there and a failure falls
  back to the rulebook with a warning;
* ``"torch-rulebook"`` everywhere else: a pure-PyTorch rulebook implementation, verified against
  dense ``conv2d`` / ``max_pool2d`` forward and backward in ``tests/test_sparse.py``. spconv's
  CPU wheel returns wrong answers here (the book's *Design* page, "Sparse convolution"), so it is never used on CPU.
  ``NBSUPPORT_SPARSE_BACKEND=torch-rulebook`` forces ours on CUDA too.

How the rulebook works (hand-written because no installed library does correct sparse convolution
on CPU): coordinates ``(batch, y, x)`` are hashed to linear keys; for each of the ``k*k`` kernel
offsets the index of the neighbour site is looked up (a dense index grid when the bounding grid is
small, ``torch.searchsorted`` on sorted keys otherwise); missing neighbours point to an extra zero
row.  The table is cached on the :class:`SparseTensor`, so both convolutions of a block share it.
The CPU then executes one of four plans with identical results, the cheapest by a cost model
(:func:`choose_strategy`, :func:`plan_costs`):

* ``"pairs"`` (low density, the MESM regime): the classic gather -> GEMM -> scatter rulebook over the
  *active* (output, input) pairs only, one kernel offset at a time (its buffers stay in cache); the work is the
  real rulebook size that :mod:`nbsupport.flops` counts;
* ``"dense"`` (most of the grid active): oneDNN's ``conv2d`` on the zero-filled map, read at the sites;
* ``"im2col"`` (compact regions, most neighbours active): one gather to (N, k*k*C_in) and one matmul.
  Because the submanifold neighbour relation is symmetric, its backward is the mirrored gather and one
  matmul (no scatter);
* ``"tiles"`` (compact regions whose tiles are well filled: the regions MESM's attention keeps): the
  block-sparse plan of SBNet (Ren et al. 2018) -- the map is cut into tiles (:func:`tile_plan`), the
  tiles holding active sites are gathered with a one-cell halo (zeros at inactive cells), oneDNN's dense
  ``conv2d`` runs on that batch of small maps, and only the active sites are read back. With inputs
  zero at inactive sites this is the submanifold convolution exactly.

:class:`SubMConv2d` keeps its weight in PyTorch's (C_out, C_in, k, k) shape -- state dicts are shared
with ``nn.Conv2d`` -- but stored offset-major in memory, so the rulebook reads it without copies.
Measured in ``benchmarks/sparse_vs_dense.py`` (results in ``benchmarks/results/``).

Shapes of the paper (MESM's original code, checked): after the dense stage (conv5x5-64, BN, ReLU,
max-pool 2, two VGG-64 blocks *without* pooling) a 48x48 face is a 64x24x24 map and a 128x32 mel piece
a 64x64x16 map; the three sparse blocks (128, 256, 512) halve that to 12x12, 6x6, 3x3 (faces) and
32x8, 16x4, 8x2 (mel).  See :data:`PAPER_SPARSE_INPUT`.
"""
from __future__ import annotations
from __future__ import annotations

from .backends import (SPARSE_BACKEND_CPU, SPCONV_SELFCHECK_TOL, SpconvSubm, backend_description, sparse_backend,
                       spconv_selfcheck)
from .engine import (DENSE_POOL_MIN_DENSITY, IM2COL_COST, IM2COL_FEW_CHANNELS, PAIRS_COST, PAIRS_FEW_CHANNELS, REFERENCE_CHANNELS,
                     TILE_GATHER_COST, TILE_GATHER_FEW_CHANNELS, TILE_SIZES, RulebookPairs,
                     SparseTensor, TileCount, TilePlan, choose_strategy, neighbour_table, offset_major, plan_costs,
                     rulebook_pairs, sparse_max_pool2d, subm_conv2d, tile_count, tile_plan, to_dense, to_sparse)
from .layers import DenseConvBNReLU, DenseVggBlock, SparseConvBNReLU, SparseMaxPool2d, SparseVggBlock, SubMConv2d
from .topp import top_p_mask, top_p_mask_segments

__all__ = [
    "PAPER_SPARSE_INPUT", "SPARSE_BACKEND_CPU", "SPCONV_SELFCHECK_TOL", "sparse_backend", "backend_description",
    "spconv_selfcheck", "SpconvSubm", "top_p_mask", "top_p_mask_segments",
    "SparseTensor", "to_sparse", "to_dense", "neighbour_table", "rulebook_pairs", "RulebookPairs", "offset_major",
    "choose_strategy", "plan_costs", "tile_plan", "TilePlan", "tile_count", "TileCount", "subm_conv2d", "sparse_max_pool2d",
    "PAIRS_COST", "IM2COL_COST", "TILE_GATHER_COST", "TILE_SIZES", "REFERENCE_CHANNELS", "PAIRS_FEW_CHANNELS",
    "TILE_GATHER_FEW_CHANNELS", "IM2COL_FEW_CHANNELS", "DENSE_POOL_MIN_DENSITY",
    "SubMConv2d", "SparseConvBNReLU", "SparseMaxPool2d", "SparseVggBlock", "DenseConvBNReLU", "DenseVggBlock",
]

#: (channels, height, width) entering the first sparse block, per modality, as in MESM's code.
PAPER_SPARSE_INPUT = {"faces": (64, 24, 24), "mel": (64, 64, 16)}
