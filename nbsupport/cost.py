"""Measured cost: training steps timed in interleaved rounds, where a step's time goes, and the
per-utterance cost of every pipeline from raw frames and audio to the prediction (Chapters 6-7).

Speed is only ever compared within one run: :func:`interleave` runs one repetition of every variant in
turn (the order rotated every round), so all see the same machine load, and :func:`ratio_summary` reads
the per-round ratios.  Their range over ``n`` rounds is a distribution-free confidence interval for the
median ratio, of coverage ``1 - 2 ** (1 - n)`` (94 % for five rounds): the verdict "faster" or "slower"
is printed only when the whole range lies on one side of 1.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from nbsupport import flops
from nbsupport.base import to_device
from nbsupport.data import collate_mesm, collate_umons
from nbsupport.data import features as feats
from nbsupport.data.raw import read_audio, read_frame, sample_frame_positions
from nbsupport.data.text import load_tokenizer
from nbsupport.models import baselines as bl

__all__ = ["interleave", "ratio_summary", "training_step", "compare_training_steps", "step_profile",
           "step_verdict", "profile_table", "profile_sentence", "pipeline_costs", "pipeline_table", "STAGES"]


# ------------------------------------------------------------------------------------------ timing
def _timed(fn: Callable[[], object]) -> float:
    # wall time of fn(); on CUDA the queue is drained before and after
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleave(fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time every variant ``rounds`` times, one repetition of each in turn (order rotated every round),
    after ``warmup`` untimed rounds (Chapter 6; the Performance page's benchmarks).  Returns the seconds of
    every repetition per variant."""
    if rounds < 1:
        raise ValueError(f"interleave: 'rounds' must be >= 1, got {rounds!r}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(_timed(fns[name]))
    return out


#: Rounds needed before :func:`ratio_summary` gives a verdict: their range is then a confidence
#: interval of at least 94 % for the median ratio.
MIN_VERDICT_ROUNDS = 5


def ratio_summary(times: Mapping[str, list[float]], num: str, den: str) -> dict:
    """The per-round ratio ``num / den`` (round i of one against round i of the other, timed back to back):
    its median, its range (``low``, ``high``; a confidence interval for the median of coverage
    ``1 - 2 ** (1 - rounds)``), each variant's median seconds, and the verdict: ``"faster"`` when the whole
    range lies below 1, ``"slower"`` when above, else ``"no difference shown"``; with fewer than
    :data:`MIN_VERDICT_ROUNDS` rounds none (Chapter 6)."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    n = len(ratios)
    low, high = min(ratios), max(ratios)
    verdict = ("too few rounds for a verdict" if n < MIN_VERDICT_ROUNDS else
               "faster" if high < 1 else "slower" if low > 1 else "no difference shown")
    return dict(ratio=statistics.median(ratios), low=low, high=high, rounds=n,
                coverage=1 - 2.0 ** (1 - n) if n > 1 else 0.0, verdict=verdict,
                **{f"{k}_seconds": statistics.median(times[k]) for k in (num, den)})


# ------------------------------------------------------------------------------------------ training steps
def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = model.param_groups(lr) if hasattr(model, "param_groups") else model.parameters()
    return torch.optim.AdamW(groups, lr=lr)


def training_step(model: nn.Module, batches: list[dict], lr: float = 1e-3, device="cpu") -> Callable[[], float]:
    """One optimisation step per call, cycling through ``batches`` (Chapters 5-6): forward, BCE-with-logits
    on the emotions, backward, AdamW (the text encoder at its own learning rate, as ``fit`` does).
    Returns the loss."""
    opt = _optimizer(model, lr)
    state = {"i": 0}
    model.train()

    def step() -> float:
        batch = to_device(batches[state["i"] % len(batches)], device)
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(batch), batch["emotion"].float())
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def compare_training_steps(models: Mapping[str, nn.Module], batches: list[dict], *, rounds: int = 5,
                           lr: float = 1e-3, device="cpu") -> dict:
    """Training steps of several models timed in interleaved rounds on the same ``batches`` (Chapter 6:
    MESM against FE2E).  The models are deep-copied, so trained weights are left as they are.  Returns
    ``times`` (seconds per round per model) and ``seconds`` (medians); read two of them with
    :func:`ratio_summary`."""
    fns = {name: training_step(copy.deepcopy(m), batches, lr, device) for name, m in models.items()}
    times = interleave(fns, rounds)
    return dict(times=times, seconds={k: statistics.median(v) for k, v in times.items()})


# ------------------------------------------------------------------------------------------ stage profile
#: The stages :func:`step_profile` splits a training step of FE2E/MESM into.
STAGES = ("text encoder", "dense CNN stem", "cross-modal attention (scores)", "selection and gathers",
          "CNN blocks (with pooling)", "frame transformer", "heads, fusion, loss", "optimizer", "autograd engine")


def _stage_scopes(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, stage) pairs of an :class:`~nbsupport.models.mesm.EndToEndModel` whose forward passes open
    a profiler scope; a module's own scope is the innermost one for the ops it runs."""
    scopes = [(model.text, "text encoder")]
    for p in model.pathways.values():
        scopes.append((p, "selection and gathers"))  # top-p, to/from sparse: the pathway outside its parts
        scopes.append((p.stem, "dense CNN stem"))
        scopes += [(b, "CNN blocks (with pooling)") for b in p.blocks]
        scopes += [(a, "cross-modal attention (scores)") for a in (p.cross_attention or [])]
        scopes += [(layer, "frame transformer") for layer in p.encoder]
        scopes.append((p.proj, "frame transformer"))
    return scopes


def _innermost_stage(ev) -> str | None:
    while ev is not None:
        if ev.name.startswith("stage:"):
            return ev.name[6:]
        ev = ev.cpu_parent
    return None


class _SilentFds:
    """Sends the process' stdout/stderr file descriptors to /dev/null while open: PyTorch's profiler
    (Kineto) prints a line on every start and stop from C++, which would land in the chapter's output.
    Python exceptions are unaffected."""

    def __enter__(self):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.saved = [os.dup(1), os.dup(2)]
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
        return self

    def __exit__(self, *exc):
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)


