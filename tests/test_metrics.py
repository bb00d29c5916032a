"""nbsupport.metrics against scikit-learn, scipy and hand-computed cases."""
import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from nbsupport import metrics as M


def test_weighted_accuracy_hand_computed():
    # P=2 positives, N=4 negatives; TP=1, TN=3 -> (1*4/2 + 3) / (2*4) = 5/8
    y = [1, 1, 0, 0, 0, 0]
    p = [1, 0, 1, 0, 0, 0]
    assert M.weighted_accuracy(y, p) == pytest.approx(5 / 8)


def test_against_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 6)) < 0.3).astype(float)
    s = y * 0.8 + rng.normal(0, 0.6, y.shape)
    p = s > 0.5
    for j in range(6):
        assert M.per_emotion_weighted_accuracy(y, p)[j] == pytest.approx(balanced_accuracy_score(y[:, j], p[:, j]))
        assert M.per_emotion_accuracy(y, p)[j] == pytest.approx(accuracy_score(y[:, j], p[:, j]))
        assert M.f1_per_emotion(y, p)[j] == pytest.approx(f1_score(y[:, j], p[:, j]))
        assert M.auc_per_emotion(y, s)[j] == pytest.approx(roc_auc_score(y[:, j], s[:, j]))
    assert M.weighted_f1(y, p) == pytest.approx(f1_score(y, p, average="weighted"))
    m = M.emotion_metrics(s, y, thresholds=np.full(6, 0.5), probs=True)
    assert m["f1"] == pytest.approx(np.mean([f1_score(y[:, j], p[:, j]) for j in range(6)]))
    assert m["wacc"] == pytest.approx(np.mean([balanced_accuracy_score(y[:, j], p[:, j]) for j in range(6)]))
    logits = rng.normal(size=(200, 6))
    assert M.emotion_metrics(logits, y)["acc"] == pytest.approx(np.mean((1 / (1 + np.exp(-logits)) > 0.5) == y))


def test_best_thresholds_hand_computed():
    y = np.array([[1], [1], [0], [0]])
    pr = np.array([[0.9], [0.35], [0.3], [0.1]])  # any threshold in [0.30, 0.35) separates perfectly
    assert M.best_thresholds(y, pr)[0] == pytest.approx(0.30)
    assert M.best_thresholds(y, pr, grid=[0.5, 0.32])[0] == pytest.approx(0.32)


def test_sentiment_hand_computed():
    t = np.array([-3.0, -1.2, 0.0, 0.4, 2.6, 1.0])
    p = np.array([-2.0, 0.3, -0.2, 0.6, 3.4, 1.4])
    # non-zero Acc-2 drops the 0 target: signs agree for -3, 0.4, 2.6, 1.0 of 5 -> 4/5
    assert M.acc2(t, p) == pytest.approx(4 / 5)
    # with zero: (t>=0)==(p>=0): T, F, F, T, T, T -> 4/6
    assert M.acc2_with_zero(t, p) == pytest.approx(4 / 6)
    # Acc-7: rounded clipped: t -> -3,-1,0,0,3,1 ; p -> -2,0,0,1,3,1 -> 3/6
    assert M.acc7(t, p) == pytest.approx(3 / 6)
    # Acc-5: clip to [-2,2]: t -> -2,-1,0,0,2,1 ; p -> -2,0,0,1,2,1 -> 4/6
    assert M.acc5(t, p) == pytest.approx(4 / 6)
    assert M.mae(t, p) == pytest.approx(np.mean(np.abs(t - p)))
    assert M.pearson_r(t, p) == pytest.approx(pearsonr(t, p)[0])
    assert set(M.sentiment_metrics(t, p)) == {"acc2", "acc2_zero", "acc2_non0", "acc2_has0", "acc5", "acc7",
                                              "acc7_bins", "mae", "corr"}


