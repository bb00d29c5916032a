"""The protocol layer: one loader builder and one train-and-test for every model of the book.

Chapters 3-8 compare models, so every model goes through the same steps (Dai et al. 2021, Sec. 4.3;
Delbrouck et al. 2020, Sec. 4): :func:`loaders` reads the three splits of a data root in the form a
model family needs and wraps them in seeded loaders; :func:`train_and_test` fits a model with
:func:`nbsupport.train.fit` (best epoch on validation), then scores the test split with the thresholds
chosen on validation. Models never import this module; it imports them.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Mapping

import pandas as pd
import torch
from tqdm.auto import tqdm

from nbsupport import evidence, flops, train
from nbsupport.base import ParameterError
from nbsupport.data import (EMOTIONS, SPLITS, collate_mesm, collate_umons, ensure_corpus, formats, handcrafted_dataset,
                            mesm_dataset, umons_dataset)
from nbsupport.data.text import load_tokenizer
from nbsupport.models import mesm as mesm_models
from nbsupport.models import toy
from nbsupport.models import umons as umons_models

__all__ = ["LOADER_KINDS", "chapter_data", "emotion_names", "loaders", "train_and_test", "train_umons", "build_umons",
           "umons_verdicts", "UMONS_BUG_NAME",
           "top_p_sweep", "compare_attention_grad", "reference_bug_cost",
           "umons_bug_cost", "mesm_bug_cost", "SeedRuns", "train_seeds", "pooling_verdict",
           "family_seed_runs", "MESM_SEED_VARIANTS", "mesm_seed_runs", "mesm_seed_verdicts", "mesm_metrics"]

#: What each model family reads: the dataset factory, its collate function, and whether the
#: (small) feature sequences are held in memory once read.
LOADER_KINDS = ("umons", "handcrafted", "mesm")


def chapter_data(data_root, data_format: str = "auto", *, n: int, seed: int, style: str = "mosei", **knobs):
    """Where a chapter reads its data, and in which form: ``(root, data_format)``.

    No ``data_root``: the synthetic corpus of ``n`` utterances (cached; the MESM raw layout, Chapter 2),
    drawn with the corpus ``knobs`` of :class:`nbsupport.data.synth.SynthConfig` (``hidden_cue``,
    ``cue_gain``, ...; Chapter 7's two regimes). The knobs describe synthetic data only: with a
    ``data_root`` they are ignored (the data is the user's).
    Otherwise ``data_root`` as given, with its form resolved (``"auto"`` detects it;
    :func:`nbsupport.data.formats.resolve_format`): the raw layout is checked, pre-extracted features
    (UMONS, MMSA, MulT pickles, CMU-SDK sequences) are read as they are by :func:`loaders`.
    """
    if data_root in (None, ""):
        return ensure_corpus(None, n=n, seed=seed, style=style, **knobs), "raw"
    fmt, path = formats.resolve_format(data_root, data_format, style)
    return (ensure_corpus(data_root, style=style) if fmt == "raw" else path), fmt


def emotion_names(dataset, style: str = "mosei") -> list[str]:
    """The emotion columns of a loaded split, in label order (pre-extracted sets may hold fewer than six)."""
    return list(getattr(dataset, "emotion_names", None) or EMOTIONS[style])


def loaders(kind: str, root, *, dataset: str = "mosei", batch_size: int = 16, seed: int = 0,
            seq_len: int = 60, text_model: str | None = None, img_interval: float = 500,
            progress: bool = True, data_format: str = "auto", label_columns: str = "metadata",
            csd_sequences: Mapping | None = None) -> tuple[dict, dict]:
    """Train/valid/test datasets of ``kind`` and their seeded loaders (the training one shuffled with ``seed``).

    * ``"umons"``: word vectors, log-mel frames and per-frame HOG cut at ``seq_len`` (Chapters 3-4,
      Delbrouck et al. 2020, Sec. 4), held in memory once read; batches are ``collate_umons`` dicts.
    * ``"handcrafted"``: the two-phase features (Chapter 7), cached on disk; ``collate_umons``.
    * ``"mesm"``: subword tokens of ``text_model``'s tokenizer, face crops every ``img_interval`` ms and
      mel pieces (Chapters 5-7, Dai et al. 2021, Sec. 3.1), cached on disk; ``collate_mesm``.

    ``data_format`` says what ``root`` holds (:mod:`nbsupport.data.formats`): ``"raw"`` (the MESM raw
    layout, features computed here), or pre-extracted features -- ``"umons"`` (UMONS pickles),
    ``"mmsa"`` (``aligned_50.pkl`` / ``unaligned_50.pkl``), ``"mult"`` (MulT pickles), ``"csd"``
    (CMU-MultimodalSDK sequences) -- which feed ``"umons"`` and ``"handcrafted"`` as they are (read
    once into memory, ``collate_umons``); ``"auto"`` detects the form from the files.
    ``dataset`` ("mosei", "iemocap"; "mosi" for pre-extracted CMU-MOSI) says which corpus ``root``
    holds; IEMOCAP's emotions keep their own names. For ``"csd"``, ``label_columns`` says how the label
    columns are named ("metadata": the file's names, or a stop; "sdk-default": the SDK's documented
    order) and ``csd_sequences`` ({role: file or sequence name}) picks the text/audio/video sequence
    where the folder holds several (:func:`nbsupport.data.formats.load_csd`).

    Returns ``(datasets, loaders)``, dicts keyed by split.
    """
    if kind not in LOADER_KINDS:
        raise ValueError(f"loaders: parameter 'kind' must be one of {', '.join(LOADER_KINDS)}, got {kind!r}")
    fmt, path = formats.resolve_format(root, data_format, dataset)
    if fmt != "raw":
        if kind == "mesm":
            raise ParameterError(f"loaders: kind 'mesm' reads raw frames and audio (data_format 'raw'), but {path} "
                                 f"holds pre-extracted {fmt!r} features; prepare videos with "
                                 "`python -m nbsupport.data.prepare`")
        sets = {s: formats.feature_dataset(path, s, data_format=fmt, dataset=dataset, seq_len=seq_len,
                                           text_model=text_model, label_columns=label_columns,
                                           csd_sequences=csd_sequences) for s in SPLITS}
        collate, in_memory = collate_umons, False  # already in memory; items are cut on the fly
    elif kind == "umons":
        sets = {s: umons_dataset(root, dataset, s, seq_len=seq_len) for s in SPLITS}
        collate, in_memory = collate_umons, True
    elif kind == "handcrafted":
        sets = {s: handcrafted_dataset(root, dataset, s) for s in SPLITS}
        collate, in_memory = collate_umons, False
    elif kind == "mesm":
        tokenizer = load_tokenizer(text_model or None)  # offline only; clear error naming the parameter
        sets = {s: mesm_dataset(root, dataset, s, tokenizer=tokenizer, img_interval=img_interval) for s in SPLITS}
        collate, in_memory = collate_mesm, False
    else:
        raise ValueError(f"loaders: parameter 'kind' must be one of {', '.join(LOADER_KINDS)}, got {kind!r}")
    out = {}
    for s, ds in sets.items():
        if in_memory:
            ds = list(ds)
        elif hasattr(ds, "precompute"):
            ds.precompute(progress=progress)
        out[s] = train.make_loader(ds, batch_size=batch_size, shuffle=(s == "train"), seed=seed, collate_fn=collate)
    return sets, out


def train_and_test(model: torch.nn.Module, loaders: Mapping[str, Iterable], *, name: str, task: str = "emotion",
                   epochs: int, lr: float, device="auto", seed: int = 0,
                   protocol: "str | train.TrainProtocol" = "book", checkpoint_dir=None, progress: bool = True,
                   callbacks=(), macs: bool = True, **settings) -> tuple[dict, object]:
    """The book's single protocol for every model (Chapters 3-8): fit, pick the best epoch, test.

    :func:`nbsupport.train.fit` on ``loaders["train"]`` (BCE with pos_weight for emotions; best epoch
    on the validation split), with per-emotion thresholds chosen on validation by F1 when
    ``thresholds="validation"`` (Dai et al. 2021, Sec. 4.3), then the test split with those thresholds.
    Returns ``(row, fit_result)``; ``fit_result.extra["test"]`` holds the test decisions
    (:class:`nbsupport.evidence.Predictions`) that intervals are computed from; ``row`` has ``model``, ``modalities``, ``task``, the task's metrics
    (and per-emotion ones), ``n_params``, ``epochs``, ``best_epoch`` and ``seconds`` (training wall time,
    without the time spent in ``callbacks``).
    End-to-end models (FE2E, MESM) add ``top_p`` and the feature extractor's MACs per test utterance as
    it ran (``macs``) and densely (``dense_macs``): the paper's FLOPs column (``macs=False`` skips that
    extra pass over the test split, e.g. for the bug costs' many short runs).
    ``callbacks`` (``cb(epoch, row)`` after each epoch, e.g. :class:`nbsupport.interpret.LiftTracker`) go
    to :func:`~nbsupport.train.fit`, and so does the protocol: ``protocol`` (a
    :class:`~nbsupport.train.TrainProtocol` or its name: "book", "paper", "umons", "mesm") with
    ``settings`` (its fields, e.g. ``patience=3``) changed. Under the name "book" the thresholds are
    chosen on validation unless ``thresholds`` is given; otherwise the protocol's own rule holds.
    """
    t0 = time.perf_counter()
    if settings.get("thresholds") is None:  # the book's test protocol: thresholds chosen on validation
        settings["thresholds"] = "validation" if protocol == "book" else train.PROTOCOL_DEFAULT
    proto = train.TrainProtocol.named(protocol, model, **settings)
    spent = [0.0]  # seconds inside the callbacks: measurement, not training

    def timed(cb):
        def run(epoch, row):
            start = time.perf_counter()
            try:
                return cb(epoch, row)
            finally:
                spent[0] += time.perf_counter() - start
        return run

    res = train.fit(model, loaders["train"], loaders["valid"], task=task, epochs=epochs, lr=lr, device=device,
                    seed=seed, protocol=proto, checkpoint_dir=checkpoint_dir, progress=progress, desc=name,
                    callbacks=[timed(cb) for cb in callbacks])
    seconds = time.perf_counter() - t0 - spent[0]
    logits, labels, ids = train.predict(res.model, loaders["test"], task=task, device=device)
    test = train.compute_metrics(logits, labels, task, res.thresholds)
    # the decisions behind every interval the chapters print (nbsupport.evidence)
    res.extra["test"] = evidence.predictions_from(logits, labels, ids, task=task, thresholds=res.thresholds)
    row = {"model": name, "modalities": res.model.modalities, "task": task, **{k: float(v) for k, v in test.items()},
           "n_params": res.n_params, "epochs": epochs, "best_epoch": res.best_epoch, "seconds": round(seconds, 2)}
    if isinstance(res.model, mesm_models.EndToEndModel) and macs:
        ext = mesm_models.extractor_macs(res.model, loaders["test"])
        n_test = len(loaders["test"].dataset)
        row.update(top_p=float(res.model.top_p), macs=ext["macs"] / n_test, dense_macs=ext["dense_macs"] / n_test)
    return row, res


def train_umons(modalities: str, loaders: Mapping[str, Iterable], *, task: str = "emotion",
                config: "umons_models.UmonsConfig | None" = None, epochs: int = 10, lr: float = 1e-3,
                device="auto", seed: int = 0, patience: int | None = train.PROTOCOL_DEFAULT,
                checkpoint_dir=None, progress: bool = True, n_emotions: int = 6, normalise_inputs: bool = True,
                protocol: str = "book"):
    """Build a :class:`~nbsupport.models.umons.UmonsTransformer` for ``modalities`` (seeded: same
    initial weights for the same seed and modalities) and run :func:`train_and_test` on it with a 0.5
    threshold, as UMONS does (Chapters 3-4). ``config=UmonsConfig.paper()`` with ``protocol="paper"``
    and ``normalise_inputs=False`` is the authors' network trained as their code trains it.
    Returns ``(row, fit_result)``."""
    torch.manual_seed(seed)
    model = build_umons(modalities, loaders, config=config, task=task, n_emotions=n_emotions,
                        normalise_inputs=normalise_inputs)
    return train_and_test(model, loaders, name=f"UMONS-{model.modalities}", task=task, epochs=epochs, lr=lr,
                          device=device, seed=seed, thresholds=0.5, patience=patience,
                          checkpoint_dir=checkpoint_dir, progress=progress, protocol=protocol)


def build_umons(modalities: str, loaders: Mapping[str, Iterable], *, config=None, task: str = "emotion",
                n_emotions: int = 6, normalise_inputs: bool = True) -> "umons_models.UmonsTransformer":
    """The untrained UMONS model :func:`train_umons` trains (Chapters 3-4): input sizes read from the first
    training batch (the loader's own generator, so the global ``torch`` seed is untouched), inputs
    standardised on the training split. Call it under ``torch.manual_seed(seed)`` for seeded weights."""
    first = next(iter(loaders["train"]))
    model = umons_models.UmonsTransformer(modalities, train.n_outputs(task, n_emotions),
                                          config=config or umons_models.UmonsConfig(),
                                          input_dims=umons_models.input_dims_from(first))
    return model.fit_input_normalisation(loaders["train"]) if normalise_inputs else model


#: Chapter 4's name for L+A+V trained with Model_LAV's video-mask bug (a method of its seed runs).
UMONS_BUG_NAME = "LAV (video-mask bug)"


def umons_verdicts(loaders: Mapping[str, Iterable], config: "umons_models.UmonsConfig", modalities, *, seeds,
                   bug_seeds=(), bug: Mapping | None = None, task: str = "emotion", n_emotions: int = 6,
                   epochs: int, lr: float, device="auto", runs: "SeedRuns | None" = None,
                   progress: bool = True) -> tuple["SeedRuns", dict]:
    """Chapter 4's three verdicts across training seeds, in one call: does fusion pay (the best joint
    model against the best single modality, each chosen by mean validation score over seeds,
    :func:`nbsupport.evidence.compare_groups`), does vision add (L+A+V against L+A), and what the
    reference code's bug ``bug`` (e.g. ``{"video_glimpse_mask": "audio"}``) costs L+A+V.

    Every method of ``modalities`` (named by its letters, e.g. ``"LAV"``) is trained with every seed of
    ``seeds`` as :func:`train_umons` trains it (:func:`build_umons` under ``torch.manual_seed(seed)``, the
    same trainer and threshold 0.5), so a run the chapter already made with :func:`train_umons` and entered
    with :meth:`SeedRuns.add` is the same run and is not repeated. The bug is one more method,
    :data:`UMONS_BUG_NAME`, trained with each seed of ``bug_seeds``: built from the same initial weights as
    that seed's L+A+V (the bug switches change no parameter) and trained with the same data order and
    dropout draws, so its "without the bug" runs are L+A+V's seed runs (trained here for a bug seed not
    in ``seeds``). Returns ``(runs, verdicts)``: ``verdicts`` maps ``"fusion_gain"``, ``"vision_gain"``
    and ``"video_mask_bug"`` (each only when its methods were asked for) to
    :class:`~nbsupport.evidence.SeedVerdict`."""
    metric = {"emotion": "wacc", "sentiment7": "acc7", "sentiment2": "acc2"}[task]
    runs = runs if runs is not None else SeedRuns(metric)
    fit_kw = dict(epochs=epochs, lr=lr, device=device, runs=runs, progress=progress, task=task, thresholds=0.5)

    def builder(m: str, switches: Mapping | None = None):
        def build():
            model = build_umons(m, loaders, config=config, task=task, n_emotions=n_emotions)
            if switches:  # same initial weights as the fixed model built first under this seed
                buggy = build_umons(m, loaders, config=dataclasses.replace(config, **switches), task=task,
                                    n_emotions=n_emotions)
                buggy.load_state_dict(model.state_dict())
                model = buggy
            return model
        return build

    modalities = list(modalities)
    train_seeds({m: builder(m) for m in modalities}, loaders, seeds, **fit_kw)
    if bug and bug_seeds:
        train_seeds({"LAV": builder("LAV"), UMONS_BUG_NAME: builder("LAV", bug)}, loaders, bug_seeds, **fit_kw)
    def on(seed_list, table):  # the runs at these seeds of the methods trained with all of them
        seed_list = [int(s) for s in seed_list]
        return {m: {s: per[s] for s in seed_list} for m, per in table.items() if set(seed_list) <= set(per)}

    test, valid = on(seeds, runs.test), on(seeds, runs.valid)
    verdicts = {}
    single, joint = [m for m in modalities if len(m) == 1], [m for m in modalities if len(m) > 1]
    if single and joint:
        verdicts["fusion_gain"] = evidence.compare_groups(test, valid, {"joint encoding": joint,
                                                                        "single modality": single}, metric)
    if {"LA", "LAV"} <= set(modalities):
        verdicts["vision_gain"] = evidence.compare_seeds(test, "LAV", "LA", metric)
    if bug and bug_seeds:
        bug_runs = {m: v for m, v in on(bug_seeds, runs.test).items() if m in ("LAV", UMONS_BUG_NAME)}
        verdicts["video_mask_bug"] = evidence.compare_seeds(bug_runs, UMONS_BUG_NAME, "LAV", metric)
    return runs, verdicts


def top_p_sweep(model: "mesm_models.EndToEndModel", loader, top_ps, *, thresholds=None, device="cpu",
                progress: bool = True) -> pd.DataFrame:
    """Evaluate one trained MESM at several ``top_p`` (Chapter 6): quality, extractor MACs and wall time.

    The same weights are used for every ``p`` (the selection is a test-time knob here; the paper
    retrains per p). Returns a DataFrame with ``top_p, wacc, acc, f1, macs, dense_macs, seconds``;
    ``seconds`` is the wall time of the full forward pass over ``loader``. ``model.top_p`` is restored.
    """
    original, rows = model.top_p, []
    try:
        for p in tqdm(list(top_ps), desc="top_p sweep", disable=not progress, leave=False):
            model.top_p = float(p)
            with flops.MacCounter(model, include=mesm_models.is_extractor_layer) as mc:
                start = time.perf_counter()
                metrics = train.evaluate(model, loader, device=device, thresholds=thresholds)
                seconds = time.perf_counter() - start
            table = mc.table()
            rows.append(dict(top_p=float(p), wacc=metrics["wacc"], acc=metrics["acc"], f1=metrics["f1"],
                             macs=int(table["macs"].sum()), dense_macs=int(table["dense_macs"].sum()),
                             seconds=seconds))
    finally:
        model.top_p = original
    return pd.DataFrame(rows)


def compare_attention_grad(build, loaders: Mapping[str, Iterable], *, epochs: int, lr: float, seed: int = 0,
                           device="auto", metric: str = "wacc", resamples: int = evidence.BOOTSTRAP_RESAMPLES,
                           progress: bool = True, trained: Mapping | None = None, **fit_kw) -> dict:
    """Train MESM twice on the same data and seed, once with the book's learned attention
    (``attention_grad="reweight"``) and once as the authors' code (``"none"``: the attention only selects
    with its initial weights), and compare them on the test split (Chapter 6).

    ``build(attention_grad) -> EndToEndModel`` makes each model (called under the same ``torch`` seed, so
    both start from the same weights). Returns ``rows`` (the two :func:`train_and_test` rows, ``model`` =
    "MESM (reweight)" / "MESM (none)"), ``fits`` ({setting: FitResult}, for the attention maps),
    ``difference`` (:func:`nbsupport.evidence.paired_difference` of ``metric``, reweight minus none, over
    the test utterances, each model with its validation thresholds) and ``verdict`` (the sentence computed
    from that interval). ``fit_kw`` go to :func:`train_and_test` (e.g. ``protocol``, ``patience``).
    ``trained`` ({setting: (row, fit_result)}) supplies a setting already trained by the caller in exactly
    this way (same ``build``, seed, data and protocol; Chapter 6's main MESM is the "reweight" one), which
    is then not trained a second time.
    """
    rows, fits, preds = [], {}, {}
    for setting in mesm_models.ATTENTION_GRAD:
        name = f"MESM ({setting})"
        if trained and setting in trained:
            row, res = trained[setting]
            model = res.model
            row = {**row, "model": name}
        else:
            torch.manual_seed(seed)
            model = build(setting)
        if any(p.attention_grad != setting for p in (getattr(model, "pathways", None) or {}).values()):
            raise ValueError(f"compare_attention_grad: the {setting!r} model (from build or trained) has another "
                             f"attention_grad")
        if not (trained and setting in trained):
            row, res = train_and_test(model, loaders, name=name, epochs=epochs, lr=lr, seed=seed,
                                      device=device, progress=progress, **fit_kw)
        row["attention_grad"] = setting
        rows.append(row)
        fits[setting] = res
        preds[name] = res.extra["test"]
    diff, sentence = evidence.compare(preds, "MESM (reweight)", "MESM (none)", metric, resamples=resamples,
                                      seed=seed)
    return {"rows": rows, "fits": fits, "difference": diff, "verdict": sentence}


def reference_bug_cost(build, loaders: Mapping[str, Iterable], *, seeds, epochs: int, lr: float,
                       device="auto", metric: str = "wacc", measure=None, name: str = "model",
                       progress: bool = True, **fit_kw) -> dict:
    """What one bug of the authors' code costs, measured across training seeds (Chapters 4 and 6).

    For every seed: ``build(bug)`` makes the model without (``False``) and with (``True``) the bug under
    the same ``torch`` seed, the buggy one gets the fixed one's initial weights (the bug switches change
    no parameter), and both train with :func:`train_and_test` on the same loaders with that seed (same
    shuffle order and dropout draws; the corpus and its split stay fixed) and are scored on the test split.
    The cost is ``metric(bug) - metric(fixed)`` paired by seed with a t interval over seeds
    (:func:`nbsupport.evidence.seed_interval`): the variance of training again is in the interval, which a
    bootstrap over one run's test utterances would leave out. ``measure(model) -> {key: number}``
    (e.g. the attention's lift per layer) adds per-seed values of each trained model, each with its own
    mean and t interval per setting and paired difference.

    Returns ``per_seed`` (one row per seed: ``fixed``, ``bug``, their ``seconds`` and measured values),
    ``difference`` (bug minus fixed, :class:`~nbsupport.evidence.Estimate` as a dict, with ``n_seeds``),
    ``sentence`` (the verdict), ``measures`` ({key: {fixed, bug, difference}} intervals over seeds) and
    ``seconds`` (wall time of all the training and measuring).
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"reference_bug_cost: parameter 'seeds' must be distinct integers, got {seeds!r}")
    t0 = time.perf_counter()
    rows = []
    for seed in tqdm(seeds, desc=f"{name}: bug cost over seeds", disable=not progress, leave=False):
        torch.manual_seed(seed)
        models = {"fixed": build(False), "bug": build(True)}
        models["bug"].load_state_dict(models["fixed"].state_dict())  # the same initial weights
        row = {"seed": seed}
        for setting, model in models.items():
            r, res = train_and_test(model, loaders, name=f"{name} ({setting})", epochs=epochs, lr=lr,
                                    device=device, seed=seed, progress=progress, macs=False, **fit_kw)
            row[setting], row[f"{setting}_seconds"] = float(r[metric]), r["seconds"]
            for key, value in (measure(res.model) if measure else {}).items():
                row[f"{setting}: {key}"] = float(value)
        rows.append(row)
    fixed, bug = [r["fixed"] for r in rows], [r["bug"] for r in rows]
    diff = evidence.seed_interval(bug, fixed)

    def plain(est):  # metrics.json: an undefined interval end is null, not NaN
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in est.as_dict().items()}

    measures = {}
    for key in sorted({k.split(": ", 1)[1] for r in rows for k in r if k.startswith("fixed: ")}):
        a, b = [r[f"bug: {key}"] for r in rows], [r[f"fixed: {key}"] for r in rows]
        measures[key] = {"fixed": plain(evidence.seed_interval(b)), "bug": plain(evidence.seed_interval(a)),
                         "difference": plain(evidence.seed_interval(a, b))}
    return {"metric": metric, "seeds": seeds, "per_seed": rows,
            "difference": {**plain(diff), "n_seeds": len(seeds)},
            "sentence": evidence.seed_verdict(f"{name} with the bug", "without", diff, len(seeds), metric),
            "measures": measures, "seconds": round(time.perf_counter() - t0, 1)}


