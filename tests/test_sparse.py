"""nbsupport.sparse against independent references: dense conv2d / max_pool2d and a per-sample loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from nbsupport import sparse as sp
from nbsupport.sparse import backends

torch.set_num_threads(1)


# An independent reference for top_p_mask: a per-sample loop in the style of MESM's original
# to_sparse_by_cdf (sort, cumsum, keep entries until the mass reaches p).
def top_p_mask_loop(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample Python loop in the style of MESM's original ``to_sparse_by_cdf`` (for the
    benchmark and as an independent test reference): sort, cumsum, keep entries until the mass
    reaches ``p`` (the first entry reaching it included).  ``probs`` (B, S)."""
    out = torch.zeros_like(probs, dtype=torch.bool)
    for i in range(probs.shape[0]):
        sp, idx = torch.sort(probs[i], descending=True)
        cum = torch.cumsum(sp, 0)
        m = cum < (p - 1e-6) * float(cum[-1])
        k = min(int(m.sum()), probs.shape[1] - 1)
        m[k] = True
        if p >= 1.0:
            m[:] = True
        out[i, idx[m]] = True
    return out


def _random_case(seed, b, h, w, c, density):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, w, generator=g) < density  # rand < 1: density 1.0 keeps every site
    dense = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    return g, mask, dense


CONV_CASES = [  # seed, batch, H, W, C_in, C_out, density, kernel
    (0, 2, 7, 9, 3, 5, 0.05, 3),
    (1, 3, 12, 12, 4, 8, 0.2, 3),
    (2, 2, 6, 11, 8, 3, 0.5, 3),
    (3, 4, 5, 5, 16, 16, 0.8, 3),
    (4, 2, 9, 7, 5, 6, 1.0, 3),
    (5, 3, 10, 8, 2, 4, 0.4, 5),
    (6, 2, 8, 8, 3, 2, 0.3, 1),
]


@pytest.mark.parametrize("seed,b,h,w,cin,cout,density,k", CONV_CASES)
@pytest.mark.parametrize("method,strategy", [("grid", "pairs"), ("search", "pairs"), ("grid", "im2col"),
                                             ("search", "dense"), ("grid", "tiles"), ("grid", "auto")])