def test_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        M.weighted_accuracy(np.zeros((3, 6)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="same length"):
        M.acc7([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        M.mae([np.nan], [0.0])  # IEMOCAP has no sentiment


def test_threshold_ties_lowest_as_mesm_or_closest_to_half():
    y = np.array([[1], [1], [0], [0]])
    pr = np.array([[0.9], [0.8], [0.2], [0.1]])  # every threshold in [0.20, 0.80) separates perfectly
    assert M.best_thresholds(y, pr)[0] == pytest.approx(0.50)  # book: the tie closest to 0.5
    assert M.best_thresholds(y, pr, ties="lowest")[0] == pytest.approx(0.20)  # MESM: argmax = first = lowest
    with pytest.raises(ValueError, match="ties"):
        M.best_thresholds(y, pr, ties="highest")


def test_acc7_with_cmu_mosei_bins_on_hand_picked_labels():
    labels = np.array([-2.4, -7 / 3, -2.0, -4 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3, 4 / 3, 7 / 3, 3.0])
    # CMU-MOSEI bins: <-2 -> 0, [-2,-1) -> 1, [-1,0) -> 2, 0 -> 3, (0,1] -> 4, (1,2] -> 5, >2 -> 6
    assert M.sentiment7_bins(labels).tolist() == [0, 0, 1, 1, 2, 3, 4, 4, 5, 6, 6]
    rounded = np.round(np.clip(labels, -3, 3)) + 3  # -2.4 -> 1, -7/3 -> 1, -4/3 -> 2, -1/3 -> 3, 1/3 -> 3 ...
    assert rounded.tolist() == [1, 1, 1, 2, 3, 3, 3, 4, 4, 5, 6]
    pred_class = np.array([0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6])  # a classifier's output classes
    # bins: equal at -2.4, -2, -1/3, 0, 1/3, 2/3, 4/3, 3 -> 8/11; rounding: equal at -7/3, -2, -4/3, 0, 2/3, 7/3, 3
    assert M.acc7_bins(labels, pred_class - 3.0) == pytest.approx(8 / 11)
    assert M.acc7(labels, pred_class - 3.0) == pytest.approx(7 / 11)


def test_acc2_has0_and_non0_on_a_vector_with_zeros():
    t = np.array([0.0, 0.0, 1.0, -1.0, 2.0])
    p = np.array([0.5, -0.5, 1.0, 1.0, -2.0])
    # Non0 drops the two zero labels: signs agree on 1.0 only -> 1/3
    assert M.acc2_non0(t, p) == pytest.approx(1 / 3)
    # Has0: (t >= 0) == (p >= 0): T, F, T, F, F -> 2/5
    assert M.acc2_has0(t, p) == pytest.approx(2 / 5)


def test_umons_pickle_emotions_are_mapped_by_name(tmp_path):
    import pickle

    from nbsupport.base import ParameterError
    from nbsupport.data import EMOTIONS, load_umons_pickles

    # one utterance per SDK column: happy, sad, anger, surprise, disgust, fear
    ids = [f"u{k}" for k in range(6)]
    emo = {u: [1.0 if j == k else 0.0 for j in range(6)] for k, u in enumerate(ids)}
    files = {"sentences": {u: ["a", "word"] for u in ids}, "mels": {u: np.zeros((3, 80)) for u in ids},
             "emotion": emo}
    for k, v in files.items():
        (tmp_path / f"test_{k}.p").write_bytes(pickle.dumps(v))
    raw = load_umons_pickles(tmp_path, "test")
    named = [EMOTIONS["mosei"][int(np.argmax(raw.labels[k]))] for k in range(6)]
    assert named == ["happy", "sad", "anger", "surprise", "disgust", "fear"]  # same emotion, book's column
    alpha = load_umons_pickles(tmp_path, "test", emotion_order=["anger", "disgust", "fear", "happiness",
                                                                 "sadness", "surprise"])
    assert [int(np.argmax(alpha.labels[k])) for k in range(6)] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ParameterError, match="emotion_order"):
        load_umons_pickles(tmp_path, "test", emotion_order=["happy", "sad", "anger", "surprise", "disgust", "joy"])



def test_decisions_one_rule_for_every_task():
    """metrics.decisions, the rule compute_metrics and evidence share, against hand-computed decisions."""
    logits = np.array([[0.0, 2.0], [-1.0, 0.1]])  # sigmoid: [[0.5, 0.881], [0.269, 0.525]]
    assert M.decisions(logits, "emotion").tolist() == [[0, 1], [0, 1]]  # 0.5 is not above 0.5
    assert M.decisions(logits, "emotion", [0.2, 0.6]).tolist() == [[1, 1], [1, 0]]
    seven = np.zeros((3, 7))
    seven[0, 6], seven[1, 0], seven[2, 3] = 1.0, 1.0, 1.0  # classes 6, 0, 3 -> scores 3, -3, 0
    assert M.decisions(seven, "sentiment7").tolist() == [3.0, -3.0, 0.0]
    assert M.decisions(np.array([[0.2, 0.1], [0.0, 0.3]]), "sentiment2").tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="task"):
        M.decisions(logits, "sentiment3")
