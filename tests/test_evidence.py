"""nbsupport.evidence: bootstrap intervals over test utterances and the verdicts computed from them."""
import numpy as np
import pytest
import torch
from scipy import stats

from nbsupport import evidence, metrics, train


def _preds(decisions, labels, ids=None, task="emotion"):
    return evidence.Predictions(task, np.asarray(decisions), np.asarray(labels, dtype=float),
                                list(ids if ids is not None else range(len(labels))))


def test_accuracy_interval_matches_scipy_on_per_utterance_correctness():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (200, 1))
    decisions = np.where(rng.random((200, 1)) < 0.8, labels, 1 - labels)  # about 80 % right
    est = evidence.bootstrap(_preds(decisions, labels), "acc", resamples=3000, seed=1)
    correct = (decisions == labels)[:, 0].astype(float)  # independent reference: the mean of 0/1 outcomes
    ref = stats.bootstrap((correct,), np.mean, method="percentile", n_resamples=3000,
                          rng=np.random.default_rng(1)).confidence_interval
    assert est.value == pytest.approx(correct.mean())
    assert est.low == pytest.approx(ref.low, abs=0.015) and est.high == pytest.approx(ref.high, abs=0.015)
    assert est.low < est.value < est.high


def test_interval_narrows_with_more_utterances():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        labels = rng.integers(0, 2, (n, 6))
        decisions = np.where(rng.random((n, 6)) < 0.7, labels, 1 - labels)
        est = evidence.bootstrap(_preds(decisions, labels), "wacc", resamples=500)
        widths.append(est.high - est.low)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(16) = 1/4 of the width


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (60, 6))
    p = _preds(rng.integers(0, 2, (60, 6)), labels)
    d = evidence.paired_difference(p, p, "wacc", resamples=200)
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0)
    assert "not distinguishable" in evidence.verdict("A", "A", d)


def test_paired_difference_finds_a_clearly_better_model_and_refuses_other_utterances():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (300, 6))
    good = _preds(np.where(rng.random((300, 6)) < 0.9, labels, 1 - labels), labels)
    bad = _preds(np.where(rng.random((300, 6)) < 0.6, labels, 1 - labels), labels)
    d = evidence.paired_difference(good, bad, "wacc", resamples=500)
    assert d.low > 0.2  # about 0.3 apart
    assert evidence.verdict("good", "bad", d).startswith("good beats bad on wacc")
    assert evidence.verdict("bad", "good", evidence.paired_difference(bad, good, "wacc", resamples=500)) \
        .startswith("good beats bad")
    with pytest.raises(ValueError, match="different utterances"):
        evidence.paired_difference(good, _preds(bad.decisions, labels, ids=range(1, 301)))


def test_undefined_resamples_are_left_out_and_a_tiny_split_gives_no_verdict():
    labels = np.array([[1, 0], [0, 1], [0, 0], [1, 1]])
    p = _preds(labels, labels)  # perfect; many resamples lack a positive or a negative in a column
    est = evidence.bootstrap(p, "wacc", resamples=400)
    assert est.value == 1.0 and est.low == 1.0 and est.high == 1.0
    one = _preds(np.array([[1]]), np.array([[1]]))  # wacc undefined on every resample (no negative)
    d = evidence.paired_difference(one, one, "wacc", resamples=50)
    assert np.isnan(d.low) and "too small for an interval" in evidence.verdict("A", "B", d)


def test_verdict_text_follows_the_interval_by_hand():
    assert evidence.verdict("A", "B", evidence.Estimate(0.05, 0.01, 0.09)) == \
        "A beats B on wacc: +5.0 points, 95 % CI [+1.0, +9.0]."
    assert evidence.verdict("A", "B", evidence.Estimate(-0.05, -0.09, -0.01)).startswith("B beats A")
    assert "not distinguishable" in evidence.verdict("A", "B", evidence.Estimate(0.02, -0.01, 0.05))


