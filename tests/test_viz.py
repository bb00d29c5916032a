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


def _top_p_sweep():  # Chapter 6: one trained MESM evaluated at each top_p (one point per value)
    return pd.DataFrame({"top_p": [0.3, 0.5, 0.7, 1.0], "wacc": [0.55, 0.61, 0.64, 0.66],
                         "macs_per_utt": [2e6, 3e6, 4e6, 6e6], "seconds": [1.5, 1.7, 2.0, 2.4]})


def test_quality_vs_cost_without_intervals_draws_the_sweep_and_the_reference_line():
    sweep = _top_p_sweep()
    fig = viz.quality_vs_cost(sweep, intervals=False, reference={"FE2E": 0.65}, title="t",
                              costs={"macs_per_utt": "MACs", "seconds": "wall time (s)"})
    assert fig._suptitle.get_text() == "t"
    for ax, x in zip(fig.axes, ("macs_per_utt", "seconds")):
        points = [ln for ln in ax.lines if ln.get_marker() == "o"]  # one per top_p
        drawn = sorted((float(ln.get_xdata()[0]), float(ln.get_ydata()[0])) for ln in points)
        assert drawn == sorted(zip(sweep[x], sweep["wacc"]))
        dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert len(dashed) == 1 and np.allclose(dashed[0].get_ydata(), 0.65)
        trend = [ln for ln in ax.lines if ln.get_linestyle() == "-" and ln.get_marker() != "o"]
        assert np.allclose(trend[0].get_xdata(), sweep[x]) and np.allclose(trend[0].get_ydata(), sweep["wacc"])
        assert not ax.collections  # one point per top_p: no error bars, no "mean over seeds" diamonds
        assert ax.get_ylabel() == "test wacc"
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert sorted(labels) == ["FE2E", "top_p=0.3", "top_p=0.5", "top_p=0.7", "top_p=1.0"]


def _regime_rows():  # Chapter 7: one result row per (regime, model)
    return [{"regime": g, "model": m, "wacc": w, "macs": c}
            for g, shift in (("visible", 0.0), ("hidden", -0.1))
            for m, w, c in (("LF-LSTM", 0.70, 1e5), ("FE2E", 0.75, 5e7), ("MESM", 0.74, 2e7))
            for w in [w + shift]]


def test_quality_per_regime_draws_each_rows_quality_and_cost():
    rows = _regime_rows()
    fig = viz.quality_per_regime(rows)
    bars, scatter = fig.axes[:2]
    # one bar container per regime, bars in the models' order, heights = 100 * wacc
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["visible", "hidden"]
    assert len(bars.containers) == 2
    models = [t.get_text() for t in bars.get_xticklabels()]
    for container, regime in zip(bars.containers, ("visible", "hidden")):
        want = {r["model"]: 100 * r["wacc"] for r in rows if r["regime"] == regime}
        assert np.allclose([p.get_height() for p in container.patches], [want[m] for m in models])
    drawn = sorted(map(tuple, scatter.collections[0].get_offsets()))
    assert np.allclose(drawn, sorted((r["macs"], r["wacc"]) for r in rows))
    assert scatter.get_xscale() == "log" and bars.get_ylabel() == "test wacc (%)"
    with pytest.raises(ValueError, match="macs"):
        viz.quality_per_regime([{k: v for k, v in r.items() if k != "macs"} for r in rows])
