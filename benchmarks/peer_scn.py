"""The book's sparse engine against SparseConvNet, the engine MESM's authors used (Performance page).

Usage::

    PYTHONPATH=/work/scn/src:. python benchmarks/peer_scn.py --out benchmarks/results/peer_scn.json

Two comparisons, every variant timed in the same run with interleaved repetitions (``benchmarks/common.py``),
forward + backward, once per thread count of ``--threads`` (1 and 2 by default) and per kind of site mask
of ``--masks`` (``common.site_masks``: "random" scattered sites, "attention" compact regions like those
top-p keeps from a peaked attention map); the goals of the Performance page are checked in ``goals``:

* **one layer**: a submanifold 3x3 convolution, 64 -> 128 channels on 24x24 maps, batch 32 (MESM's first
  face block), at site densities 0.1 ... 1.0: the book's :class:`nbsupport.sparse.SubMConv2d`,
  SparseConvNet's ``SubmanifoldConvolution`` and the dense ``nn.Conv2d`` (FE2E), on the same sites and
  weights.  Rulebooks are built once and reused by both sparse engines (as within a block); the build is
  timed separately (``rulebook_*``).  Both sparse outputs and both gradients are checked against the dense
  convolution read at the active sites.  ``gemm_bound_seconds``: the time of the layer's MACs over its active
  (site, neighbour) pairs at the MAC rate the dense layer reached in the same run (no engine that multiplies
  the pairs at oneDNN's rate can go below it); ``over_gemm_bound``: each sparse engine's time over it.
* **whole extractor** at the paper's shapes (faces 64x24x24, mel pieces 64x64x16 after the dense stage):
  the three blocks of the book's own model (``VisualPathway.extract`` of ``nbsupport.models.mesm`` at
  ``PAPER_SIZES``) as MESM (attention + top-p + sparse blocks) and as FE2E (dense blocks), and the same
  MESM with its blocks run by SparseConvNet the way the authors' code does (``InputLayer`` of the kept
  sites, ``SubmanifoldConvolution`` + ``BatchNormReLU`` twice, ``MaxPooling``) with the book's attention
  and top-p in between.  The two sparse extractors are checked against each other.

Without ``sparseconvnet`` importable the benchmark still runs (book engine against dense) and records
that the peer is absent.  How to build it for CPU: ``book/performance.md``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import common
from nbsupport import sparse as sp
from nbsupport.base import atomic_write, atomic_write_json
from nbsupport.models import mesm

try:  # the peer is optional: nothing in the book depends on it
    import sparseconvnet as scn
except ImportError:  # pragma: no cover - depends on the machine
    scn = None


# ------------------------------------------------------------------------------------------ SparseConvNet glue
def scn_weight(weight: torch.Tensor, order: str) -> torch.Tensor:
    """A dense (C_out, C_in, 3, 3) weight in SparseConvNet's layout (k*k, 1, C_in, C_out); ``order`` "yx" or
    "xy" says which spatial axis varies slowest in its filter index (found by :func:`scn_filter_order`)."""
    w = weight.detach().permute(2, 3, 1, 0) if order == "yx" else weight.detach().permute(3, 2, 1, 0)
    return w.reshape(-1, 1, weight.shape[1], weight.shape[0]).contiguous()


def scn_input(coords: torch.Tensor, feats: torch.Tensor, hw, batch_size: int):
    """Our (batch, y, x) sites -> a SparseConvNet tensor; SparseConvNet wants (y, x, batch) on the CPU."""
    layer = scn.InputLayer(2, torch.LongTensor(list(hw)))
    return layer([coords[:, [1, 2, 0]].cpu(), feats, batch_size])


def scn_to_ours(t, hw) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseConvNet tensor -> (features (N, C), coords (N, 3) (batch, y, x)) in the book's site order."""
    loc = t.get_spatial_locations().long()  # (N, 3) (y, x, batch)
    coords = loc[:, [2, 0, 1]]
    key = (coords[:, 0] * hw[0] + coords[:, 1]) * hw[1] + coords[:, 2]
    order = torch.argsort(key)
    return t.features[order], coords[order]