def test_decisions_agree_with_the_trainer_metrics():
    torch.manual_seed(0)
    logits, labels = torch.randn(40, 6), (torch.rand(40, 6) > 0.6).float()
    th = np.full(6, 0.4)
    p = evidence.predictions_from(logits, labels, list(range(40)), thresholds=th)
    ref = train.compute_metrics(logits, labels, "emotion", th)
    for name in ("wacc", "acc", "f1"):
        assert evidence.statistic(name)(p.labels, p.decisions) == pytest.approx(ref[name])
    sent = torch.tensor([-2.4, 0.0, 1.0, 3.0, -0.5])
    logits7 = torch.nn.functional.one_hot(torch.tensor([1, 3, 4, 6, 3]), 7).float()
    p7 = evidence.predictions_from(logits7, sent, list(range(5)), task="sentiment7")
    assert evidence.statistic("acc7")(p7.labels, p7.decisions) == pytest.approx(metrics.acc7(sent, [-2, 0, 1, 3, 0]))


def test_difference_in_differences_against_a_hand_written_bootstrap():
    """Chapter 7: the change of a gap between two regimes, all four models on the same resampled utterances."""
    from nbsupport import evidence as ev

    rng = np.random.default_rng(3)
    n = 120
    labels = (rng.random((n, 6)) < 0.3).astype(np.int8)

    def model(p_right):
        right = rng.random((n, 6)) < p_right
        return ev.Predictions("emotion", np.where(right, labels, 1 - labels).astype(np.int8), labels,
                              [f"u{i}" for i in range(n)])

    a1, b1, a2, b2 = model(0.9), model(0.6), model(0.75), model(0.75)
    est = ev.difference_in_differences(a1, b1, a2, b2, "wacc", resamples=1000, seed=0)
    w = ev.statistic("wacc")
    point = (w(labels, a1.decisions) - w(labels, b1.decisions)) - (w(labels, a2.decisions) - w(labels, b2.decisions))
    assert est.value == pytest.approx(point)
    # independent reference: the same percentile bootstrap written out here
    r = np.random.default_rng(0)
    vals = []
    for _ in range(1000):
        i = r.integers(0, n, n)
        vals.append((w(labels[i], a1.decisions[i]) - w(labels[i], b1.decisions[i]))
                    - (w(labels[i], a2.decisions[i]) - w(labels[i], b2.decisions[i])))
    lo, hi = np.nanpercentile(vals, [2.5, 97.5])
    assert est.low == pytest.approx(lo, abs=0.02) and est.high == pytest.approx(hi, abs=0.02)
    assert est.low > 0  # a 30-point gap in one regime, none in the other
    same = ev.difference_in_differences(a1, b1, a1, b1, "wacc", resamples=200)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    other = ev.Predictions("emotion", a2.decisions, labels, [f"v{i}" for i in range(n)])
    with pytest.raises(ValueError, match="different utterances"):
        ev.difference_in_differences(a1, b1, other, b2)


def test_seed_interval_is_the_t_interval_over_seeds_by_hand():
    from nbsupport.evidence import seed_interval, seed_verdict

    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2 dof) = 4.302653 -> 2 -+ 4.302653 / sqrt(3)
    est = seed_interval([1.5, 2.0, 3.5], [0.5, 0.0, 0.5])
    half = 4.302653 / 3 ** 0.5
    assert est.value == pytest.approx(2.0)
    assert (est.low, est.high) == (pytest.approx(2 - half, abs=1e-5), pytest.approx(2 + half, abs=1e-5))
    one = seed_interval([0.8, 0.9, 1.0])  # one sample: the mean's t interval
    assert one.value == pytest.approx(0.9) and one.low == pytest.approx(0.9 - 4.302653 * 0.1 / 3 ** 0.5, abs=1e-6)
    flat = seed_interval([0.5, 0.5], [0.25, 0.25])  # no spread: t undefined, no interval
    assert flat.value == pytest.approx(0.25) and flat.low != flat.low
    assert "no verdict" in seed_verdict("A", "B", flat, 2)
    assert "not distinguishable" in seed_verdict("A", "B", est, 3)  # the interval [-0.48, 4.48] holds 0
    assert "A is higher" in seed_verdict("A", "B", seed_interval([0.10, 0.12, 0.11], [0, 0, 0]), 3)
    assert "B is higher" in seed_verdict("A", "B", seed_interval([0, 0, 0], [0.10, 0.12, 0.11]), 3)
    with pytest.raises(ValueError, match="one value per seed"):
        seed_interval([1, 2, 3], [1, 2])