def _profile_once(model, batch, opt, loss_fn) -> tuple[dict, dict]:
    # one profiled step: wall ms per stage scope (its time minus the stage scopes nested in it, so Python
    # between ops counts where it runs), backward ms per stage of the forward op that created each node
    with _SilentFds(), profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.zero_grad(set_to_none=True)
        with record_function("stage:heads, fusion, loss"):
            loss = loss_fn(model(batch), batch["emotion"].float())
        with record_function("stage:backward"):
            loss.backward()
        with record_function("stage:optimizer"):
            opt.step()
    events = prof.events()
    seq_stage = {}
    for ev in events:  # forward ops: the sequence number autograd gives the node they create
        stage = _innermost_stage(ev)
        if ev.sequence_nr >= 0 and stage not in (None, "backward", "optimizer"):
            seq_stage.setdefault(ev.sequence_nr, stage)
    fwd = dict.fromkeys(STAGES, 0.0)
    bwd = dict.fromkeys(STAGES, 0.0)
    for ev in events:
        if not ev.name.startswith("stage:"):
            continue
        ms = ev.cpu_time_total / 1e3
        outer = _innermost_stage(ev.cpu_parent)
        if outer is not None and outer != "backward":
            fwd[outer] -= ms  # the nested scope's time is its own stage's, not the enclosing one's
        if ev.name == "stage:backward":
            bwd["autograd engine"] += ms  # what the nodes below do not account for stays here
        else:
            fwd[ev.name[6:]] += ms
    for ev in events:  # backward nodes: their whole time, to the stage of their forward op
        if ev.name.startswith("autograd::engine::evaluate_function") and _innermost_stage(ev) == "backward":
            ms = ev.cpu_time_total / 1e3
            bwd["autograd engine"] -= ms
            target = seq_stage.get(ev.sequence_nr)
            bwd[target or "optimizer"] += ms  # gradient accumulation into .grad has no forward op
    return fwd, bwd


