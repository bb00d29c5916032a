"""Pre-extracted features in the field's forms (nbsupport.data.formats): MMSA and MulT pickles and
CMU-MultimodalSDK computational sequences, written here with the authors' key structure and dtypes.

Every expected value is computed by hand from the arrays the test wrote (real rows, -inf set to 0,
emotion columns looked up by name); each form then goes through protocol.loaders and trains one step
of the chapter's model, as chapters 3, 4 and 7 do."""
import json
import os
import pickle

import h5py
import numpy as np
import pytest
import torch

from nbsupport import protocol, train
from nbsupport.base import ParameterError
from nbsupport.data import DataError, EMOTIONS
from nbsupport.data import formats
from nbsupport.models import baselines
from nbsupport.models.umons import UmonsConfig

SMALL = UmonsConfig(hidden_size=16, ff_size=32, layers=1, heads=2, seq_len=8, dropout=0.0)
SIZES = {"train": 12, "valid": 6, "test": 6}


# ----------------------------------------------------------------------------------------------
# Writers in the authors' structures
# ----------------------------------------------------------------------------------------------
def _mmsa_split(rng, n, split, dims=(768, 74, 35), lt=10, la=12, lv=9):
    """One split with MMSA's keys and dtypes (unaligned_50.pkl): end-padded sequences plus lengths."""
    dt, da, dv = dims
    # real ids may start with '-'
    ids = np.array([f"-vid{split}{i // 3}$_${i % 3}" for i in range(n)], dtype=object)
    t_len = rng.integers(3, lt + 1, n)
    a_len, v_len = rng.integers(2, la + 1, n), rng.integers(2, lv + 1, n)
    text = np.zeros((n, lt, dt), np.float32)
    text_bert = np.zeros((n, 3, lt), np.float64)  # ids, mask, segment ids
    audio = np.zeros((n, la, da), np.float32)
    vision = np.zeros((n, lv, dv), np.float32)
    for i in range(n):
        text[i, :t_len[i]] = rng.normal(size=(t_len[i], dt))
        text_bert[i, 0, :t_len[i]] = rng.integers(100, 30000, t_len[i])
        text_bert[i, 1, :t_len[i]] = 1
        audio[i, :a_len[i]] = rng.normal(size=(a_len[i], da))
        vision[i, :v_len[i]] = rng.normal(size=(v_len[i], dv))
    audio[0, 1, 3] = -np.inf  # COVAREP's log features hold -inf in real frames
    audio[1, 0, :5] = -np.inf
    reg = rng.choice(np.round(np.arange(-3, 3.01, 1 / 3), 4), n).astype(np.float32)
    reg[:3] = [-2.6667, 2.3333, 0.0]
    return {"raw_text": np.array([f"utterance {i} of {split}" for i in range(n)], dtype=object),
            "audio": audio, "vision": vision, "id": ids, "text": text, "text_bert": text_bert,
            "audio_lengths": [int(v) for v in a_len], "vision_lengths": [int(v) for v in v_len],
            "annotations": np.array(["Positive" if r > 0 else "Negative" for r in reg], dtype=object),
            "classification_labels": np.sign(reg).astype(np.float32) + 1,  # deprecated
            "regression_labels": reg}


@pytest.fixture(scope="module")
def mmsa(tmp_path_factory):
    rng = np.random.default_rng(0)
    data = {s: _mmsa_split(rng, n, s) for s, n in SIZES.items()}
    path = tmp_path_factory.mktemp("mmsa") / "unaligned_50.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path, data


