"""Synthetic corpus generator (nbsupport.data.synth): layout, determinism, atomicity, cue ground truth."""
import filecmp
import json
import os
import pickle

import numpy as np
import pytest

from nbsupport.data import DataError, ensure_corpus, load_cues, synth


def _same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only and not cmp.funny_files
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, mismatch
    for d in cmp.common_dirs:
        _same_tree(a / d, b / d)


def test_mosei_layout_and_labels(tmp_path):
    out = synth.generate_corpus(tmp_path / "c", n=12, seed=1, style="mosei", progress=False)
    raw = out / "MOSEI_RAW_PROCESSED"
    meta = pickle.loads((raw / "meta.pkl").read_bytes())
    ids = sum(((out / "MOSEI_SPLIT" / f"{s}_split.txt").read_text().split() for s in ("train", "valid", "test")), [])
    assert sorted(ids) == sorted(meta) and len(ids) == 12
    for uid, m in meta.items():
        assert len(m["label"]) == 6 and sum(m["label"]) >= 1 and -3 <= m["sentiment"] <= 3
        assert (raw / uid / "audio.wav").is_file() and (raw / uid / "image_0.jpg").is_file()
        assert (raw / uid / "image_15.jpg").is_file()  # frames numbered as 30 fps video, every 500 ms
    info = json.loads((out / "synth_info.json").read_text())
    assert info["version"] == synth.GENERATOR_VERSION and info["config"]["n"] == 12


def test_iemocap_layout_speaker_tags(tmp_path):
    out = synth.generate_corpus(tmp_path / "c", n=10, seed=0, style="iemocap", progress=False)
    meta = pickle.loads((out / "IEMOCAP_RAW_PROCESSED" / "meta.pkl").read_bytes())
    assert set(m["label"] for m in meta.values()) <= {"ang", "exc", "fru", "hap", "neu", "sad"}
    folders = [p for p in (out / "IEMOCAP_RAW_PROCESSED").glob("*/*") if p.is_dir()]
    assert len(folders) == 10
    for f in folders:
        side = "L" if f.name.split("_")[0][-1] == f.name.split("_")[-1][0] else "R"  # hand rule of the release
        assert (f / f"audio_{side}.wav").is_file() and (f / f"image_{side}_0.jpg").is_file()


def test_deterministic_byte_identical(tmp_path):
    a = synth.generate_corpus(tmp_path / "a", n=8, seed=5, progress=False)
    b = synth.generate_corpus(tmp_path / "b", n=8, seed=5, progress=False)
    _same_tree(a, b)
    c = synth.generate_corpus(tmp_path / "c", n=8, seed=6, progress=False)
    assert (a / "MOSEI_RAW_PROCESSED" / "meta.pkl").read_bytes() != (c / "MOSEI_RAW_PROCESSED" / "meta.pkl").read_bytes()


