"""MESM's sparse feature extractor against FE2E's dense one: wall time, MACs and activation memory.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sparse_vs_dense.py --out benchmarks/results/sparse_vs_dense.json

For the paper's shapes after the dense stage (faces: 64x24x24, mel pieces: 64x64x16; MESM's code, see
``nbsupport.sparse.PAPER_SPARSE_INPUT``), batch 8 and 32 images/pieces and ``top_p`` in {0.5, 0.7, 0.9,
1.0}, it times one forward+backward pass of the book's own extractor, ``VisualPathway.extract`` of
``nbsupport.models.mesm`` at ``PAPER_SIZES`` (the three blocks 128, 256, 512 after the stem):

* **MESM** (Ch. 6): before each block the additive attention from a text vector scores every active
  site, ``top_p`` keeps each frame's nucleus, features are reweighted by attention x active sites, and
  the block runs as ``SparseVggBlock`` on the kept sites (sites stay sparse from block to block);
* **FE2E** (Ch. 5): the same three blocks as ``DenseVggBlock`` (shared weights),

interleaved in the same run (median and range of the per-round ratio over ``--repeats``).  An untrained
attention is nearly uniform, which is not what MESM learns, so the attention scores get a random
*peaked* log-prior through forward hooks (one Gaussian blob per frame, width ``--blob`` of the map;
``common.PeakedAttention``): "random but peaked" attention.  The densities this produces are reported
per block.  Memory: peak resident memory of a step (``common.peak_rss_mb``) and bytes saved for
backward (autograd saved-tensor hooks; the activation memory of training).

Also measured: one submanifold layer at density d against the dense layer (goal: <= 1.2 d x dense for
0.2 <= d <= 0.7) and the vectorised ``top_p_mask`` against a per-sample loop like MESM's original code.
Writes the JSON (list of rows under "rows" plus the other tables) and a PNG plot next to it.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import common
from nbsupport import flops
from nbsupport import sparse as sp
from nbsupport.base import atomic_write, atomic_write_json
from nbsupport.models import mesm

TEXT_DIM = 384  # all-MiniLM-L6-v2, the book's text encoder
LAYER_GOAL = 1.2  # one sparse layer at density d (0.2 <= d <= 0.7) should take <= 1.2 d x the dense layer
EXTRACTOR_GOAL = 0.4  # the extractor at top_p 0.7 should take <= 0.4 x FE2E's


# ------------------------------------------------------------------------------------------ timing
def saved_bytes(fn, model: nn.Module) -> int:
    """Bytes of distinct activation tensors autograd saves for backward while ``fn()`` runs (the
    training-time activation memory; the model's parameters are left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
        except Exception:  # tensors without storage (e.g. sparse/meta) carry no activation bytes
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def bench_extractors(modality: str, batch: int, top_ps, repeats: int, blob: float, seed: int,
                     device: str = "cpu") -> list[dict]:
    """The book's MESM extractor (one per ``top_p``) against its FE2E extractor, same blocks and inputs."""
    c, h, w = sp.PAPER_SPARSE_INPUT[modality]
    gen = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(batch, c, h, w, generator=gen)).to(device)  # post-ReLU output of the dense stage
    query = torch.randn(batch, TEXT_DIM, generator=gen).to(device)
    prior = common.peaked_prior(batch, h, w, blob, gen).to(device)
    sizes = {k: mesm.PAPER_SIZES[k] for k in ("stem_channels", "block_channels", "dim", "layers", "heads")}
    torch.manual_seed(seed)
    dense = mesm.VisualPathway(TEXT_DIM, mesm.MesmConfig(attention=False, sparse=False, **sizes)).to(device)

    def run(path):
        def f():
            xin = x.clone().requires_grad_(True)
            path.extract(xin, query).square().mean().backward()
        return f

    rows = []
    for p in top_ps:
        torch.manual_seed(seed)
        m = mesm.VisualPathway(TEXT_DIM, mesm.MesmConfig(attention=True, sparse=True, top_p=p, **sizes)).to(device)
        m.load_state_dict(dense.state_dict(), strict=False)  # shared blocks (same parameter names)
        peaked = common.PeakedAttention(m, prior)
        times = common.interleave({"sparse": run(m), "dense": run(dense)}, repeats)
        peaked.check()
        with flops.MacCounter(m) as mc_s:  # MACs counted in the forward pass that measures memory
            sb = saved_bytes(lambda: m.extract(x.clone().requires_grad_(True), query), m)
        densities = [float(r.kept.sum()) / r.kept.numel() for r in m.records]
        with flops.MacCounter(dense) as mc_d:
            db = saved_bytes(lambda: dense.extract(x.clone().requires_grad_(True), query), dense)
        strategies = [mod.last_strategy for mod in m.modules() if isinstance(mod, sp.SubMConv2d)]
        spread = common.spread(times, "sparse", "dense")
        row = dict(modality=modality, batch=batch, top_p=p,
                   sparse_seconds=spread["sparse_seconds"], dense_seconds=spread["dense_seconds"],
                   time_ratio=spread["ratio"], time_ratio_min=spread["ratio_min"],
                   time_ratio_max=spread["ratio_max"],
                   sparse_macs=mc_s.total, dense_macs=mc_d.total,
                   sparse_executed_macs=int(mc_s.table()["executed_macs"].sum()),
                   sparse_saved_mb=sb / 2**20, dense_saved_mb=db / 2**20,
                   densities=[round(d, 4) for d in densities], cpu_plans=strategies, device=str(device))
        if str(device).startswith("cuda"):  # peak GPU memory of one forward+backward of each
            for name, fn in (("sparse", run(m)), ("dense", run(dense))):
                torch.cuda.reset_peak_memory_stats()
                fn()
                row[f"{name}_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            row["sparse_peak_mb"] = common.peak_rss_mb(run(m))
            row["dense_peak_mb"] = common.peak_rss_mb(run(dense))
        row["macs_ratio"] = row["sparse_macs"] / row["dense_macs"]
        rows.append(row)
        print(f"{modality:5s} B={batch:2d} p={p:.1f}: sparse {row['sparse_seconds']*1e3:7.1f} ms  dense "
              f"{row['dense_seconds']*1e3:7.1f} ms  ratio {row['time_ratio']:.2f} [{row['time_ratio_min']:.2f}, "
              f"{row['time_ratio_max']:.2f}]  MACs ratio {row['macs_ratio']:.2f}  densities {row['densities']}",
              flush=True)
    return rows


def bench_layer(densities, repeats: int, seed: int, batch: int = 32) -> list[dict]:
    """One submanifold 3x3 conv (faces block 1: 64->128 at 24x24) at density d vs the dense conv."""
    c_in, c_out, h, w = 64, 128, 24, 24
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, h, w, generator=gen)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    sub = sp.SubMConv2d(c_in, c_out)
    sub.load_state_dict(conv.state_dict())
    rows = []
    for d in densities:
        mask = torch.rand(batch, h, w, generator=gen) < d
        s0 = sp.to_sparse(x, mask)
        s0.neighbours(3), s0.pairs(3)

        def run_dense():
            xin = x.clone().requires_grad_(True)
            conv(xin).square().mean().backward()

        def run_sparse():
            s = s0.replace(s0.features.clone().requires_grad_(True))
            sub(s).features.square().mean().backward()
        times = common.interleave({"sparse": run_sparse, "dense": run_dense}, repeats)
        spread = common.spread(times, "sparse", "dense")
        row = dict(density=d, actual_density=s0.density, sparse_seconds=spread["sparse_seconds"],
                   dense_seconds=spread["dense_seconds"], cpu_plan=sub.last_strategy, ratio=spread["ratio"],
                   ratio_min=spread["ratio_min"], ratio_max=spread["ratio_max"],
                   sparse_peak_mb=common.peak_rss_mb(run_sparse), dense_peak_mb=common.peak_rss_mb(run_dense))
        row["ratio_over_density"] = row["ratio"] / max(s0.density, 1e-9)
        row["goal_met"] = bool(row["ratio"] <= LAYER_GOAL * s0.density) if 0.2 <= d <= 0.7 else None
        rows.append(row)
        print(f"layer d={d:.2f} ({row['cpu_plan']}): sparse {row['sparse_seconds']*1e3:6.1f} ms dense "
              f"{row['dense_seconds']*1e3:6.1f} ms ratio {row['ratio']:.2f} = {row['ratio_over_density']:.2f} x d",
              flush=True)
    return rows


