"""nbsupport.book.fmt: tables for people, from the files and numbers a run produced."""
import inspect
import json

from nbsupport.book import fmt


def test_train_step_table_reads_the_file_it_is_given(tmp_path):
    """The benchmark's result is read from the path the caller gives (Chapter 6: its own folder's
    ``../benchmarks/results/train_step.json``), never from a path inside the installed package."""
    assert inspect.signature(fmt.train_step_table).parameters["path"].default is inspect.Parameter.empty
    row = {"preset": "chapter6", "sizes": {"stem_channels": 8, "block_channels": [16, 32, 64]},
           "mesm_over_fe2e": {"ratio": 1.4071, "ratio_min": 1.3, "ratio_max": 1.519},
           "extractor_macs": {"ratio": 0.4626}, "peak_mb": {"mesm": 310.4, "fe2e": 402.6}}
    path = tmp_path / "train_step.json"
    path.write_text(json.dumps({"rows": [row]}))
    table = fmt.train_step_table(path)
    assert list(table.index) == ["chapter6 (stem 8, blocks 16/32/64)"]
    assert table.iloc[0].to_dict() == {"MESM / FE2E step time": "1.41 [1.30, 1.52]",
                                       "MESM / FE2E extractor MACs": "46.3 %", "peak MB (MESM / FE2E)": "310 / 403"}


def test_mesm_answer_reads_each_value_from_the_runs_objects():
    """Chapter 6's measured answer: every line computed from the rows, verdicts and lift table given."""
    import numpy as np
    import pandas as pd

    from nbsupport import evidence

    rows = [{"model": "FE2E", "wacc": 0.7, "macs": 4e6, "seconds": 10.0},
            {"model": "MESM", "wacc": 0.68, "macs": 1.8e6, "seconds": 12.5}]
    this_run = evidence.Comparison("MESM", "FE2E", "wacc", evidence.Estimate(-0.02, -0.05, 0.01), "S.")
    lifts = pd.DataFrame({"modality": ["V", "V", "A"], "layer": [1, 2, 1],
                          "attention lift [95 % CI]": ["1.200 [1.100, 1.300]", "0.9", "1.0"],
                          "attention_lift_low": [1.1, 0.8, np.nan]})
    table = fmt.mesm_answer(rows, this_run=this_run, seed_verdicts={"k": {"sentence": "V."}}, cue_table=lifts)
    got = table["value"].to_dict()
    assert got["MESM wacc"] == "68.0 %" and got["FE2E wacc"] == "70.0 %"
    assert got["MESM MACs / FE2E MACs"] == "45.0 %"  # 1.8 M / 4 M
    assert got["MESM train time / FE2E train time"] == "1.25×"  # 12.5 s / 10 s
    assert got["MESM MACs per utterance"] == "1.8 M"
    assert got["MESM against FE2E, this run (test resamples; a description)"] == "S."
    assert got["across seeds: k"] == "V."
    assert got["V: attention lift, this run [95 % CI] (layers 1-3)"] == "1.200 [1.100, 1.300]; 0.9"
    assert got["V: this run's layers with the interval above 1"] == "1"
    assert got["A: this run's layers with the interval above 1"] == "no interval"
    alone = fmt.mesm_answer(rows[1:])["value"].to_dict()  # MESM without FE2E, no lifts
    assert list(alone) == ["MESM wacc", "MESM MACs per utterance"]
