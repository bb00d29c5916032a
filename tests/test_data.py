"""Loaders, features, cached datasets, collates and bad-input errors of nbsupport.data."""
import pickle
import shutil

import cv2
import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from nbsupport.data import (DataError, collate_mesm, collate_umons, handcrafted_dataset, load_split,
                            load_umons_pickles, mesm_dataset, speaker_side, synth, umons_dataset,
                            umons_pickle_dataset)
from nbsupport.data import features as F
from nbsupport.data.raw import list_frames, sample_frame_positions


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth.generate_corpus(tmp_path_factory.mktemp("d") / "c", n=10, seed=0, progress=False)


@pytest.fixture
def broken(corpus, tmp_path):
    """A private copy of the corpus to break."""
    return shutil.copytree(corpus, tmp_path / "c")


def _first(root, split="train"):
    uid = (root / "MOSEI_SPLIT" / f"{split}_split.txt").read_text().split()[0]
    return uid, root / "MOSEI_RAW_PROCESSED" / uid


def test_load_split_items(corpus):
    ds = load_split(corpus, "mosei", "train")
    it = ds[0]
    assert it["id"] == ds.ids[0] and isinstance(it["text"], str) and it["sr"] == 16000
    assert it["audio"].dtype == np.float32 and it["audio"].ndim == 1
    wav, sr = sf.read(f"{it['folder']}/audio.wav", dtype="float32")  # independent read
    np.testing.assert_allclose(it["audio"], wav)
    assert it["frame_index"] == sorted(it["frame_index"]) and it["frame_index"][:2] == [0, 15]
    assert it["emotion"].shape == (6,) and it["emotion"].dtype == torch.float32
    meta = pickle.loads((corpus / "MOSEI_RAW_PROCESSED" / "meta.pkl").read_bytes())
    assert it["emotion"].tolist() == [float(v) for v in meta[it["id"]]["label"]]


