"""The sparse tensor and the rulebook engine: submanifold convolution and sparse max-pool (Chapter 6).

A :class:`SparseTensor` holds the active sites of a batch of 2-D maps; :func:`neighbour_table` finds,
for every site and kernel offset, the index of its neighbour (the *rulebook*); :func:`subm_conv2d`
runs a submanifold convolution from it (Graham & van der Maaten, 2017) with one of four plans of
identical results, the cheapest by a measured cost model (:func:`choose_strategy`; one of them, "tiles",
is SBNet's block-sparse plan, :func:`tile_plan`), and :func:`sparse_max_pool2d` pools active inputs.
Hand-written because no installed library does correct sparse convolution on CPU (spconv's CPU
wheel returns wrong values here); every plan is tested against dense ``conv2d``/``max_pool2d``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

# A dense index grid is used for neighbour lookup when the padded grid has at most this many cells.
_DENSE_GRID_MAX_CELLS = 1 << 24

# ---------------------------------------------------------------------------------------------
# Sparse tensor + rulebook
# ---------------------------------------------------------------------------------------------
@dataclass
class SparseTensor:
    """Active sites of a batch of 2-D feature maps (MESM's sparse CNN input, Chapter 6).

    ``features`` (N, C); ``coords`` (N, 3) long ``(batch, y, x)``; ``spatial_shape`` (H, W);
    ``batch_size`` B (number of images/frames/pieces).  The neighbour tables of the rulebook are
    cached per kernel size, so the two convolutions of a VGG block build it once; methods that
    change the sites (:meth:`select`, pooling) return a tensor with a fresh cache.
    """

    features: torch.Tensor
    coords: torch.Tensor
    spatial_shape: tuple[int, int]
    batch_size: int
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.features.dim() != 2:
            raise ValueError(f"SparseTensor: 'features' must be (N, C), got shape {tuple(self.features.shape)}")
        if self.coords.dim() != 2 or self.coords.shape[1] != 3 or self.coords.shape[0] != self.features.shape[0]:
            raise ValueError(f"SparseTensor: 'coords' must be (N, 3) with N = {self.features.shape[0]}, "
                             f"got shape {tuple(self.coords.shape)}")
        if self.coords.is_floating_point():
            raise TypeError("SparseTensor: 'coords' must be an integer tensor (batch, y, x)")
        # contiguous: CUDA nonzero() returns column-major (N, 3) coordinates, which spconv silently misreads
        # (book/design.md, "Sparse convolution"); every SparseTensor holds row-major ones, whatever produced them
        self.coords = self.coords.long().contiguous()
        self.spatial_shape = (int(self.spatial_shape[0]), int(self.spatial_shape[1]))
        self.batch_size = int(self.batch_size)

    @property
    def num_sites(self) -> int:
        return self.features.shape[0]

    @property
    def density(self) -> float:
        """Share of the B*H*W grid that is active."""
        cells = self.batch_size * self.spatial_shape[0] * self.spatial_shape[1]
        return self.num_sites / cells if cells else 0.0

    def replace(self, features: torch.Tensor) -> "SparseTensor":
        """Same sites (and cached rulebook), new features (N, C')."""
        if features.shape[0] != self.num_sites:
            raise ValueError(f"SparseTensor.replace: features must have {self.num_sites} rows, got {features.shape[0]}")
        return SparseTensor(features, self.coords, self.spatial_shape, self.batch_size, self.cache)

    def select(self, mask: torch.Tensor) -> "SparseTensor":
        """Keep the sites where ``mask`` (N,) bool is True (e.g. a top-p mask); fresh cache."""
        return SparseTensor(self.features[mask], self.coords[mask], self.spatial_shape, self.batch_size)

    def neighbours(self, kernel_size: int = 3) -> torch.Tensor:
        """Cached rulebook (N, k*k) long: neighbour site of each site per kernel offset, N = missing."""
        key = ("nbr", int(kernel_size))
        if key not in self.cache:
            self.cache[key] = neighbour_table(self.coords, self.spatial_shape, self.batch_size, kernel_size)
        return self.cache[key]

    def pairs(self, kernel_size: int = 3) -> "RulebookPairs":
        """Cached (output, input) site pairs of the rulebook per kernel offset (see :func:`rulebook_pairs`)."""
        key = ("pairs", int(kernel_size))
        if key not in self.cache:
            self.cache[key] = rulebook_pairs(self.neighbours(kernel_size))
        return self.cache[key]

    def tile_count(self, kernel_size: int = 3) -> "TileCount":
        """Cached tile side and active-tile count of :meth:`tiles`' plan (see :func:`tile_count`)."""
        key = ("tile_count", int(kernel_size))
        if key not in self.cache:
            self.cache[key] = tile_count(self.coords, self.spatial_shape, self.batch_size, kernel_size)
        return self.cache[key]

    def tiles(self, kernel_size: int = 3) -> "TilePlan":
        """Cached block-sparse plan of these sites (see :func:`tile_plan`)."""
        key = ("tiles", int(kernel_size))
        if key not in self.cache:
            self.cache[key] = tile_plan(self.coords, self.spatial_shape, self.batch_size, kernel_size)
        return self.cache[key]

    def dense(self, fill: float = 0.0) -> torch.Tensor:
        """(B, C, H, W) with ``fill`` at inactive sites."""
        return to_dense(self.features, self.coords, (self.batch_size, *self.spatial_shape), fill=fill)


def to_sparse(dense: torch.Tensor, mask: torch.Tensor | None = None) -> SparseTensor:
    """Dense maps (B, C, H, W) and a site mask (B, H, W) bool -> :class:`SparseTensor` of the True sites
    (sites ordered by batch, y, x).  ``mask=None`` keeps every site.  Chapter 6 (MESM's first block)."""
    if dense.dim() != 4:
        raise ValueError(f"nbsupport.sparse.to_sparse: 'dense' must be (B, C, H, W), got {tuple(dense.shape)}")
    b, c, h, w = dense.shape
    if mask is None:
        mask = torch.ones(b, h, w, dtype=torch.bool, device=dense.device)
    if mask.shape != (b, h, w):
        raise ValueError(f"nbsupport.sparse.to_sparse: 'mask' must be (B, H, W) = {(b, h, w)}, got {tuple(mask.shape)}")
    coords = mask.nonzero()  # (N, 3); SparseTensor makes it row-major
    feats = dense.permute(0, 2, 3, 1)[mask.bool()]  # (N, C)
    return SparseTensor(feats, coords, (h, w), b)


def to_dense(features: torch.Tensor, coords: torch.Tensor, shape: Sequence[int], fill: float = 0.0) -> torch.Tensor:
    """Scatter sparse ``features`` (N, C) at ``coords`` (N, 3) into a (B, C, H, W) map, ``shape`` = (B, H, W)
    or (B, C, H, W); inactive sites hold ``fill`` (0, or ``-inf`` for the max-pool equivalence).  Differentiable."""
    if len(shape) == 4:
        shape = (shape[0], shape[2], shape[3])
    if len(shape) != 3:
        raise ValueError(f"nbsupport.sparse.to_dense: 'shape' must be (B, H, W) or (B, C, H, W), got {tuple(shape)}")
    b, h, w = (int(s) for s in shape)
    c = features.shape[1]
    coords = coords.long()
    lin = (coords[:, 0] * h + coords[:, 1]) * w + coords[:, 2]
    out = features.new_full((b * h * w, c), fill)
    out = out.index_copy(0, lin, features)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)


def neighbour_table(coords: torch.Tensor, spatial_shape: Sequence[int], batch_size: int,
                    kernel_size: int = 3, method: str = "auto") -> torch.Tensor:
    """Rulebook of a submanifold convolution: (N, k*k) long, entry [i, a*k+b] is the index of the
    site at ``(y + a - k//2, x + b - k//2)`` in the same image, or N when that site is inactive (or
    off the map).

    ``method``: "grid" (dense index grid, O(B*H*W) memory), "search" (``torch.searchsorted`` on
    sorted linear keys), or "auto" (grid when the padded grid is small).  Chapter 6.
    """
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"nbsupport.sparse: 'kernel_size' must be a positive odd integer, "
                         f"got {kernel_size!r}")
    coords = coords.long()
    n = coords.shape[0]
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    r = k // 2
    dev = coords.device
    if n == 0:
        return torch.zeros(0, k * k, dtype=torch.long, device=dev)
    off = torch.arange(-r, r + 1, device=dev)
    dy = off.repeat_interleave(k)  # (K,) row-major kernel offsets
    dx = off.repeat(k)
    hp, wp = h + 2 * r, w + 2 * r
    if method == "auto":
        method = "grid" if batch_size * hp * wp <= _DENSE_GRID_MAX_CELLS else "search"
    if method == "grid":
        grid = torch.full((batch_size * hp * wp,), n, dtype=torch.long, device=dev)
        lin = (coords[:, 0] * hp + coords[:, 1] + r) * wp + coords[:, 2] + r  # (N,) padded keys
        grid[lin] = torch.arange(n, device=dev)
        return grid[lin[:, None] + (dy * wp + dx)[None, :]]  # (N, K)
    if method != "search":
        raise ValueError(f"nbsupport.sparse.neighbour_table: 'method' must be auto/grid/search, "
                         f"got {method!r}")
    return _neighbour_search(coords, h, w, dy, dx)


