"""Top-p (nucleus) site selection of MESM (Dai et al. 2021, Sec. 3.3; Chapter 6).

The one implementation of top-p in the book: :func:`top_p_mask` on dense rows, and its ragged twin
:func:`top_p_mask_segments` (sites of several frames packed together), which lays the sites out in
rows and calls :func:`top_p_mask`.
"""
from __future__ import annotations

import torch

__all__ = ["top_p_mask", "top_p_mask_segments"]

# ---------------------------------------------------------------------------------------------
# Top-p (nucleus) site selection
# ---------------------------------------------------------------------------------------------
# Mass within this (relative) distance of p counts as reaching p: float32 attention weights summing
# to "0.7" are often 0.69999999, which must not pull in one more site.
_TOP_P_TOL = 1e-6


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < float(p) <= 1.0):
        raise ValueError(f"nbsupport.sparse.top_p_mask: parameter 'p' must be a number in (0, 1], got {p!r}")
    return float(p)


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus selection of MESM (Dai et al. 2021, Sec. 3.3): per row, the smallest set of
    highest-probability entries whose mass reaches ``p``.

    ``probs`` (..., S) is a distribution over the last dimension (rows need not be exactly
    normalised: the threshold is ``p`` times the row's total).  Returns a bool mask of the same
    shape. An entry is kept when the mass of the entries ranked strictly above it is below
    ``p * total``, which keeps exactly the smallest prefix of the sorted row whose mass reaches the
    threshold (ties broken by sort order; mass within 1e-6 of ``p`` counts as reaching it, so
    float32 rounding does not add a site).  ``p = 1.0`` keeps every entry, zeros included, without
    relying on floating-point sums.  A row of all zeros keeps nothing for ``p < 1``.  Used in
    Chapter 6.
    """
    p = _check_p(p)
    if not torch.is_tensor(probs) or not probs.is_floating_point():
        raise TypeError("nbsupport.sparse.top_p_mask: 'probs' must be a floating-point tensor")
    if probs.dim() == 0:
        raise ValueError("nbsupport.sparse.top_p_mask: 'probs' needs at least one dimension "
                         "(sites)")
    if p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, order = torch.sort(probs.detach(), dim=-1, descending=True)  # (..., S)
    cum = torch.cumsum(sorted_p, dim=-1)  # in the input's precision, like the per-sample loop
    # mass ranked strictly above
    before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1)
    keep_sorted = before < (p - _TOP_P_TOL) * cum[..., -1:]
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def top_p_mask_segments(probs: torch.Tensor, segment_ids: torch.Tensor, p: float) -> torch.Tensor:
    """Ragged :func:`top_p_mask`: ``probs`` (N,) of sites of several frames packed together,
    ``segment_ids`` (N,) integer frame index of each site; the nucleus is chosen per segment.

    For sites that are already sparse, where frames keep different numbers of them: the extractor of
    ``benchmarks/sparse_vs_dense.py`` selects each block's nucleus this way (Chapter 6's MESM model
    applies :func:`top_p_mask` to dense maps).  Vectorised: sites are laid out in a zero-padded
    (segments, longest segment) matrix (a stable integer sort by segment only if they are not already
    grouped) and :func:`top_p_mask` runs once on it, so both functions share one definition; padding (probability 0) is never kept
    for ``p < 1``.  Each segment's probabilities should sum to 1 (the threshold is ``p`` times the
    segment's total).  ``p = 1.0`` keeps every site.
    """
    p = _check_p(p)
    if probs.dim() != 1 or segment_ids.shape != probs.shape:
        raise ValueError(f"nbsupport.sparse.top_p_mask_segments: 'probs' and 'segment_ids' must be 1-D of "
                         f"the same length, got {tuple(probs.shape)} and {tuple(segment_ids.shape)}")
    if segment_ids.is_floating_point():
        raise TypeError("nbsupport.sparse.top_p_mask_segments: 'segment_ids' must be an integer tensor")
    n = probs.numel()
    if p >= 1.0 or n == 0:
        return torch.ones(n, dtype=torch.bool, device=probs.device)
    seg = segment_ids.long()
    grouped = bool((seg[1:] >= seg[:-1]).all())
    order = None if grouped else torch.argsort(seg, stable=True)
    seg_s = seg if grouped else seg[order]
    pr = probs.detach() if grouped else probs.detach()[order]
    _, run, counts = torch.unique_consecutive(seg_s, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=probs.device) - starts[run]  # position inside its segment
    mat = pr.new_zeros(counts.numel(), int(counts.max()))  # (segments, longest) zero-padded
    mat[run, pos] = pr
    keep = top_p_mask(mat, p)[run, pos]
    if grouped:
        return keep
    return torch.empty_like(keep).index_put_((order,), keep)
