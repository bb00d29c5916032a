"""Each chapter's parameters, declared once: rules and ranges, smoke overrides, cross-checks.

A chapter's ``parameters`` cell holds the default values; its opening call
``run = nb.start("06_mesm", globals())`` checks them against the chapter's :class:`Spec` here, and the
sweep command (``python -m nbsupport.book.experiments``) checks ``-p``/``--grid`` values against the same
spec. ``tests/test_notebooks.py`` checks that every parameters cell and its spec name the same parameters.
Smoke overrides shrink a run to well under a minute on two CPU cores along the same code path; a
parameter set explicitly (papermill's ``-p epochs 3``, a sweep's ``-p``/``--grid`` value) keeps its value:
explicit parameters win over smoke sizes.
"""
from __future__ import annotations

from nbsupport.base import ParameterError
from nbsupport.data.formats import DATA_FORMATS, LABEL_COLUMNS
from nbsupport.data.synth import MAX_CUE_GAIN
from nbsupport.data.text import TINY_TEXT_MODEL
from nbsupport.interpret import ANALYSES, COMPARISONS

from .params import (Choice, DictOf, Float, GridRule, Int, ListOf, Modalities, ParamsRule, Path_, Spec, Str,
                     shrink_grid)

__all__ = ["SPECS", "spec", "MESM_SMOKE_SIZES"]

_P = Float(min=0, max=1, open_min=True)  # a top_p
_POS = Float(min=0, open_min=True)  # a learning rate or scale
_DATA = dict(data_root=Path_(optional=True, must_exist=True))
#: Data in one of the forms researchers hold (raw MESM layout, or pre-extracted features).
_DATA_FORMAT = dict(data_format=Choice(*DATA_FORMATS))
#: The corpus a data root holds, and how a CMU-SDK (.csd) folder is read (nbsupport.data.formats.load_csd).
_REAL_DATA = dict(dataset=Choice("mosei", "iemocap"), label_columns=Choice(*LABEL_COLUMNS),
                  csd_sequences=DictOf(keys=("labels", "text", "audio", "video"), item=Str()))
#: Feature-extractor and transformer sizes of FE2E/MESM in a smoke run (tiny tensors, same code path).
MESM_SMOKE_SIZES = dict(stem_channels=8, block_channels=[8, 16, 16], dim=16, layers=1, heads=2)
_MESM_SIZES = dict(stem_channels=Int(min=1), block_channels=ListOf(Int(min=1), min_len=3), dim=Int(min=2),
                   layers=Int(min=1), heads=Int(min=1))
_E2E = dict(text_model=Str(optional=True), text_lr_scale=_POS, epochs=Int(min=1), lr=_POS, batch_size=Int(min=1))
_UMONS = dict(n_utterances=Int(min=30), hidden_size=Int(min=4), ff_size=Int(min=4), layers=Int(min=1),
              heads=Int(min=1), dropout=Float(min=0, max=0.9), seq_len=Int(min=2), epochs=Int(min=1), lr=_POS,
              batch_size=Int(min=1))
_UMONS_SMOKE = dict(n_utterances=lambda n: min(n, 60), epochs=1)
#: Chapter 6's trainings across seeds (one MESM run per seed shared by every verdict); smoke: two seeds.
_MESM_SEEDS = dict(seeds=ListOf(Int(min=0), min_len=0), seed_epochs=Int(min=1), attention_grad_seeds=Int(min=0))
#: What Chapter 6 trains beside MESM and what it analyses (each a list; empty: MESM trained and tested only).
_MESM_EXTRAS = dict(compare=ListOf(Choice(*COMPARISONS), min_len=0), analyses=ListOf(Choice(*ANALYSES), min_len=0))
_MESM_SEEDS_SMOKE = dict(seeds=lambda s: s[:2], seed_epochs=1, attention_grad_seeds=lambda n: min(n, 2))
#: Chapter 7's regimes: a name -> the synthetic corpus's ``hidden_cue`` (nbsupport.data.synth.SynthConfig).
_REGIMES = DictOf(item=Float(min=0, max=1))
_BASELINE_SIZES = DictOf(keys=("LF-LSTM", "LF-Transformer", "MulT"), item=DictOf(item=Int(min=1)), complete=True)