def test_subm_conv2d_matches_dense_forward_and_backward(seed, b, h, w, cin, cout, density, k, method, strategy):
    g, mask, dense = _random_case(seed, b, h, w, cin, density)
    dense = dense * mask[:, None]  # inactive sites are zeros
    weight = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    x = sp.to_sparse(dense, mask)
    feats = x.features.clone().requires_grad_(True)
    wt = weight.clone().requires_grad_(True)
    bs = bias.clone().requires_grad_(True)
    nbr = sp.neighbour_table(x.coords, (h, w), b, k, method=method)
    out = sp.subm_conv2d(feats, x.coords, wt, bs, neighbours=nbr, strategy=strategy, spatial_shape=(h, w),
                         batch_size=b)
    # reference: dense conv on the zero-filled map, read at active sites
    dref = dense.clone().requires_grad_(True)
    wref = weight.clone().requires_grad_(True)
    bref = bias.clone().requires_grad_(True)
    ref_map = F.conv2d(dref, wref, bref, padding=k // 2)
    ref = ref_map.permute(0, 2, 3, 1)[mask]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(feats.grad, dref.grad.permute(0, 2, 3, 1)[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wt.grad, wref.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bs.grad, bref.grad, atol=1e-4, rtol=1e-4)


def test_subm_conv2d_float32_and_default_shape():
    g, mask, dense = _random_case(11, 2, 8, 8, 6, 0.3)
    dense = (dense * mask[:, None]).float()
    weight = torch.randn(7, 6, 3, 3, generator=g)
    x = sp.to_sparse(dense, mask)
    out = sp.subm_conv2d(x.features, x.coords, weight)  # bounding box inferred
    ref = F.conv2d(dense, weight, padding=1).permute(0, 2, 3, 1)[mask]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_subm_conv2d_empty_and_single_site():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    f0 = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    out0 = sp.subm_conv2d(f0, torch.zeros(0, 3, dtype=torch.long), w)
    assert out0.shape == (0, 4)
    out0.sum().backward()
    assert torch.count_nonzero(w.grad) == 0
    # single site: only the centre tap sees a neighbour
    f1 = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    c1 = torch.tensor([[1, 2, 3]])
    out1 = sp.subm_conv2d(f1, c1, w, spatial_shape=(5, 5), batch_size=2)
    torch.testing.assert_close(out1, f1 @ w[:, :, 1, 1].t())
    dense = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    dense[1, :, 2, 3] = f1.detach()[0]
    torch.testing.assert_close(out1, F.conv2d(dense, w.detach(), padding=1)[1, :, 2, 3][None])


def test_subm_conv2d_bad_weight_names_parameter():
    with pytest.raises(ValueError, match="weight"):
        sp.subm_conv2d(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(4, 2, 3, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        sp.neighbour_table(torch.zeros(1, 3, dtype=torch.long), (3, 3), 1, 2)


POOL_CASES = [  # seed, batch, H, W, C, density, kernel, stride
    (0, 2, 8, 8, 3, 0.05, 2, 2),
    (1, 3, 12, 12, 5, 0.3, 2, 2),
    (2, 2, 7, 9, 4, 0.6, 2, 2),
    (3, 4, 6, 6, 2, 1.0, 2, 2),
    (4, 2, 9, 8, 3, 0.5, 3, 2),
    (5, 2, 10, 7, 3, 0.4, 3, 3),
]


@pytest.mark.parametrize("seed,b,h,w,c,density,k,s", POOL_CASES)
@pytest.mark.parametrize("strategy", ["sparse", "dense", "auto"])
def test_sparse_max_pool_matches_dense_with_minus_inf(seed, b, h, w, c, density, k, s, strategy):
    g, mask, dense = _random_case(seed, b, h, w, c, density)
    x = sp.to_sparse(dense, mask)
    feats = x.features.clone().requires_grad_(True)
    out, oc = sp.sparse_max_pool2d(feats, x.coords, k, s, spatial_shape=(h, w), batch_size=b, strategy=strategy)
    # reference: dense max-pool with -inf at inactive sites
    dref = dense.masked_fill(~mask[:, None], -math.inf).requires_grad_(True)
    ref_map = F.max_pool2d(dref, k, s)
    site = torch.isfinite(ref_map[:, 0])  # output exists where the window holds an active input
    assert oc.tolist() == site.nonzero().tolist()
    ref = ref_map.permute(0, 2, 3, 1)[site]
    torch.testing.assert_close(out, ref)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(feats.grad, dref.grad.permute(0, 2, 3, 1)[mask])


@pytest.mark.parametrize("strategy", ["sparse", "dense"])
def test_sparse_max_pool_ties_go_to_first_in_window_like_dense(strategy):
    dense = torch.zeros(1, 1, 2, 2, dtype=torch.float64)  # all ties (e.g. after ReLU)
    mask = torch.tensor([[[False, True], [True, True]]])
    x = sp.to_sparse(dense, mask)
    f = x.features.clone().requires_grad_(True)
    out, _ = sp.sparse_max_pool2d(f, x.coords, 2, 2, batch_size=1, strategy=strategy)
    out.sum().backward()
    dref = dense.masked_fill(~mask[:, None], -math.inf).requires_grad_(True)
    F.max_pool2d(dref, 2).sum().backward()
    torch.testing.assert_close(f.grad, dref.grad.permute(0, 2, 3, 1)[mask])


def test_sparse_max_pool_empty():
    f, c = sp.sparse_max_pool2d(torch.zeros(0, 4), torch.zeros(0, 3, dtype=torch.long), 2, 2)
    assert f.shape == (0, 4) and c.shape == (0, 3)


def test_to_dense_roundtrip():
    g, mask, dense = _random_case(3, 2, 5, 6, 4, 0.5)
    x = sp.to_sparse(dense, mask)
    back = x.dense()
    torch.testing.assert_close(back, dense * mask[:, None])
    assert torch.isinf(sp.to_dense(x.features, x.coords, (2, 5, 6), fill=-math.inf)[~mask[:, None].expand(-1, 4, -1, -1)]).all()


# ----------------------------------------------------------------------------- top-p
@pytest.mark.parametrize("p", [0.1, 0.5, 0.7, 0.9, 0.999])
def test_top_p_mask_matches_loop_and_is_smallest_set(p):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(16, 50, generator=g), -1)
    m = sp.top_p_mask(probs, p)
    assert m.shape == probs.shape and m.dtype == torch.bool
    assert torch.equal(m, top_p_mask_loop(probs, p))
    for row, mr in zip(probs, m):
        kept = row[mr]
        assert kept.sum() >= p - 1e-6  # reaches p
        assert kept.sum() - kept.min() < p  # dropping the smallest kept entry falls short: smallest set
        assert row[~mr].max() <= kept.min() if (~mr).any() else True  # highest first


def test_top_p_mask_one_keeps_all_and_hand_example():
    probs = torch.tensor([[0.5, 0.2, 0.3, 0.0], [0.1, 0.1, 0.1, 0.7]])
    assert sp.top_p_mask(probs, 1.0).all()
    assert sp.top_p_mask(probs, 0.7).tolist() == [[True, False, True, False], [False, False, False, True]]
    assert sp.top_p_mask(probs, 0.5).tolist() == [[True, False, False, False], [False, False, False, True]]
    with pytest.raises(ValueError, match="'p'"):
        sp.top_p_mask(probs, 0.0)
    with pytest.raises(ValueError, match="'p'"):
        sp.top_p_mask(probs, 1.5)


def test_top_p_mask_segments_matches_per_segment_mask():
    g = torch.Generator().manual_seed(1)
    sizes = [5, 1, 17, 9, 30]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    probs = torch.cat([torch.softmax(2 * torch.randn(n, generator=g), 0) for n in sizes])
    perm = torch.randperm(len(seg), generator=g)  # segments interleaved
    for p in (0.3, 0.7, 0.95, 1.0):
        m = sp.top_p_mask_segments(probs[perm], seg[perm], p)
        for i in range(len(sizes)):
            sel = seg[perm] == i
            assert torch.equal(m[sel], sp.top_p_mask(probs[perm][sel][None], p)[0])


# ----------------------------------------------------------------------------- modules
def test_sparse_vgg_block_equals_dense_twin_at_full_density_and_shares_state_dict():
    torch.manual_seed(0)
    dense_block = sp.DenseVggBlock(4, 6).double()
    sparse_block = sp.SparseVggBlock(4, 6).double()
    sparse_block.load_state_dict(dense_block.state_dict())  # same keys, same layout
    assert set(dense_block.state_dict()) == set(sparse_block.state_dict())
    x = torch.randn(3, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    ref = dense_block(x)  # train mode: BN statistics over all sites = all active sites
    s = sp.to_sparse(x)
    out = sparse_block(s)
    assert out.spatial_shape == (3, 4) and out.batch_size == 3
    torch.testing.assert_close(out.dense(), ref, atol=1e-4, rtol=1e-4)
    ref.pow(2).sum().backward()
    out.features.pow(2).sum().backward()
    torch.testing.assert_close(sparse_block.conv1.conv.weight.grad, dense_block.conv1.conv.weight.grad,
                               atol=1e-4, rtol=1e-4)
    assert sparse_block.conv1.conv.last_backend == sp.SPARSE_BACKEND_CPU
    assert sparse_block.conv1.conv.last_strategy == "dense"  # full grid -> oneDNN plan


@pytest.mark.parametrize("strategy", ["auto", "pairs", "im2col", "dense", "tiles"])
def test_sparse_block_on_partial_sites_equals_masked_dense_layers(strategy):
    torch.manual_seed(1)
    block = sp.SparseVggBlock(3, 5).double().eval()  # eval: BN uses running stats (site-independent)
    for conv in (block.conv1.conv, block.conv2.conv):
        conv.strategy = strategy
    for bn in (block.conv1.bn, block.conv2.bn):
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.data.normal_()
        bn.running_var.data.uniform_(0.5, 2.0)

    def bn2d(x, bn):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    g, mask, dense = _random_case(2, 2, 8, 8, 3, 0.4)
    x = sp.to_sparse(dense * mask[:, None], mask)
    out = block(x)
    # reference: dense conv, BN, ReLU, re-mask, again, then -inf max-pool
    m = mask[:, None]
    h = torch.relu(bn2d(F.conv2d(dense * m, block.conv1.conv.weight, padding=1), block.conv1.bn)) * m
    h = torch.relu(bn2d(F.conv2d(h, block.conv2.conv.weight, padding=1), block.conv2.bn))
    ref = F.max_pool2d(h.masked_fill(~m, -math.inf), 2)
    site = torch.isfinite(ref[:, 0])
    assert out.coords.tolist() == site.nonzero().tolist()
    torch.testing.assert_close(out.features, ref.permute(0, 2, 3, 1)[site])
    if strategy != "auto":
        assert block.conv2.conv.last_strategy == strategy


def test_backend_is_torch_rulebook_on_cpu():
    assert sp.sparse_backend("cpu") == "torch-rulebook"
    assert "torch-rulebook" in sp.backend_description("cpu")


@pytest.mark.parametrize("strategy", ["pairs", "im2col", "dense", "tiles"])
def test_offset_major_weight_storage_same_values_and_grad_layout(strategy):
    g, mask, dense = _random_case(7, 2, 7, 6, 5, 0.5)
    dense = dense * mask[:, None]
    w_std = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64)
    w_om = sp.offset_major(w_std).requires_grad_(True)
    assert torch.equal(w_om, w_std) and not w_om.is_contiguous()
    x = sp.to_sparse(dense, mask)
    out = sp.subm_conv2d(x.features, x.coords, w_om, strategy=strategy, spatial_shape=(7, 6), batch_size=2)
    wref = w_std.clone().requires_grad_(True)
    ref = F.conv2d(dense, wref, padding=1).permute(0, 2, 3, 1)[mask]
    torch.testing.assert_close(out, ref)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(w_om.grad, wref.grad)
    assert w_om.grad.stride() == w_om.stride()  # autograd keeps our layout: no copy per step


def test_subm_module_state_dict_roundtrip_with_conv2d():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    sub = sp.SubMConv2d(3, 4)
    sub.load_state_dict(conv.state_dict())
    assert torch.equal(sub.weight, conv.weight)
    conv2 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    conv2.load_state_dict(sub.state_dict())
    assert torch.equal(conv2.weight, conv.weight)


def test_modules_on_empty_and_single_site_inputs():
    block = sp.SparseVggBlock(3, 4).eval()
    empty = sp.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), (6, 6), 2)
    out = block(empty)
    assert out.features.shape == (0, 4) and out.spatial_shape == (3, 3)
    one = sp.SparseTensor(torch.randn(1, 3), torch.tensor([[1, 3, 4]]), (6, 6), 2)
    out = block(one)
    assert out.coords.tolist() == [[1, 1, 2]]
    f, c = sp.sparse_max_pool2d(one.features, one.coords, 2, 2, spatial_shape=(6, 6), batch_size=2)
    torch.testing.assert_close(f, one.features)


# --- spconv self-check (the guard in front of the CUDA backend) -----------------------------------
class _FakeSpconv:
    """A stand-in for ``spconv.pytorch`` computed with our verified rulebook; ``swap_xy`` makes it read
    coordinates the wrong way round, like spconv with column-major CUDA coordinates.  It offers what
    ``sparse.backends.SpconvSubm`` uses: ``SparseConvTensor`` with ``features`` and ``replace_feature``,
    and a ``SubMConv2d`` module whose ``weight`` Parameter (spconv 2.x KRSC layout) our module deletes and
    replaces by a converted view of its own weight."""

    def __init__(self, swap_xy=False):
        fake = self
        self.calls = 0  # forward calls of the fake engine (the self-check must reach it)

        class SparseConvTensor:
            def __init__(self, features, indices, spatial_shape, batch_size):
                self.features, self.indices = features, indices
                self.spatial_shape, self.batch_size = spatial_shape, batch_size

            def replace_feature(self, features):
                return SparseConvTensor(features, self.indices, self.spatial_shape, self.batch_size)

        class SubMConv2d(torch.nn.Module):
            def __init__(self, c_in, c_out, k, padding=1, bias=False, indice_key=None):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(c_out, k, k, c_in))  # spconv 2.x KRSC layout

            def forward(self, st):
                fake.calls += 1
                coords = st.indices.long()
                if fake.swap_xy:
                    coords = coords[:, [0, 2, 1]]
                w = self.weight.permute(0, 3, 1, 2)
                return st.replace_feature(sp.subm_conv2d(st.features, coords, w))

        self.swap_xy, self.SparseConvTensor, self.SubMConv2d = swap_xy, SparseConvTensor, SubMConv2d