def _neighbour_search(coords: torch.Tensor, h: int, w: int, dy: torch.Tensor, dx: torch.Tensor):
    # neighbour_table's "search" method: look each neighbour's linear key up in the sorted keys
    n = coords.shape[0]
    lin = (coords[:, 0] * h + coords[:, 1]) * w + coords[:, 2]
    skeys, sidx = torch.sort(lin)
    ny = coords[:, 1:2] + dy[None, :]  # (N, K)
    nx = coords[:, 2:3] + dx[None, :]
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    q = (coords[:, 0:1] * h + ny) * w + nx
    pos = torch.searchsorted(skeys, q.clamp(min=0)).clamp(max=n - 1)
    found = inside & (skeys[pos] == q)
    return torch.where(found, sidx[pos], torch.full_like(pos, n))


def _flip_table(nbr: torch.Tensor) -> torch.Tensor:
    # Mirrored offsets: column K-1-j of a submanifold table holds the site at the opposite offset.
    return nbr.flip(1)


class _SubmConvFunction(torch.autograd.Function):
    """im2col-on-sites convolution; backward = mirrored gather + one matmul (no scatter)."""

    @staticmethod
    def forward(ctx, features, weight, nbr):
        n, c_in = features.shape
        c_out, _, kh, kw = weight.shape
        kk = kh * kw
        fpad = torch.cat([features, features.new_zeros(1, c_in)], 0)  # (N+1, C_in), row N = missing
        cols = fpad.index_select(0, nbr.reshape(-1)).view(n, kk * c_in)  # (N, K*C_in)
        w_mat = _weight_by_offset(weight).view(kk * c_in, c_out)  # (K*C_in, C_out)
        ctx.save_for_backward(features, weight, nbr)
        return cols @ w_mat  # (N, C_out)

    @staticmethod
    def backward(ctx, grad_out):
        features, weight, nbr = ctx.saved_tensors
        n, c_in = features.shape
        c_out, _, kh, kw = weight.shape
        kk = kh * kw
        grad_out = grad_out.contiguous()
        grad_f = grad_w = None
        if ctx.needs_input_grad[0]:
            gpad = torch.cat([grad_out, grad_out.new_zeros(1, c_out)], 0)  # (N+1, C_out)
            gcols = gpad.index_select(0, _flip_table(nbr).reshape(-1)).view(n, kk * c_out)
            w_back = _weight_by_offset(weight).transpose(1, 2).reshape(kk * c_out, c_in)  # (K*C_out, C_in)
            grad_f = gcols @ w_back  # (N, C_in)
        if ctx.needs_input_grad[1]:
            fpad = torch.cat([features, features.new_zeros(1, c_in)], 0)
            cols = fpad.index_select(0, nbr.reshape(-1)).view(n, kk * c_in)
            gw = cols.t() @ grad_out  # (K*C_in, C_out)
            grad_w = _grad_like(gw.view(kk, c_in, c_out), weight)
        return grad_f, grad_w, None