def _mult_data(rng, iemocap: bool, l=10, dims=(300, 74, 35)):
    """MulT's structure: front-padded (N, 50, D) sequences, ``labels``, ``id``."""
    out = {}
    for s, n in SIZES.items():
        lens = rng.integers(2, l + 1, n)
        d = {}
        for key, dim in zip(("text", "audio", "vision"), dims):
            x = np.zeros((n, l, dim), np.float32)
            for i in range(n):
                x[i, l - lens[i]:] = rng.normal(size=(lens[i], dim)) + 0.1  # padding first, as in MulT's data
            d[key] = x
        d["audio"][0, -1, 0] = -np.inf
        if iemocap:
            which = rng.integers(0, 2, (n, 4))
            lab = np.zeros((n, 4, 2), np.float32)
            lab[np.arange(n)[:, None], np.arange(4)[None], which] = 1
            d["labels"] = lab
        else:
            d["labels"] = rng.uniform(-3, 3, (n, 1, 1)).astype(np.float32)
            d["id"] = np.array([[f"v{s}{i}".encode(), b"0.0", f"{i}.5".encode()] for i in range(n)])
        out[s], out[s]["_lens"] = d, lens
    return out


def _write_mult(path, data):
    clean = {s: {k: v for k, v in d.items() if not k.startswith("_")} for s, d in data.items()}
    path.write_bytes(pickle.dumps(clean, protocol=4))
    return path


def _write_csd(path, name, data, metadata):
    """A computational sequence as the SDK writes it: <name>/data/<vid>/{features, intervals} and
    <name>/metadata/<key> = one JSON string."""
    with h5py.File(path, "w") as fh:
        root = fh.create_group(name)
        grp = root.create_group("data")
        for vid, (feats, iv) in data.items():
            v = grp.create_group(vid)
            v.create_dataset("features", data=feats)
            v.create_dataset("intervals", data=iv)
        meta = root.create_group("metadata")
        for k, val in metadata.items():
            ds = meta.create_dataset(k, (1,), dtype=h5py.special_dtype(vlen=str))
            ds[0] = json.dumps(val)
    return path


# SDK label rows: [sentiment, happy, sad, anger, surprise, disgust, fear]
SDK_NAMES = ("sentiment", "happy", "sad", "anger", "surprise", "disgust", "fear")
SDK_ROWS = {"-6rXp3zJ3kc": [[1.0, 2.0, 0, 0, 0, 0, 0], [-1.5, 0, 0, 1.3, 0, 0.6, 0], [0.0, 0, 0.3, 0, 0, 0, 0]],
            "abc_DEF-123": [[2.3333, 1.0, 0, 0, 0.6, 0, 0], [-2.6667, 0, 2.0, 0, 0, 0, 1.0]],
            "zz9": [[0.6667, 0, 0, 0, 0, 0.3, 0], [-0.3333, 0, 0, 2.0, 0, 0, 0]]}
SEGMENTS = {"-6rXp3zJ3kc": [[0.5, 2.0], [2.5, 4.0], [4.2, 6.0]], "abc_DEF-123": [[0.0, 1.5], [2.0, 3.0]],
            "zz9": [[1.0, 2.0], [3.0, 4.5]]}


def _book_vector(sdk_row):
    """Book-order presence written out by hand from the SDK's named columns."""
    named = dict(zip(["sentiment", "happy", "sad", "anger", "surprise", "disgust", "fear"], sdk_row))
    return [float(named[e] > 0) for e in ["anger", "disgust", "fear", "happy", "sad", "surprise"]]


@pytest.fixture(scope="module")
def csd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("csd")
    rng = np.random.default_rng(1)
    labels = {v: (np.asarray(r, np.float64)[::-1].copy(), np.asarray(SEGMENTS[v], np.float64)[::-1].copy())
              for v, r in SDK_ROWS.items()}  # stored out of time order: utterance v[k] is stored row k
    _write_csd(folder / "CMU_MOSEI_Labels.csd", "All Labels", labels,
               {"root name": "All Labels", "dataset name": "CMU-MOSEI", "dimension names": list(SDK_NAMES)})
    seqs = {}
    for fname, name, dim, step in (("CMU_MOSEI_TimestampedWordVectors.csd", "glove_vectors", 300, 0.4),
                                   ("CMU_MOSEI_COVAREP.csd", "COVAREP", 74, 0.1),
                                   ("CMU_MOSEI_VisualFacet42.csd", "FACET 4.2", 35, 0.2)):
        data = {}
        for vid in SDK_ROWS:
            starts = np.arange(0, 6.4, step)
            iv = np.stack([starts, starts + step], 1)
            data[vid] = (rng.normal(size=(len(starts), dim)).astype(np.float32), iv)
        if name == "COVAREP":
            data["zz9"][0][10, 2] = -np.inf
        _write_csd(folder / fname, name, data, {"root name": name})
        seqs[name] = data
    (folder / "train_split.txt").write_text("-6rXp3zJ3kc\nabc_DEF-123\n")
    (folder / "valid_split.txt").write_text("zz9[0]\n")
    (folder / "test_split.txt").write_text("zz9[1]\n")
    return folder, seqs