def umons_bug_cost(loaders: Mapping[str, Iterable], config: "umons_models.UmonsConfig", bug: Mapping, *,
                   seeds, modalities: str = "LAV", task: str = "emotion", n_emotions: int = 6, epochs: int,
                   lr: float, device="auto", metric: str | None = None, progress: bool = True) -> dict:
    """:func:`reference_bug_cost` for a UMONS bug (Chapter 4): ``config`` without and with the switches
    ``bug`` (e.g. ``{"video_glimpse_mask": "audio"}``, Model_LAV's video glimpse under the audio mask),
    built and trained as :func:`train_umons` does (inputs standardised on the training split, threshold
    0.5). ``metric`` defaults to the task's (wacc, acc7, acc2)."""
    metric = metric or {"emotion": "wacc", "sentiment7": "acc7", "sentiment2": "acc2"}[task]
    first = next(iter(loaders["train"]))
    dims = umons_models.input_dims_from(first)

    def build(with_bug: bool):
        cfg = dataclasses.replace(config, **bug) if with_bug else config
        model = umons_models.UmonsTransformer(modalities, train.n_outputs(task, n_emotions), config=cfg,
                                              input_dims=dims)
        return model.fit_input_normalisation(loaders["train"])

    return reference_bug_cost(build, loaders, seeds=seeds, epochs=epochs, lr=lr, device=device, task=task,
                              metric=metric, thresholds=0.5, name=f"UMONS-{modalities}", progress=progress)