def test_killed_run_leaves_no_corpus(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth._write_utterance

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(synth, "_write_utterance", boom)
    with pytest.raises(KeyboardInterrupt):
        synth.generate_corpus(tmp_path / "c", n=8, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cue_ground_truth(tmp_path):
    out = synth.generate_corpus(tmp_path / "c", n=12, seed=2, progress=False)
    meta = pickle.loads((out / "MOSEI_RAW_PROCESSED" / "meta.pkl").read_bytes())
    seen_face = False
    for uid in meta:
        cue = load_cues(out, "mosei", uid)
        assert cue["au_mask"].shape == (len(cue["frame_index"]), 96, 96)
        box = cue["audio_box"]
        assert 0 <= box["t0"] < box["t1"] <= meta[uid]["duration"] + 1e-6 and box["f0_hz"] < box["f1_hz"]
        if cue["active_aus"]:
            t = np.asarray(cue["frame_index"]) / 30.0
            on, off = cue["video_window_s"]
            inside = (t > on + 0.3) & (t < off - 0.3)
            assert not cue["au_mask"][~((t > on) & (t < off))].any()  # no cue region outside onset..offset
            if inside.any():
                assert cue["au_mask"][inside].any()
                seen_face = True
        else:
            assert not cue["au_mask"].any()
    assert seen_face


def test_unknown_style_errors(tmp_path):
    with pytest.raises(ValueError, match="style"):
        synth.generate_corpus(tmp_path / "c", n=8, style="meld", progress=False)
    with pytest.raises(DataError, match="style"):
        ensure_corpus(style="meld")
    assert synth.main(["--out", str(tmp_path / "x"), "--n", "2"]) == 2  # n too small: clean CLI error


def test_ensure_corpus_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_DATA", str(tmp_path))
    a = ensure_corpus(n=6, seed=0, progress=False)
    stamp = (a / "synth_info.json").stat().st_mtime_ns
    b = ensure_corpus(n=6, seed=0, progress=False)
    assert a == b and (b / "synth_info.json").stat().st_mtime_ns == stamp
    assert f"v{synth.GENERATOR_VERSION}" in a.name and "n6" in a.name and "s0" in a.name
    assert ensure_corpus(a) == a  # a given root is returned as is
    with pytest.raises(DataError, match="IEMOCAP_RAW_PROCESSED"):
        ensure_corpus(a, style="iemocap")


def test_specialties_set_how_often_each_modality_shows_an_emotion():
    """With ``specialise`` s, a modality shows its specialties with p + s and other emotions with p - s."""
    cfg = synth.SynthConfig(p_text=0.55, p_audio=0.55, p_video=0.55, specialise=0.35).check()
    assert synth.carry_probability(cfg, "V", "happy") == pytest.approx(0.9)
    assert synth.carry_probability(cfg, "V", "anger") == pytest.approx(0.2)
    assert synth.carry_probability(synth.SynthConfig(p_audio=0.9, specialise=0.35), "A", "sad") == 1.0  # clipped
    rng = np.random.default_rng(0)
    for modality, emotion, expected in [("V", "happy", 0.9), ("V", "anger", 0.2), ("A", "anger", 0.9),
                                        ("A", "happy", 0.2), ("L", "sad", 0.9), ("L", "disgust", 0.2)]:
        shown = [synth._modality_profiles(rng, [emotion], cfg, modality) for _ in range(4000)]
        rate = np.mean([carried for _, carried in shown])
        assert abs(rate - expected) < 0.03, (modality, emotion, rate)
        assert all(profiles == [emotion] for profiles, carried in shown if carried)
    # every MOSEI emotion is a specialty of some modality, so fusion can read each one where it shows
    assert set(synth.EMOTIONS["mosei"]) <= set().union(*synth.SPECIALTIES.values())


def test_specialise_out_of_range_is_named():
    with pytest.raises(ValueError, match="specialise"):
        synth.SynthConfig(specialise=1.5).check()


def test_stale_partial_folders_of_dead_runs_are_removed(tmp_path):
    """After kill -9 the generator leaves <out>.partial-<pid>; the next run removes it only when that pid
    is gone (issue 15). A finished process gives a dead pid; our parent is a live one."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    dead = int(proc.stdout)
    live = os.getppid()
    for pid in (dead, live):
        (tmp_path / f"c.partial-{pid}" / "MOSEI_RAW_PROCESSED").mkdir(parents=True)
    (tmp_path / "other.partial-1").mkdir()  # another corpus' folder: not ours to judge
    synth.generate_corpus(tmp_path / "c", n=6, seed=0, progress=False)
    assert not (tmp_path / f"c.partial-{dead}").exists()
    assert (tmp_path / f"c.partial-{live}").exists() and (tmp_path / "other.partial-1").exists()
    assert (tmp_path / "c" / "synth_info.json").is_file()


@pytest.mark.slow  # a child Python imports torch and the data package (~10 s on 2 cores)
def test_command_line_runs_without_a_runpy_warning(tmp_path):
    """``python -m nbsupport.data.synth`` as the README and Chapter 2 give it: no RuntimeWarning from runpy
    (the package imports the generator; a module run with -m after its import makes runpy warn)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "nbsupport.data.synth", "--out",
                           str(tmp_path / "x"), "--n", "2"], capture_output=True, text=True, timeout=120)
    assert "RuntimeWarning" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 2 and "error:" in proc.stderr  # n too small: the CLI's own clean error