def step_profile(model: nn.Module, batch: dict, *, lr: float = 1e-3, device="cpu", repeats: int = 3,
                 warmup: int = 1) -> pd.DataFrame:
    """Where a training step of FE2E or MESM spends its time (Chapter 6), from PyTorch's profiler: the
    forward pass is timed per model part (:data:`STAGES`, scopes opened by module hooks; a part's time
    includes the Python between its ops, not the parts nested in it), each backward node is given to the
    part whose forward op created it (autograd's sequence numbers), the AdamW update (and gradient
    accumulation) to "optimizer", and the backward time no node accounts for to "autograd engine".  ``repeats`` steps are profiled and each stage's median is kept.  Runs on
    a copy of ``model``.  Returns one row per stage: ``forward_ms``, ``backward_ms``, ``total_ms`` and
    ``share`` of the step (the profiler adds a small overhead per op)."""
    model = copy.deepcopy(model)  # the steps below train it: the caller's weights stay as they are
    step = training_step(model, [batch], lr, device)
    for _ in range(warmup):
        step()
    opt = _optimizer(model, lr)
    stack: list = []

    def enter(name):
        def hook(mod, inputs):
            rf = record_function(f"stage:{name}")
            rf.__enter__()
            stack.append(rf)
        return hook

    def leave(mod, inputs, output):
        stack.pop().__exit__(None, None, None)

    handles = []
    for mod, name in _stage_scopes(model):
        handles += [mod.register_forward_pre_hook(enter(name)), mod.register_forward_hook(leave)]
    batch = to_device(batch, device)
    runs = []
    try:
        for _ in range(repeats):
            runs.append(_profile_once(model, batch, opt, F.binary_cross_entropy_with_logits))
    finally:
        for h in handles:
            h.remove()
    rows = []
    for s in STAGES:
        f = statistics.median(r[0][s] for r in runs)
        b = statistics.median(r[1][s] for r in runs)
        rows.append(dict(stage=s, forward_ms=f, backward_ms=b, total_ms=f + b))
    table = pd.DataFrame(rows)
    table["share"] = table["total_ms"] / table["total_ms"].sum()
    return table


# ------------------------------------------------------------------------------------------ pipelines
def _sampled_frames(raw, i: int, img_interval: float, max_frames: int | None):
    paths, idx = raw.frames(i)
    pos = sample_frame_positions(idx, img_interval)
    if max_frames is not None and len(pos) > max_frames:
        pos = [pos[j] for j in np.linspace(0, len(pos) - 1, max_frames).round().astype(int)]
    return [paths[p] for p in pos]


class _Clock:
    """Adds the wall time of ``with clock("stage"):`` blocks per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.muted = False  # True: blocks run untimed (a warm-up)

    def __call__(self, stage: str):
        clock = self

        class _Block:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if not clock.muted:
                    clock.seconds[stage] = clock.seconds.get(stage, 0.0) + time.perf_counter() - self.t0
        return _Block()


def _pipeline_rows(models: Mapping[str, nn.Module], family: str, clock, items: list, collate, device,
                   macs_per_utterance) -> list[dict]:
    """Rows of :func:`pipeline_costs` for one family: its feature stages (timed once by ``clock`` for all
    its models) and each model's own per-utterance forward time (after one untimed warm-up) and MACs."""
    n = len(items)
    rows = []
    for name, model in models.items():
        rows += [dict(pipeline=name, family=family, stage=stage, seconds=sec / n, macs=np.nan)
                 for stage, sec in clock.seconds.items()]
        model.eval()
        with torch.no_grad():
            model(to_device(collate(items[:1]), device))  # warm-up, untimed
            t = sum(_timed(lambda it=it: model(to_device(collate([it]), device))) for it in items)
            macs = macs_per_utterance(model)
        rows.append(dict(pipeline=name, family=family, stage="model", seconds=t / n, macs=macs))
    return rows