def mesm_bug_cost(loaders: Mapping[str, Iterable], config: "mesm_models.MesmConfig", bug: Mapping, *, seeds,
                  modalities: str = "LAV", top_p: float = 0.7, text_model: str | None = None, epochs: int,
                  lr: float, device="auto", measure=None, progress: bool = True) -> dict:
    """:func:`reference_bug_cost` for a MESM bug (Chapter 6): MESM at ``top_p`` from ``config`` without and
    with the switches ``bug`` (e.g. ``{"site_order": "reference"}``, the reference code's scrambled block-1
    sites), trained with the book's protocol; ``measure`` as in :func:`reference_bug_cost`."""
    def build(with_bug: bool):
        cfg = dataclasses.replace(config, **bug) if with_bug else config
        return mesm_models.MESM(modalities, top_p=top_p, config=cfg, text_model=text_model)

    return reference_bug_cost(build, loaders, seeds=seeds, epochs=epochs, lr=lr, device=device, measure=measure,
                              name="MESM", progress=progress)


# ------------------------------------------------------------------------------------------------
# Method comparisons across training seeds (Chapters 4, 6 and 7)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SeedRuns:
    """Every (method, seed) training of a comparison decided across seeds: what
    :func:`nbsupport.evidence.compare_seeds` needs (test predictions and validation scores per method and
    seed) and the per-seed rows ``metrics.json`` carries. The trained models are not kept."""

    metric: str = "wacc"
    rows: list = dataclasses.field(default_factory=list)
    test: dict = dataclasses.field(default_factory=dict)   # method -> {seed: evidence.Predictions}
    valid: dict = dataclasses.field(default_factory=dict)  # method -> {seed: validation score}
    seconds: float = 0.0
    measures: dict = dataclasses.field(default_factory=dict)  # method -> {seed: what measure returned}

    def add(self, name: str, seed: int, row: Mapping, fit_result, measured=None) -> None:
        """Record one trained run (``row, fit_result`` as :func:`train_and_test` returns them), e.g. the
        chapter's own run at its seed, so that seed is not trained again; ``measured``: what
        :func:`train_seeds`' ``measure`` would have returned for its model (kept when not None)."""
        if measured is not None:
            self.measures.setdefault(name, {})[int(seed)] = measured
        self.test.setdefault(name, {})[int(seed)] = fit_result.extra["test"]
        self.valid.setdefault(name, {})[int(seed)] = float(fit_result.valid_metrics.get(self.metric, float("nan")))
        # the columns every run has, whether trained by train_seeds (macs=False) or added (the FLOPs pass)
        keep = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) and not k.startswith("f1_")
                and k not in ("top_p", "macs", "dense_macs")}
        self.rows.append({"seed": int(seed), **keep, "model": name,
                          f"valid_{self.metric}": self.valid[name][int(seed)]})

    def has(self, name: str, seed: int) -> bool:
        return int(seed) in self.test.get(name, {})

    def table(self) -> pd.DataFrame:
        """One row per (method, seed)."""
        return pd.DataFrame(self.rows).sort_values(["model", "seed"]).reset_index(drop=True)

    def compare(self, a: str, b: str, *, seeds=None, **kwargs) -> "evidence.SeedVerdict":
        """``a`` against ``b`` across the seeds both were trained with (:func:`evidence.compare_seeds`), or
        across ``seeds`` only (e.g. where one method was trained with fewer seeds for the budget)."""
        test = self.test
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            test = {m: {s: test[m][s] for s in seeds if s in test[m]} for m in (a, b) if m in test}
        return evidence.compare_seeds(test, a, b, self.metric, **kwargs)

    def compare_groups(self, groups: Mapping, **kwargs) -> "evidence.SeedVerdict":
        """Best of each group (chosen on validation) across seeds (:func:`evidence.compare_groups`)."""
        return evidence.compare_groups(self.test, self.valid, groups, self.metric, **kwargs)