def scn_filter_order(seed: int = 0) -> str | None:
    """Which of the two axis orders makes SparseConvNet's submanifold conv equal ``conv2d`` (checked, not
    assumed, on a small random case); None if neither does."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 6, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    mask = torch.rand(2, 5, 6, generator=g) < 0.6
    s = sp.to_sparse(x, mask)
    ref = F.conv2d(s.dense(), w, padding=1).permute(0, 2, 3, 1)[mask]
    for order in ("yx", "xy"):
        conv = scn.SubmanifoldConvolution(2, 3, 4, 3, False)
        conv.weight.data.copy_(scn_weight(w, order))
        f, c = scn_to_ours(conv(scn_input(s.coords, s.features, (5, 6), 2)), (5, 6))
        if torch.equal(c, s.coords) and torch.allclose(f, ref, atol=1e-5):
            return order
    return None


class ScnBlock(nn.Module):
    """MESM's sparse block as the authors built it with SparseConvNet (``SparseVggNet`` with
    ``['C', c], ['C', c], ['MP', 2, 2]``), holding the weights of a book :class:`SparseVggBlock`."""

    def __init__(self, block: sp.SparseVggBlock, order: str):
        super().__init__()
        c_in, c_out = block.conv1.conv.in_channels, block.conv1.conv.out_channels
        self.seq = scn.Sequential(
            scn.SubmanifoldConvolution(2, c_in, c_out, 3, False),
            scn.BatchNormReLU(c_out, eps=block.conv1.bn.eps),
            scn.SubmanifoldConvolution(2, c_out, c_out, 3, False),
            scn.BatchNormReLU(c_out, eps=block.conv2.bn.eps),
            scn.MaxPooling(2, 2, 2))
        with torch.no_grad():
            for i, ours in ((0, block.conv1), (2, block.conv2)):
                self.seq[i].weight.copy_(scn_weight(ours.conv.weight, order))
                self.seq[i + 1].weight.copy_(ours.bn.weight)
                self.seq[i + 1].bias.copy_(ours.bn.bias)

    def forward(self, s: sp.SparseTensor) -> sp.SparseTensor:
        h, w = s.spatial_shape
        out = self.seq(scn_input(s.coords, s.features, (h, w), s.batch_size))
        f, c = scn_to_ours(out, (h // 2, w // 2))
        return sp.SparseTensor(f, c, (h // 2, w // 2), s.batch_size)


def scn_extract(pathway: mesm.VisualPathway, blocks: list[ScnBlock], x: torch.Tensor, query: torch.Tensor,
                sites: dict | None = None):
    """MESM's extractor with SparseConvNet blocks: the book's attention + top-p before each block (the same
    methods ``VisualPathway`` uses), the blocks run by SparseConvNet.  x (N, C0, H, W) -> (N, 512)."""
    n = x.shape[0]
    active = torch.ones(n, x.shape[2], x.shape[3], dtype=torch.bool)
    s = blocks[0](pathway._select(0, x, active, query, sparse_out=True)[0])
    for i in (1, 2):
        if sites is not None:
            sites[i] = s.coords  # for the benchmark's peaked prior
        s_in, _, _ = pathway._select_sparse(i, s, query)
        s = blocks[i](s_in)
    frame = s.coords[:, 0]
    sums = s.features.new_zeros(n, s.features.shape[1]).index_add(0, frame, s.features)
    return sums / torch.bincount(frame, minlength=n).clamp_min(1).to(sums.dtype)[:, None]


# ------------------------------------------------------------------------------------------ one layer
def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float((a.detach() - ref.detach()).abs().max() / ref.detach().abs().max().clamp_min(1e-30))


def bench_layer(densities, repeats: int, seed: int, batch: int, order: str | None, kind: str = "random") -> list[dict]:
    """One submanifold 3x3 layer (64 -> 128 at 24x24): book engine, SparseConvNet and dense conv2d, on
    site masks of ``kind`` (``common.site_masks``: "random" scattered sites or "attention" compact regions)."""
    c_in, c_out, h, w = 64, 128, 24, 24
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, h, w, generator=g)
    dense = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    ours = sp.SubMConv2d(c_in, c_out)
    ours.load_state_dict(dense.state_dict())
    peer = None
    if order is not None:
        peer = scn.SubmanifoldConvolution(2, c_in, c_out, 3, False)
        peer.weight.data.copy_(scn_weight(dense.weight, order))
    rows = []
    for d in densities:
        mask = common.site_masks(kind, batch, h, w, d, g)
        s0 = sp.to_sparse(x, mask)
        upstream = torch.randn(s0.num_sites, c_out, generator=g)  # the same gradient into every engine
        fns, grads = {}, {}

        def run_dense():
            xin = x.clone().requires_grad_(True)
            out = dense(xin)
            out.backward(torch.ones_like(out))
        fns["dense"] = run_dense

        def run_ours():
            s = s0.replace(s0.features.clone().requires_grad_(True))
            ours(s).features.backward(upstream)
        fns["ours"] = run_ours
        t0 = time.perf_counter()
        s0.neighbours(3), s0.pairs(3), s0.tiles(3)
        rulebook_ours = time.perf_counter() - t0
        # correctness against the dense convolution read at the sites, forward and backward
        dense.weight.grad = None
        grid = s0.dense().requires_grad_(True)
        ref = F.conv2d(grid, dense.weight, padding=1).permute(0, 2, 3, 1)[mask]
        ref.backward(upstream)
        f_in = s0.features.clone().requires_grad_(True)
        ours.weight.grad = None
        out = ours(s0.replace(f_in)).features
        out.backward(upstream)
        g_in = grid.grad.permute(0, 2, 3, 1)[mask]
        err = dict(ours_forward=rel(out, ref), ours_grad_input=rel(f_in.grad, g_in),
                   ours_grad_weight=rel(ours.weight.grad, dense.weight.grad))
        rulebook_peer = None
        if peer is not None:
            t0 = time.perf_counter()
            t_in = scn_input(s0.coords, s0.features, (h, w), batch)
            peer(t_in)  # builds and caches SparseConvNet's rulebook in the tensor's metadata
            rulebook_peer = time.perf_counter() - t0
            f_p, c_p = scn_to_ours(t_in, (h, w))
            assert torch.equal(c_p, s0.coords)
            loc = t_in.get_spatial_locations().long()
            key = (loc[:, 2] * h + loc[:, 0]) * w + loc[:, 1]
            perm = torch.argsort(key)  # our row j is SparseConvNet's row perm[j]
            rank = torch.empty_like(key)
            rank[perm] = torch.arange(key.numel())  # SparseConvNet row -> our row
            peer_feats = t_in.features.detach()
            peer_up = upstream[rank]

            def run_peer():
                t_in.features = peer_feats.clone().requires_grad_(True)
                peer(t_in).features.backward(peer_up)
            fns["scn"] = run_peer
            t_in.features = peer_feats.clone().requires_grad_(True)
            peer.weight.grad = None
            out_p = peer(t_in).features
            out_p.backward(peer_up)
            gw = peer.weight.grad.view(3, 3, c_in, c_out) if order == "yx" else \
                peer.weight.grad.view(3, 3, c_in, c_out).transpose(0, 1)
            err.update(scn_forward=rel(out_p[perm], ref), scn_grad_input=rel(t_in.features.grad[perm], g_in),
                       scn_grad_weight=rel(gw.permute(3, 2, 0, 1), dense.weight.grad))
        times = common.interleave(fns, repeats)
        row = dict(mask=kind, threads=torch.get_num_threads(), density=d, actual_density=s0.density,
                   sites=s0.num_sites, cpu_plan=ours.last_strategy, max_relative_error=err,
                   rulebook_ours_seconds=rulebook_ours, rulebook_scn_seconds=rulebook_peer)
        if ours.last_strategy == "tiles":
            row["tile"], row["tile_fill"] = list(s0.tiles(3).tile), s0.tiles(3).fill
        row["ours_over_dense"] = common.spread(times, "ours", "dense")
        if "scn" in times:
            row["ours_over_scn"] = common.spread(times, "ours", "scn")
            row["scn_over_dense"] = common.spread(times, "scn", "dense")
        row["peak_mb"] = {name: common.peak_rss_mb(fn) for name, fn in fns.items()}
        row["seconds"] = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        # The GEMM bound: the layer's multiply-accumulates over its active (site, neighbour) pairs, forward
        # and backward, at the MAC rate the dense layer reached in this run; every engine's time over it.
        n_pairs = s0.pairs(3).n_pairs
        bound = row["seconds"]["dense"] * n_pairs / (batch * h * w * 9)
        row["pairs_per_site"] = n_pairs / s0.num_sites
        row["gemm_bound_seconds"] = bound
        row["over_gemm_bound"] = {name: t / bound for name, t in row["seconds"].items() if name != "dense"}
        rows.append(row)
        peer_txt = (f" | ours/scn {row['ours_over_scn']['ratio']:.2f} [{row['ours_over_scn']['ratio_min']:.2f}, "
                    f"{row['ours_over_scn']['ratio_max']:.2f}]") if "scn" in times else ""
        od = row["ours_over_dense"]["ratio"]
        print(f"layer {kind} t={row['threads']} d={d:.1f} ({row['cpu_plan']}): "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["seconds"].items())
              + f" | ours/dense {od:.2f} = {od / s0.density:.2f} d"
              + peer_txt + f" | max err {max(err.values()):.1e}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ whole extractor
def bench_extractor(modality: str, batch: int, top_p: float, repeats: int, seed: int, order: str | None,
                    blob: float = 0.25, kind: str = "attention") -> dict:
    """MESM's and FE2E's extractors of the book's model (paper sizes), and MESM with SparseConvNet blocks;
    the attention's scores get a ``common.site_prior`` of ``kind`` ("attention": one blob per frame, so
    top-p keeps compact regions; "random": independent noise per site, so it keeps scattered sites)."""
    c, h, w = sp.PAPER_SPARSE_INPUT[modality]
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(batch, c, h, w, generator=g))  # post-ReLU output of the dense stage
    text_dim = 384  # all-MiniLM-L6-v2, the book's text encoder
    query = torch.randn(batch, text_dim, generator=g)
    sizes = {k: v for k, v in mesm.PAPER_SIZES.items() if k in ("stem_channels", "block_channels", "dim", "layers", "heads")}
    torch.manual_seed(seed)
    sparse_path = mesm.VisualPathway(text_dim, mesm.MesmConfig(attention=True, sparse=True, top_p=top_p, **sizes))
    peaked = common.PeakedAttention(sparse_path, common.site_prior(kind, batch, h, w, blob, g))
    dense_path = mesm.VisualPathway(text_dim, mesm.MesmConfig(attention=False, sparse=False, **sizes))
    dense_path.load_state_dict(sparse_path.state_dict(), strict=False)  # same blocks (shared parameter names)
    fns = {}

    def run(path):
        def f():
            xin = x.clone().requires_grad_(True)
            path.extract(xin, query).square().mean().backward()
        return f
    fns["mesm"] = run(sparse_path)
    fns["fe2e"] = run(dense_path)
    err = None
    if order is not None:
        blocks = [ScnBlock(b, order) for b in sparse_path.blocks]

        def run_scn():
            xin = x.clone().requires_grad_(True)
            scn_extract(sparse_path, blocks, xin, query, peaked.sites).square().mean().backward()
        fns["mesm_scn"] = run_scn
        with torch.no_grad():
            a = sparse_path.extract(x, query)
            b = scn_extract(sparse_path, blocks, x, query, peaked.sites)
        err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    with torch.no_grad():
        sparse_path.extract(x, query)
    peaked.check()
    densities = [round(float(r.kept.sum()) / r.kept.numel(), 4) for r in sparse_path.records]
    plans = [m.last_strategy for m in sparse_path.modules() if isinstance(m, sp.SubMConv2d)]
    times = common.interleave(fns, repeats)
    row = dict(modality=modality, mask=kind, threads=torch.get_num_threads(), batch=batch, top_p=top_p,
               densities=densities, cpu_plans=plans,
               scn_relative_difference=err, seconds={k: sorted(v)[len(v) // 2] for k, v in times.items()})
    row["mesm_over_fe2e"] = common.spread(times, "mesm", "fe2e")
    if "mesm_scn" in times:
        row["mesm_over_scn"] = common.spread(times, "mesm", "mesm_scn")
        row["scn_over_fe2e"] = common.spread(times, "mesm_scn", "fe2e")
    row["peak_mb"] = {name: common.peak_rss_mb(fn) for name, fn in fns.items()}
    print(f"extractor {modality} {kind} t={row['threads']} B={batch} p={top_p}: "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in row["seconds"].items())
          + f" | mesm/fe2e {row['mesm_over_fe2e']['ratio']:.2f} [{row['mesm_over_fe2e']['ratio_min']:.2f}, "
          f"{row['mesm_over_fe2e']['ratio_max']:.2f}] densities {densities}", flush=True)
    return row


def layer_profile(modality: str, batch: int, top_p: float, repeats: int, seed: int, blob: float = 0.25) -> list[dict]:
    """Where the extractor's time goes: every step of the book's MESM and FE2E extractors (attention + top-p,
    conv1, conv2 (each with BN + ReLU), pool of each block), timed forward + backward on the inputs it
    received in one pass, the MESM and FE2E twins interleaved."""
    c, h, w = sp.PAPER_SPARSE_INPUT[modality]
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(batch, c, h, w, generator=g))
    query = torch.randn(batch, 384, generator=g)
    sizes = {k: v for k, v in mesm.PAPER_SIZES.items() if k in ("stem_channels", "block_channels", "dim", "layers", "heads")}
    torch.manual_seed(seed)
    path = mesm.VisualPathway(384, mesm.MesmConfig(attention=True, sparse=True, top_p=top_p, **sizes))
    peaked = common.PeakedAttention(path, common.peaked_prior(batch, h, w, blob, g))
    dense = mesm.VisualPathway(384, mesm.MesmConfig(attention=False, sparse=False, **sizes))
    dense.load_state_dict(path.state_dict(), strict=False)
    seen: dict = {}

    def grab(key):
        def hook(mod, inputs):
            seen[key] = inputs[0]
        return hook
    handles = []
    for tag, pw in (("mesm", path), ("fe2e", dense)):
        for i, blk in enumerate(pw.blocks):
            for part in ("conv1", "conv2", "pool"):
                handles.append(getattr(blk, part).register_forward_pre_hook(grab((tag, i, part))))
    with torch.no_grad():
        path.extract(x, query)
        dense.extract(x, query)
    peaked.check()
    for hd in handles:
        hd.remove()
    sites = dict(peaked.sites)

    def run_module(mod, inp):
        if isinstance(inp, sp.SparseTensor):
            def f():
                feats = inp.features.detach().clone().requires_grad_(True)
                mod(inp.replace(feats)).features.square().mean().backward()
        else:
            def f():
                mod(inp.detach().clone().requires_grad_(True)).square().mean().backward()
        return f

    def run_select(i):
        if i == 0:
            def f():
                xin = x.clone().requires_grad_(True)
                active = torch.ones(batch, h, w, dtype=torch.bool)
                path._select(0, xin, active, query, sparse_out=True)[0].features.square().mean().backward()
        else:
            s_in = seen[("mesm", i, "conv1")]  # what block i received; rebuild its input: the pooled sites
            prev = seen[("mesm", i - 1, "pool")]
            pooled = path.blocks[i - 1].pool(prev)

            def f():
                peaked.sites[i] = sites[i]
                s_req = pooled.replace(pooled.features.detach().clone().requires_grad_(True))
                out, _, _ = path._select_sparse(i, s_req, query)
                out.features.square().mean().backward()
            assert s_in.num_sites <= pooled.num_sites
        return f
    rows = []
    for i in range(len(path.blocks)):
        steps = [("attention + top-p", run_select(i), None)]
        for part in ("conv1", "conv2", "pool"):
            mod_s, mod_d = getattr(path.blocks[i], part), getattr(dense.blocks[i], part)
            steps.append((part, run_module(mod_s, seen[("mesm", i, part)]),
                          run_module(mod_d, seen[("fe2e", i, part)])))
        for name, f_s, f_d in steps:
            fns = {"mesm": f_s} if f_d is None else {"mesm": f_s, "fe2e": f_d}
            times = common.interleave(fns, repeats)
            inp = seen[("mesm", i, name)] if name != "attention + top-p" else None
            rows.append(dict(modality=modality, batch=batch, top_p=top_p, block=i + 1, step=name,
                             density=round(inp.density, 4) if inp is not None else None,
                             mesm_seconds=sorted(times["mesm"])[len(times["mesm"]) // 2],
                             fe2e_seconds=sorted(times["fe2e"])[len(times["fe2e"]) // 2] if "fe2e" in times else 0.0,
                             peak_mb={k: common.peak_rss_mb(fn) for k, fn in fns.items()}))
            r = rows[-1]
            print(f"profile {modality} block {i + 1} {name:18s} mesm {r['mesm_seconds'] * 1e3:7.1f} ms  "
                  f"fe2e {r['fe2e_seconds'] * 1e3:7.1f} ms  density {r['density']}", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    """Left: one layer's time ratios by density (median and range of the per-round ratios); right: where
    the extractor's time goes, step by step, MESM against FE2E."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, axes = plt.subplots(1, 3, figsize=(19, 4.6))
    lay = result["layer"]
    for ax, key, title in ((axes[0], "ours_over_scn", "book / SparseConvNet (goal 0.8)"),
                           (axes[1], "ours_over_dense", "book / dense conv2d (goal 1.2 d, attention masks)")):
        for (kind, threads) in sorted({(r["mask"], r["threads"]) for r in lay}):
            sel = [r for r in lay if r["mask"] == kind and r["threads"] == threads and key in r]
            if not sel:
                continue
            dens = [r["actual_density"] for r in sel]
            med = [r[key]["ratio"] for r in sel]
            err = [[m - r[key]["ratio_min"] for m, r in zip(med, sel)],
                   [r[key]["ratio_max"] - m for m, r in zip(med, sel)]]
            ax.errorbar(dens, med, yerr=err, marker="o" if kind == "attention" else "s", capsize=3,
                        ls="-" if threads == 1 else "--", label=f"{kind} masks, {threads} thread(s)")
        dd = sorted({r["actual_density"] for r in lay})
        if key == "ours_over_scn":
            ax.axhline(0.8, ls=":", c="grey", lw=1, label="goal 0.8")
        else:
            ax.plot(dd, [1.2 * d for d in dd], ":", c="grey", lw=1, label="goal 1.2 d")
        ax.set(xlabel="density d of active sites", ylabel="time ratio (forward + backward)",
               title=f"{title}\n3x3 layer 64->128 at 24x24, batch {result['parameters']['batch']}")
        ax.legend(fontsize=7)
    axes = [axes[0], axes[2]]
    prof = pd.DataFrame(result.get("profile", []))
    if len(prof):
        prof = prof[prof["modality"] == prof["modality"].iloc[0]]
        labels = [f"b{b} {s}" for b, s in zip(prof["block"], prof["step"])]
        ypos = range(len(prof))
        axes[1].barh([y + 0.2 for y in ypos], prof["fe2e_seconds"] * 1e3, height=0.4, label="FE2E (dense)")
        axes[1].barh([y - 0.2 for y in ypos], prof["mesm_seconds"] * 1e3, height=0.4, label="MESM (book engine)")
        axes[1].set_yticks(list(ypos), labels, fontsize=8)
        axes[1].invert_yaxis()
        axes[1].set(xlabel="ms, forward + backward",
                    title=f"extractor step by step ({prof['modality'].iloc[0]}, batch {prof['batch'].iloc[0]}, "
                          f"top_p {prof['top_p'].iloc[0]})")
        axes[1].legend(fontsize=8)
    mach = result["machine"]
    load = f"{mach['load_average_before'][0]:.1f} -> {mach['load_average_after'][0]:.1f}"
    fig.suptitle(f"{mach['cpu']} | torch {mach['torch']} | threads {mach['threads']} | load avg "
                 f"{load} on {mach['cores']} cores"
                 f" | peer: {'SparseConvNet' if result.get('scn_filter_order') else 'absent'}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), "wb")
    plt.close(fig)


#: Goals of the Performance page (a benchmark's, never a test's): one layer at most LAYER_VS_SCN x
#: SparseConvNet's time at densities 0.1-0.7 on both kinds of mask, and at most LAYER_VS_DENSE * d of the
#: dense layer's at 0.2-0.7 on the attention-shaped masks.
LAYER_VS_SCN, LAYER_VS_DENSE = 0.8, 1.2


def goals(layer_rows: list[dict]) -> list[dict]:
    """Each layer goal, per (mask kind, threads, density) where it applies: the median ratio, its range over
    the rounds, the bound and whether the median meets it (``met_whole_range``: the worst round too)."""
    out = []
    for r in layer_rows:
        d = r["density"]
        checks = []
        if "ours_over_scn" in r and 0.1 - 1e-9 <= d <= 0.7 + 1e-9:
            checks.append(("ours/SparseConvNet <= 0.8", r["ours_over_scn"], LAYER_VS_SCN))
        if r["mask"] == "attention" and 0.2 - 1e-9 <= d <= 0.7 + 1e-9:
            checks.append(("ours/dense <= 1.2 d", r["ours_over_dense"], LAYER_VS_DENSE * r["actual_density"]))
        for name, sp_, bound in checks:
            out.append(dict(goal=name, mask=r["mask"], threads=r["threads"], density=d, plan=r["cpu_plan"],
                            ratio=sp_["ratio"], ratio_min=sp_["ratio_min"], ratio_max=sp_["ratio_max"],
                            bound=bound, met=sp_["ratio"] <= bound, met_whole_range=sp_["ratio_max"] <= bound))
    return out


def main(argv=None) -> dict:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--densities", default="0.1,0.2,0.3,0.5,0.7,1.0")
    ap.add_argument("--modalities", default="faces,mel")
    ap.add_argument("--masks", default=",".join(common.MASK_KINDS), help="site mask kinds (common.site_masks)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--extractor-repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="torch thread counts, one pass each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-extractor", action="store_true")
    ap.add_argument("--profile", default="faces", help="modalities of the step-by-step profile ('' for none)")
    ap.add_argument("--label", default="", help="free text describing the machine")
    args = ap.parse_args(argv)
    common.json_out(ap, args.out)
    kinds = common.listed(ap, "--masks", args.masks, common.MASK_KINDS, "kind")
    threads = [int(t) for t in args.threads.split(",")]
    t0 = time.perf_counter()
    order = scn_filter_order() if scn is not None else None
    peer = ("absent: sparseconvnet is not importable (build it from source, see book/performance.md)"
            if scn is None else f"sparseconvnet from {Path(scn.__file__).parent}"
            + ("" if order else " FAILED its check against conv2d: not timed"))
    print("peer:", peer, flush=True)
    result = dict(machine=common.machine(args.label), parameters=vars(args), peer=peer, scn_filter_order=order,
                  layer=[], extractor=[], profile=[])
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for kind in kinds:
            result["layer"] += bench_layer([float(d) for d in args.densities.split(",")], args.repeats, args.seed,
                                           args.batch, order, kind)
        for m in [] if args.skip_extractor else args.modalities.split(","):
            for kind in kinds:
                result["extractor"].append(bench_extractor(m, args.batch, args.top_p, args.extractor_repeats,
                                                           args.seed, order, kind=kind))
    torch.set_num_threads(threads[0])
    result["profile"] = [] if args.skip_extractor else [
        row for m in args.profile.split(",") if m
        for row in layer_profile(m, args.batch, args.top_p, args.extractor_repeats, args.seed)]
    result["goals"] = goals(result["layer"])
    result["seconds_total"] = time.perf_counter() - t0
    result["machine"]["threads"] = threads
    result["machine"]["load_average_after"] = list(os.getloadavg())
    atomic_write_json(Path(args.out), result)
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and its .png in {result['seconds_total']:.0f} s")
    return result


if __name__ == "__main__":
    main()
