"""Chapter 8's computed answer (nbsupport.book.sweep_stats) against hand-computed values and scipy."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nbsupport.book import sweep_stats as ss

# top_p x 3 seeds; wacc chosen so every statistic is easy by hand; MACs fall with top_p
WACC = {0.3: [0.60, 0.62, 0.64], 0.7: [0.70, 0.69, 0.74], 1.0: [0.72, 0.70, 0.74]}
MACS = {0.3: 10.0, 0.7: 16.0, 1.0: 20.0}


def table(wacc=WACC) -> pd.DataFrame:
    return pd.DataFrame([{"top_p": p, "seed": s, "wacc": w, "macs": MACS[p] + s * 0.1, "seconds": 5.0 + s}
                         for p, ws in wacc.items() for s, w in enumerate(ws)])


def test_per_value_stats_and_pooled_noise_by_hand():
    pv = ss.per_value_stats(table())
    assert pv["top_p"].tolist() == [0.3, 0.7, 1.0] and pv["n_seeds"].tolist() == [3, 3, 3]
    assert pv["mean"].tolist() == pytest.approx([0.62, 0.71, 0.72])
    # SD (ddof 1): 0.3 -> deviations -0.02, 0, 0.02 -> sqrt(0.0008 / 2) = 0.02
    # 0.7 -> -0.01, -0.02, 0.03 -> sqrt(0.0014 / 2); 1.0 -> 0, -0.02, 0.02 -> 0.02
    assert pv["sd"].tolist() == pytest.approx([0.02, math.sqrt(0.0007), 0.02])
    assert pv["macs"].tolist() == pytest.approx([10.1, 16.1, 20.1]) and pv["seconds"].tolist() == [6.0] * 3
    # pooled: equal seed counts -> root of the mean variance
    assert ss.seed_noise(pv) == pytest.approx(math.sqrt((0.0004 + 0.0007 + 0.0004) / 3))
    # unequal counts weight by degrees of freedom; a single-seed value adds nothing
    pv2 = pd.DataFrame({"n_seeds": [2, 4, 1], "sd": [0.1, 0.2, float("nan")]})
    assert ss.seed_noise(pv2) == pytest.approx(math.sqrt((1 * 0.01 + 3 * 0.04) / 4))
    assert math.isnan(ss.seed_noise(pd.DataFrame({"n_seeds": [1], "sd": [float("nan")]})))


def test_paired_effect_matches_scipy_and_hand_values():
    eff = ss.paired_effect(table(), 1.0, 0.3)
    d = np.array([0.12, 0.08, 0.10])  # 1.0 minus 0.3, seed by seed
    assert eff["value"] == pytest.approx(0.10) and eff["n"] == 3 and eff["sd"] == pytest.approx(0.02)
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)  # t interval by hand: mean +- t * sd / sqrt(n)
    assert (eff["low"], eff["high"]) == pytest.approx((0.10 - half, 0.10 + half))
    ref = stats.ttest_rel([0.72, 0.70, 0.74], [0.60, 0.62, 0.64])
    assert eff["pvalue"] == pytest.approx(ref.pvalue) and d.mean() == pytest.approx(eff["value"])
    # pairing matters: only the seeds both values have are paired
    t = table().drop(index=0)  # top_p 0.3, seed 0 missing
    assert ss.paired_effect(t, 1.0, 0.3)["n"] == 2
    one = table()[table()["seed"] == 0]
    single = ss.paired_effect(one, 1.0, 0.3)
    assert single["value"] == pytest.approx(0.12) and math.isnan(single["low"]) and math.isnan(single["high"])
    with pytest.raises(KeyError, match="top_p=0.5"):
        ss.paired_effect(table(), 1.0, 0.5)


def test_knee_is_the_cheapest_value_within_one_noise_sd_of_the_reference():
    pv = ss.per_value_stats(table())
    noise = ss.seed_noise(pv)  # about 0.0224: 0.7 (mean 0.71) is within it of 1.0 (0.72); 0.3 (0.62) is not
    k = ss.knee(pv, noise)
    assert k["top_p"] == 0.7 and k["macs"] == pytest.approx(16.1)
    assert k["cost_ratio"] == pytest.approx(16.1 / 20.1) and k["threshold"] == pytest.approx(0.72 - noise)
    assert ss.knee(pv, 0.2)["top_p"] == 0.3  # a large noise: the cheapest value is as good as dense
    assert ss.knee(pv, 0.0)["top_p"] == 1.0  # no noise: only the reference itself
    assert ss.knee(pv, float("nan"))["top_p"] is None


def test_sweep_answer_sentence_follows_the_interval():
    ans = ss.sweep_answer(table())
    assert ans["effect"]["a"] == 1.0 and ans["effect"]["b"] == 0.3
    assert "exceeds seed noise" in ans["sentence"] and "top_p=1.0 scores higher" in ans["sentence"]
    assert "+10.0 points" in ans["sentence"] and "Knee: top_p=0.7" in ans["sentence"]
    assert "80 % of its macs" in ans["sentence"]  # 16.1 / 20.1
    pv = {r["top_p"]: r for r in ans["per_value"]}
    assert pv[1.0]["diff_vs_ref"] == pytest.approx(0.0) and pv[0.3]["diff_vs_ref"] == pytest.approx(-0.10)
    # noisy seeds: the same mean effect with a spread that puts 0 inside the interval
    noisy = ss.sweep_answer(table({0.3: [0.60, 0.72, 0.54], 1.0: [0.80, 0.62, 0.74]}))
    assert "does not exceed seed noise" in noisy["sentence"]
    assert noisy["effect"]["low"] < 0 < noisy["effect"]["high"]
    # one seed: no interval and no knee, said so
    one = ss.sweep_answer(table()[table()["seed"] == 0])
    assert "no verdict" in one["sentence"] and one["knee"]["top_p"] is None
    assert one["seed_noise_sd"] is None and one["effect"]["low"] is None  # JSON-safe: no NaN
    assert "seed noise is not measured" in one["sentence"]
    single = ss.sweep_answer(table()[table()["top_p"] == 1.0])
    assert single["effect"] is None and "One top_p value" in single["sentence"]


def test_paired_effect_without_spread_over_seeds_gives_no_interval():
    """The same difference on every seed leaves t undefined: no interval, so no verdict (not a zero-width one)."""
    t = pd.DataFrame({"top_p": [1.0, 0.3] * 3, "seed": [0, 0, 1, 1, 2, 2],
                      "wacc": [0.70, 0.65, 0.72, 0.67, 0.68, 0.63]})
    eff = ss.paired_effect(t, 1.0, 0.3)
    assert eff["value"] == pytest.approx(0.05) and eff["n"] == 3
    assert np.isnan(eff["low"]) and np.isnan(eff["high"])


def test_sweep_answer_carries_the_top_p_effect_as_a_seed_verdict():
    """Chapter 8's metrics.json entry "top_p_effect": per-seed values by hand, the t interval of
    paired_effect, and a decision that follows it (the travel check compares it across builds)."""
    t = table()
    sv = ss.sweep_answer(t)["seed_verdict"]
    eff = ss.paired_effect(t, 1.0, 0.3)
    assert (sv["a"], sv["b"], sv["n_seeds"]) == ("top_p=1.0", "top_p=0.3", 3)
    assert (sv["value"], sv["low"], sv["high"]) == pytest.approx((eff["value"], eff["low"], eff["high"]))
    wide = t.pivot_table(index="seed", columns="top_p", values="wacc")
    assert [r["seed"] for r in sv["per_seed"]] == [0, 1, 2]
    for r in sv["per_seed"]:
        assert r["top_p=1.0"] == pytest.approx(wide.loc[r["seed"], 1.0])
        assert r["difference"] == pytest.approx(wide.loc[r["seed"], 1.0] - wide.loc[r["seed"], 0.3])
    assert sv["decision"] == "top_p=1.0" and sv["sentence"] in ss.sweep_answer(t)["sentence"]
    noisy = ss.sweep_answer(table({0.3: [0.60, 0.72, 0.54], 1.0: [0.80, 0.62, 0.74]}))["seed_verdict"]
    assert noisy["decision"] == "undecided"
    worse = ss.sweep_answer(table({0.3: [0.80, 0.82, 0.84], 1.0: [0.70, 0.71, 0.75]}))["seed_verdict"]
    assert worse["decision"] == "top_p=0.3"
    one = ss.sweep_answer(t[t["seed"] == 0])["seed_verdict"]
    assert one["decision"] == "undecided" and one["low"] is None  # JSON-safe, no verdict
    single = ss.sweep_answer(t[t["top_p"] == 1.0])["seed_verdict"]
    assert single["decision"] == "undecided" and "One top_p value" in single["sentence"]
    json.dumps(single, allow_nan=False)
