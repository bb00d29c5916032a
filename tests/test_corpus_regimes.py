"""The corpus's two placement knobs, measured (nbsupport.data.synth: cue_gain, hidden_cue).

References independent of the generator: scikit-learn logistic-regression probes, cross-validated, on
the hand-crafted extractors the two-phase models read (face_geometry, prosody_windows) against raw
references computed here (a fine rectified high-pass of the face crops; librosa's 128-band log-mel
inside the recorded cue box); pixel differences inside and outside the cue.pkl regions for cue_gain.
"""
import pickle

import cv2
import librosa
import numpy as np
import pytest
import soundfile as sf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nbsupport.data import features as F
from nbsupport.data import synth

# every face and voice shows its one labelled emotion; cue_gain 1.5 so that 96 utterances decide
KNOBS = dict(p_audio=1.0, p_video=1.0, specialise=0.0, p_contradict=0.0, p_second=0.0, frame_step=30,
             cue_gain=1.5)
N = 96


def _features(root):
    raw = root / "MOSEI_RAW_PROCESSED"
    meta = pickle.loads((raw / "meta.pkl").read_bytes())
    vh, vr, ah, ar, y, forms = [], [], [], [], [], []
    for uid, m in sorted(meta.items()):
        cue = pickle.loads((raw / uid / "cue.pkl").read_bytes())
        crops = [F.face_crop(cv2.imread(str(raw / uid / f"image_{k}.jpg")))[0] for k in cue["frame_index"]]
        g = np.stack([F.face_geometry(c) for c in crops])
        vh.append(np.r_[g.mean(0), g.std(0)])
        cells = []
        for c in crops:  # positive minus negative energy of a fine high-pass, 6x6 cells, minus frame 0
            c = c.astype(np.float32)
            hp = c - cv2.GaussianBlur(c, (0, 0), 0.7)
            cells.append((cv2.resize(np.maximum(hp, 0) ** 2, (6, 6), interpolation=cv2.INTER_AREA)
                          - cv2.resize(np.maximum(-hp, 0) ** 2, (6, 6),
                                       interpolation=cv2.INTER_AREA)).ravel())
        d = np.stack(cells)[1:] - cells[0]
        vr.append(np.r_[d.max(0), d.mean(0)])
        wav, sr = sf.read(str(raw / uid / "audio.wav"), dtype="float32")
        p = F.prosody_windows(wav, sr)
        ah.append(np.r_[p.mean(0), p.std(0)])
        mel = librosa.power_to_db(librosa.feature.melspectrogram(y=wav, sr=sr, n_fft=400, hop_length=200,
                                                                 n_mels=128))
        b = cue["audio_box"]
        ar.append(mel[:, int(b["t0"] * 80):max(int(b["t0"] * 80) + 1, int(b["t1"] * 80))].mean(1))
        y.append(int(np.argmax(m["label"])))
        forms.append((cue["form"]["V"], cue["form"]["A"], m["cue_form"]["V"], m["cue_form"]["A"]))
    return {"V_hand": np.array(vh), "V_raw": np.array(vr), "A_hand": np.array(ah), "A_raw": np.array(ar),
            "y": np.array(y), "forms": forms}