def pipeline_costs(two_phase: Mapping[str, nn.Module], end_to_end: Mapping[str, nn.Module], hc_set, raw_set, *,
                   n_utterances: int = 3, text_model: str | None = None, device="cpu") -> pd.DataFrame:
    """Per-utterance wall time of every stage of every pipeline, from the raw frames and audio on disk to the
    prediction, measured in one run on the first ``n_utterances`` of a split (Chapter 7).

    Two-phase models (``two_phase``: trained baselines on the hand-crafted view ``hc_set``): reading the
    frames sampled every ``img_interval`` ms of ``hc_set.settings`` and the audio, face detection and
    crop (:func:`~nbsupport.data.features.face_crop`), the hand-crafted features (face geometry/HOG per
    frame, MFCC/prosody windows, word vectors of the bundled encoder's embeddings) and the model.
    End-to-end models (``end_to_end``: FE2E, MESM on ``raw_set``): reading frames (every ``img_interval`` of
    ``raw_set.settings``) and audio, face detection and crop, log-mel pieces and the subword tokens of
    ``text_model``'s tokenizer, and the model.  Reading and feature stages are
    timed once per view and shared by its models; each model runs in eval mode on one utterance at a time.
    Every stage runs once untimed first (word vectors and librosa's compiled kernels load once per
    process).  MACs are given for the models (linear and convolution layers and the LSTM gates and attention matmuls
    that :func:`~nbsupport.models.baselines.model_macs` counts; for FE2E/MESM the whole model's linear and
    convolution layers, sparse ones as they ran); feature extraction has no MAC count.  Returns one row per
    (pipeline, stage): ``seconds`` per utterance, ``macs`` per utterance (NaN where undefined)."""
    for name, ds, models in (("hc_set", hc_set, two_phase), ("raw_set", raw_set, end_to_end)):
        if models and not (hasattr(ds, "raw") and hasattr(ds, "settings")):
            raise ValueError(f"pipeline_costs: parameter '{name}' must be a dataset read from raw frames and "
                             f"audio (protocol.loaders on data_format 'raw'), got {type(ds).__name__}")
    n = min([int(n_utterances)] + [len(s) for s, m in ((hc_set, two_phase), (raw_set, end_to_end)) if m])
    if n < 1:
        raise ValueError(f"pipeline_costs: 'n_utterances' must be >= 1 and the splits non-empty, got {n_utterances!r}")
    rows = []
    # --- two-phase view: every stage from the files, timed per utterance
    hc_clock = _Clock()
    wv = feats.WordVectors() if two_phase else None  # the vectors the hand-crafted loader uses
    hc = hc_set.settings
    # the first utterance runs once untimed first: loading the word vectors and compiling librosa's
    # kernels happen once per process, not per utterance
    for k, i in enumerate([0, *range(n)] if two_phase else ()):
        hc_clock.muted = k == 0
        with hc_clock("read frames and audio"):
            frames = [read_frame(p) for p in _sampled_frames(hc_set.raw, i, hc["img_interval"], hc["seq_len"])]
            wav, sr = read_audio(hc_set.raw.audio_path(i), feats.SR)
        with hc_clock("face detection and crop"):
            crops = [feats.face_crop(f)[0] for f in frames]
        with hc_clock("hand-crafted features"):
            np.stack([feats.face_geometry(c) for c in crops])
            feats.prosody_windows(wav, sr, max_windows=hc["seq_len"])
            wv((feats.split_words(hc_set.raw.texts[i])[:hc["seq_len"]] or ["<empty>"]))
    items = [hc_set[i] for i in range(n)] if two_phase else []
    rows += _pipeline_rows(two_phase, "two-phase", hc_clock, items, collate_umons, device,
                           lambda model: bl.model_macs(model, items, collate_umons, device=device))
    # --- end-to-end view
    e2e_clock = _Clock()
    tok = load_tokenizer(text_model or None) if end_to_end else None
    st = raw_set.settings
    for k, i in enumerate([0, *range(n)] if end_to_end else ()):
        e2e_clock.muted = k == 0  # the first utterance once untimed (one-time loading)
        with e2e_clock("read frames and audio"):
            frames = [read_frame(p) for p in _sampled_frames(raw_set.raw, i, st["img_interval"], None)]
            wav, sr = read_audio(raw_set.raw.audio_path(i), feats.SR)
        with e2e_clock("face detection and crop"):
            [feats.face_crop(f)[0] for f in frames]
        with e2e_clock("log-mel pieces and tokens"):
            feats.mel_pieces(wav, sr)
            tok(raw_set.raw.texts[i], truncation=True, max_length=50)
    items = [raw_set[i] for i in range(n)] if end_to_end else []
    rows += _pipeline_rows(end_to_end, "end-to-end", e2e_clock, items, collate_mesm, device,
                           lambda model: sum(int(flops.count_macs(
                               model, to_device(collate_mesm([it]), device))["macs"].sum())
                               for it in items) / n)
    return pd.DataFrame(rows)