@pytest.mark.parametrize("swap_xy,ok", [(False, True), (True, False)])
def test_spconv_selfcheck_detects_a_wrong_engine(monkeypatch, swap_xy, ok):
    import sys
    import types
    pkg = types.ModuleType("spconv")
    pkg.pytorch = _FakeSpconv(swap_xy)
    monkeypatch.setitem(sys.modules, "spconv", pkg)
    monkeypatch.setitem(sys.modules, "spconv.pytorch", pkg.pytorch)
    diff = sp.spconv_selfcheck("cpu")
    assert pkg.pytorch.calls == 1  # the check ran the (fake) engine through sparse.backends.SpconvSubm
    assert (diff <= sp.SPCONV_SELFCHECK_TOL) == ok
    if not ok:
        assert diff > 0.1


@pytest.mark.parametrize("result,expected", [(0.0, "spconv"), (1.2, "torch-rulebook"),
                                             (RuntimeError("no kernel image"), "torch-rulebook")])
def test_cuda_backend_falls_back_when_spconv_fails_its_selfcheck(monkeypatch, result, expected):
    def fake_check(device):
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(backends, "_spconv_available", lambda: True)
    monkeypatch.setattr(backends, "spconv_selfcheck", fake_check)
    monkeypatch.setattr(backends, "_SPCONV_CHECKED", {})
    monkeypatch.delenv("NBSUPPORT_SPARSE_BACKEND", raising=False)
    if expected == "spconv":
        assert sp.sparse_backend("cuda") == "spconv"
    else:
        with pytest.warns(UserWarning, match="self-check"):
            assert sp.sparse_backend("cuda") == "torch-rulebook"
        assert sp.sparse_backend("cuda") == "torch-rulebook"  # decided once per device
    monkeypatch.setenv("NBSUPPORT_SPARSE_BACKEND", "torch-rulebook")
    assert sp.sparse_backend("cuda") == "torch-rulebook"