def _cv_acc(X, y):
    cv = StratifiedKFold(4, shuffle=True, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    return float(cross_val_score(clf, X, y, cv=cv).mean())


@pytest.fixture(scope="module")
def regimes(tmp_path_factory):
    base = tmp_path_factory.mktemp("regimes")
    out = {}
    for h in (0.0, 1.0):
        root = synth.generate_corpus(base / f"h{h}", n=N, seed=2, progress=False, hidden_cue=h, **KNOBS)
        out[h] = _features(root)
    return out


@pytest.mark.slow  # the `regimes` fixture generates two corpora and their features (~9 s)
def test_hidden_cue_forms_recorded(regimes):
    assert all(f == ("geometry", "prosody", "geometry", "prosody") for f in regimes[0.0]["forms"])
    assert all(f == ("texture", "tones", "texture", "tones") for f in regimes[1.0]["forms"])
    assert np.array_equal(regimes[0.0]["y"], regimes[1.0]["y"])  # same labels, only the cue's form differs


@pytest.mark.slow  # the `regimes` fixture generates two corpora and their features (~9 s)
def test_visible_cues_reach_the_handcrafted_features(regimes):
    f = regimes[0.0]
    chance = np.bincount(f["y"]).max() / len(f["y"])
    assert _cv_acc(f["V_hand"], f["y"]) > chance + 0.25
    assert _cv_acc(f["A_hand"], f["y"]) > chance + 0.15


@pytest.mark.slow  # the `regimes` fixture generates two corpora and their features (~9 s)
def test_hidden_cues_are_missed_by_handcrafted_but_kept_in_raw_inputs(regimes):
    f = regimes[1.0]
    chance = np.bincount(f["y"]).max() / len(f["y"])
    v_hand, a_hand = _cv_acc(f["V_hand"], f["y"]), _cv_acc(f["A_hand"], f["y"])
    v_raw, a_raw = _cv_acc(f["V_raw"], f["y"]), _cv_acc(f["A_raw"], f["y"])
    assert v_hand < chance + 0.1 and a_hand < chance + 0.1, (v_hand, a_hand, chance)
    assert v_raw > chance + 0.15 and a_raw > chance + 0.4, (v_raw, a_raw, chance)


def test_cue_gain_grows_the_contrast_inside_the_recorded_regions(tmp_path):
    """Same seed: the frames differ only by the cue, so |frame(g) - frame(0)| inside the cue.pkl AU regions
    against outside them measures the cue's strength where cue.pkl says it is."""
    kw = dict(n=8, seed=5, progress=False, p_video=1.0, specialise=0.0, p_contradict=0.0, p_second=0.0)
    roots = {g: synth.generate_corpus(tmp_path / f"g{g}", cue_gain=g, **kw) for g in (0.0, 1.0, 2.0, 3.0)}
    raw = {g: r / "MOSEI_RAW_PROCESSED" for g, r in roots.items()}
    uids = sorted(p.name for p in raw[0.0].iterdir() if p.is_dir())
    inside, outside = {g: [] for g in (1.0, 2.0, 3.0)}, {g: [] for g in (1.0, 2.0, 3.0)}
    for uid in uids:
        cue1 = pickle.loads((raw[1.0] / uid / "cue.pkl").read_bytes())
        cue0 = pickle.loads((raw[0.0] / uid / "cue.pkl").read_bytes())
        assert not np.unpackbits(cue0["au_mask_packed"]).any()  # no cue at gain 0: no region recorded
        for g in inside:
            cue = pickle.loads((raw[g] / uid / "cue.pkl").read_bytes())
            masks = np.unpackbits(cue["au_mask_packed"], axis=-1, count=96).astype(bool)
            for j, k in enumerate(cue["frame_index"]):
                if masks[j].sum() < 50:
                    continue
                a = cv2.imread(str(raw[g] / uid / f"image_{k}.jpg"), cv2.IMREAD_GRAYSCALE).astype(np.float32)
                b = cv2.imread(str(raw[0.0] / uid / f"image_{k}.jpg"),
                               cv2.IMREAD_GRAYSCALE).astype(np.float32)
                d = np.abs(a - b)
                inside[g].append(d[masks[j]].mean())
                outside[g].append(d[~masks[j]].mean())
    m_in = {g: np.mean(v) for g, v in inside.items()}
    m_out = {g: np.mean(v) for g, v in outside.items()}
    assert m_in[1.0] < m_in[2.0] < m_in[3.0], m_in
    for g in m_in:  # the change sits in the recorded regions (JPEG noise elsewhere)
        assert m_in[g] > 4 * m_out[g], (g, m_in[g], m_out[g])


def test_knob_validation_names_the_knob():
    with pytest.raises(ValueError, match="cue_gain"):
        synth.SynthConfig(cue_gain=-0.5).check()
    with pytest.raises(ValueError, match="cue_gain"):
        synth.SynthConfig(cue_gain=synth.MAX_CUE_GAIN + 1).check()
    with pytest.raises(ValueError, match="hidden_cue"):
        synth.SynthConfig(hidden_cue=1.5).check()
    with pytest.raises(ValueError, match="splits"):
        synth.SynthConfig(splits=(0.5, 0.1, 0.1)).check()
    assert synth.SynthConfig().splits == (0.6, 0.1, 0.3)


def test_cli_takes_the_two_flags(tmp_path):
    rc = synth.main(["--out", str(tmp_path / "c"), "--n", "6", "--cue-gain", "2", "--hidden-cue", "1",
                     "--quiet"])
    assert rc == 0
    info = (tmp_path / "c" / "synth_info.json").read_text()
    assert '"cue_gain": 2.0' in info and '"hidden_cue": 1.0' in info
    assert synth.main(["--out", str(tmp_path / "d"), "--n", "6", "--hidden-cue", "2", "--quiet"]) == 2