@dataclass
class RulebookPairs:
    """Active (output, input) site pairs of a submanifold rulebook, one list per non-centre kernel offset:
    ``out_idx[m]`` and ``in_idx[m]`` (P_m,) long are the rows of the sites paired by offset
    ``offsets[m]`` (row-major index into the k*k kernel), output rows ascending.  ``n_pairs`` counts all
    real pairs, the centre tap's N included."""

    out_idx: list[torch.Tensor]
    in_idx: list[torch.Tensor]
    offsets: list[int]
    n_pairs: int


def rulebook_pairs(nbr: torch.Tensor) -> RulebookPairs:
    """Turn a neighbour table (N, K) into :class:`RulebookPairs` (the classic gather-GEMM-scatter
    rulebook): for every offset but the centre, the sites whose neighbour there is active."""
    n, kk = nbr.shape
    offsets = [j for j in range(kk) if j != kk // 2]
    out_idx, in_idx = [], []
    for j in offsets:
        rows = (nbr[:, j] < n).nonzero()[:, 0]  # output sites with an active neighbour at offset j
        out_idx.append(rows)
        in_idx.append(nbr[rows, j])  # that neighbour's row
    n_pairs = n + sum(int(r.numel()) for r in out_idx)
    return RulebookPairs(out_idx, in_idx, offsets, n_pairs)


def _weight_by_offset(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, kh, kw) -> (K, C_in, C_out), offsets row-major.  Free for SubMConv2d's weights (stored
    offset-major, see there); otherwise a 2-D transpose then a row shuffle, about 3x faster on CPU than one
    3-D permute copy (which dominated small layers)."""
    c_out, c_in, kh, kw = weight.shape
    kk = kh * kw
    v = weight.permute(2, 3, 1, 0)
    if v.is_contiguous():
        return v.view(kk, c_in, c_out)
    w = weight.contiguous().view(c_out, c_in * kk).t().contiguous()  # (C_in*K, C_out)
    return w.view(c_in, kk, c_out).transpose(0, 1).contiguous()  # (K, C_in, C_out)


def _weight_from_offset(w_all: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Inverse of :func:`_weight_by_offset`: (K, C_in, C_out) -> contiguous (C_out, C_in, kh, kw)."""
    kk, c_in, c_out = w_all.shape
    w = w_all.transpose(0, 1).contiguous().view(c_in * kk, c_out)  # (C_in*K, C_out)
    return w.t().contiguous().view(c_out, c_in, kh, kw)