def train_seeds(builders: Mapping, loaders: Mapping[str, Iterable], seeds, *, epochs: int, lr: float,
                device="auto", metric: str = "wacc", runs: SeedRuns | None = None,
                per_model: Mapping | None = None, measure: Mapping | None = None, progress: bool = True,
                **fit_kw) -> SeedRuns:
    """Train every method of ``builders`` (name -> a function building the untrained model) with every
    training seed and test it, with the book's protocol (:func:`train_and_test`): the seed sets the
    initial weights (``torch.manual_seed`` before the build), the shuffle order and dropout draws; the
    corpus and its split stay fixed, so the spread over seeds is the variance of training again. Runs
    already in ``runs`` (e.g. the chapter's own seed, added with :meth:`SeedRuns.add`) are not repeated.
    ``per_model[name]`` overrides keyword arguments for one method (``loaders``, ``epochs``, ...).
    ``measure[name](model) -> value`` (e.g. Chapter 6's attention on the cue regions,
    :func:`nbsupport.interpret.cue_sums`) is called on each trained model of that method and kept in
    ``runs.measures[name][seed]``; its time counts in ``runs.seconds``."""
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ParameterError(f"train_seeds: parameter 'seeds' must be distinct integers, got {seeds!r}")
    runs = runs if runs is not None else SeedRuns(metric)
    t0 = time.perf_counter()
    todo = [(s, n) for s in seeds for n in builders if not runs.has(n, s)]
    for seed, name in tqdm(todo, desc="training seeds", disable=not progress, leave=False):
        kw = {"loaders": loaders, "epochs": epochs, "lr": lr, **fit_kw, **(per_model or {}).get(name, {})}
        torch.manual_seed(seed)
        model = builders[name]()
        row, res = train_and_test(model, kw.pop("loaders"), name=name, device=device, seed=seed,
                                  progress=progress, macs=False, **kw)
        fn = (measure or {}).get(name)
        runs.add(name, seed, row, res, measured=fn(res.model) if fn else None)
    runs.seconds += round(time.perf_counter() - t0, 1)
    return runs