def test_frame_naming_and_speaker(tmp_path):
    assert speaker_side("Ses01F_impro01_F000") == "L" and speaker_side("Ses01F_impro01_M003") == "R"
    for name in ("image_L_0.jpg", "image_L_15.jpg", "image_R_0.jpg", "image_2_R.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    paths, idx = list_frames(tmp_path, "L")
    assert idx == [0, 15] and paths[1].endswith("image_L_15.jpg")
    assert list_frames(tmp_path, "R")[1] == [0, 2]
    (tmp_path / "image_7.jpg").write_bytes(b"x")
    assert list_frames(tmp_path, None)[1] == [7]  # untagged MOSEI naming


def test_sample_frame_positions_hand_computed():
    assert sample_frame_positions(list(range(0, 91)), 500) == [0, 15, 30, 45, 60, 75, 90]
    assert sample_frame_positions([0, 15, 30, 45], 250) == [0, 1, 2, 3]  # sparse frames: nearest, deduplicated
    assert sample_frame_positions([0, 10, 20, 30], 1000, duration_s=1.0) == [0, 3]


def test_mel_pieces_against_librosa():
    rng = np.random.default_rng(0)
    wav = rng.normal(0, 0.1, 16000 + 123).astype(np.float32)
    pieces = F.mel_pieces(wav)
    ref = librosa.power_to_db(librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=400, win_length=400,
                                                             hop_length=200, n_mels=128), ref=1.0, amin=1e-10, top_db=None)
    n = ref.shape[1]  # 81 frames -> 3 pieces, last padded
    assert pieces.shape == (-(-n // 32), 128, 32)
    flat = np.concatenate(list(pieces), axis=1)
    np.testing.assert_allclose(flat[:, :n] * F.MEL_DB_STD + F.MEL_DB_MEAN, ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(flat[:, n:], (-100 - F.MEL_DB_MEAN) / F.MEL_DB_STD)
    um = F.umons_mel(np.tile(wav, 2))
    assert um.shape == (60, 80)


def test_pool_frames_hand_computed():
    x = np.arange(70 * 2, dtype=np.float32).reshape(70, 2)  # row r = [2r, 2r + 1]
    pooled = F._pool_frames(x, 60)  # 70 = 10 chunks of 2 frames, then 50 of 1 (np.array_split)
    assert pooled.shape == (60, 2)
    np.testing.assert_allclose(pooled[0], [1.0, 2.0])  # mean of rows 0 and 1: ([0, 1] + [2, 3]) / 2
    np.testing.assert_allclose(pooled[9], [37.0, 38.0])  # rows 18 and 19
    np.testing.assert_allclose(pooled[10], [40.0, 41.0])  # row 20 alone
    np.testing.assert_allclose(pooled[-1], [138.0, 139.0])  # row 69
    np.testing.assert_array_equal(F._pool_frames(x[:60], 60), x[:60])  # not longer than seq_len: as is


def test_cues_errors(corpus, tmp_path):
    from nbsupport.data import load_cues, read_cues

    uid, folder = _first(corpus)
    assert load_cues(corpus, "mosei", uid)["au_mask"].dtype == bool
    np.testing.assert_array_equal(read_cues(folder)["au_mask"], load_cues(corpus, "mosei", uid)["au_mask"])
    with pytest.raises(DataError, match="unknown dataset 'meld'"):
        load_cues(corpus, "meld", uid)
    with pytest.raises(DataError, match="nope: utterance folder missing"):
        load_cues(corpus, "mosei", "nope")
    with pytest.raises(DataError, match="cue.pkl: no cue ground truth"):
        read_cues(tmp_path)


def test_face_crop_centre_fallback_and_hog():
    img = np.zeros((60, 100, 3), np.uint8)
    img[:, 20:80] = 200
    crop, found = F.face_crop(img)
    assert not found and crop.shape == (48, 48)
    ref = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, 20:80], (48, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(crop, ref)
    assert F.hog_features(crop).shape == (900,)  # 5x5 blocks * 2x2 cells * 9 bins
    assert F.face_geometry(crop).shape == (356,)


def test_mesm_batch(corpus, tmp_path):
    ds = mesm_dataset(corpus, "mosei", "train", cache_dir=tmp_path)
    items = [ds[i] for i in range(3)]
    assert ds.cache_path(0).exists()  # cached on disk
    b = collate_mesm(items)
    B = 3
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].shape == b["input_ids"].shape
    assert b["attention_mask"].sum(1).tolist() == [len(it["input_ids"]) for it in items]
    assert b["input_ids"][0, 0].item() == 101  # [CLS] of the bundled MiniLM
    assert b["faces"].shape[:2] == b["faces_mask"].shape and b["faces"].shape[2:] == (48, 48)
    assert 0 <= b["faces"].min() and b["faces"].max() <= 1
    assert b["mel"].shape[0] == B and b["mel"].shape[2:] == (128, 32) and b["mel_mask"].shape == b["mel"].shape[:2]
    assert b["faces_mask"].sum(1).tolist() == [it["faces"].shape[0] for it in items]
    assert b["emotion"].shape == (B, 6) and b["sentiment"].shape == (B,)
    again = ds[0]
    torch.testing.assert_close(again["mel"], items[0]["mel"])


def test_umons_and_handcrafted_batches(corpus, tmp_path):
    for fn, da, dv in ((umons_dataset, 80, 900), (handcrafted_dataset, 33, 356)):
        ds = fn(corpus, "mosei", "valid", cache_dir=tmp_path)
        b = collate_umons([ds[i] for i in range(len(ds))])
        assert b["audio"].shape[2] == da and b["video"].shape[2] == dv and b["text"].shape[2] == 384
        for k in ("text", "audio", "video"):
            assert b[f"{k}_mask"].shape == b[k].shape[:2] and b[f"{k}_mask"].dtype == torch.bool
            assert b[k].shape[1] <= 60
            assert (b[k][~b[f"{k}_mask"]] == 0).all()


def test_seq_len_checked(corpus, tmp_path):
    for fn in (umons_dataset, handcrafted_dataset):
        with pytest.raises(DataError, match="seq_len must be >= 1"):
            fn(corpus, "mosei", "valid", seq_len=0, cache_dir=tmp_path)


def test_umons_pickles(tmp_path):
    rng = np.random.default_rng(0)
    ids = ["a_1", "b_2"]
    data = {"sentences": {i: ["i", "am", "happy"] for i in ids}, "mels": {i: rng.normal(size=(70, 80)) for i in ids},
            "emotion": {i: [0, 0, 0, 1.3, 0, 0] for i in ids}, "sentiment": {i: 1.5 for i in ids}}
    for k, v in data.items():
        (tmp_path / f"test_{k}.p").write_bytes(pickle.dumps(v))
    raw = load_umons_pickles(tmp_path, "test")
    assert raw[0]["emotion"].tolist() == [0, 0, 0, 1, 0, 0] and raw[0]["sentiment"] == 1.5
    b = collate_umons([umons_pickle_dataset(tmp_path, "test")[i] for i in range(2)])
    assert b["audio"].shape == (2, 60, 80) and b["text"].shape == (2, 3, 384) and "video" not in b
    long_mel = data["mels"]["a_1"]  # 70 frames pooled to 60: the first row is the mean of frames 0 and 1
    np.testing.assert_allclose(umons_pickle_dataset(tmp_path, "test")[0]["audio"][0].numpy(),
                               (long_mel[0] + long_mel[1]) / 2, rtol=1e-5, atol=1e-6)
    (tmp_path / "test_mels.p").unlink()
    with pytest.raises(DataError, match="test_mels.p"):
        load_umons_pickles(tmp_path, "test")


# ------------------------------------------------------------------ bad input, one test per case
def test_missing_split_file(broken):
    (broken / "MOSEI_SPLIT" / "valid_split.txt").unlink()
    with pytest.raises(DataError, match="valid_split.txt: split file missing"):
        load_split(broken, "mosei", "valid")


def test_id_without_folder(broken):
    uid, folder = _first(broken)
    shutil.rmtree(folder)
    with pytest.raises(DataError, match=f"{uid}: utterance folder missing"):
        load_split(broken, "mosei", "train")


def test_empty_wav(broken):
    _, folder = _first(broken)
    (folder / "audio.wav").write_bytes(b"")
    with pytest.raises(DataError, match="audio.wav: audio file is empty"):
        load_split(broken, "mosei", "train")[0]


def test_corrupt_wav(broken):
    _, folder = _first(broken)
    (folder / "audio.wav").write_bytes(b"RIFF-not-really-a-wave-file" * 10)
    with pytest.raises(DataError, match="audio.wav: cannot decode audio"):
        load_split(broken, "mosei", "train")[0]


def test_zero_byte_jpg(broken, tmp_path):
    _, folder = _first(broken)
    (folder / "image_0.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="image_0.jpg: frame file is empty"):
        mesm_dataset(broken, "mosei", "train", cache_dir=tmp_path / "fc")[0]


def test_corrupt_jpg(broken, tmp_path):
    _, folder = _first(broken)
    (folder / "image_15.jpg").write_bytes(b"\xff\xd8garbage" * 20)
    with pytest.raises(DataError, match="image_15.jpg: cannot decode image"):
        mesm_dataset(broken, "mosei", "train", cache_dir=tmp_path / "fc")[0]


def test_no_frames(broken):
    _, folder = _first(broken)
    for p in folder.glob("*.jpg"):
        p.unlink()
    with pytest.raises(DataError, match="no frames"):
        load_split(broken, "mosei", "train")[0]


def test_label_wrong_width(broken):
    meta_path = broken / "MOSEI_RAW_PROCESSED" / "meta.pkl"
    meta = pickle.loads(meta_path.read_bytes())
    uid, _ = _first(broken)
    meta[uid]["label"] = [1, 0, 0]
    meta_path.write_bytes(pickle.dumps(meta))
    with pytest.raises(DataError, match="field .label. has width 3, expected 6"):
        load_split(broken, "mosei", "train")


def test_unknown_dataset_and_split(corpus):
    with pytest.raises(DataError, match="unknown dataset 'meld'"):
        load_split(corpus, "meld", "train")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split(corpus, "mosei", "dev")


def test_guard_book_cache_drops_outputs_of_older_data(tmp_path, monkeypatch):
    """make book's guard: jupyter-cache keys notebooks by code only, so a new corpus version must empty it."""
    from nbsupport.data import corpus

    cache = tmp_path / ".jupyter_cache"
    cache.mkdir()
    (cache / "global.db").write_text("old outputs")
    assert corpus.guard_book_cache(cache) is True and not cache.exists()  # no stamp yet: unknown data
    cache.mkdir()
    (cache / "global.db").write_text("new outputs")
    assert corpus.guard_book_cache(cache) is False and (cache / "global.db").exists()
    assert (tmp_path / ".jupyter_cache.data_version").read_text().strip() == corpus.data_version()
    monkeypatch.setattr(corpus, "data_version", lambda: "synth999-features1")
    assert corpus.guard_book_cache(cache) is True and not cache.exists()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left


# ------------------------------------------------------------------ issue 15: safe pickles, cache, splits
def test_safe_unpickler_round_trips_data_and_refuses_code(tmp_path):
    """Plain containers and NumPy values of every pickle protocol come back equal (reference: the objects
    themselves); a global outside the allow-list is refused before it is called."""
    import collections

    from nbsupport.data.safe_pickle import UnsafePickleError, load_pickle, safe_loads

    objs = [np.arange(6.0).reshape(2, 3), np.float64(1.5), np.int32(-3), np.array(["ab", "c"]),
            np.array([1, "x", None], dtype=object), {"a": [1, 2.5, None, True], "b": (b"\xff", "s")},
            {1, 2}, frozenset([3]), collections.OrderedDict(z=1), 1 + 2j, np.dtype("float16")]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for obj in objs:
            back = safe_loads(pickle.dumps(obj, protocol=protocol))
            if isinstance(obj, np.ndarray):
                assert back.dtype == obj.dtype and back.tolist() == obj.tolist()
            else:
                assert back == obj and type(back) is type(obj), (protocol, obj)
    for evil in (pickle.dumps(print), pickle.dumps(getattr), b"cos\nsystem\n(S'true'\ntR."):
        with pytest.raises(UnsafePickleError, match="refused global"):
            safe_loads(evil)
    (tmp_path / "m.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(DataError, match=r"m.pkl: meta.pkl not loaded: refused global 'os.system'"):
        load_pickle(tmp_path / "m.pkl", "meta.pkl")


def test_file_identity_hashes_both_ends(tmp_path):
    """file_identity = [path, size, mtime_ns, BLAKE2b(first MiB + last MiB)], checked with hashlib directly."""
    import hashlib

    from nbsupport.data.datasets import file_identity

    small = tmp_path / "a.bin"
    small.write_bytes(b"hello")
    st = small.stat()
    assert file_identity(small, tmp_path) == ["a.bin", 5, st.st_mtime_ns,
                                              hashlib.blake2b(b"hello", digest_size=16).hexdigest()]
    big = tmp_path / "b.bin"
    data = np.random.default_rng(0).bytes(3 * 2**20 + 7)
    big.write_bytes(data)
    ref = hashlib.blake2b(data[:2**20] + data[-2**20:], digest_size=16).hexdigest()
    assert file_identity(big)[3] == ref
    mid = bytearray(data)
    mid[2**21] ^= 1  # a change in the middle is not seen by design (size and time are)
    big.write_bytes(bytes(mid))
    assert file_identity(big)[3] == ref


def test_cache_entry_unchanged_is_served_without_recompute(corpus, tmp_path, caplog):
    ds = mesm_dataset(corpus, "mosei", "train", cache_dir=tmp_path)
    first = ds.features(0)
    calls = []
    compute = ds._compute
    ds._compute = lambda raw, i: calls.append(i) or compute(raw, i)
    with caplog.at_level("WARNING", logger="nbsupport.data"):
        again = ds.features(0)
    assert calls == [] and not caplog.text
    assert torch.equal(again["mel"], first["mel"]) and torch.equal(again["faces"], first["faces"])


def test_allow_overlap_accepts_shared_and_repeated_ids(broken):
    train_ids = (broken / "MOSEI_SPLIT" / "train_split.txt").read_text().split()
    test_file = broken / "MOSEI_SPLIT" / "test_split.txt"
    test_file.write_text(test_file.read_text() + train_ids[0] + "\n" + train_ids[0] + "\n")
    with pytest.raises(DataError, match="more than once"):
        load_split(broken, "mosei", "test")
    ds = load_split(broken, "mosei", "test", allow_overlap=True)
    assert ds.ids[-2:] == [train_ids[0], train_ids[0]]


def test_nan_sentiment_means_absent_and_labels_keep_intensities(broken):
    """IEMOCAP-style NaN/None sentiment is "no sentiment"; MOSEI intensities in [0, 3] become presence."""
    meta_path = broken / "MOSEI_RAW_PROCESSED" / "meta.pkl"
    meta = pickle.loads(meta_path.read_bytes())
    uid, _ = _first(broken)
    meta[uid].update(sentiment=None, label=[0, 2.5, 0, 0.33, 0, 3])
    meta_path.write_bytes(pickle.dumps(meta))
    ds = load_split(broken, "mosei", "train")
    i = ds.ids.index(uid)
    assert np.isnan(ds.sentiments[i]) and ds.labels[i].tolist() == [0, 1, 0, 1, 0, 1]