def _region_nbr(mask):
    return sp.neighbour_table(mask.nonzero(), mask.shape[1:], mask.shape[0])


def _plan_case(b, h, w, regions):
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    for i, y0, y1, x0, x1 in regions:
        mask[i, y0:y1, x0:x1] = True
    return mask


# Hand-counted plan costs (units: one output cell of the dense conv; PAIRS_COST 1.75, IM2COL_COST 1.8,
# TILE_GATHER_COST 0.1 at the reference channels 64 -> 128; at 16 -> 32 the few-channel terms add
# 14 x 0.0703125 and 5.5 x 0.0703125, i.e. 2.734375 per pair / 9 and 2.1867 per site, since
# 1/16 + 1/32 - (1/64 + 1/128) = 0.0703125).  A compact n x n block has (3n - 2)^2 active
# (site, neighbour) pairs.
PLAN_CASES = [  # expected plan, mask, whether the block-sparse plan is offered, channels (None: reference)
    # isolated sites on a 20x20 map (every third row and column): 49 pairs, 49 sites -> pairs 9.5 < im2col 88
    ("pairs", lambda: (torch.arange(20)[:, None] % 3 == 0) & (torch.arange(20) % 3 == 0), True, None),
    # a 20x20 block of a 40x40 map at 16 -> 32 channels: 58^2 = 3364 pairs -> pairs 1022.1, im2col 874.7,
    # dense 1600 (at the reference channels pairs would win: 654.1 against 720)
    ("im2col", lambda: _plan_case(1, 40, 40, [(0, 10, 30, 10, 30)]), False, (16, 32)),
    # a 16x16 block aligned to one 16x16 tile of a 32x32 map: 46^2 = 2116 pairs -> pairs 411.4, im2col 460.8,
    # tiles 256 + 0.1 * 18^2 = 288.4 (4x4 tiles: 16 * (16 + 3.6) = 313.6), dense 1024
    ("tiles", lambda: _plan_case(1, 32, 32, [(0, 0, 16, 0, 16)]), True, None),
    # every site of a 20x20 map: pairs 654.1, im2col 720, tiles >= 400 + halo (25 4x4 tiles: 490), dense 400
    ("dense", lambda: torch.ones(1, 20, 20, dtype=torch.bool), True, None),
]