def _grad_like(gw: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gradient (K, C_in, C_out) returned in the memory layout of ``weight`` (so autograd keeps it as is)."""
    c_out, c_in, kh, kw = weight.shape
    if weight.permute(2, 3, 1, 0).is_contiguous():
        return gw.view(kh, kw, c_in, c_out).permute(3, 2, 0, 1)
    return _weight_from_offset(gw, kh, kw)


def offset_major(weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` (C_out, C_in, kh, kw) with the same shape and values, stored offset-major
    (kh, kw, C_in, C_out) in memory: the storage :class:`SubMConv2d` uses so the rulebook reads each
    offset's (C_in, C_out) matrix without copying."""
    return weight.detach().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


class _StandardLayout(torch.autograd.Function):
    """Identity on values; returns a contiguous (C_out, C_in, kh, kw) copy of an offset-major weight for
    oneDNN's conv2d (the dense plan), and converts the gradient back with the fast 2-step copies."""

    @staticmethod
    def forward(ctx, weight):
        kh, kw = weight.shape[2:]
        return _weight_from_offset(_weight_by_offset(weight), kh, kw)

    @staticmethod
    def backward(ctx, grad):
        c_out, c_in, kh, kw = grad.shape
        return _weight_by_offset(grad.contiguous()).view(kh, kw, c_in, c_out).permute(3, 2, 0, 1)


class _SubmConvPairsFunction(torch.autograd.Function):
    """Rulebook convolution over the active pairs only (the real rulebook size, best at low density):
    the centre tap as one matmul, then per kernel offset gather -> matmul by that offset's (C_in, C_out)
    weight -> index_add into the output rows.  One offset at a time, not all offsets padded into one
    ``bmm``: each offset's buffers then stay in the CPU's cache, and the layer took 0.39 to 1.03 of the
    batched version's time (one thread, 64 -> 128 and chapter 6's widths; same sums in the same order,
    up to the GEMM library's rounding for another row count; Performance page)."""

    @staticmethod
    def forward(ctx, features, weight, holder):
        rb: RulebookPairs = holder.pairs
        kh, kw = weight.shape[2:]
        w_all = _weight_by_offset(weight)  # (K, C_in, C_out): a view for SubMConv2d's weights
        out = features @ w_all[(kh * kw) // 2]  # centre tap: every site with itself
        for j, rows_out, rows_in in zip(rb.offsets, rb.out_idx, rb.in_idx):
            out.index_add_(0, rows_out, features.index_select(0, rows_in) @ w_all[j])
        ctx.save_for_backward(features, w_all)
        ctx.rb = rb
        ctx.kernel = (kh, kw)
        # layout only
        ctx.weight_ref = torch.empty_strided(weight.shape, weight.stride(), device="meta")
        return out

    @staticmethod
    def backward(ctx, grad_out):
        features, w_all = ctx.saved_tensors
        rb: RulebookPairs = ctx.rb
        kh, kw = ctx.kernel
        centre = (kh * kw) // 2
        grad_out = grad_out.contiguous()
        need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_f = grad_out @ w_all[centre].t() if need_f else None
        gw = None
        if need_w:
            gw = features.new_empty(w_all.shape)  # offset-major (K, C_in, C_out)
            torch.mm(features.t(), grad_out, out=gw[centre])
        for j, rows_out, rows_in in zip(rb.offsets, rb.out_idx, rb.in_idx):
            g = grad_out.index_select(0, rows_out)  # (P_j, C_out)
            if need_f:  # the mirrored pairs: each input site collects from the outputs it fed
                grad_f.index_add_(0, rows_in, g @ w_all[j].t())
            if need_w:  # an offset without pairs gets zeros (an empty inner dimension)
                torch.mm(features.index_select(0, rows_in).t(), g, out=gw[j])
        grad_w = _grad_like(gw, ctx.weight_ref) if need_w else None  # in the weight's layout
        return grad_f, grad_w, None


class _Pairs:
    # plain holder so autograd.Function.apply does not treat the rulebook as a tensor argument
    def __init__(self, pairs):
        self.pairs = pairs


# ---------------------------------------------------------------------------------------------
# Block-sparse plan: dense convolution on the active tiles (SBNet, Ren et al. 2018)
# ---------------------------------------------------------------------------------------------
#: Output tile sides the block-sparse plan considers (a tile is clipped to the map, so a side larger than
#: the map means whole images); :func:`tile_plan` with ``tile=None`` takes the cheapest by
#: :func:`_tile_cost`.
TILE_SIZES = (4, 8, 16)


@dataclass
class TilePlan:
    """Active tiles of a block-sparse submanifold convolution (SBNet, Ren et al. 2018; Chapter 6).

    The map is cut into ``tile`` = (th, tw) output tiles; ``n_tiles`` of them hold an active site.  Each is
    gathered with a ``halo`` of k//2 cells on every side: ``cells`` (n_tiles * (th+2r) * (tw+2r),) long
    holds, row-major per tile, the index of the site at each cell, or N where the cell is inactive or off
    the map (a zero row).  ``site_pos`` (N,) long is each site's row in the (n_tiles * th * tw) output
    cells.  ``fill`` = active sites / output cells of the active tiles."""

    tile: tuple[int, int]
    halo: int
    n_tiles: int
    cells: torch.Tensor
    site_pos: torch.Tensor

    @property
    def covered(self) -> int:
        """Output cells the dense convolution computes: n_tiles * th * tw."""
        return self.n_tiles * self.tile[0] * self.tile[1]

    @property
    def fill(self) -> float:
        """Share of the computed output cells that are active sites."""
        return self.site_pos.numel() / self.covered if self.covered else 0.0


def _tile_sides(tile: int, spatial_shape: Sequence[int]) -> tuple[int, int]:
    return min(int(tile), int(spatial_shape[0])), min(int(tile), int(spatial_shape[1]))


def _tile_keys(coords: torch.Tensor, spatial_shape: Sequence[int], th: int, tw: int):
    # linear key (batch, tile row, tile column) of every site's tile, and the tile grid's (rows, cols)
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    nty, ntx = -(-h // th), -(-w // tw)
    ty = torch.div(coords[:, 1], th, rounding_mode="floor")
    tx = torch.div(coords[:, 2], tw, rounding_mode="floor")
    return (coords[:, 0] * nty + ty) * ntx + tx, nty, ntx


def _tile_cost(n_tiles: int, th: int, tw: int, r: int, gather: float | None = None) -> float:
    # relative cost of the block-sparse plan: the dense convolution over the tiles' output cells, plus the
    # gather of the input tiles with their halo and the scatter back (``gather`` per gathered cell,
    # TILE_GATHER_COST at the reference channels)
    gather = TILE_GATHER_COST if gather is None else gather
    return n_tiles * (th * tw + gather * (th + 2 * r) * (tw + 2 * r))


@dataclass(frozen=True)
class TileCount:
    """How many ``tile`` = (th, tw) output tiles hold an active site (``n_tiles``), with the ``halo``
    k//2: what :func:`plan_costs` needs of a block-sparse plan, without building its gather tables."""

    tile: tuple[int, int]
    halo: int
    n_tiles: int


def _count_tiles(coords: torch.Tensor, spatial_shape: Sequence[int], batch_size: int, th: int, tw: int) -> int:
    # distinct tiles holding a site: an occupancy grid over the tiles (no sort, unlike torch.unique)
    key, nty, ntx = _tile_keys(coords, spatial_shape, th, tw)
    occupied = torch.zeros(max(int(batch_size), 1) * nty * ntx, dtype=torch.bool, device=coords.device)
    occupied[key] = True
    return int(occupied.sum())


def tile_count(coords: torch.Tensor, spatial_shape: Sequence[int], batch_size: int,
               kernel_size: int = 3) -> TileCount:
    """The tile side :func:`tile_plan` picks for these sites (the one of :data:`TILE_SIZES` of least
    estimated cost) and its number of active tiles (Chapter 6's planner, :func:`choose_strategy`)."""
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"nbsupport.sparse.tile_count: 'kernel_size' must be a positive odd integer, got {kernel_size!r}")
    coords = coords.long()
    n, r = coords.shape[0], k // 2
    costs = []
    for t in TILE_SIZES:
        th, tw = _tile_sides(t, spatial_shape)
        m = _count_tiles(coords, spatial_shape, batch_size, th, tw) if n else 0
        costs.append((_tile_cost(m, th, tw, r), -t, t, m))
    _, _, t, m = min(costs)
    return TileCount(_tile_sides(t, spatial_shape), r, m)


def tile_plan(coords: torch.Tensor, spatial_shape: Sequence[int], batch_size: int, kernel_size: int = 3,
              tile: int | None = None) -> TilePlan:
    """The block-sparse plan of a submanifold convolution (SBNet, Ren et al. 2018; Chapter 6): which
    ``tile`` x ``tile`` output tiles (clipped to the map) hold active sites, and for each, the sites of its
    input tile with a k//2 halo.  ``tile=None``: the side in :data:`TILE_SIZES` of least estimated cost
    (the tiles' area with their halo).  Sites are (batch, y, x) rows of ``coords``."""
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"nbsupport.sparse.tile_plan: 'kernel_size' must be a positive odd integer, got {kernel_size!r}")
    coords = coords.long()
    n, r = coords.shape[0], k // 2
    if tile is None:
        tile = max(tile_count(coords, spatial_shape, batch_size, k).tile)  # the sides, clipped alike
    if int(tile) < 1:
        raise ValueError(f"nbsupport.sparse.tile_plan: 'tile' must be >= 1, got {tile!r}")
    th, tw = _tile_sides(tile, spatial_shape)
    dev = coords.device
    key, nty, ntx = _tile_keys(coords, spatial_shape, th, tw)
    tiles, inv = torch.unique(key, return_inverse=True)  # sorted: tiles in (batch, row, col) order
    m = tiles.numel()
    # padded index grid covering whole tiles plus the halo; every cell not holding a site points to row N
    hg, wg = nty * th + 2 * r, ntx * tw + 2 * r
    grid = torch.full((int(batch_size) * hg * wg,), n, dtype=torch.long, device=dev)
    grid[(coords[:, 0] * hg + coords[:, 1] + r) * wg + coords[:, 2] + r] = torch.arange(n, device=dev)
    tb = torch.div(tiles, nty * ntx, rounding_mode="floor")
    rem = tiles - tb * nty * ntx
    ty, tx = torch.div(rem, ntx, rounding_mode="floor"), rem % ntx
    base = (tb * hg + ty * th) * wg + tx * tw  # the input tile's top-left cell in the padded grid
    oy, ox = torch.arange(th + 2 * r, device=dev), torch.arange(tw + 2 * r, device=dev)
    cells = grid[base[:, None] + (oy[:, None] * wg + ox[None, :]).reshape(1, -1)].reshape(-1)
    site_pos = (inv * th + coords[:, 1] - ty[inv] * th) * tw + coords[:, 2] - tx[inv] * tw
    return TilePlan((th, tw), r, m, cells, site_pos)


def _subm_conv_tiles(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     plan: TilePlan) -> torch.Tensor:
    """Block-sparse submanifold convolution: gather the active input tiles (halo included, zeros at inactive
    cells) as a batch of small dense maps, oneDNN's conv2d without padding, read back the active sites.
    Built from differentiable gathers, so autograd's backward is exact (halo copies add up their
    gradients)."""
    n, c_in = features.shape
    (th, tw), r = plan.tile, plan.halo
    fpad = torch.cat([features, features.new_zeros(1, c_in)], 0)  # (N+1, C_in), row N = zeros
    x = fpad.index_select(0, plan.cells).view(plan.n_tiles, th + 2 * r, tw + 2 * r, c_in)
    x = x.permute(0, 3, 1, 2)  # (M, C_in, th+2r, tw+2r), channels-last memory
    if not weight.is_contiguous() and weight.permute(2, 3, 1, 0).is_contiguous():
        weight = _StandardLayout.apply(weight)  # offset-major storage -> oneDNN's layout, fast copy
    y = F.conv2d(x, weight, bias)  # (M, C_out, th, tw)
    return y.permute(0, 2, 3, 1).reshape(-1, weight.shape[0]).index_select(0, plan.site_pos)  # (N, C_out)


#: Relative costs of the CPU plans, in units of one output cell of oneDNN's dense 3x3 convolution (forward +
#: backward), fitted on one thread at the first face block's shapes (64 -> 128 channels at 24x24, batch
#: 32) on random and compact masks to a run of ``benchmarks/layer_anatomy.py`` ("planner"): the "pairs"
#: plan pays PAIRS_COST per active (site, neighbour) pair divided by k*k (its per-offset GEMMs with inner
#: size C_in run below oneDNN's rate), "im2col" IM2COL_COST per site (one GEMM over all k*k offsets, zero
#: rows included), "tiles" one per output cell of its active tiles plus TILE_GATHER_COST per gathered input
#: cell (its halo), "dense" one per cell of the grid.  The committed run measured, at densities 0.2 to
#: 0.7, 1.59 to 1.91 per pair / 9, 1.47 to 2.06 per im2col site and 1.10 to 1.24 per tile cell (4x4 and
#: 8x8 tiles).  :func:`plan_costs` applies them.
PAIRS_COST = 1.75
IM2COL_COST = 1.8
TILE_GATHER_COST = 0.1
#: The constants above hold at REFERENCE_CHANNELS (C_in, C_out) = (64, 128).  With fewer channels a dense
#: cell costs fewer MACs (C_in C_out per tap) while the plans' gathers and scatters move C_in + C_out
#: numbers per row, so each plan's overhead grows like 1/C_in + 1/C_out: PAIRS_FEW_CHANNELS,
#: IM2COL_FEW_CHANNELS and TILE_GATHER_FEW_CHANNELS times (1/C_in + 1/C_out minus its value at the
#: reference, never below 0: wider layers keep the reference's constants) are added to PAIRS_COST,
#: IM2COL_COST and TILE_GATHER_COST, fitted to the same measurement at chapter 6's widths (8 -> 16 at
#: 48x48, 16 -> 32 at 24x24, 32 -> 64 at 12x12, 56 frames), where the committed run measured a pair at
#: 3.9 to 4.5, 2.6 to 3.7 and 1.8 to 3.1 dense taps (densities 0.2 to 0.7).
REFERENCE_CHANNELS = (64, 128)
PAIRS_FEW_CHANNELS = 14.0
IM2COL_FEW_CHANNELS = 5.5
TILE_GATHER_FEW_CHANNELS = 3.0


def _few_channels(channels: tuple[int, int] | None) -> float:
    # 1/C_in + 1/C_out above its value at the reference channels; 0 for None (the reference itself) and
    # for wider layers, which keep the reference's constants (the fit did not go beyond 64 -> 128)
    if channels is None:
        return 0.0
    ref = 1.0 / REFERENCE_CHANNELS[0] + 1.0 / REFERENCE_CHANNELS[1]
    return max(0.0, 1.0 / int(channels[0]) + 1.0 / int(channels[1]) - ref)


def _check_weight(weight: torch.Tensor, c_in: int) -> None:
    if weight.dim() != 4 or weight.shape[1] != c_in or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"nbsupport.sparse.subm_conv2d: 'weight' must be (C_out, C_in={c_in}, k, k) with odd k "
                         f"(PyTorch's dense layout), got {tuple(weight.shape)}")