def pooling_verdict(data, test, *, seeds, epochs: int, done: Mapping | None = None,
                    done_seed: int = 0) -> "evidence.SeedVerdict":
    """Attention pooling against mean pooling on the cue-word task (Chapter 1; Bahdanau et al. 2015's
    additive attention as a pooling), decided across training seeds: each seed trains both poolings
    (:func:`nbsupport.models.toy.train_pooling_classifier`, same data, that seed's initial weights) and
    tests them on the same ``test`` sequences; the verdict is :func:`nbsupport.evidence.compare_seeds` on
    accuracy. ``done[pooling] = (model, accuracy, losses)``: the chapter's own run at ``done_seed``, reused."""
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ParameterError(f"pooling_verdict: parameter 'seeds' must be distinct integers, got {seeds!r}")
    tokens, lengths, labels, _ = test
    ids = [str(i) for i in range(len(labels))]
    truth = labels.numpy().astype(int)[:, None]
    runs = {}
    for pooling in ("attention", "mean"):
        for seed in seeds:
            if done and seed == done_seed and pooling in done:
                model = done[pooling][0]
            else:
                model = toy.train_pooling_classifier(pooling, data, test, epochs=epochs, seed=seed)[0]
            with torch.no_grad():
                decisions = (model(tokens, lengths) > 0).numpy().astype(int)[:, None]
            runs.setdefault(f"{pooling} pooling", {})[seed] = evidence.Predictions("emotion", decisions, truth, ids)
    return evidence.compare_seeds(runs, "attention pooling", "mean pooling", "acc")