def _runs(rows, n=40, seed=0):
    """Predictions for one emotion: ``rows`` -> per-seed accuracies; one shared test split."""
    from nbsupport.evidence import Predictions

    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 1)) < 0.5).astype(int)
    ids = [f"u{i}" for i in range(n)]
    out = []
    for k, correct in enumerate(rows):
        right = np.zeros(n, bool)
        right[np.random.default_rng(100 + k).permutation(n)[:correct]] = True
        out.append(Predictions("emotion", np.where(right[:, None], labels, 1 - labels), labels, ids))
    return out


def test_seed_difference_without_test_variance_is_the_t_interval_over_seeds():
    from scipy import stats as st

    from nbsupport.evidence import Predictions, seed_difference

    # every utterance alike: a resample of utterances cannot move a score, so only the seeds vary
    labels, ids = np.ones((10, 1), int), [f"u{i}" for i in range(10)]
    right, wrong = (Predictions("emotion", np.full((10, 1), v), labels, ids) for v in (1, 0))
    a, b = [right, wrong, right, right, wrong], [wrong] * 5  # acc differences 1, 0, 1, 1, 0
    est = seed_difference(a, b, "acc", resamples=50)
    ci = st.ttest_1samp([1, 0, 1, 1, 0], 0).confidence_interval(0.95)
    assert est.value == pytest.approx(0.6)
    assert (est.low, est.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    one = seed_difference(a[:1], b[:1], "acc")
    assert one.value == 1.0 and one.low != one.low  # one seed: no interval


def test_seed_difference_adds_the_test_sample_variance_to_the_seed_variance():
    from nbsupport.evidence import paired_difference, seed_difference

    a, b = _runs([30] * 5), _runs([20] * 5)  # every seed the same run: no training variance
    a = [a[0]] * 5
    b = [b[0]] * 5
    est = seed_difference(a, b, "acc", resamples=2000)
    boot = paired_difference(a[0], b[0], "acc", resamples=2000)  # the test-sample spread alone
    sd = (boot.high - boot.low) / (2 * 1.96)
    assert est.value == pytest.approx(0.25)
    half = (est.high - est.low) / 2
    assert half == pytest.approx(2.776445 * sd, rel=0.15)  # t(0.975, 4 dof) times the bootstrap SD
    # with training variance too it is never narrower than the t interval over seeds alone
    from nbsupport.evidence import seed_interval

    a_acc, b_acc = [30, 34, 26, 31, 29], [20, 18, 24, 21, 19]
    both = seed_difference(_runs(a_acc), _runs(b_acc), "acc")
    seeds_only = seed_interval(np.array(a_acc) / 40, np.array(b_acc) / 40)
    assert both.value == pytest.approx(seeds_only.value)
    assert both.low < seeds_only.low and both.high > seeds_only.high


def test_compare_seeds_decides_from_the_interval_and_groups_choose_on_validation():
    import json

    from nbsupport.evidence import compare_groups, compare_seeds

    runs = {"A": dict(enumerate(_runs([36, 37, 35, 38, 36]))), "B": dict(enumerate(_runs([20, 22, 19, 21, 20]))),
            "C": dict(enumerate(_runs([21, 20, 22, 20, 21])))}
    v = compare_seeds(runs, "A", "B", "acc")
    assert v.decision == "A" and v.sentence.startswith("A beats B on acc across training seeds")
    assert [r["seed"] for r in v.as_dict()["per_seed"]] == [0, 1, 2, 3, 4]
    assert v.as_dict()["per_seed"][0]["A"] == pytest.approx(36 / 40)
    assert compare_seeds(runs, "B", "A", "acc").decision == "A"
    tie = compare_seeds(runs, "B", "C", "acc")
    assert tie.decision == "undecided" and "not distinguishable" in tie.sentence
    json.dumps(tie.as_dict())
    # validation chooses C from the single group (the test split never chooses)
    valid = {"A": dict.fromkeys(range(5), 0.5), "B": dict.fromkeys(range(5), 0.6),
             "C": dict.fromkeys(range(5), 0.7)}
    g = compare_groups(runs, valid, {"single": ["B", "C"], "joint": ["A"]}, "acc")
    assert (g.a, g.b, g.decision) == ("C", "A", "A") and g.as_dict()["chosen_from"] == ["single", "joint"]
    assert g.pair == ("C", "A")
    del runs["C"][4]
    with pytest.raises(ValueError, match="same seeds"):
        compare_seeds(runs, "A", "C", "acc")
    with pytest.raises(KeyError, match="no runs of 'D'"):
        compare_seeds(runs, "A", "D", "acc")


def test_pooling_verdict_trains_both_poolings_per_seed_and_reuses_the_chapters_run():
    import torch

    from nbsupport import protocol
    from nbsupport.models import toy

    data, test = toy.cue_word_task(120, 8, seed=0), toy.cue_word_task(60, 8, seed=1)
    done = {p: toy.train_pooling_classifier(p, data, test, epochs=5, seed=7) for p in ("attention", "mean")}
    v = protocol.pooling_verdict(data, test, seeds=[7, 8], epochs=5, done=done, done_seed=7)
    assert (v.a, v.b, v.metric, v.seeds) == ("attention pooling", "mean pooling", "acc", (7, 8))
    assert v.a_values[0] == pytest.approx(done["attention"][1])  # seed 7: the chapter's own model
    assert v.b_values[0] == pytest.approx(done["mean"][1])
    model = toy.train_pooling_classifier("attention", data, test, epochs=5, seed=8)[0]  # seed 8, by hand
    with torch.no_grad():
        hand = ((model(test[0], test[1]) > 0).float() == test[2]).float().mean().item()
    assert v.a_values[1] == pytest.approx(hand)
    with pytest.raises(ValueError, match="distinct"):
        protocol.pooling_verdict(data, test, seeds=[1, 1], epochs=1)
def test_seed_difference_in_differences_is_the_seed_difference_of_the_gaps_with_both_variances():
    from nbsupport.evidence import seed_difference, seed_difference_in_differences, seed_interval

    a2, b2 = _runs([34, 31, 36, 30, 33]), _runs([20, 22, 19, 24, 21])
    same = _runs([25] * 5)
    # a first corpus whose two methods decide alike: the change of gap is the second corpus's gap, and
    # with the same resamples the interval is seed_difference's exactly
    did = seed_difference_in_differences(a2, b2, same, same, "acc", resamples=300)
    ref = seed_difference(a2, b2, "acc", resamples=300)
    assert (did.value, did.low, did.high) == (pytest.approx(ref.value), pytest.approx(ref.low),
                                              pytest.approx(ref.high))
    # value by hand: per seed (a2 - b2) - (a1 - b1) accuracies, averaged over seeds
    a1, b1 = _runs([30, 29, 31, 28, 30], seed=0), _runs([26, 27, 25, 25, 28], seed=0)
    did = seed_difference_in_differences(a2, b2, a1, b1, "acc", resamples=300)
    by_hand = (np.array([34, 31, 36, 30, 33]) - [20, 22, 19, 24, 21] - [30, 29, 31, 28, 30]
               + [26, 27, 25, 25, 28]) / 40
    assert did.value == pytest.approx(by_hand.mean())
    seeds_only = seed_interval(by_hand)  # the t interval over seeds alone: the test sample adds width
    assert did.low < seeds_only.low and did.high > seeds_only.high
    one = seed_difference_in_differences(a2[:1], b2[:1], a1[:1], b1[:1], "acc")
    assert one.low != one.low  # one seed: no interval
    with pytest.raises(ValueError, match="one run per seed"):
        seed_difference_in_differences(a2, b2, a1[:4], b1, "acc")
    other = [_preds(p.decisions, p.labels, ids=[f"x{i}" for i in range(len(p))]) for p in b1]
    with pytest.raises(ValueError, match="different utterances"):
        seed_difference_in_differences(a2, b2, a1, other, "acc")


def test_compare_gaps_decides_a_planted_change_of_gap_and_refuses_unpaired_seeds():
    import json

    from nbsupport.evidence import compare_gaps

    second = {"E": dict(enumerate(_runs([36, 37, 35, 38, 36]))), "T": dict(enumerate(_runs([20, 22, 19, 21, 20])))}
    first = {"E": dict(enumerate(_runs([28, 27, 29, 28, 27]))), "T": dict(enumerate(_runs([27, 28, 27, 26, 28])))}
    v = compare_gaps(second, ("E", "T"), first, ("E", "T"), "acc", labels=("hidden", "visible"))
    gaps = (np.array([36, 37, 35, 38, 36]) - [20, 22, 19, 21, 20]) / 40
    assert v["per_seed"][2]["hidden gap"] == pytest.approx(gaps[2])
    assert v["value"] == pytest.approx(np.mean(gaps - (np.array([28, 27, 29, 28, 27]) - [27, 28, 27, 26, 28]) / 40))
    assert v["decision"] == "hidden gap" and v["low"] > 0 and "hidden gap is larger" in v["sentence"]
    assert v["n_seeds"] == 5
    json.dumps(v)
    flat = compare_gaps(second, ("E", "T"), second, ("E", "T"), "acc")
    assert flat["decision"] == "undecided" and flat["value"] == 0
    del second["T"][4]
    with pytest.raises(ValueError, match="same seeds"):
        compare_gaps(second, ("E", "T"), first, ("E", "T"), "acc")


def test_compare_best_chooses_each_groups_best_on_validation_and_compares_on_test():
    """Chapter 7's one-run description: the best of each group by *validation* score, then the paired
    bootstrap on test -- the test split never chooses (here the test favours the validation loser)."""
    import json

    from nbsupport.evidence import compare_best, paired_difference, verdict

    a, b, c = _runs([36, 20, 30])  # test accuracies 0.9, 0.5, 0.75
    preds = {"E1": a, "E2": c, "T1": b}
    valid = {"E1": 0.6, "E2": 0.7, "T1": 0.5}  # validation prefers E2 although E1 tests better
    best = compare_best(preds, valid, {"end-to-end": ["E1", "E2", "E3"], "two-phase": ["T1"]}, "acc",
                        resamples=300, seed=4)
    assert best.pair == ("E2", "T1")
    ref = paired_difference(c, b, "acc", resamples=300, seed=4)
    assert best.difference == ref and best.sentence == verdict("E2", "T1", ref, "acc")
    diff, sentence = best  # unpacks as evidence.compare always returned
    assert (diff, sentence) == (ref, best.sentence)
    assert best.as_dict() == {"sentence": best.sentence, **ref.as_dict()}
    json.dumps(best.as_dict())
    tie = compare_best(preds, {"E1": 0.7, "E2": 0.7, "T1": 0.5}, {"e": ["E1", "E2"], "t": ["T1"]}, "acc")
    assert tie.pair == ("E1", "T1")  # a tie goes to the first of the group, as compare_groups does
    with pytest.raises(ValueError, match="group 't' has no runs"):
        compare_best(preds, valid, {"e": ["E1"], "t": ["T9"]}, "acc")
    with pytest.raises(ValueError, match="two groups"):
        compare_best(preds, valid, {"e": ["E1"]}, "acc")


def test_gap_change_is_the_difference_in_differences_of_the_two_pairs():
    from nbsupport.evidence import difference_in_differences, gap_change

    e2, t2, e1, t1 = _runs([36, 20, 28, 27])
    second, first = {"E": e2, "T": t2, "X": t1}, {"E": e1, "T": t1}
    change = gap_change(second, ("E", "T"), first, ("E", "T"), "acc", labels=("hidden", "visible"),
                        resamples=300, seed=2)
    ref = difference_in_differences(e2, t2, e1, t1, "acc", resamples=300, seed=2)
    assert change.difference == ref
    assert change.difference.value == pytest.approx((36 - 20 - 28 + 27) / 40)  # by hand
    assert (change.a, change.b) == ("hidden gap", "visible gap")
    assert change.sentence.startswith("this run, test resamples: the gap acc(E) - acc(T) in hidden minus "
                                      "acc(E) - acc(T) in visible: +37.5 points, 95 % CI [")
    assert change.sentence.endswith("; a description only")