# ----------------------------------------------------------------------------------------------
# MMSA
# ----------------------------------------------------------------------------------------------
def test_mmsa_items_hand_computed(mmsa):
    path, data = mmsa
    ds = formats.load_mmsa(path, "train", seq_len=60)
    d = data["train"]
    assert ds.ids == list(d["id"]) and ds.emotion_names == [] and ds.feature_dims() == {
        "text": 768, "audio": 74, "video": 35}
    for i in (0, 1, 5):
        it = ds[i]
        n_tok = int(d["text_bert"][i, 1].sum())
        np.testing.assert_array_equal(it["text"].numpy(), d["text"][i, :n_tok])
        audio = d["audio"][i, :d["audio_lengths"][i]].copy()
        audio[np.isneginf(audio)] = 0.0  # MMSA's own loader sets -inf to 0
        np.testing.assert_array_equal(it["audio"].numpy(), audio)
        np.testing.assert_array_equal(it["video"].numpy(), d["vision"][i, :d["vision_lengths"][i]])
        assert it["sentiment"] == pytest.approx(float(d["regression_labels"][i]))
        assert it["emotion"].shape == (0,)
    assert torch.isfinite(ds[1]["audio"]).all() and ds[1]["audio"][0, :5].abs().sum() == 0


def test_mmsa_long_sequences_are_pooled_like_umons(mmsa):
    path, data = mmsa
    ds = formats.load_mmsa(path, "train", seq_len=2)
    d = data["train"]
    i = next(j for j in range(12) if d["audio_lengths"][j] >= 4)
    a = d["audio"][i, :d["audio_lengths"][i]].copy()
    a[np.isneginf(a)] = 0.0
    half = -(-len(a) // 2)  # np.array_split: the first chunk takes the extra row
    expected = np.stack([a[:half].mean(0), a[half:].mean(0)])
    np.testing.assert_allclose(ds[i]["audio"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert ds[i]["text"].shape[0] == 2  # text is cut, not pooled


def test_mmsa_sentiment_end_to_end_metrics_on_the_raw_scale(mmsa):
    path, data = mmsa
    sets, loaders = protocol.loaders("umons", path, data_format="mmsa", batch_size=4, seq_len=8, progress=False)
    assert formats.detect_format(path)[0] == "mmsa" and formats.detect_format(path.parent)[0] == "mmsa"
    row, res = protocol.train_umons("LAV", loaders, task="sentiment7", config=SMALL, epochs=1, device="cpu",
                                    progress=False)
    logits, labels, ids = train.predict(res.model, loaders["test"], task="sentiment7", device="cpu")
    truth = dict(zip(data["test"]["id"], data["test"]["regression_labels"]))
    np.testing.assert_allclose(labels.numpy(), [truth[u] for u in ids])  # scores in [-3, 3], not classes
    acc7 = np.mean(logits.argmax(1).numpy() - 3 == np.round(np.clip(labels.numpy(), -3, 3)))
    assert row["acc7"] == pytest.approx(acc7) and set(row) >= {"mae", "corr", "acc2"}


def test_mmsa_aligned_mosi_sizes_without_lengths(tmp_path):
    """CMU-MOSI's sizes (768/5/20) in an aligned file: no *_lengths keys, padding rows at the front."""
    rng = np.random.default_rng(5)
    data = {}
    for s, n in SIZES.items():
        d = _mmsa_split(rng, n, s, dims=(768, 5, 20), la=10, lv=10)
        for key in ("audio", "vision"):
            x = np.zeros_like(d[key])
            for i in range(n):
                m = d[f"{key}_lengths"][i]
                x[i, x.shape[1] - m:] = d[key][i, :m]  # the same rows, padded in front
            d[key] = x
        d["_lens"] = (d.pop("audio_lengths"), d.pop("vision_lengths"))
        data[s] = d
    path = tmp_path / "aligned_50.pkl"
    path.write_bytes(pickle.dumps({s: {k: v for k, v in d.items() if k != "_lens"} for s, d in data.items()}))
    ds = formats.load_mmsa(path, "valid", dataset="mosi")
    assert ds.feature_dims() == {"text": 768, "audio": 5, "video": 20}
    for i in range(3):
        m = data["valid"]["_lens"][1][i]
        np.testing.assert_array_equal(ds[i]["video"].numpy(), data["valid"]["vision"][i, -m:])
    _, loaders = protocol.loaders("umons", path, dataset="mosi", batch_size=4, seq_len=8, progress=False)
    row, _ = protocol.train_umons("LAV", loaders, task="sentiment2", config=SMALL, epochs=1, device="cpu",
                                  progress=False)
    assert 0.0 <= row["acc2"] <= 1.0


def test_mmsa_without_emotions_refuses_the_emotion_task(mmsa):
    path, _ = mmsa
    _, loaders = protocol.loaders("umons", path, batch_size=4, seq_len=8, progress=False)
    with pytest.raises(ValueError, match="merge-emotions"):
        protocol.train_umons("L", loaders, task="emotion", config=SMALL, epochs=1, device="cpu", progress=False)


def _labels_for_mmsa(folder, data):
    """CMU's label sequence for the MMSA fixture's videos: clip k = row k; intensities chosen per row."""
    rng = np.random.default_rng(3)
    rows, truth = {}, {}
    for s, d in data.items():
        for uid, sent in zip(d["id"], d["regression_labels"]):
            vid, _, clip = uid.rpartition("$_$")
            rows.setdefault(vid, {})[int(clip)] = (float(sent), rng.integers(0, 2, 6) * rng.uniform(0.3, 3, 6))
    seqs = {}
    for vid, by_clip in rows.items():
        feats = np.array([[by_clip[k][0], *by_clip[k][1]] for k in sorted(by_clip)])
        iv = np.array([[2.0 * k, 2.0 * k + 1.5] for k in sorted(by_clip)])
        seqs[vid] = (feats, iv)
        for k in by_clip:
            truth[f"{vid}$_${k}"] = _book_vector(feats[k])
    seqs["-vidtrain0"] = (seqs["-vidtrain0"][0][:2], seqs["-vidtrain0"][1][:2])  # clip 2 unlabelled
    return _write_csd(folder / "CMU_MOSEI_Labels.csd", "All Labels", seqs,
                      {"root name": "All Labels", "dimension names": list(SDK_NAMES)}), truth


def test_merge_emotions_by_video_id_then_emotion_training(mmsa, tmp_path):
    path, data = mmsa
    labels, truth = _labels_for_mmsa(tmp_path, data)
    out = tmp_path / "merged" / "unaligned_50.pkl"
    assert formats.main(["merge-emotions", str(path), "--emotions", str(labels), "--out", str(out)]) == 0
    ds = formats.load_mmsa(out, "train")
    assert ds.emotion_names == EMOTIONS["mosei"]
    assert "-vidtrain0$_$2" not in ds.ids and len(ds) == SIZES["train"] - 1  # the unmatched clip is dropped
    for i, uid in enumerate(ds.ids):
        assert ds[i]["emotion"].tolist() == truth[uid], uid
    _, loaders = protocol.loaders("umons", out, batch_size=4, seq_len=8, progress=False)
    row, _ = protocol.train_umons("LA", loaders, task="emotion", config=SMALL, epochs=1, device="cpu",
                                  progress=False)
    assert 0.0 <= row["wacc"] <= 1.0


def test_merge_leaves_out_a_clip_whose_row_has_another_sentiment(mmsa, tmp_path):
    path, data = mmsa
    labels, truth = _labels_for_mmsa(tmp_path, data)
    with h5py.File(labels, "r+") as fh:  # row 1 of -vidtrain1 now carries another sentiment
        fh["All Labels/data/-vidtrain1/features"][1, 0] += 1.0
    report = formats.merge_emotions(path, labels)
    assert report["train"]["left_out"] == {
        "no SDK utterance with that clip number": ["-vidtrain0$_$2"],
        "the label row's sentiment differs from MMSA's (another utterance)": ["-vidtrain1$_$1"]}
    assert report["train"]["matched"] == SIZES["train"] - 2 and report["train"]["ambiguous"] == []


# ----------------------------------------------------------------------------------------------
# MulT
# ----------------------------------------------------------------------------------------------
def test_mult_iemocap_emotions_by_name_and_training(tmp_path):
    data = _mult_data(np.random.default_rng(2), iemocap=True)
    path = _write_mult(tmp_path / "iemocap_data.pkl", data)
    ds = formats.load_mult(path, "train", dataset="iemocap")
    assert ds.emotion_names == ["ang", "hap", "neu", "sad"]  # the book's order, 'exc' and 'fru' absent
    lab = data["train"]["labels"]
    for i in range(4):
        # MulT's order: Neutral, Happy, Sad, Angry
        mult = {e: lab[i, j, 1] for j, e in enumerate(["neu", "hap", "sad", "ang"])}
        assert ds[i]["emotion"].tolist() == [mult[e] for e in ["ang", "hap", "neu", "sad"]]
        n = data["train"]["_lens"][i]
        np.testing.assert_array_equal(ds[i]["video"].numpy(), data["train"]["vision"][i, -n:])
        assert np.isnan(ds[i]["sentiment"])
    assert torch.isfinite(ds[0]["audio"]).all() and ds[0]["audio"][-1, 0] == 0
    _, loaders = protocol.loaders("umons", tmp_path, dataset="iemocap", batch_size=4, seq_len=8, progress=False)
    row, _ = protocol.train_umons("LAV", loaders, config=SMALL, epochs=1, device="cpu", progress=False,
                                  n_emotions=4)
    assert 0.0 <= row["wacc"] <= 1.0


def test_mult_mosei_sentiment_ids_and_training(tmp_path):
    data = _mult_data(np.random.default_rng(4), iemocap=False)
    path = _write_mult(tmp_path / "mosei_senti_data_noalign.pkl", data)
    ds = formats.load_mult(path, "valid")
    assert ds.ids[1] == "vvalid1_0.0_1.5"
    assert ds[1]["sentiment"] == pytest.approx(float(data["valid"]["labels"][1, 0, 0]))
    with pytest.raises(DataError, match="IEMOCAP"):
        formats.load_mult(path, "valid", dataset="iemocap")
    _, loaders = protocol.loaders("handcrafted", path, batch_size=4, seq_len=8, progress=False)
    row, _ = protocol.train_umons("LAV", loaders, task="sentiment2", config=SMALL, epochs=1, device="cpu",
                                  progress=False)
    assert 0.0 <= row["acc2"] <= 1.0


# ----------------------------------------------------------------------------------------------
# CMU-MultimodalSDK computational sequences
# ----------------------------------------------------------------------------------------------
def test_csd_utterances_rows_and_emotion_order(csd):
    folder, seqs = csd
    ds = formats.load_csd(folder, "train")
    assert ds.ids == ["-6rXp3zJ3kc[0]", "-6rXp3zJ3kc[1]", "-6rXp3zJ3kc[2]", "abc_DEF-123[0]", "abc_DEF-123[1]"]
    assert ds.emotion_names == EMOTIONS["mosei"]
    for i, uid in enumerate(ds.ids):
        vid, k = uid[:-3], int(uid[-2])
        k = len(SDK_ROWS[vid]) - 1 - k  # stored row k of the reversed file is time-order row n-1-k
        it = ds[i]
        assert it["emotion"].tolist() == _book_vector(SDK_ROWS[vid][k]), uid  # happy stays happy
        assert it["sentiment"] == pytest.approx(SDK_ROWS[vid][k][0])
        s, e = SEGMENTS[vid][k]
        feats, iv = seqs["COVAREP"][vid]
        # frames overlapping the utterance by more than the SDK's epsilon (1 ms), as its align() keeps them
        rows = [j for j in range(len(iv)) if min(iv[j, 1], e) - max(iv[j, 0], s) > 1e-3]
        assert 3 <= len(rows) <= 60
        np.testing.assert_array_equal(it["audio"].numpy(), feats[rows])
        assert it["text"].shape[1] == 300 and it["video"].shape[1] == 35
    assert ds[2]["emotion"].tolist() == [0, 0, 0, 1, 0, 0]  # SDK column 1 'happy' -> book column 3 'happy'
    zz = formats.load_csd(folder, "valid")[0]
    assert torch.isfinite(zz["audio"]).all()


def test_csd_dimension_names_metadata_wins(tmp_path):
    names = ["sentiment", "anger", "disgust", "fear", "happy", "sad", "surprise"]  # a file naming its own order
    data = {"v": (np.array([[0.5, 0, 0, 0, 0, 0, 1.0]]), np.array([[0.0, 1.0]]))}
    _write_csd(tmp_path / "labels.csd", "All Labels", data, {"dimension names": names})
    out = formats.csd_emotion_labels(tmp_path / "labels.csd")
    assert out["__names__"] == EMOTIONS["mosei"] and out["v"][2][0].tolist() == [0, 0, 0, 0, 0, 1.0]


def test_csd_umons_step_with_the_sdk_feature_sizes(csd):
    from nbsupport.models.umons import UmonsTransformer, input_dims_from

    folder, _ = csd
    _, loaders = protocol.loaders("umons", folder, data_format="csd", batch_size=5, seq_len=8, progress=False)
    batch = next(iter(loaders["train"]))
    assert input_dims_from(batch) == {"L": 300, "A": 74, "V": 35}  # read from the data, not the synthetic sizes
    torch.manual_seed(0)
    model = UmonsTransformer("LAV", 6, config=SMALL, input_dims=input_dims_from(batch))
    model.fit_input_normalisation(loaders["train"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["emotion"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


def test_csd_handcrafted_loaders_and_a_baseline_step(csd):
    folder, _ = csd
    sets, loaders = protocol.loaders("handcrafted", folder, batch_size=4, seq_len=8, progress=False)
    batch = next(iter(loaders["train"]))
    dims = {"L": batch["text"].shape[-1], "A": batch["audio"].shape[-1], "V": batch["video"].shape[-1]}
    assert dims == {"L": 300, "A": 74, "V": 35} and batch["emotion"].shape[1] == 6
    torch.manual_seed(0)
    model = baselines.build_baseline("LF-LSTM", "LAV", dims, hidden=8).fit_input_stats(loaders["train"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss0 = None
    for _ in range(3):  # one optimiser step at a time on the same batch: the loss must go down
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["emotion"])
        loss0 = loss0 if loss0 is not None else loss.item()
        opt.zero_grad(), loss.backward(), opt.step()
    assert loss.item() < loss0


def test_umons_pickle_folder_through_the_same_loader_builder(tmp_path):
    rng = np.random.default_rng(6)
    for split, n in SIZES.items():
        ids = [f"{split}{i}_0" for i in range(n)]
        data = {"sentences": {u: ["i", "am", "so", "happy"][: 2 + i % 3] for i, u in enumerate(ids)},
                "mels": {u: rng.normal(size=(5 + i, 80)) for i, u in enumerate(ids)},
                # UMONS's emotion pickles hold the CMU-MOSEI SDK order: happy, sad, anger, surprise, disgust, fear
                "emotion": {u: [float(i % 2), 0, 0, 0, 0, 0.7 * (i % 3 == 0)] for i, u in enumerate(ids)},
                "sentiment": {u: float(i % 7 - 3) for i, u in enumerate(ids)}}
        for k, v in data.items():
            (tmp_path / f"{split}_{k}.p").write_bytes(pickle.dumps(v))
    assert formats.detect_format(tmp_path) == ("umons", tmp_path)
    sets, loaders = protocol.loaders("umons", tmp_path, batch_size=4, seq_len=8, progress=False)
    # the book's order (anger, disgust, fear, happy, sad, surprise), mapped by name
    assert sets["train"][1]["emotion"].tolist() == [0, 0, 0, 1, 0, 0]  # happy
    assert sets["train"][0]["emotion"].tolist() == [0, 0, 1, 0, 0, 0]  # fear
    row, _ = protocol.train_umons("LA", loaders, config=SMALL, epochs=1, device="cpu", progress=False)
    assert 0.0 <= row["wacc"] <= 1.0


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_missing_key_and_bad_shapes_name_file_and_key(mmsa, tmp_path):
    _, data = mmsa
    broken = {s: dict(d) for s, d in data.items()}
    del broken["valid"]["regression_labels"]
    p = tmp_path / "aligned_50.pkl"
    p.write_bytes(pickle.dumps(broken))
    with pytest.raises(DataError, match=r"aligned_50\.pkl.*\['valid'\]\['regression_labels'\] missing"):
        formats.load_mmsa(p, "valid")
    broken["valid"] = dict(data["valid"], text_bert=data["valid"]["text_bert"][:, :2])
    p.write_bytes(pickle.dumps(broken))
    with pytest.raises(DataError, match=r"text_bert.*expected \(N, 3"):
        formats.load_mmsa(p, "valid")
    broken["test"] = dict(data["test"], regression_labels=data["test"]["regression_labels"] * 10)
    p.write_bytes(pickle.dumps(broken))
    with pytest.raises(DataError, match=r"regression_labels.*\[-3, 3\]"):
        formats.load_mmsa(p, "test")
    p.write_bytes(pickle.dumps({"train": {}}))
    with pytest.raises(DataError, match="key 'test' missing"):
        formats.load_mmsa(p, "test")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_that_run_code_are_refused(tmp_path):
    p = tmp_path / "unaligned_50.pkl"
    p.write_bytes(pickle.dumps({"train": {"id": _Evil()}}))
    with pytest.raises(DataError, match=r"unaligned_50\.pkl.*refused global '(posix|os)\.system'"):
        formats.load_mmsa(p, "train")


def test_csd_errors(csd, tmp_path):
    (tmp_path / "labels.csd").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"labels\.csd: not an HDF5"):
        formats.read_csd(tmp_path / "labels.csd")
    with h5py.File(tmp_path / "x.csd", "w") as fh:
        fh.create_group("All Labels").create_group("metadata")
    with pytest.raises(DataError, match=r"x\.csd: key 'All Labels/data' missing"):
        formats.read_csd(tmp_path / "x.csd")
    folder, _ = csd
    bad = tmp_path / "nosplit"
    bad.mkdir()
    os.symlink(folder / "CMU_MOSEI_Labels.csd", bad / "CMU_MOSEI_Labels.csd")
    os.symlink(folder / "CMU_MOSEI_COVAREP.csd", bad / "CMU_MOSEI_COVAREP.csd")
    with pytest.raises(DataError, match=r"test_split\.txt: split file missing"):
        formats.load_csd(bad, "test")
    (bad / "test_split.txt").write_text("nope\n")
    with pytest.raises(DataError, match=r"test_split\.txt: none of its 1 ids is a video of CMU_MOSEI_Labels\.csd"):
        formats.load_csd(bad, "test")


def test_format_parameter_and_detection_errors(tmp_path, mmsa):
    with pytest.raises(ParameterError, match="data_format"):
        protocol.loaders("umons", tmp_path, data_format="hdf5")
    with pytest.raises(DataError, match="no data found"):
        formats.detect_format(tmp_path)
    path, _ = mmsa
    with pytest.raises(ParameterError, match="kind 'mesm' reads raw frames"):
        protocol.loaders("mesm", path)
    with pytest.raises(DataError, match="holds 'mmsa' data"):
        formats.resolve_format(path.parent, "mult")
