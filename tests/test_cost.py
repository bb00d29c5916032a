"""nbsupport.cost (Chapters 6-7) against hand-computed values and the model's own structure.  No test
here asserts a speed: timings only ever appear as values whose arithmetic is checked."""
import pandas as pd
import pytest
import torch

from nbsupport import cost
from nbsupport.models import mesm

from test_mesm import make_batch, small

torch.set_num_threads(1)


def test_interleave_rotates_the_order_and_counts_rounds():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = cost.interleave(fns, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rotated rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="rounds"):
        cost.interleave(fns, rounds=0)


def test_ratio_summary_hand_computed():
    times = {"x": [1.0, 3.0, 2.0, 4.0, 5.0], "y": [2.0, 2.0, 4.0, 4.0, 4.0]}
    s = cost.ratio_summary(times, "x", "y")  # per-round ratios 0.5, 1.5, 0.5, 1.0, 1.25
    assert s["ratio"] == 1.0 and s["low"] == 0.5 and s["high"] == 1.5
    assert s["coverage"] == pytest.approx(1 - 2 ** -4)  # rank interval of the median from 5 rounds
    assert s["verdict"] == "no difference shown"
    assert s["x_seconds"] == 3.0 and s["y_seconds"] == 4.0
    faster = cost.ratio_summary({"x": [1.0] * 5, "y": [2.0, 1.5, 1.1, 3.0, 1.2]}, "x", "y")
    assert faster["verdict"] == "faster"
    slower = cost.ratio_summary({"x": [3.0] * 5, "y": [2.0] * 5}, "x", "y")
    assert slower["verdict"] == "slower" and "slower" in cost.step_verdict(slower, "x", "y")
    few = cost.ratio_summary({"x": [1.0] * 4, "y": [2.0] * 4}, "x", "y")  # a 88 % interval: no verdict
    assert few["verdict"] == "too few rounds for a verdict" and few["coverage"] == pytest.approx(0.875)
    assert "too few rounds" in cost.step_verdict(few, "x", "y")


@pytest.mark.parametrize("build,has_attention", [(mesm.MESM, True), (mesm.FE2E, False)])
def test_step_profile_attributes_forward_and_backward_to_the_model_parts(build, has_attention):
    torch.manual_seed(0)
    model = build("LAV", config=small(), tiny_text=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = cost.step_profile(model, make_batch(b=2, t=2, p=2), repeats=1)
    assert list(table["stage"]) == list(cost.STAGES)
    ms = table.set_index("stage")
    # the parts FE2E does not have cost nothing; every part both have runs forward and backward
    assert (ms.loc["cross-modal attention (scores)", "total_ms"] > 0) == has_attention
    for stage in ("text encoder", "dense CNN stem", "CNN blocks (with pooling)", "frame transformer"):
        assert ms.loc[stage, "forward_ms"] > 0 and ms.loc[stage, "backward_ms"] > 0, stage
    assert ms.loc["optimizer", "forward_ms"] > 0
    assert table["share"].sum() == pytest.approx(1.0)
    # the profile trains a copy: the caller's weights are unchanged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    wide = cost.profile_table({"M": table})
    assert wide.loc["whole step", "M ms"] == pytest.approx(table["total_ms"].sum())


def test_pipeline_table_totals_and_shares_by_hand():
    costs = pd.DataFrame([
        dict(pipeline="A", family="two-phase", stage="read frames and audio", seconds=0.1, macs=float("nan")),
        dict(pipeline="A", family="two-phase", stage="hand-crafted features", seconds=0.3, macs=float("nan")),
        dict(pipeline="A", family="two-phase", stage="model", seconds=0.1, macs=1000.0),
        dict(pipeline="B", family="end-to-end", stage="read frames and audio", seconds=0.2, macs=float("nan")),
        dict(pipeline="B", family="end-to-end", stage="model", seconds=0.6, macs=5e6),
    ])
    t = cost.pipeline_table(costs, {"A": "50 %"})
    assert t.loc["A", "total (s)"] == pytest.approx(0.5) and t.loc["B", "total (s)"] == pytest.approx(0.8)
    assert t.loc["A", "before the model"] == pytest.approx(0.8)
    assert t.loc["B", "before the model"] == pytest.approx(0.25)
    assert t.loc["B", "model MACs"] == 5e6 and t.loc["A", "test WAcc [95 % CI]"] == "50 %"
    assert t.loc["B", "test WAcc [95 % CI]"] == "–"
    assert list(t.columns[:3]) == ["read frames and audio (s)", "hand-crafted features (s)", "model (s)"]


def test_profile_sentence_reads_the_table_by_hand():
    stages = list(cost.STAGES)  # attention is stages[2], selection [3], blocks [4]
    mine = pd.DataFrame({"stage": stages, "total_ms": [1.0, 2, 3, 4, 5, 6, 7, 8, 0]})
    other = mine.assign(total_ms=[1.0, 2, 0, 1, 9, 6, 7, 9, 0])
    sentence = cost.profile_sentence(cost.profile_table({"MESM": mine, "FE2E": other}))
    # adds (3 - 0) + (4 - 1) = 6, saves 9 - 5 = 4 in the blocks, shared stages differ by 8 - 9 = -1
    assert "adds 6 ms" in sentence and "saves 4 ms in the CNN blocks" in sentence
    assert "differ by -1 ms" in sentence and "36 ms against 35 ms" in sentence


def test_pipeline_costs_refuse_pre_extracted_features_naming_the_parameter():
    with pytest.raises(ValueError, match="'hc_set'"):
        cost.pipeline_costs({"LF-LSTM": torch.nn.Linear(1, 1)}, {}, [{"text": torch.zeros(1)}], None)