def top_p_mask_loop(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample Python loop in the style of MESM's original ``to_sparse_by_cdf`` (the peer
    this benchmark times the book's vectorised :func:`nbsupport.sparse.top_p_mask` against): sort, cumsum, keep entries until the mass
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


def bench_top_p(seed: int, repeats: int) -> list[dict]:
    """Vectorised top_p_mask vs a per-sample loop (MESM's original to_sparse_by_cdf style)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n_frames, sites in [(32, 576), (256, 576), (1024, 144)]:
        probs = torch.softmax(3 * torch.randn(n_frames, sites, generator=gen), -1)
        assert torch.equal(sp.top_p_mask(probs, 0.7), top_p_mask_loop(probs, 0.7))
        tv = statistics.median(common.timed(lambda: sp.top_p_mask(probs, 0.7)) for _ in range(repeats))
        tl = statistics.median(common.timed(lambda: top_p_mask_loop(probs, 0.7)) for _ in range(repeats))
        rows.append(dict(frames=n_frames, sites=sites, vectorised_seconds=tv, loop_seconds=tl, speedup=tl / tv))
        print(f"top_p_mask {n_frames}x{sites}: vectorised {tv*1e3:.2f} ms, loop {tl*1e3:.2f} ms, x{tl/tv:.0f}",
              flush=True)
    return rows


# ------------------------------------------------------------------------------------------ plot
def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame(result["rows"])
    df["series"] = df["modality"] + ", batch " + df["batch"].astype(str)
    lay = pd.DataFrame(result["layer"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sns.lineplot(df, x="top_p", y="time_ratio", hue="series", marker="o", ax=axes[0])
    axes[0].axhline(EXTRACTOR_GOAL, ls="--", c="grey", lw=1)
    axes[0].axhline(1.0, ls=":", c="grey", lw=1)
    axes[0].set(xlabel="top_p", ylabel="sparse / dense wall time (fwd+bwd)",
                title=f"MESM extractor vs FE2E: time (goal {EXTRACTOR_GOAL} at p=0.7)")
    sns.lineplot(df, x="top_p", y="macs_ratio", hue="series", marker="o", ax=axes[1], legend=False)
    axes[1].set(xlabel="top_p", ylabel="sparse / dense MACs", title="MACs (rulebook size) ratio")
    axes[2].plot(lay["actual_density"], lay["ratio"], "o-", label="measured")
    dd = lay["actual_density"]
    axes[2].plot(dd, LAYER_GOAL * dd, "--", c="grey", label=f"goal {LAYER_GOAL} d")
    axes[2].plot(dd, dd, ":", c="grey", label="ideal d")
    axes[2].set(xlabel="density d of active sites", ylabel="sparse / dense layer time",
                title="one 3x3 layer, 64->128 at 24x24")
    axes[2].legend()
    mach = result["machine"]
    fig.suptitle(f"{mach['label'] + ' | ' if mach.get('label') else ''}{mach['cpu']} | torch {mach['torch']} | "
                 f"threads {mach['threads']} | load avg {mach['load_average_before'][0]:.1f} on {mach['cores']} cores",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), "wb")
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (a PNG plot is written next to it)")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--top-p", default="0.5,0.7,0.9,1.0")
    ap.add_argument("--modalities", default="faces,mel")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blob", type=float, default=0.25, help="width of the attention prior blob (share of the map)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 only on a quiet machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny run for a smoke test")
    ap.add_argument("--label", default="", help="free text describing the machine (stored in the JSON and plot)")
    args = ap.parse_args(argv)
    out = common.json_out(ap, args.out)
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        ap.error(f"--device: 'cpu', or 'cuda' on a machine with a GPU, got {args.device!r}")
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    top_ps = [float(p) for p in args.top_p.split(",")]
    mods = common.listed(ap, "--modalities", args.modalities, sp.PAPER_SPARSE_INPUT, "modality")
    if args.quick:
        batches, top_ps, args.repeats = [2], [0.7, 1.0], 1
    t0 = time.perf_counter()
    machine = dict(cpu=common.cpu_name(), python=sys.version.split()[0], torch=torch.__version__,
                   threads=torch.get_num_threads(), cores=os.cpu_count(), load_average_before=os.getloadavg(),
                   backend=sp.backend_description(args.device), label=args.label,
                   gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    result = dict(machine=machine, parameters=vars(args), rows=[], layer=[], top_p_mask=[])
    if args.device == "cpu":  # the per-layer and top-p studies are about the CPU implementation
        result["top_p_mask"] = bench_top_p(args.seed, 3 if args.quick else 7)
        result["layer"] = bench_layer([0.2, 0.5, 1.0] if args.quick else [0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
                                      args.repeats, args.seed, batch=4 if args.quick else 32)
    for m in mods:
        for b in batches:
            result["rows"] += bench_extractors(m, b, top_ps, args.repeats, args.blob, args.seed, args.device)
    at07 = [r["time_ratio"] for r in result["rows"] if abs(r["top_p"] - 0.7) < 1e-9]
    result["summary"] = dict(
        time_ratio_at_0_7=at07, goal_time_ratio_at_0_7=EXTRACTOR_GOAL,
        goal_met_at_0_7=all(r <= EXTRACTOR_GOAL for r in at07) if at07 else None,
        layer_goal_met=[r["goal_met"] for r in result["layer"]],
        seconds_total=time.perf_counter() - t0,
        max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["machine"]["load_average_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    if result["layer"]:  # the CPU study; a GPU run writes only the JSON of extractor timings
        plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['summary']['seconds_total']:.0f} s")
    return result


if __name__ == "__main__":
    main()
