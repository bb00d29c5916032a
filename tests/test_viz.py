"""The chapters' plot helpers draw what their tables hold (nbsupport.book.viz)."""
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from nbsupport.book import viz  # noqa: E402


def _sweep():
    rows = []
    for p, base in ((0.3, 0.60), (1.0, 0.70)):
        for s in range(3):
            w = base + 0.01 * s
            rows.append({"top_p": p, "seed": s, "wacc": w, "wacc_low": w - 0.05,
                         "wacc_high": w + 0.05 if s else np.nan, "macs": 1e6 * p, "seconds": 2.0 + s})
    return pd.DataFrame(rows)


def test_quality_vs_cost_draws_every_point_and_the_means_per_value():
    fig = viz.quality_vs_cost(_sweep())
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    means = ax.collections[-1].get_offsets()  # the diamonds: one per top_p, at the mean over seeds
    assert np.allclose(sorted(map(tuple, means)), [(3e5, 0.61), (1e6, 0.71)])
    line = ax.lines[-1]
    assert np.allclose(line.get_ydata(), [0.61, 0.71])
    assert ax.get_xlabel() == "extractor MACs per test utterance"
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == ["mean over seeds", "top_p=0.3", "top_p=1.0"]


def test_quality_vs_cost_names_a_missing_column():
    with pytest.raises(ValueError, match="wacc_low"):
        viz.quality_vs_cost(_sweep().drop(columns="wacc_low"))