def family_seed_runs(trained: Mapping, builders: Mapping, loaders: Mapping[str, Iterable], seeds, *,
                     families: Mapping, keep=(), seed: int, epochs: int, lr: float, device="auto",
                     metric: str = "wacc", per_model: Mapping | None = None,
                     progress: bool = True) -> tuple[SeedRuns, dict]:
    """The runs across training seeds that one corpus's family verdicts need, within a chapter's budget
    (Chapter 7: best end-to-end against best two-phase, and MESM against FE2E, in each regime).

    ``trained``: ``{method: (row, fit_result)}``, the chapter's own run of every method, trained with
    ``seed`` as ``builders[method]`` builds it (under ``torch.manual_seed(seed)``) and
    :func:`train_and_test` trains it (``per_model[method]``: its own ``loaders``, ``epochs``, ...).
    ``families``: two ``label -> [methods]`` entries. Trained with every seed of ``seeds``
    (:func:`train_seeds`; the chapter's run is entered with :meth:`SeedRuns.add` when ``seed`` is one of
    them, so it is not repeated): every method of ``keep`` that was trained (e.g. FE2E and MESM, which a
    verdict compares directly), and, from a family with no such method, only its method with the best
    *validation* ``metric`` in the chapter's run -- chosen at that one seed (the budget), never on test.
    Returns ``(runs, groups)``: ``groups`` maps each family to the methods trained with every seed (the
    groups :meth:`SeedRuns.compare_groups` picks from by mean validation score over seeds; empty where
    the family had no trained method)."""
    seeds = [int(s) for s in seeds]
    groups = {}
    for label, methods in families.items():
        have = [m for m in methods if m in trained]
        kept = [m for m in have if m in keep]
        best = max(have, key=lambda m: trained[m][1].valid_metrics[metric]) if have else None
        groups[label] = kept or ([best] if best else [])
    chosen = [m for ms in groups.values() for m in ms]
    runs = SeedRuns(metric)
    for m in chosen if seed in seeds else ():
        runs.add(m, seed, *trained[m])
    train_seeds({m: builders[m] for m in chosen}, loaders, seeds, epochs=epochs, lr=lr, device=device,
                metric=metric, runs=runs, per_model={m: (per_model or {}).get(m, {}) for m in chosen},
                progress=progress)
    return runs, groups