@pytest.mark.parametrize("expected,make,offer_tiles,channels", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_planner_picks_each_plan_from_hand_counted_costs(expected, make, offer_tiles, channels):
    mask = make()
    mask = mask[None] if mask.dim() == 2 else mask
    b, h, w = mask.shape
    nbr = _region_nbr(mask)
    tiles = sp.tile_plan(mask.nonzero(), (h, w), b) if offer_tiles else None
    costs = sp.plan_costs(nbr, (h, w), b, tiles, channels=channels)
    n, pairs = int(mask.sum()), int((nbr < nbr.shape[0]).sum())
    per_pair, per_site = (1.75, 1.8) if channels is None else (2.734375, 1.8 + 5.5 * 0.0703125)
    assert costs["pairs"] == pytest.approx(per_pair * pairs / 9) and costs["im2col"] == pytest.approx(per_site * n)
    assert costs["dense"] == b * h * w
    assert sp.choose_strategy(nbr, (h, w), b, tiles=tiles, channels=channels) == expected
    if expected == "tiles":
        assert tiles.tile == (16, 16) and tiles.n_tiles == 1 and costs["tiles"] == pytest.approx(288.4)
    if not offer_tiles:
        return
    # the module (which always offers the block-sparse plan) takes the same decision at the reference
    # channels (64 -> 128), and its result is the dense convolution's
    torch.manual_seed(0)
    conv = sp.SubMConv2d(64, 128).double()
    dense = torch.randn(b, 64, h, w, dtype=torch.float64) * mask[:, None]
    out = conv(sp.to_sparse(dense, mask)).features
    assert conv.last_strategy == expected
    ref = F.conv2d(dense, conv.weight, padding=1).permute(0, 2, 3, 1)[mask]
    torch.testing.assert_close(out, ref)


def test_planner_prefers_dense_kernels_with_few_channels():
    """A checkerboard of a 20x20 map (200 sites, each with its diagonal neighbours: 922 pairs): at the
    reference channels the pairs plan is cheapest (1.75 x 922 / 9 = 179.3 against im2col 360 and dense
    400); at 8 -> 16 channels 1/8 + 1/16 - (1/64 + 1/128) = 0.1640625, so a pair costs
    1.75 + 14 x 0.1640625 = 4.046875 dense taps (pairs 414.6) and a site 1.8 + 5.5 x 0.1640625 in im2col
    (540.5): the dense plan (400) wins."""
    mask = ((torch.arange(20)[:, None] + torch.arange(20)) % 2 == 0)[None]
    nbr = _region_nbr(mask)
    pairs = int((nbr < nbr.shape[0]).sum())
    assert pairs == 922
    tiles = sp.tile_plan(mask.nonzero(), (20, 20), 1)
    assert sp.choose_strategy(nbr, (20, 20), 1, tiles=tiles) == "pairs"
    assert sp.choose_strategy(nbr, (20, 20), 1, tiles=tiles, channels=(64, 128)) == "pairs"
    costs = sp.plan_costs(nbr, (20, 20), 1, tiles, channels=(8, 16))
    assert costs["pairs"] == pytest.approx(4.046875 * 922 / 9)
    assert costs["im2col"] == pytest.approx((1.8 + 5.5 * 0.1640625) * 200) and costs["dense"] == 400
    assert sp.choose_strategy(nbr, (20, 20), 1, tiles=tiles, channels=(8, 16)) == "dense"
    conv = sp.SubMConv2d(8, 16)
    x = sp.to_sparse(torch.randn(1, 8, 20, 20) * mask[:, None], mask)
    out = conv(x).features
    assert conv.last_strategy == "dense"
    ref = F.conv2d(x.dense(), conv.weight, padding=1).permute(0, 2, 3, 1)[mask]
    torch.testing.assert_close(out, ref)


def _compact_masks(seed, b, h, w, density):
    """Attention-shaped masks: per image, the sites nearest a random centre (a compact blob) at the given
    density; image 0 has none (an empty image, so some tiles and one whole image are empty), and one blob
    is centred on the map's corner (tiles at the border)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(1, b):
        cy, cx = (h - 1, w - 1) if i == 1 else (float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w)
        dist = (yy - cy) ** 2 + (xx - cx) ** 2 + 0.01 * torch.rand(h, w, generator=g)
        k = max(1, round(density * h * w))
        masks[i].view(-1)[dist.view(-1).argsort()[:k]] = True
    return masks


TILE_CASES = [  # seed, batch, H, W, C_in, C_out, density, kernel, tile
    (0, 3, 13, 11, 4, 5, 0.3, 3, 4),  # odd sizes, partial tiles at the bottom/right border
    (1, 4, 24, 24, 3, 6, 0.5, 3, 8),
    (2, 3, 9, 17, 5, 3, 0.7, 3, 16),  # tile larger than the map's height: clipped to 9
    (3, 2, 10, 10, 2, 4, 0.2, 5, 4),  # 5x5 kernel: two-cell halo
    (4, 3, 7, 7, 3, 3, 0.4, 1, 3),  # 1x1 kernel: no halo
    (5, 3, 12, 8, 4, 4, 0.6, 3, None),  # tile chosen by the plan's cost
]


@pytest.mark.parametrize("seed,b,h,w,cin,cout,density,k,tile", TILE_CASES)
def test_block_sparse_plan_equals_dense_conv_on_compact_regions(seed, b, h, w, cin, cout, density, k, tile):
    """The block-sparse ("tiles") plan against PyTorch's dense conv2d, forward and backward (input, weight
    and bias gradients), on attention-shaped masks with an empty image, border tiles and odd sizes."""
    mask = _compact_masks(seed, b, h, w, density)
    g = torch.Generator().manual_seed(seed + 100)
    dense = torch.randn(b, cin, h, w, generator=g, dtype=torch.float64) * mask[:, None]
    weight = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    x = sp.to_sparse(dense, mask)
    plan = sp.tile_plan(x.coords, (h, w), b, k, tile)
    # the plan, counted by hand: distinct (image, tile row, tile column) of the active sites
    th, tw = plan.tile
    if tile is not None:
        assert (th, tw) == (min(tile, h), min(tile, w))
    keys = {(int(c[0]), int(c[1]) // th, int(c[2]) // tw) for c in x.coords}
    assert plan.n_tiles == len(keys) and plan.covered == len(keys) * th * tw
    assert plan.cells.numel() == len(keys) * (th + k - 1) * (tw + k - 1)
    assert plan.fill == pytest.approx(x.num_sites / plan.covered)
    feats = x.features.clone().requires_grad_(True)
    wt, bs = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    out = sp.subm_conv2d(feats, x.coords, wt, bs, strategy="tiles", tiles=plan)
    dref, wref, bref = (t.clone().requires_grad_(True) for t in (dense, weight, bias))
    ref = F.conv2d(dref, wref, bref, padding=k // 2).permute(0, 2, 3, 1)[mask]
    torch.testing.assert_close(out, ref)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(feats.grad, dref.grad.permute(0, 2, 3, 1)[mask])
    torch.testing.assert_close(wt.grad, wref.grad)
    torch.testing.assert_close(bs.grad, bref.grad)


def test_block_sparse_plan_bad_arguments_name_the_parameter():
    coords = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match="kernel_size"):
        sp.tile_plan(coords, (4, 4), 1, 2)
    with pytest.raises(ValueError, match="'tile'"):
        sp.tile_plan(coords, (4, 4), 1, 3, 0)
    with pytest.raises(ValueError, match="spatial_shape"):
        sp.subm_conv2d(torch.randn(1, 2), coords, torch.randn(3, 2, 3, 3), strategy="tiles",
                       neighbours=sp.neighbour_table(coords, (4, 4), 1))


def test_wider_layers_keep_the_reference_constants():
    """The few-channel term is fitted between 8 and 128 channels: a layer wider than 64 -> 128 is priced
    with the reference's constants (the term never goes below 0), a narrower one above them."""
    region = torch.zeros(1, 20, 20, dtype=torch.bool)
    region[0, 3:8, 10:15] = True
    nbr = sp.neighbour_table(region.nonzero(), (20, 20), 1)
    tiles = sp.tile_plan(region.nonzero(), (20, 20), 1)
    ref = sp.plan_costs(nbr, (20, 20), 1, tiles)
    for wide in ((128, 256), (512, 512), (64, 128)):
        assert sp.plan_costs(nbr, (20, 20), 1, tiles, channels=wide) == pytest.approx(ref)
    narrow = sp.plan_costs(nbr, (20, 20), 1, tiles, channels=(64, 64))  # 1/64 + 1/64 - 3/128 = 1/128
    assert narrow["pairs"] == pytest.approx((1.75 + 14 / 128) * 169 / 9)
    assert narrow["im2col"] == pytest.approx((1.8 + 5.5 / 128) * 25)