def _multimodal_needs_language(params: dict) -> None:
    bad = [m for m in params["modalities"] if len(m) > 1 and "L" not in m]
    if bad:
        raise ParameterError(f"parameter 'modalities': multimodal entries must include 'L' (co-attention attends "
                             f"to language), got {bad}")


def _mesm_needs_a_visual_modality(params: dict) -> None:
    if not params["modalities"].replace("L", ""):
        raise ParameterError("parameter 'modalities' must include 'A' or 'V' for MESM (the attention selects "
                             "their sites)")


def _mesm_chapter_checks(params: dict) -> None:
    """Chapter 6: a visual modality to select sites in, and data with frames and audio (raw layout)."""
    _mesm_needs_a_visual_modality(params)
    if params["data_format"] not in ("auto", "raw"):
        raise ParameterError(f"parameter 'data_format' = {params['data_format']!r}: chapter 6 trains MESM end to "
                             "end on face frames and audio, so it needs the raw layout ('raw'); pre-extracted "
                             "features (umons, mmsa, mult, csd) hold no frames. Prepare the videos with "
                             "`python -m nbsupport.data.prepare` (see Running on your data)")


def _regimes_not_empty(params: dict) -> None:
    if not params["regimes"]:
        raise ParameterError("parameter 'regimes' must name at least one regime, e.g. {'visible': 0.0}")


def _two_phase_chapter_checks(params: dict) -> None:
    """Chapter 7: at least one regime, and distinct training seeds (each seed is one run per method)."""
    _regimes_not_empty(params)
    if len(set(params["seeds"])) != len(params["seeds"]):
        raise ParameterError(f"parameter 'seeds' must hold distinct training seeds, got {params['seeds']}")


def _shrink_grid(grid: dict) -> dict:
    return shrink_grid(grid, max_points=1)


def _smoke_points(fixed: dict) -> dict:
    """Chapter 8 in smoke mode sweeps smoke-sized points of the swept chapter (same code path): the fixed
    values a chapter's smoke mode shrinks are left out, since explicit values win over smoke sizes."""
    shrunk = {name for s in SPECS.values() for name in s.smoke}
    return {**{k: v for k, v in fixed.items() if k not in shrunk}, "smoke": True}


