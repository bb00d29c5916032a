"""MESM's first-block site order, checked with SparseConvNet itself (Chapter 6, "What the authors'
block-1 bug costs").

Usage::

    PYTHONPATH=/opt/scn:. python benchmarks/scn_site_order.py --out benchmarks/results/scn_site_order.json

The authors' ``sparse_e2e.py`` builds SparseConvNet's input of block 1 from ``locations =
attn.permute(1, 2, 0).nonzero()`` (sites sorted by y, x, frame) and ``features = x[bs, :, y, x]`` with ``bs,
y, x = attn.nonzero(as_tuple=True)`` (sorted by frame, y, x). This script feeds exactly those two lists to
SparseConvNet's ``InputLayer`` (and, for comparison, the sites in the features' own order), reads the
sparse tensor back on a dense grid, and compares it with the book's
:func:`nbsupport.models.mesm.reference_site_order` and with the features on their own sites. It records
how many kept sites hold another site's features, at MESM's first face block (24 x 24 grid, 64
channels) and mel block (64 x 16), top-p 0.7 of random attention maps. Without ``sparseconvnet``
importable it records that the peer is absent (how to build it: ``book/performance.md``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nbsupport.base import atomic_write_json
from nbsupport.models import mesm
from nbsupport.sparse import to_sparse, top_p_mask

try:  # the peer is optional: nothing in the book depends on it
    import sparseconvnet as scn
except ImportError:  # pragma: no cover - depends on the machine
    scn = None


def scn_dense(locations: torch.Tensor, features: torch.Tensor, frames: int, hw) -> torch.Tensor:
    """SparseConvNet's InputLayer (locations (N, 3) = y, x, frame; row i <- features row i), back on a
    dense (frames, C, H, W) grid through ``SparseToDense``."""
    layer = scn.InputLayer(2, torch.LongTensor(list(hw)))
    # .contiguous(): today's CPU nonzero() returns a column-major (N, 3) tensor that SparseConvNet misreads;
    # the authors' PyTorch 1.6 returned it row-major, which is what this models
    t = layer([locations.cpu().contiguous(), features.cpu().contiguous(), frames])
    return scn.SparseToDense(2, features.shape[1])(t)


def check(frames: int, channels: int, hw, top_p: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, channels, *hw, generator=g)
    weights = torch.softmax(torch.randn(frames, hw[0] * hw[1], generator=g) * 2, -1)
    attn = weights * top_p_mask(weights, top_p)  # the kept sites keep their weight, the rest 0
    attn = attn.view(frames, *hw)
    # the reference's two lists, written as its code writes them
    locations = attn.permute(1, 2, 0).nonzero()
    bs, y, xx = attn.nonzero(as_tuple=True)
    features = x[bs, :, y, xx]
    peer_bug = scn_dense(locations, features, frames, hw)
    own = torch.stack([y, xx, bs], 1)  # the same features on their own sites
    peer_fixed = scn_dense(own, features, frames, hw)
    keep = attn > 0
    book_bug = mesm.reference_site_order(to_sparse(x, keep)).dense()
    book_fixed = to_sparse(x, keep).dense()
    moved = ((peer_bug - book_fixed).abs().amax(1) > 0) & keep
    return {"grid": list(hw), "frames": frames, "channels": channels, "top_p": top_p, "kept_sites": int(keep.sum()),
            "sites_with_another_sites_features": int(moved.sum()),
            "max_abs_diff_scn_bug_vs_book_reference_site_order": float((peer_bug - book_bug).abs().max()),
            "max_abs_diff_scn_own_sites_vs_book_matched": float((peer_fixed - book_fixed).abs().max())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/scn_site_order.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if scn is None:
        result = {"peer": "absent: sparseconvnet is not importable (build it from source, see book/performance.md)"}
    else:
        result = {"peer": "sparseconvnet (built from source, CPU)",
                  "faces_block1": check(8, 64, (24, 24), 0.7, args.seed),
                  "mel_block1": check(8, 64, (64, 16), 0.7, args.seed + 1)}
    atomic_write_json(Path(args.out), result)
    print(result)
    return result


if __name__ == "__main__":
    main()