def test_choose_strategy_considers_only_the_plans_it_can_run():
    """A compact 5x5 region of a 20x20 map has 13 x 13 = 169 active (site, neighbour) pairs (hand count):
    pairs 1.75 * 169 / 9 = 32.9 < im2col 1.8 * 25 = 45.  A full map is dense's, but without a grid size the
    dense plan is not considered (pairs 1.75 * 3364 / 9 = 654.1 < im2col 720; at 16 -> 32 channels im2col
    2.1867 * 400 = 874.7 < pairs 2.734375 * 3364 / 9 = 1022.1), and without a tile plan the tiles are not."""
    region = torch.zeros(1, 20, 20, dtype=torch.bool)
    region[0, 3:8, 10:15] = True
    nbr = sp.neighbour_table(region.nonzero(), (20, 20), 1)
    assert int((nbr < nbr.shape[0]).sum()) == 169
    assert sp.choose_strategy(nbr, (20, 20), 1) == "pairs"
    full = torch.ones(1, 20, 20, dtype=torch.bool)
    nbr = sp.neighbour_table(full.nonzero(), (20, 20), 1)
    assert sp.choose_strategy(nbr, (20, 20), 1) == "dense"
    assert sp.choose_strategy(nbr) == "pairs"
    assert sp.choose_strategy(nbr, channels=(16, 32)) == "im2col"
    assert set(sp.plan_costs(nbr)) == {"pairs", "im2col"}


