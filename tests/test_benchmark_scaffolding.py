"""The benchmarks' peaked-attention scaffolding (benchmarks/common.py) reaches the model's scores.

An untrained attention is nearly uniform, so the Performance page's MESM extractor rows add a peaked
log-prior to every site's score through hooks; when the model stopped calling the hooked layer (the
fused site scores of #30), the benchmark silently timed top-p on a uniform map (about two thirds of the
sites kept, scattered) under the name "attention-shaped". These tests pin the densities to the prior."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py, not a package)

from nbsupport.models import mesm  # noqa: E402

SIZES = dict(stem_channels=8, block_channels=[8, 16, 16], dim=16, layers=1, heads=2)


def _kept(kind, top_p=0.7, n=4, h=16, w=16):
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(n, 8, h, w, generator=g))
    query = torch.randn(n, 24, generator=g)
    torch.manual_seed(0)
    path = mesm.VisualPathway(24, mesm.MesmConfig(attention=True, sparse=True, top_p=top_p, **SIZES))
    peaked = None
    if kind is not None:
        peaked = common.PeakedAttention(path, common.site_prior(kind, n, h, w, 0.25, g))
    with torch.no_grad():
        path.extract(x, query)
    return [float(r.kept.sum()) / r.kept.numel() for r in path.records], path, peaked


def test_the_prior_reaches_every_blocks_scores_and_concentrates_top_p():
    uniform, _, _ = _kept(None)
    peaked_d, path, peaked = _kept("attention")
    assert peaked.calls == len(path.cross_attention) == 3
    peaked.check()
    # top-p of a nearly uniform map keeps about p of the sites; of one blob per frame, far fewer
    assert uniform[0] > 0.55
    assert peaked_d[0] < 0.5 * uniform[0]


def test_kept_sites_of_the_blob_prior_form_one_region_per_frame():
    """Compact regions: the kept sites' spread is well below a uniform spread over the 16x16 grid
    (std 16/sqrt(12) = 4.6 per axis), which is what the scattered ("random") prior and no prior give."""
    for kind, compact in (("attention", True), ("random", False), (None, False)):
        _, path, _ = _kept(kind)
        keep = path.records[0].kept  # (N, H, W) of the first block
        for f in range(keep.shape[0]):
            ys, xs = keep[f].nonzero(as_tuple=True)
            spread = max(float(ys.float().std()), float(xs.float().std()))
            assert (spread < 3.2) == compact, (kind, f, spread)


def test_check_refuses_a_prior_that_never_fired():
    path = mesm.VisualPathway(24, mesm.MesmConfig(attention=True, sparse=True, top_p=0.7, **SIZES))
    peaked = common.PeakedAttention(path, torch.zeros(2, 16, 16))
    with pytest.raises(RuntimeError, match="no attention score got the prior"):
        peaked.check()
