"""Where one submanifold layer's time goes, plan by plan, and the rates of the kernels it hands work to
(Performance page, "Where one layer's time goes").

Usage::

    python benchmarks/layer_anatomy.py --out benchmarks/results/layer_anatomy.json

The layer is ``peer_scn.py``'s (3x3, 64 -> 128 channels, 24x24 maps, batch 32, forward + backward) on the
two kinds of site mask of ``common.site_masks``.  Four measurements, all in one run, one thread:

* **plans**: the book's engine (:func:`nbsupport.sparse.subm_conv2d`) forced to each CPU plan ("pairs",
  "im2col", "tiles") and the dense ``conv2d``, timed interleaved (``common.interleave``); then each plan
  once more under PyTorch's profiler, every op's self time put into one of :data:`CATEGORIES` (the
  GEMMs MKL runs, the convolutions oneDNN runs, the gathers and scatters, the rest), as shares of the
  profiled wall time.  This says whether a plan's time is set by its kernels or by the memory passes
  around them.  ``kernels_only_seconds``: the best plan's time times its kernels' share, i.e. what it
  would take with every gather, scatter and Python step free; ``kernels_only_over_scn``: that against
  SparseConvNet's time in the same run (when ``sparseconvnet`` is importable), the most any rewrite
  of the memory passes around the same kernel calls could give.
* **rates**: GFLOP/s of the kernel calls these plans make, at the layer's sizes with the number of
  sites of density 0.3: MKL's ``mm`` with inner size K = C_in (one kernel offset, the pairs plan's
  GEMM), 3 C_in (a kernel row) and 9 C_in (im2col), the 8-offset ``bmm`` of the former, batched pairs
  plan, and oneDNN's
  ``conv2d`` forward + backward on the whole 24x24 map and on 4x4 output tiles with their halo covering
  the same output cells (the block-sparse plan's kernel).
* **planner**: at the reference layer and at chapter 6's widths (8 -> 16 at 48x48, 16 -> 32 at 24x24,
  32 -> 64 at 12x12, 56 frames), both kinds of mask, densities 0.1 to 0.7: every plan timed
  interleaved, each plan's measured cost in the units of :func:`nbsupport.sparse.plan_costs` (one
  output cell of the dense layer: the pairs plan per active pair / k^2, im2col per site, tiles per
  output cell of its tiles) next to the cost model's, and the plan the planner picks against the
  fastest (``regret``: the picked plan's time over the fastest's).  This is how the constants of
  :data:`nbsupport.sparse.PAIRS_COST` and its neighbours are measured.
* **tiles**: for each attention-shaped density, the 4x4 tiles' fill and the time the block-sparse plan
  would take with every overhead removed (the tiles' output cells at the tile kernel's rate), against
  the goal 1.2 d of the dense layer.

A FLOP here is 2 per multiply-accumulate; forward + backward of a convolution is 3 times its forward.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import common
import peer_scn
from nbsupport import sparse as sp
from nbsupport.base import atomic_write_json
from nbsupport.sparse import engine

C_IN, C_OUT, H, W, K = 64, 128, 24, 24, 3
PLANS = ("pairs", "im2col", "tiles")

#: Profiler op names of each category (self time); any other op counts as "other".
CATEGORIES = {
    "GEMM (MKL)": ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::matmul"),
    "convolution (oneDNN)": ("aten::mkldnn_convolution", "aten::convolution_backward"),
    "gather / scatter": ("aten::index_select", "aten::index_add_", "aten::scatter_add_", "aten::index",
                         "aten::index_put_", "aten::_index_put_impl_", "aten::cat", "aten::gather",
                         "aten::scatter_", "aten::index_add"),
}


def category(op: str) -> str:
    """The :data:`CATEGORIES` entry a profiler op name belongs to ("other" when none)."""
    for name, ops in CATEGORIES.items():
        if op in ops:
            return name
    return "other"


def median_time(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def layer_step(s: sp.SparseTensor, weight: torch.Tensor, upstream: torch.Tensor, plan: str, grid=(H, W)):
    """One forward + backward of the layer on the sites of ``s`` (on a ``grid`` map) by the engine's
    ``plan``."""
    nbr, pairs, tiles = s.neighbours(K), s.pairs(K), s.tiles(K)

    def step():
        f = s.features.clone().requires_grad_(True)
        out = engine.subm_conv2d(f, s.coords, weight, spatial_shape=grid, batch_size=s.batch_size,
                                 neighbours=nbr, strategy=plan, pairs=pairs, tiles=tiles)
        out.backward(upstream)
    return step


def dense_step(x: torch.Tensor, weight: torch.Tensor):
    """One forward + backward of the dense layer (FE2E's), as ``peer_scn.py`` times it."""
    def step():
        xin = x.clone().requires_grad_(True)
        out = F.conv2d(xin, weight, padding=1)
        out.backward(torch.ones_like(out))
    return step


def scn_step(s: sp.SparseTensor, dense_w: torch.Tensor, order: str, upstream: torch.Tensor):
    """One forward + backward of SparseConvNet's ``SubmanifoldConvolution`` on the same sites and weights
    (``peer_scn.py`` checks its values against dense ``conv2d``; here it is only timed)."""
    peer = peer_scn.scn.SubmanifoldConvolution(2, C_IN, C_OUT, K, False)
    peer.weight.data.copy_(peer_scn.scn_weight(dense_w, order))
    t_in = peer_scn.scn_input(s.coords, s.features, (H, W), s.batch_size)
    peer(t_in)  # builds and caches its rulebook, as peer_scn.py does before timing
    feats = t_in.features.detach()

    def step():
        t_in.features = feats.clone().requires_grad_(True)
        peer(t_in).features.backward(upstream)
    return step


def shares(step, rounds: int = 3) -> dict:
    """Self time of ``step``'s ops under the profiler, per :data:`CATEGORIES` entry, as shares of the
    profiled wall time; "between ops" is the rest (Python, dispatch, the profiler's own overhead, which
    makes every op's share a little smaller than without it)."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(rounds):
            step()
        wall = (time.perf_counter() - t0) * 1e6  # microseconds, the profiler's unit
    total: dict[str, float] = {}
    for ev in prof.key_averages():
        c = category(ev.key)
        total[c] = total.get(c, 0.0) + ev.self_cpu_time_total
    out = {c: total.get(c, 0.0) / wall for c in list(CATEGORIES) + ["other"]}
    out["between ops"] = max(0.0, 1.0 - sum(out.values()))
    return out


def bench_plans(kinds, densities, repeats: int, seed: int, batch: int) -> list[dict]:
    """Interleaved times of every plan and the dense layer, and each plan's profile shares."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C_IN, H, W, generator=g)
    dense_w = torch.randn(C_OUT, C_IN, K, K, generator=g) * 0.05
    weight = engine.offset_major(dense_w).requires_grad_(True)  # stored as SubMConv2d stores it
    dense_w.requires_grad_(True)
    order = peer_scn.scn_filter_order() if peer_scn.scn is not None else None
    rows = []
    for kind in kinds:
        for d in densities:
            s = sp.to_sparse(x, common.site_masks(kind, batch, H, W, d, g))
            upstream = torch.randn(s.num_sites, C_OUT, generator=g)
            fns = {plan: layer_step(s, weight, upstream, plan) for plan in PLANS}
            fns["dense"] = dense_step(x, dense_w)
            if order is not None:
                fns["scn"] = scn_step(s, dense_w, order, upstream)
            times = common.interleave(fns, repeats)
            sec = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            tp = s.tiles(K)
            best_plan = min(PLANS, key=sec.get)
            row = dict(mask=kind, density=d, actual_density=s.density, sites=s.num_sites,
                       pairs_per_site=s.pairs(K).n_pairs / s.num_sites, tile=list(tp.tile), tile_fill=tp.fill,
                       seconds=sec, over_dense_per_d={p: sec[p] / sec["dense"] / s.density for p in PLANS},
                       best_plan=best_plan, shares={p: shares(fns[p]) for p in PLANS})
            # the best plan with its gathers, scatters and every other op free: its kernels' time alone
            kernels = sec[best_plan] * sum(v for c, v in row["shares"][best_plan].items()
                                           if c in ("GEMM (MKL)", "convolution (oneDNN)"))
            row["kernels_only_seconds"] = kernels
            if "scn" in sec:
                row["best_over_scn"] = sec[best_plan] / sec["scn"]
                row["kernels_only_over_scn"] = kernels / sec["scn"]
            rows.append(row)
            best = row["best_plan"]
            print(f"{kind:9s} d={d:.1f} " + " ".join(f"{k} {v * 1e3:6.1f}" for k, v in sec.items())
                  + f" ms | best {best} {row['over_dense_per_d'][best]:.2f} d | "
                  + ", ".join(f"{c} {v:.0%}" for c, v in row["shares"][best].items())
                  + (f" | best/scn {row['best_over_scn']:.2f}, kernels only {row['kernels_only_over_scn']:.2f}"
                     if "scn" in sec else ""), flush=True)
    return rows


def bench_rates(repeats: int, seed: int, batch: int) -> dict:
    """GFLOP/s of the kernel calls the CPU plans make, at the layer's sizes (M = sites at d = 0.3)."""
    g = torch.Generator().manual_seed(seed)
    m = round(0.3 * batch * H * W)
    out = {}
    for taps, name in ((1, "mm K=C_in (one offset, pairs)"), (3, "mm K=3 C_in (a kernel row)"),
                       (9, "mm K=9 C_in (im2col)")):
        a, b = torch.randn(m, taps * C_IN, generator=g), torch.randn(taps * C_IN, C_OUT, generator=g)
        out[name] = 2 * m * taps * C_IN * C_OUT / median_time(lambda: a @ b, repeats) / 1e9
    a, b = torch.randn(8, m, C_IN, generator=g), torch.randn(8, C_IN, C_OUT, generator=g)
    out["bmm 8 offsets x K=C_in (former batched pairs)"] = 2 * 8 * m * C_IN * C_OUT / median_time(lambda: torch.bmm(a, b),
                                                                                   repeats) / 1e9
    w = torch.randn(C_OUT, C_IN, K, K, generator=g)
    cells = batch * H * W
    flop = 3 * 2 * cells * K * K * C_IN * C_OUT  # forward + backward over the same output cells
    full = torch.randn(batch, C_IN, H, W, generator=g).contiguous(memory_format=torch.channels_last)
    tiles = torch.randn(cells // 16, C_IN, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    for name, inp, pad in (("conv2d fwd+bwd, whole 24x24 maps", full, 1),
                           ("conv2d fwd+bwd, 4x4 tiles with halo", tiles, 0)):
        def step(inp=inp, pad=pad):
            xi, wi = inp.clone().requires_grad_(True), w.clone().requires_grad_(True)
            y = F.conv2d(xi, wi, padding=pad)
            y.backward(torch.ones_like(y))
        out[name] = flop / median_time(step, repeats) / 1e9
    return out


#: (C_in, C_out, frames, H, W) of the planner measurement: the reference layer, then chapter 6's widths.
PLANNER_SHAPES = ((64, 128, 32, 24, 24), (8, 16, 56, 48, 48), (16, 32, 56, 24, 24), (32, 64, 56, 12, 12))


def bench_planner(kinds, densities, repeats: int, seed: int) -> list[dict]:
    """Every CPU plan timed at :data:`PLANNER_SHAPES`; measured unit costs against the cost model, and
    the planner's pick against the fastest plan."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c_in, c_out, frames, h, w in PLANNER_SHAPES:
        x = torch.randn(frames, c_in, h, w, generator=g)
        dense_w = torch.randn(c_out, c_in, K, K, generator=g) * 0.1
        weight = engine.offset_major(dense_w).requires_grad_(True)
        dense_w.requires_grad_(True)
        cells = frames * h * w
        for kind in kinds:
            for d in densities:
                s = sp.to_sparse(x, common.site_masks(kind, frames, h, w, d, g))
                upstream = torch.randn(s.num_sites, c_out, generator=g)
                fns = {plan: layer_step(s, weight, upstream, plan, (h, w)) for plan in PLANS}
                fns["dense"] = dense_step(x, dense_w)
                times = common.interleave(fns, repeats)
                sec = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
                unit = sec["dense"] / cells  # one output cell of the dense layer
                tiles = s.tile_count(K)
                n_pairs = s.pairs(K).n_pairs
                measured = dict(pairs=sec["pairs"] / unit / (n_pairs / K ** 2), im2col=sec["im2col"] / unit / s.num_sites,
                                tiles=sec["tiles"] / unit / (tiles.n_tiles * tiles.tile[0] * tiles.tile[1]), dense=1.0)
                model = sp.plan_costs(s.neighbours(K), (h, w), frames, tiles, channels=(c_in, c_out))
                model_unit = dict(pairs=model["pairs"] / (n_pairs / K ** 2), im2col=model["im2col"] / s.num_sites,
                                  tiles=model["tiles"] / (tiles.n_tiles * tiles.tile[0] * tiles.tile[1]), dense=1.0)
                pick = min(model, key=model.get)
                fastest = min(sec, key=sec.get)
                rows.append(dict(channels=[c_in, c_out], grid=[frames, h, w], mask=kind, density=d,
                                 actual_density=s.density, tile=list(tiles.tile), seconds=sec,
                                 measured_unit_cost=measured, model_unit_cost=model_unit, picked=pick,
                                 fastest=fastest, regret=sec[pick] / sec[fastest]))
                print(f"planner {c_in}->{c_out} {kind:9s} d={d:.1f} picked {pick:6s} fastest {fastest:6s} "
                      f"regret {sec[pick] / sec[fastest]:.2f} | unit costs measured/model "
                      + " ".join(f"{p} {measured[p]:.2f}/{model_unit[p]:.2f}" for p in PLANS), flush=True)
    return rows


def tile_limits(rows: list[dict], rates: dict) -> list[dict]:
    """Per attention-shaped density: the block-sparse plan's time with every overhead removed (its
    tiles' output cells at the tile kernel's measured rate) over the dense layer's, in units of d."""
    slow = rates["conv2d fwd+bwd, whole 24x24 maps"] / rates["conv2d fwd+bwd, 4x4 tiles with halo"]
    out = []
    for r in rows:
        if r["mask"] != "attention":
            continue
        ideal = slow / r["tile_fill"]  # d / fill of the grid at the tile kernel's rate, in units of d
        out.append(dict(density=r["density"], tile=r["tile"], tile_fill=r["tile_fill"], tile_kernel_slowdown=slow,
                        ideal_tiles_per_d=ideal, measured_tiles_per_d=r["over_dense_per_d"]["tiles"],
                        goal_per_d=1.2, fill_needed_for_goal=slow / 1.2))
    return out


def main(argv=None) -> dict:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--densities", default="0.1,0.2,0.3,0.5,0.7")
    ap.add_argument("--masks", default=",".join(common.MASK_KINDS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--planner-repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="free text describing the machine")
    args = ap.parse_args(argv)
    common.json_out(ap, args.out)
    kinds = common.listed(ap, "--masks", args.masks, common.MASK_KINDS, "kind")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    densities = [float(d) for d in args.densities.split(",")]
    rows = bench_plans(kinds, densities, args.repeats, args.seed, args.batch)
    planner = bench_planner(kinds, densities, args.planner_repeats, args.seed)
    rates = bench_rates(args.repeats, args.seed, args.batch)
    for k, v in rates.items():
        print(f"{k:40s} {v:6.1f} GFLOP/s", flush=True)
    result = dict(machine=common.machine(args.label), parameters=vars(args), plans=rows, rates=[dict(kernel=k, gflop_per_s=v) for k, v in rates.items()], planner=planner,
                  tiles=tile_limits(rows, rates), seconds_total=time.perf_counter() - t0)
    result["machine"]["threads"] = [1]
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out} in {result['seconds_total']:.0f} s")
    return result


if __name__ == "__main__":
    main()