SPECS: dict[str, Spec] = {
    "01_attention_basics": Spec(
        rules=dict(n_train=Int(min=20, max=10**6), seq_len=Int(min=4), epochs=Int(min=1), sentence=Str(),
                   seeds=ListOf(Int(min=0), min_len=1),
                   explorer_angles=ListOf(Float()), explorer_temperatures=ListOf(Float(min=0, open_min=True))),
        smoke=dict(n_train=200, epochs=40, explorer_angles=[0, 90], explorer_temperatures=[0.5, 2.0],
                   seeds=lambda s: s[:2])),
    "02_multimodal_data": Spec(
        rules=dict(**_DATA, n_utterances=Int(min=12), style=Choice("mosei", "iemocap"),
                   placement_n=Int(min=24)),
        smoke=dict(n_utterances=48, placement_n=36)),
    "03_umons_monomodal": Spec(
        rules=dict(**_DATA, **_DATA_FORMAT, **_REAL_DATA, **_UMONS, task=Choice("emotion", "sentiment7", "sentiment2"),
                   sentiment_task=Choice("", "sentiment7", "sentiment2"), modalities=ListOf(Choice("L", "A", "V"))),
        smoke=_UMONS_SMOKE),
    "04_umons_multimodal": Spec(
        rules=dict(**_DATA, **_DATA_FORMAT, **_REAL_DATA, **_UMONS,
                   task=Choice("emotion", "sentiment7", "sentiment2"), modalities=ListOf(Modalities()),
                   seeds=ListOf(Int(min=0)), bug_cost_seeds=ListOf(Int(min=0), min_len=0)),
        smoke=dict(_UMONS_SMOKE, seeds=lambda s: s[:2], bug_cost_seeds=lambda s: s[:2]),
        check=_multimodal_needs_language),
    "05_fe2e": Spec(
        rules=dict(**_DATA, n_utterances=Int(min=20), modalities=Modalities(need_text=True), **_E2E, **_MESM_SIZES),
        smoke=dict(n_utterances=lambda n: min(n, 40), epochs=1, text_model=TINY_TEXT_MODEL, **MESM_SMOKE_SIZES)),
    "06_mesm": Spec(
        rules=dict(**_DATA, **_DATA_FORMAT, dataset=Choice("mosei", "iemocap"), n_utterances=Int(min=20),
                   modalities=Modalities(need_text=True), **_E2E, top_p=_P,
                   top_p_sweep=ListOf(_P), **_MESM_EXTRAS,
                   cue_gain=Float(min=0, max=MAX_CUE_GAIN),
                   **_MESM_SIZES, attention_hidden=Int(min=1), **_MESM_SEEDS),
        smoke=dict(n_utterances=lambda n: min(n, 40), epochs=1, text_model=TINY_TEXT_MODEL, **MESM_SMOKE_SIZES,
                   attention_hidden=16, **_MESM_SEEDS_SMOKE),
        check=_mesm_chapter_checks),
    "07_two_phase_vs_end_to_end": Spec(
        rules=dict(**_DATA, **_DATA_FORMAT, **_REAL_DATA, n_utterances=Int(min=20), epochs=Int(min=1),
                   baseline_epochs=Int(min=1), lr=_POS,
                   batch_size=Int(min=1), top_p=_P,
                   models=ListOf(Choice("LF-LSTM", "LF-Transformer", "MulT", "FE2E", "MESM")),
                   text_model=Str(optional=True), e2e_sizes=DictOf(keys=tuple(_MESM_SIZES), rules=_MESM_SIZES,
                                                                   complete=True),
                   baseline_sizes=_BASELINE_SIZES, regimes=_REGIMES,
                   later_regime_models=ListOf(Choice("LF-LSTM", "LF-Transformer", "MulT", "FE2E", "MESM"),
                                              min_len=0), seeds=ListOf(Int(min=0))),
        smoke=dict(n_utterances=lambda n: min(n, 40), epochs=1, baseline_epochs=1, text_model=TINY_TEXT_MODEL,
                   seeds=lambda s: s[:2],
                   e2e_sizes=MESM_SMOKE_SIZES,
                   baseline_sizes={"LF-LSTM": dict(hidden=8), "LF-Transformer": dict(dim=8, layers=1, heads=2),
                                   "MulT": dict(dim=8, heads=2, cross_layers=1, self_layers=1)}),
        check=_two_phase_chapter_checks),
}


def _experiments_spec() -> Spec:
    return Spec(rules=dict(chapter=Str(), grid=GridRule(), fixed=ParamsRule(), workers=Int(min=1),
                           threads=Int(min=1),
                           gpus=Str(optional=True), sweep_dir=Path_(optional=True)),
                smoke=dict(grid=_shrink_grid, fixed=_smoke_points))


def spec(chapter: str) -> Spec:
    """The :class:`Spec` of ``chapter`` (a notebook stem such as ``"06_mesm"``, or its file name)."""
    name = str(chapter).rsplit("/", 1)[-1].removesuffix(".ipynb")
    if name == "08_experiments":
        return _experiments_spec()
    try:
        return SPECS[name]
    except KeyError:
        raise ParameterError(f"no parameter spec for chapter {chapter!r}; known: "
                             f"{', '.join([*SPECS, '08_experiments'])}") from None