def subm_conv2d(features: torch.Tensor, coords: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                *, spatial_shape: Sequence[int] | None = None, batch_size: int | None = None,
                neighbours: torch.Tensor | None = None, strategy: str = "auto",
                pairs: "RulebookPairs | None" = None, tiles: "TilePlan | None" = None) -> torch.Tensor:
    """Submanifold sparse convolution (Graham & van der Maaten 2017; MESM's sparse blocks, Chapter 6).

    ``features`` (N, C_in) at ``coords`` (N, 3) integer (batch, y, x); ``weight`` (C_out, C_in, k, k) in
    PyTorch's dense layout, k odd -> (N, C_out) at the same sites.  Equals dense
    ``conv2d(padding=k//2)`` of the zero-filled map, read at the active sites.  ``spatial_shape`` and
    ``batch_size`` default to the coordinates' bounding box (the result does not depend on them);
    pass ``neighbours`` (from :func:`neighbour_table`) to reuse a rulebook.  Differentiable.

    ``strategy`` (how the CPU executes it; the result is the same): "pairs" (per offset, gather ->
    matmul -> index_add over the active pairs only: the real rulebook size, best at low density),
    "im2col" (one gather to (N, k*k*C_in) + one matmul; missing neighbours read a zero row), "dense"
    (conv2d on the zero-filled map, read at the sites; needs ``spatial_shape``/``batch_size``), "tiles"
    (block-sparse, SBNet: conv2d on the active tiles only, :func:`tile_plan`; pass ``tiles`` to reuse a
    plan) or "auto" (:func:`choose_strategy`).
    """
    if features.dim() != 2:
        raise ValueError(f"nbsupport.sparse.subm_conv2d: 'features' must be (N, C_in), got {tuple(features.shape)}")
    _check_weight(weight, features.shape[1])
    if coords.dim() != 2 or coords.shape != (features.shape[0], 3):
        raise ValueError(f"nbsupport.sparse.subm_conv2d: 'coords' must be (N={features.shape[0]}, 3), "
                         f"got {tuple(coords.shape)}")
    k = weight.shape[2]
    if neighbours is None:
        if features.shape[0] == 0:
            spatial_shape, batch_size = (1, 1), 1
        if spatial_shape is None:
            spatial_shape = (int(coords[:, 1].max()) + 1, int(coords[:, 2].max()) + 1)
        if batch_size is None:
            batch_size = int(coords[:, 0].max()) + 1
        neighbours = neighbour_table(coords, spatial_shape, batch_size, k)
    if strategy not in ("auto", "im2col", "pairs", "dense", "tiles"):
        raise ValueError(f"nbsupport.sparse.subm_conv2d: 'strategy' must be auto/im2col/pairs/dense/tiles, "
                         f"got {strategy!r}")
    n = features.shape[0]
    if strategy == "auto":
        if tiles is None and n > 0 and spatial_shape is not None and batch_size is not None:
            tiles = tile_plan(coords, spatial_shape, batch_size, k)
        strategy = choose_strategy(neighbours, spatial_shape, batch_size, tiles=tiles,
                                   channels=(features.shape[1], weight.shape[0]))
    if strategy == "tiles" and n > 0:
        if tiles is None:
            if spatial_shape is None or batch_size is None:
                raise ValueError("nbsupport.sparse.subm_conv2d: strategy 'tiles' needs 'spatial_shape' and "
                                 "'batch_size'")
            tiles = tile_plan(coords, spatial_shape, batch_size, k)
        return _subm_conv_tiles(features, weight, bias, tiles)
    if strategy == "dense" and n > 0:
        if spatial_shape is None or batch_size is None:
            raise ValueError("nbsupport.sparse.subm_conv2d: strategy 'dense' needs 'spatial_shape' and 'batch_size'")
        h, w = int(spatial_shape[0]), int(spatial_shape[1])
        grid = to_dense(features, coords, (batch_size, h, w))  # (B, C_in, H, W), channels-last memory
        if not weight.is_contiguous() and weight.permute(2, 3, 1, 0).is_contiguous():
            weight = _StandardLayout.apply(weight)  # offset-major storage -> oneDNN's layout, fast copy
        out_map = F.conv2d(grid, weight, bias, padding=k // 2)  # (B, C_out, H, W)
        lin = (coords[:, 0].long() * h + coords[:, 1]) * w + coords[:, 2]
        return out_map.permute(0, 2, 3, 1).reshape(-1, weight.shape[0]).index_select(0, lin)  # (N, C_out)
    if strategy == "pairs" and n > 0:
        if pairs is None:
            pairs = rulebook_pairs(neighbours)
        out = _SubmConvPairsFunction.apply(features, weight, _Pairs(pairs))
    else:
        out = _SubmConvFunction.apply(features, weight, neighbours)
    if bias is not None:
        out = out + bias
    return out


def plan_costs(neighbours: torch.Tensor, spatial_shape: Sequence[int] | None = None,
               batch_size: int | None = None, tiles: "TilePlan | None" = None,
               channels: tuple[int, int] | None = None) -> dict[str, float]:
    """Estimated relative cost of each CPU plan of a submanifold convolution (Chapter 6), from its rulebook
    ``neighbours`` (N, k*k), the grid, a block-sparse :class:`TilePlan` and the layer's ``channels``
    (C_in, C_out; None: the reference 64 -> 128) (see :data:`PAIRS_COST`): "pairs" and "im2col" always,
    "dense" with a grid size, "tiles" with a tile plan."""
    n, kk = neighbours.shape
    pairs = float((neighbours < n).sum())
    few = _few_channels(channels)
    costs = {"pairs": (PAIRS_COST + PAIRS_FEW_CHANNELS * few) * pairs / kk,
             "im2col": (IM2COL_COST + IM2COL_FEW_CHANNELS * few) * n}
    if spatial_shape is not None and batch_size is not None:
        costs["dense"] = float(int(batch_size) * int(spatial_shape[0]) * int(spatial_shape[1]))
    if tiles is not None:  # a TilePlan or its TileCount
        gather = TILE_GATHER_COST + TILE_GATHER_FEW_CHANNELS * few
        costs["tiles"] = float(_tile_cost(tiles.n_tiles, *tiles.tile, tiles.halo, gather))
    return costs


def choose_strategy(neighbours: torch.Tensor, spatial_shape: Sequence[int] | None = None,
                    batch_size: int | None = None, tiles: "TilePlan | None" = None,
                    channels: tuple[int, int] | None = None) -> str:
    """CPU execution plan of a submanifold convolution (Chapter 6): the cheapest by :func:`plan_costs`.
    Scattered sites go to "pairs" (work in proportion to the active pairs), compact regions with full
    neighbourhoods to "im2col" or, when their tiles are well filled, "tiles" (block-sparse: oneDNN on the
    active tiles), a mostly active grid to "dense"; few channels favour the dense kernels.  Same result
    whichever runs.  Without a grid size the dense plan is not considered, without a tile plan the
    block-sparse one is not."""
    if neighbours.shape[0] == 0:
        return "pairs"
    costs = plan_costs(neighbours, spatial_shape, batch_size, tiles, channels)
    return min(costs, key=costs.get)


def _pool_pairs(coords: torch.Tensor, spatial_shape: Sequence[int], k: int, s: int):
    """(input index, output linear key, window rank) of every (active input, pooled site) pair."""
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    dev = coords.device
    a = torch.arange(k, device=dev)
    wa, wb = a.repeat_interleave(k), a.repeat(k)  # (k*k,) position of the input inside the window
    ny = coords[:, 1:2] - wa[None, :]  # (N, k*k): oy*s
    nx = coords[:, 2:3] - wb[None, :]
    ok = (ny >= 0) & (nx >= 0) & (ny % s == 0) & (nx % s == 0)
    oy, ox = torch.div(ny, s, rounding_mode="floor"), torch.div(nx, s, rounding_mode="floor")
    ok &= (oy < ho) & (ox < wo)
    inp, slot = ok.nonzero(as_tuple=True)
    key = (coords[inp, 0] * ho + oy[inp, slot]) * wo + ox[inp, slot]
    return inp, key, slot, (ho, wo)


#: At or above this share of active sites, the CPU max-pool runs as dense max_pool2d on the -inf-filled map.
DENSE_POOL_MIN_DENSITY = 0.5


def _max_pool_dense_plan(features, coords, spatial_shape, batch_size, k, s):
    # The documented identity, executed: dense max_pool2d of the map with -inf at inactive sites.
    b = int(batch_size) if batch_size is not None else int(coords[:, 0].max()) + 1
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    grid = to_dense(features, coords, (b, h, w), fill=-math.inf)  # (B, C, H, W) channels-last memory
    pooled = F.max_pool2d(grid, k, s)  # (B, C, Ho, Wo)
    occ = torch.zeros(b, h, w, dtype=features.dtype, device=features.device)
    occ[coords[:, 0], coords[:, 1], coords[:, 2]] = 1
    site = F.max_pool2d(occ[:, None], k, s)[:, 0] > 0  # (B, Ho, Wo) windows with an active input
    out_coords = site.nonzero()  # (M, 3) ordered by (b, y, x)
    return pooled.permute(0, 2, 3, 1)[site], out_coords


def _max_pool_windows(features, coords, spatial_shape, k):
    # Non-overlapping windows (stride = kernel, MESM's 2x2 pool): every active input lies in exactly one
    # window, so the inputs are copied into a (windows, k*k slots, C) buffer of -inf and reduced with
    # max(dim=1), whose backward sends the gradient to the first maximal slot (row-major in the window),
    # like dense max_pool2d; no scatter-max, no second pass for the arg-max.
    h, w = int(spatial_shape[0]), int(spatial_shape[1])
    ho, wo = h // k, w // k
    oy = torch.div(coords[:, 1], k, rounding_mode="floor")
    ox = torch.div(coords[:, 2], k, rounding_mode="floor")
    inside = (oy < ho) & (ox < wo)  # floor mode: the last row/column of an odd map pools into nothing
    if not bool(inside.all()):
        features, coords, oy, ox = features[inside], coords[inside], oy[inside], ox[inside]
    c = features.shape[1]
    if features.shape[0] == 0:
        return features.new_zeros(0, c), coords.new_zeros(0, 3)
    slot = (coords[:, 1] - oy * k) * k + (coords[:, 2] - ox * k)  # position in the window, row-major
    key = (coords[:, 0] * ho + oy) * wo + ox
    out_keys, inv = torch.unique(key, return_inverse=True)  # sorted keys -> (b, y, x) order
    m = out_keys.numel()
    buf = features.new_full((m * k * k, c), -math.inf).index_copy(0, inv * (k * k) + slot, features)
    out = buf.view(m, k * k, c).max(1).values  # (M, C)
    b = torch.div(out_keys, ho * wo, rounding_mode="floor")
    rem = out_keys - b * ho * wo
    return out, torch.stack([b, torch.div(rem, wo, rounding_mode="floor"), rem % wo], 1)


def sparse_max_pool2d(features: torch.Tensor, coords: torch.Tensor, kernel_size: int = 2, stride: int | None = None,
                      *, spatial_shape: Sequence[int] | None = None, batch_size: int | None = None,
                      strategy: str = "auto"):
    """Sparse max-pooling (MESM's 2x2 pool after each sparse block, Chapter 6).

    Returns ``(features (M, C), coords (M, 3))`` of the pooled sites: an output site exists where its
    window (no padding, floor mode) holds at least one active input, and its value is the max over the
    *active* inputs only.  This equals dense ``max_pool2d`` of the map with ``-inf`` at inactive sites,
    read at those output sites -- forward and backward (the gradient goes to the first maximal active
    input of the window in row-major order, like PyTorch's CPU kernel).  ``spatial_shape`` (H, W)
    defaults to the coordinates' bounding box; pass it to match a dense map's floor-mode border.
    Output sites are ordered by (batch, y, x).  ``strategy`` (CPU execution, same result): "sparse"
    (stride = kernel: a -inf-padded (windows, k*k, C) buffer reduced by ``max``; otherwise pairs of active
    inputs and pooled sites, scatter-max), "dense" (that -inf identity executed with
    ``max_pool2d``, faster when most sites are active) or "auto" (dense from
    :data:`DENSE_POOL_MIN_DENSITY` of ``batch_size * H * W`` on; needs ``batch_size``).
    """
    k = int(kernel_size)
    s = int(stride) if stride is not None else k
    if k < 1 or s < 1:
        raise ValueError(f"nbsupport.sparse.sparse_max_pool2d: 'kernel_size' and 'stride' must be >= 1, got {k}, {s}")
    if features.dim() != 2 or coords.shape != (features.shape[0], 3):
        raise ValueError(f"nbsupport.sparse.sparse_max_pool2d: need features (N, C) and coords (N, 3), got "
                         f"{tuple(features.shape)} and {tuple(coords.shape)}")
    coords = coords.long()
    c = features.shape[1]
    if features.shape[0] == 0:
        return features.new_zeros(0, c), coords.new_zeros(0, 3)
    if spatial_shape is None:
        spatial_shape = (int(coords[:, 1].max()) + 1, int(coords[:, 2].max()) + 1)
    if strategy not in ("auto", "sparse", "dense"):
        raise ValueError(f"nbsupport.sparse.sparse_max_pool2d: 'strategy' must be auto/sparse/dense, got {strategy!r}")
    if strategy == "auto":
        cells = (batch_size or 0) * int(spatial_shape[0]) * int(spatial_shape[1])
        strategy = "dense" if cells and features.shape[0] >= DENSE_POOL_MIN_DENSITY * cells else "sparse"
    if strategy == "dense":
        return _max_pool_dense_plan(features, coords, spatial_shape, batch_size, k, s)
    if k == s:
        return _max_pool_windows(features, coords, spatial_shape, k)
    inp, key, slot, (ho, wo) = _pool_pairs(coords, spatial_shape, k, s)
    out_keys, pair_out = torch.unique(key, return_inverse=True)  # sorted keys -> (b, y, x) order
    m = out_keys.numel()
    with torch.no_grad():
        vals = features[inp]  # (P, C)
        idx = pair_out[:, None].expand(-1, c)
        vmax = features.new_full((m, c), -math.inf).scatter_reduce(0, idx, vals, "amax", include_self=True)
        # first maximal input in window (row-major rank), like dense max_pool2d
        rank = torch.where(vals == vmax[pair_out], slot[:, None].expand(-1, c), torch.full_like(idx, k * k))
        best = torch.full((m, c), k * k, dtype=torch.long, device=features.device).scatter_reduce(
            0, idx, rank, "amin", include_self=True)
        win = (rank == best[pair_out])  # (P, C) exactly one True per (output, channel)
        arg = torch.zeros((m, c), dtype=torch.long, device=features.device)
        pi, ci = win.nonzero(as_tuple=True)
        arg[pair_out[pi], ci] = inp[pi]
    out = torch.gather(features, 0, arg)  # (M, C), gradient flows to the argmax only
    b = torch.div(out_keys, ho * wo, rounding_mode="floor")
    rem = out_keys - b * ho * wo
    out_coords = torch.stack([b, torch.div(rem, wo, rounding_mode="floor"), rem % wo], 1)
    return out, out_coords
