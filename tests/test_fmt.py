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
