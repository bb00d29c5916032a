"""MESM's training step against FE2E's at the book's sizes and larger ones: where sparsity starts to pay.

Usage::

    python benchmarks/train_step.py --out benchmarks/results/train_step.json

Chapter 6 trains MESM and FE2E on the synthetic corpus with small CNNs (stem 8, blocks 16/32/64) and the
bundled MiniLM text encoder.  This times one optimisation step (forward, BCE-with-logits loss, backward,
AdamW step: ``nbsupport.cost.training_step``, the step chapter 6 times) of both models of the book
(``nbsupport.models.mesm``) on the same batches of the book's own loader
(``nbsupport.protocol.loaders("mesm", ...)``, batch 8), interleaved, for several CNN sizes from chapter
6's up to the paper's, at 1 and 2 threads, and reports the time ratio with its spread, the extractor
MACs ratio and the peak memory of a step.  The CNN widths are the only thing that changes between
presets.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import common
from nbsupport import cost
from nbsupport.base import atomic_write_json
from nbsupport.models import mesm

#: CNN/transformer sizes compared: chapter 6's defaults, then the CNN widened step by step to the paper's.
PRESETS = {
    "chapter6": dict(stem_channels=8, block_channels=(16, 32, 64), dim=32, layers=2, heads=4),
    "x2": dict(stem_channels=16, block_channels=(32, 64, 128), dim=32, layers=2, heads=4),
    "x4": dict(stem_channels=32, block_channels=(64, 128, 256), dim=32, layers=2, heads=4),
    "paper": dict(stem_channels=64, block_channels=(128, 256, 512), dim=64, layers=4, heads=4),
}


def bench_preset(name: str, sizes: dict, batches, top_p: float, repeats: int, seed: int, tiny_text: bool) -> dict:
    """FE2E and MESM(top_p) of one size preset, same initial weights, same batches, interleaved steps."""
    config = mesm.MesmConfig(**sizes)
    torch.manual_seed(seed)
    fe2e = mesm.FE2E("LAV", config=config, tiny_text=tiny_text)
    torch.manual_seed(seed)
    model = mesm.MESM("LAV", top_p=top_p, config=config, tiny_text=tiny_text)
    model.load_state_dict(fe2e.state_dict(), strict=False)  # same CNN/text/transformer weights
    fns = {}
    for key, net in (("mesm", model), ("fe2e", fe2e)):
        net.train()
        fns[key] = cost.training_step(net, batches, 1e-4)  # the step chapter 6 times (AdamW, BCE)
    times = common.interleave(fns, repeats)
    macs = mesm.extractor_macs(model, batches[0])
    macs_dense = mesm.extractor_macs(fe2e, batches[0])
    row = dict(preset=name, sizes={k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
               top_p=top_p, seconds={k: sorted(v)[len(v) // 2] for k, v in times.items()},
               extractor_macs=dict(mesm=macs["macs"], fe2e=macs_dense["macs"],
                                   ratio=macs["macs"] / macs_dense["macs"]))
    row["mesm_over_fe2e"] = common.spread(times, "mesm", "fe2e")
    row["peak_mb"] = {k: common.peak_rss_mb(fn) for k, fn in fns.items()}
    r = row["mesm_over_fe2e"]
    print(f"{name:9s} t={torch.get_num_threads()} mesm {row['seconds']['mesm'] * 1e3:7.0f} ms  fe2e {row['seconds']['fe2e'] * 1e3:7.0f} ms  "
          f"ratio {r['ratio']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]  MACs ratio "
          f"{row['extractor_macs']['ratio']:.2f}  peak MB {row['peak_mb']}", flush=True)
    return row


def goal(rows: list[dict]) -> dict:
    """The Performance page's goal, MESM's step faster than FE2E's at chapter 6's sizes, per thread count:
    ``met`` only when every interleaved round had MESM faster (the range of the per-round ratio, a
    rank interval for its median, lies below 1); the median alone is reported beside it."""
    at_ch6 = [r for r in rows if r["preset"] == "chapter6"]
    return dict(goal="MESM's training step faster than FE2E's at chapter 6's sizes",
                met={r["threads"]: r["mesm_over_fe2e"]["ratio_max"] < 1 for r in at_ch6},
                median_below_1={r["threads"]: r["mesm_over_fe2e"]["ratio"] < 1 for r in at_ch6})


def main(argv=None) -> dict:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--presets", default="chapter6,x2,x4")
    ap.add_argument("--n-utterances", type=int, default=40, help="size of the synthetic corpus (chapter 6: 240)")
    ap.add_argument("--batches", type=int, default=2, help="training batches cycled through")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="torch thread counts, one pass each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny-text", action="store_true", help="small random BERT instead of the bundled MiniLM")
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    common.json_out(ap, args.out)
    presets = common.listed(ap, "--presets", args.presets, PRESETS, "preset")
    threads = [int(t) for t in args.threads.split(",")]
    from nbsupport import protocol
    from nbsupport.data import ensure_corpus

    t0 = time.perf_counter()
    root = ensure_corpus(None, n=args.n_utterances, seed=args.seed, progress=False)
    _, loaders = protocol.loaders("mesm", root, batch_size=args.batch_size, seed=args.seed, progress=False)
    batches = []
    for b in loaders["train"]:
        batches.append(b)
        if len(batches) == args.batches:
            break
    shapes = [dict(faces=list(b["faces"].shape), faces_real=int(b["faces_mask"].sum()), mel=list(b["mel"].shape),
                   mel_real=int(b["mel_mask"].sum())) for b in batches]
    print("batches:", shapes, flush=True)
    result = dict(machine=common.machine(args.label), parameters=vars(args), batches=shapes, rows=[])
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for p in presets:
            row = bench_preset(p, PRESETS[p], batches, args.top_p, args.repeats, args.seed, args.tiny_text)
            result["rows"].append({"threads": n_threads, **row})
    result["machine"]["threads"] = threads
    result["goal"] = goal(result["rows"])
    result["seconds_total"] = time.perf_counter() - t0
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out} in {result['seconds_total']:.0f} s")
    return result


if __name__ == "__main__":
    main()