def pipeline_table(costs: pd.DataFrame, quality: Mapping[str, str] | None = None) -> pd.DataFrame:
    """:func:`pipeline_costs` as one row per pipeline (Chapter 7): seconds per utterance of each stage, the
    total, the share spent before the model, the model's MACs per utterance, and ``quality`` (e.g. each
    model's test WAcc with its interval) next to it."""
    wide = costs.pivot_table(index="pipeline", columns="stage", values="seconds", aggfunc="sum", sort=False)
    order = ["read frames and audio", "face detection and crop", "hand-crafted features",
             "log-mel pieces and tokens", "model"]
    wide = wide[[c for c in order if c in wide.columns] + [c for c in wide.columns if c not in order]]
    out = pd.DataFrame(index=wide.index)
    for stage in wide.columns:
        out[f"{stage} (s)"] = wide[stage]
    out["total (s)"] = wide.sum(axis=1, skipna=True)
    out["before the model"] = 1 - wide["model"] / out["total (s)"]
    model_rows = costs[costs["stage"] == "model"].set_index("pipeline")
    out["model MACs"] = model_rows["macs"].reindex(out.index)
    out["family"] = costs.drop_duplicates("pipeline").set_index("pipeline")["family"].reindex(out.index)
    if quality is not None:
        out["test WAcc [95 % CI]"] = [quality.get(p, "–") for p in out.index]
    return out


def step_verdict(summary: Mapping, a: str, b: str) -> str:
    """A sentence from :func:`ratio_summary`: ``a``'s training step against ``b``'s (Chapter 6)."""
    s = summary
    what = {"faster": f"{a}'s training step is faster than {b}'s",
            "slower": f"{a}'s training step is slower than {b}'s",
            "no difference shown": f"no difference between {a}'s and {b}'s training steps is shown",
            "too few rounds for a verdict": f"too few rounds to compare {a}'s and {b}'s training steps"
            }[s["verdict"]]
    return (f"{what}: {a}/{b} time per step {s['ratio']:.2f} (range over {s['rounds']} interleaved rounds "
            f"{s['low']:.2f} to {s['high']:.2f}, a {100 * s['coverage']:.0f} % interval for the median; "
            f"{s[a + '_seconds']:.2f} s against {s[b + '_seconds']:.2f} s per step, this machine, "
            f"{torch.get_num_threads()} thread(s)).")


def profile_table(profiles: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Several :func:`step_profile` tables side by side (Chapter 6: MESM against FE2E): milliseconds of
    forward + backward per stage and each stage's share of its model's step, plus a total row."""
    out = pd.DataFrame(index=list(STAGES) + ["whole step"])
    for name, t in profiles.items():
        ms = t.set_index("stage")["total_ms"]
        out[f"{name} ms"] = list(ms.reindex(STAGES)) + [ms.sum()]
        out[f"{name} share"] = list(ms.reindex(STAGES) / ms.sum()) + [1.0]
    out.index.name = "stage"
    return out


def profile_sentence(table: pd.DataFrame, a: str = "MESM", b: str = "FE2E") -> str:
    """What :func:`profile_table` says about ``a`` against ``b`` (Chapter 6): what ``a`` adds (the
    cross-modal attention and the selection), what it saves or loses in the CNN blocks, and how much the
    stages both share differ (the profile's noise)."""
    ms = {name: table[f"{name} ms"] for name in (a, b)}
    added = sum(ms[a][s] - ms[b][s] for s in ("cross-modal attention (scores)", "selection and gathers"))
    blocks = ms[b]["CNN blocks (with pooling)"] - ms[a]["CNN blocks (with pooling)"]
    shared = [s for s in STAGES if s not in ("cross-modal attention (scores)", "selection and gathers",
                                             "CNN blocks (with pooling)")]
    rest = sum(ms[a][s] - ms[b][s] for s in shared)
    saves = f"saves {blocks:.0f} ms in the CNN blocks" if blocks >= 0 else \
        f"spends {-blocks:.0f} ms more in the CNN blocks"
    return (f"Per profiled step, against {b}, {a} adds {added:.0f} ms in the cross-modal attention and the "
            f"selection and {saves}; the stages both models share differ by {rest:+.0f} ms in total (the "
            f"profile's own noise). Whole step: {ms[a]['whole step']:.0f} ms against {ms[b]['whole step']:.0f} ms.")