@pytest.mark.parametrize("shape,density", [((3, 24, 24), 0.6), ((2, 64, 16), 0.1), ((4, 6, 6), 0.9), ((1, 40, 3), 0.3)])
def test_tile_count_agrees_with_the_built_plan(shape, density):
    """The planner's cheap count (an occupancy grid, no plan built) gives the tile side and active-tile
    count of the plan tile_plan builds (which counts tiles with torch.unique), and the same choice."""
    b, h, w = shape
    mask = torch.rand(shape) < density
    mask[0, 0, 0] = True
    coords = mask.nonzero()
    plan = sp.tile_plan(coords, (h, w), b)
    count = sp.tile_count(coords, (h, w), b)
    assert (count.tile, count.halo, count.n_tiles) == (plan.tile, plan.halo, plan.n_tiles)
    for t in sp.TILE_SIZES:  # each candidate side: distinct tiles by torch.unique
        th, tw = min(t, h), min(t, w)
        ref = torch.unique((coords[:, 0] * h + coords[:, 1] // th * th) * w + coords[:, 2] // tw).numel()
        assert sp.tile_plan(coords, (h, w), b, tile=t).n_tiles == ref
    nbr = sp.neighbour_table(coords, (h, w), b)
    assert sp.choose_strategy(nbr, (h, w), b, tiles=count) == sp.choose_strategy(nbr, (h, w), b, tiles=plan)