#: Chapter 6's MESM variants trained across seeds: name -> the :class:`~nbsupport.models.mesm.MesmConfig`
#: switches that make it (none change a parameter, so a variant built under the same ``torch`` seed starts
#: from the book's MESM's initial weights).
MESM_SEED_VARIANTS = {"MESM": {},
                      "MESM (fixed attention)": {"attention_grad": "none"},
                      "MESM (site-order bug)": {"site_order": "reference"}}


def mesm_seed_runs(loaders: Mapping[str, Iterable], config: "mesm_models.MesmConfig", *, seeds, epochs: int,
                   lr: float, modalities: str = "LAV", top_p: float = 0.7, text_model: str | None = None,
                   device="auto", fe2e: bool = True, bug_cost: bool = True, attention_grad_seeds: int = 0,
                   measure=None, runs: SeedRuns | None = None, progress: bool = True) -> SeedRuns:
    """Chapter 6's trainings across seeds, shared by all its verdicts (:func:`train_seeds`, the book's
    protocol, ``epochs`` each): the book's MESM at every seed of ``seeds``, FE2E (``fe2e``) and MESM with
    the reference code's block-1 site order (``bug_cost``) at the same seeds, and MESM with the authors'
    fixed attention (``attention_grad="none"``) at the first ``attention_grad_seeds`` of them. One MESM run
    per seed serves every comparison: it is the "without the bug" run of :func:`mesm_bug_cost` (same build,
    initial weights and order) and the ``"reweight"`` run of :func:`compare_attention_grad`.
    ``measure(model)`` is called on every trained MESM variant (``runs.measures``); ``runs`` may hold the
    chapter's own run (:meth:`SeedRuns.add`, when trained the same way), which is not repeated."""
    seeds = [int(s) for s in seeds]

    def builder(name):
        cfg = dataclasses.replace(config, **MESM_SEED_VARIANTS[name])
        return lambda: mesm_models.MESM(modalities, top_p=top_p, config=cfg, text_model=text_model)

    names = ["MESM"] + (["MESM (site-order bug)"] if bug_cost else [])
    builders = {n: builder(n) for n in names}
    if fe2e:
        builders["FE2E"] = lambda: mesm_models.FE2E(modalities, config=config, text_model=text_model)
    measures = {n: measure for n in MESM_SEED_VARIANTS} if measure else None
    kw = dict(epochs=epochs, lr=lr, device=device, measure=measures, progress=progress)
    runs = train_seeds(builders, loaders, seeds, runs=runs, **kw)
    if attention_grad_seeds:
        fixed = {"MESM (fixed attention)": builder("MESM (fixed attention)")}
        runs = train_seeds(fixed, loaders, seeds[:attention_grad_seeds], runs=runs, **kw)
    return runs


def mesm_seed_verdicts(runs: SeedRuns) -> dict:
    """Chapter 6's method verdicts across training seeds from :func:`mesm_seed_runs`' runs, keyed as in
    ``metrics.json``: ``"mesm_vs_fe2e"`` (MESM against FE2E), ``"site_order_bug"`` (the bug against
    without), ``"attention_grad"`` (learned against fixed attention, on the seeds the fixed one was
    trained with); each :class:`nbsupport.evidence.SeedVerdict` only where both methods ran."""
    pairs = {"mesm_vs_fe2e": ("MESM", "FE2E"), "site_order_bug": ("MESM (site-order bug)", "MESM"),
             "attention_grad": ("MESM", "MESM (fixed attention)")}
    return {key: runs.compare(a, b, seeds=sorted(runs.test[b]))
            for key, (a, b) in pairs.items() if a in runs.test and b in runs.test}


def _records(table):
    """A table's rows as dicts for ``metrics.json`` (None stays None)."""
    return None if table is None else table.to_dict("records")


def mesm_metrics(model: "mesm_models.EndToEndModel", fits: Mapping, *, seed: int, device="cpu", sweep=None,
                 cue_table=None, lift_by_epoch=None, lift_verdicts=(), skipped="", this_run=None,
                 seed_verdicts: Mapping | None = None, seed_runs: SeedRuns | None = None,
                 seed_lifts: Mapping | None = None) -> dict:
    """Chapter 6's keys of ``metrics.json`` beside its result rows, from the run's objects (None where an
    analysis did not run): ``sweep`` (:func:`top_p_sweep`), ``interpretability`` (the cue lift table),
    ``lift_by_epoch``, ``lift_verdicts``, ``skipped``, the sparse backend that ran on ``device``, the trained
    ``model``'s fusion weights, each model of ``fits`` (name -> its fit) with its test ``wacc`` and bootstrap
    interval (seeded by ``seed``), ``this_run_mesm_vs_fe2e`` (``this_run``, an
    :class:`nbsupport.evidence.Comparison`; only where FE2E ran), the verdicts across training seeds, their
    runs (:class:`SeedRuns`) and the lifts per seed (name -> table)."""
    extra = {"sweep": _records(sweep), "interpretability": _records(cue_table),
             "lift_by_epoch": _records(lift_by_epoch), "lift_verdicts": list(lift_verdicts), "skipped": skipped,
             "sparse_backend": mesm_models.sparse_backend_name(device), "fusion_weights": model.fusion_weights(),
             "intervals": {"wacc": {name: evidence.bootstrap(fit.extra["test"], "wacc", seed=seed).as_dict()
                                    for name, fit in fits.items()}}}
    if this_run is not None:  # this run's paired bootstrap: a description, not the verdict
        extra["this_run_mesm_vs_fe2e"] = this_run.as_dict()
    extra["seed_verdicts"] = dict(seed_verdicts or {})
    extra["seed_runs"] = _records(seed_runs.table() if seed_runs is not None else None)
    extra["seed_lifts"] = {n: _records(t) for n, t in (seed_lifts or {}).items()}
    return extra
