"""Tests of nbsupport.interpret (Chapter 6's measured interpretability) with hand-made maps and
hand-computed shares."""
import numpy as np
import pytest
import torch

from nbsupport import evidence
from nbsupport.interpret import (audio_box_to_pieces, cue_shares, face_region_from_box, layer_cue_table,
                                 lift_intervals, region_to_grid, summarize_cue_table)
from nbsupport.models.mesm import LayerRecord


def test_region_to_grid_area_fractions():
    region = torch.zeros(1, 4, 4)
    region[0, 0, :3] = 1  # top row, three of four pixels
    grid = region_to_grid(region, (2, 2))
    assert grid[0].tolist() == [[0.5, 0.25], [0.0, 0.0]]  # hand count: 2/4 and 1/4 pixels


def test_cue_shares_hand_computed():
    region = torch.zeros(2, 2, 2)
    region[:, 0, 0] = 1.0  # cue in the top-left cell (a quarter of the grid)
    att = torch.tensor([[[0.7, 0.1], [0.1, 0.1]], [[0.25, 0.25], [0.25, 0.25]]])
    kept = torch.tensor([[[True, False], [False, False]], [[True, True], [True, True]]])
    active = torch.ones(2, 2, 2, dtype=torch.bool)
    s = cue_shares(att, kept, active, region)
    np.testing.assert_allclose(s["attention_share"], [0.7, 0.25])
    np.testing.assert_allclose(s["kept_share"], [1.0, 0.25])
    np.testing.assert_allclose(s["chance"], [0.25, 0.25])
    # chance counts only the available (active) sites; frames without a region are dropped
    active2 = active.clone()
    active2[0, 1, :] = False
    region2 = region.clone()
    region2[1] = 0
    s2 = cue_shares(att, kept, active2, region2)
    np.testing.assert_allclose(s2["chance"], [0.5])
    assert s2["rows"].tolist() == [0]


def test_layer_table_and_summary():
    n = 3
    region = torch.zeros(n, 8, 8)
    region[:, :4, :4] = 1  # a quarter of the image
    att = torch.full((n, 4, 4), 1 / 16)
    kept = torch.zeros(n, 4, 4, dtype=torch.bool)
    kept[:, :2, :2] = True  # all kept sites inside the cue
    rec = LayerRecord(att, kept, torch.ones(n, 4, 4, dtype=torch.bool), torch.zeros(n, 2, dtype=torch.long))
    table = layer_cue_table([rec], region, "V")
    row = table.iloc[0]
    assert (row.attention_share, row.kept_share, row.chance, row.n) == (pytest.approx(0.25), 1.0, 0.25, 3)
    summary = summarize_cue_table([table, table])
    assert summary.iloc[0]["kept_lift"] == pytest.approx(4.0) and summary.iloc[0]["n"] == 6


def _records(n_frames_attention):
    """One layer of 2x2 grids; frame f puts attention a_f on the cue cell (a quarter of the grid)."""
    a = torch.tensor(n_frames_attention, dtype=torch.float32)
    att = torch.empty(len(a), 2, 2)
    att[:] = ((1 - a) / 3)[:, None, None]
    att[:, 0, 0] = a
    kept = att >= att.amax((1, 2), keepdim=True)  # the top site only
    region = torch.zeros(len(a), 2, 2)
    region[:, 0, 0] = 1.0
    rec = LayerRecord(att, kept, torch.ones(len(a), 2, 2, dtype=torch.bool), torch.zeros(len(a), 2, dtype=torch.long))
    return [rec], region


def test_lift_intervals_point_and_interval_by_hand():
    # 6 utterances of 2 frames each; the attention on the cue cell: utterance u has 0.25 + 0.1 * u on both frames
    share = [0.25 + 0.1 * u for u in range(6) for _ in range(2)]
    owners = [f"u{u}" for u in range(6) for _ in range(2)]
    records, region = _records(share)
    per = layer_cue_table(records, region, "V", owners=owners)
    assert len(per) == 6 and per["n"].tolist() == [2] * 6
    table = lift_intervals(per, resamples=4000, seed=1)
    row = table.iloc[0]
    # hand: mean share = mean(0.25..0.75) = 0.5, chance = 0.25 -> lift 2.0; same as the frame-weighted summary
    assert row.attention_lift == pytest.approx(2.0) and row.chance == pytest.approx(0.25)
    assert row.n_utterances == 6 and row.n == 12
    assert summarize_cue_table([layer_cue_table(records, region, "V")]).iloc[0]["attention_lift"] == \
        pytest.approx(row.attention_lift)
    # independent reference: a percentile bootstrap of the per-utterance shares written out in numpy
    rng = np.random.default_rng(0)
    u = np.array([0.25 + 0.1 * k for k in range(6)])
    boot = np.array([u[rng.integers(0, 6, 6)].mean() / 0.25 for _ in range(4000)])
    low, high = np.percentile(boot, [2.5, 97.5])
    assert row.attention_lift_low == pytest.approx(low, abs=0.08)
    assert row.attention_lift_high == pytest.approx(high, abs=0.08)
    assert row.attention_lift_low > 1  # every utterance is at or above chance, most well above
    assert "prefers the cue regions" in evidence.lift_verdict("V layer 1", evidence.Estimate(
        row.attention_lift, row.attention_lift_low, row.attention_lift_high))


def test_lift_interval_straddles_one_for_a_uniform_attention():
    # attention at chance on average: half the utterances above, half below
    share = [0.15, 0.15, 0.35, 0.35, 0.2, 0.2, 0.3, 0.3]
    owners = ["a", "a", "b", "b", "c", "c", "d", "d"]
    records, region = _records(share)
    row = lift_intervals(layer_cue_table(records, region, "V", owners=owners), resamples=2000).iloc[0]
    assert row.attention_lift == pytest.approx(1.0)
    assert row.attention_lift_low < 1 < row.attention_lift_high
    text = evidence.lift_verdict("V layer 1", evidence.Estimate(row.attention_lift, row.attention_lift_low,
                                                                row.attention_lift_high))
    assert "not distinguishable from chance" in text


def test_face_region_from_box_central_square():
    mask = np.zeros((96, 128), bool)
    mask[:48, 16:64] = True  # top-left quarter of the central 96x96 square
    crop = face_region_from_box(mask, (16, 0, 96), size=48)  # the central square: x0 = (128 - 96) // 2
    assert crop.shape == (48, 48)
    assert crop[:24, :24].mean() == pytest.approx(1.0) and crop[24:, :].sum() == 0 and crop[:, 24:].sum() == 0


def test_audio_box_to_pieces():
    import librosa

    box = dict(t0=0.5, t1=1.0, f0_hz=1000.0, f1_hz=4000.0)
    m = audio_box_to_pieces(box, n_pieces=4)
    assert m.shape == (4, 128, 32)
    full = np.concatenate(list(m), axis=1)  # (128, 128 frames)
    frames = np.nonzero(full.any(0))[0]
    assert frames.min() == 40 and frames.max() == 80  # 0.5 s and 1.0 s at hop 200 / 16 kHz
    centres = librosa.mel_frequencies(130, fmin=0, fmax=8000)[1:-1]
    bands = np.nonzero(full.any(1))[0]
    assert centres[bands].min() >= 1000 and centres[bands].max() <= 4000
    assert centres[bands.min() - 1] < 1000 and centres[bands.max() + 1] > 4000
    with pytest.raises(KeyError, match="t0"):
        audio_box_to_pieces({}, 1)


def _resized(frame, x0, y0, s):
    import cv2

    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    return cv2.resize(grey[y0:y0 + s, x0:x0 + s], (48, 48), interpolation=cv2.INTER_AREA)


def test_face_box_on_a_drawn_face_and_on_noise():
    """face_box (the box Chapter 6 maps attention back with) finds a drawn face around its true centre,
    its square is the crop face_crop returns, and a frame with no face gets the hand-computed central square."""
    from nbsupport.data import synth
    from nbsupport.data.features import face_box, face_crop

    for seed in range(40):  # the cascade finds some of the synthetic corpus' drawn faces
        face = synth._face_identity(np.random.default_rng(seed))
        frame = synth._draw_face(face, {}, 0, 0)
        x0, y0, s, found = face_box(frame)
        if found:
            break
    else:
        pytest.fail("the face detector found none of 40 drawn faces")
    assert abs(x0 + s / 2 - face["cx"]) < 6 and abs(y0 + s / 2 - face["cy"]) < 6  # centred on the drawn face
    assert 2 * face["b"] <= s <= frame.shape[0]  # holds the whole face height, within the frame
    crop, crop_found = face_crop(frame)
    assert crop_found
    np.testing.assert_array_equal(_resized(frame, x0, y0, s), crop)

    noise = (np.random.default_rng(0).random((80, 120, 3)) * 255).astype(np.uint8)
    assert face_box(noise) == (20, 0, 80, False)  # central square: side min(80, 120), x0 = (120 - 80) // 2
    crop, crop_found = face_crop(noise)
    assert not crop_found
    np.testing.assert_array_equal(_resized(noise, 20, 0, 80), crop)


@pytest.mark.slow
def test_cue_regions_on_a_tiny_synthetic_corpus(tmp_path, monkeypatch):
    """End to end on real corpus files: the regions line up with the collate_mesm batch (one per real
    frame / piece), and each utterance's cue.pkl is read once for both modalities."""
    from nbsupport.data import collate_mesm, generate_corpus, load_cues, mesm_dataset, raw
    from nbsupport import interpret
    from nbsupport.interpret import CueRegions

    root = generate_corpus(tmp_path / "c", n=6, seed=1, progress=False)
    ds = mesm_dataset(root, "mosei", "train", cache_dir=tmp_path / "f")
    reads = []
    real_read = raw.read_cues
    monkeypatch.setattr(interpret, "read_cues", lambda folder: reads.append(str(folder)) or real_read(folder))
    batch = collate_mesm([ds[i] for i in range(len(ds))])
    cues = CueRegions(ds)
    faces, mel = cues.for_batch(batch, "V"), cues.for_batch(batch, "A")
    assert faces.shape == (int(batch["faces_mask"].sum()), 48, 48)
    assert mel.shape == (int(batch["mel_mask"].sum()), 128, 32)
    assert 0.0 <= float(faces.min()) and float(faces.max()) <= 1.0
    assert sorted(reads) == sorted(str(f) for f in ds.raw.folders)  # one read per utterance
    cue = cues._cue(batch["ids"][0])
    np.testing.assert_array_equal(cue["au_mask"], load_cues(root, "mosei", batch["ids"][0])["au_mask"])


@pytest.mark.slow
def test_lift_tracker_measures_every_epoch_without_changing_training(tmp_path):
    """Chapter 6 measures the lift after every epoch: the trained weights are the same, bit for bit, as
    without the callback, and the tracker holds one table per measurement with utterance-level intervals."""
    from nbsupport import protocol, train
    from nbsupport.data import collate_mesm, generate_corpus, mesm_dataset
    from nbsupport.data.text import TINY_TEXT_MODEL, load_tokenizer
    from nbsupport.interpret import CueRegions, LiftTracker
    from nbsupport.models import mesm

    root = generate_corpus(tmp_path / "c", n=12, seed=2, progress=False, splits=(0.5, 0.25, 0.25))
    tok = load_tokenizer(TINY_TEXT_MODEL)
    sets = {s: mesm_dataset(root, "mosei", s, tokenizer=tok, cache_dir=tmp_path / "f") for s in ("train", "valid", "test")}
    loaders = {s: train.make_loader(d, batch_size=3, shuffle=s == "train", seed=0, collate_fn=collate_mesm)
               for s, d in sets.items()}

    def trained(callbacks_for):
        torch.manual_seed(0)
        config = mesm.MesmConfig(stem_channels=4, block_channels=[4, 8, 8], dim=8, layers=1, heads=2,
                                 attention_hidden=8)
        model = mesm.MESM("LAV", top_p=0.7, config=config, text_model=TINY_TEXT_MODEL)
        cbs = callbacks_for(model)
        protocol.train_and_test(model, loaders, name="MESM", epochs=2, lr=1e-3, device="cpu", seed=0,
                                progress=False, callbacks=cbs)
        return model, cbs

    plain, _ = trained(lambda m: [])
    tracked, (tracker,) = trained(lambda m: [LiftTracker(m, loaders["test"], CueRegions(sets["test"]), resamples=200)])
    for (name, a), b in zip(plain.state_dict().items(), tracked.state_dict().values()):
        assert torch.equal(a, b), name
    table = tracker.table
    assert sorted(table["epoch"].unique()) == [1, 2]
    assert set(table["modality"]) <= {"A", "V"} and (table["n_utterances"] <= len(sets["test"])).all()
    ok = table.dropna(subset=["attention_lift_low"])
    assert ((ok["attention_lift_low"] <= ok["attention_lift"] + 1e-9)
            & (ok["attention_lift"] <= ok["attention_lift_high"] + 1e-9)).all()
    assert tracker.final()["epoch"].unique().tolist() == [2]


def test_lift_formatting_keeps_three_decimals_and_says_when_there_is_no_interval():
    """Chapter 6 prints each lift with its interval; an interval just above 1 must not read [1.00, 1.01]."""
    import pandas as pd

    from nbsupport.book import fmt

    assert fmt.lift(1.0042, 1.0031, 1.0053) == "1.004 [1.003, 1.005]"
    assert fmt.lift(1.2, float("nan"), float("nan")) == "1.200 [no interval]"
    table = pd.DataFrame({"attention_lift": [1.21], "attention_lift_low": [1.127], "attention_lift_high": [1.302],
                          "kept_lift": [0.98], "kept_lift_low": [0.969], "kept_lift_high": [1.001]})
    out = fmt.lift_columns(table)
    assert out["attention lift [95 % CI]"].tolist() == ["1.210 [1.127, 1.302]"]
    assert out["kept-site lift [95 % CI]"].tolist() == ["0.980 [0.969, 1.001]"]
    assert "attention lift [95 % CI]" not in table  # the input is left as it was


def _seed_sums(ratios, chance, modality="V", layer=1):
    """cue_sums-shaped rows: one per utterance, attention_sum = ratio * chance_sum."""
    import pandas as pd
    return pd.DataFrame({"modality": modality, "layer": layer, "grid": "6x6", "utterance": [f"u{i}" for i in
                         range(len(chance))], "n": 1, "attention_sum": np.asarray(ratios) * chance,
                         "kept_sum": chance, "chance_sum": chance})


def test_seed_lift_interval_is_the_t_interval_over_seeds_when_utterances_agree():
    """Within each seed every utterance has the same lift, so resampling utterances changes nothing and
    the interval must be scipy's one-sample t interval of the per-seed lifts."""
    from scipy import stats

    from nbsupport.interpret import seed_lift_intervals, seed_lift_verdicts
    chance = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    lifts = [1.10, 1.25, 1.05, 1.18, 1.12]
    table = seed_lift_intervals({s: _seed_sums(np.full(5, x), chance) for s, x in enumerate(lifts)}, resamples=200)
    r = table.iloc[0]
    ci = stats.ttest_1samp(lifts, 0.0).confidence_interval(0.95)
    assert r["lift"] == pytest.approx(np.mean(lifts)) and r["n_seeds"] == 5 and r["n_utterances"] == 5
    assert (r["low"], r["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert r["per_seed"] == {s: pytest.approx(x) for s, x in enumerate(lifts)}
    v = seed_lift_verdicts(table)["lift_V_layer1"]
    assert v["decision"] == "cue regions" and "over 5 training seeds" in v["sentence"] and v["n_seeds"] == 5
    below = seed_lift_intervals({s: _seed_sums(np.full(5, 2 - x), chance) for s, x in enumerate(lifts)})
    assert seed_lift_verdicts(below)["lift_V_layer1"]["decision"] == "elsewhere"


def test_seed_lift_interval_adds_the_test_sample_variance():
    """Identical seeds (no training spread): the half-width is t(S-1) times the bootstrap standard error
    of the one seed's ratio of sums over utterances (scipy.stats.bootstrap as the reference)."""
    from scipy import stats

    from nbsupport.interpret import seed_lift_intervals, seed_lift_verdicts
    rng = np.random.default_rng(1)
    chance = rng.uniform(0.05, 0.4, 60)
    ratios = rng.uniform(0.6, 1.5, 60)
    table = seed_lift_intervals({s: _seed_sums(ratios, chance) for s in range(3)}, resamples=4000)
    r = table.iloc[0]
    ref = stats.bootstrap((ratios * chance, chance), lambda a, c, axis=-1: a.sum(axis) / c.sum(axis), paired=True,
                          vectorized=True, n_resamples=4000, random_state=np.random.default_rng(2)).standard_error
    assert r["lift"] == pytest.approx((ratios * chance).sum() / chance.sum())
    assert (r["high"] - r["low"]) / 2 == pytest.approx(stats.t.ppf(0.975, 2) * ref, rel=0.1)
    one = seed_lift_intervals({0: _seed_sums(ratios, chance)})
    assert np.isnan(one.iloc[0]["low"])
    v = seed_lift_verdicts(one)["lift_V_layer1"]
    assert v["decision"] == "undecided" and v["low"] is None and "no verdict" in v["sentence"]


def test_analysis_plan_reads_chapter6_lists_and_names_an_unknown_entry(tmp_path):
    """Chapter 6's ``compare``/``analyses`` lists switch the trainings and analyses; the cue measures need
    cue.pkl in every test folder (hand-made folders: one with, one without)."""
    from types import SimpleNamespace

    from nbsupport.interpret import ANALYSES, COMPARISONS, analysis_plan
    with_cue, without = tmp_path / "a", tmp_path / "b"
    with_cue.mkdir(), without.mkdir()
    (with_cue / "cue.pkl").write_bytes(b"")
    synthetic, real = SimpleNamespace(folders=[with_cue]), SimpleNamespace(folders=[with_cue, without])
    full = analysis_plan(synthetic)
    assert (full.fe2e, full.attention_grad, full.bug_cost, full.explorer, full.sweep, full.cue_lifts,
            full.lift_by_epoch, full.seed_runs, full.skipped) == (True,) * 8 + ("",)
    point = analysis_plan(synthetic, analyses=[], compare=[])  # Chapter 8's sweep points
    assert not any((point.fe2e, point.attention_grad, point.bug_cost, point.explorer, point.sweep,
                    point.maps, point.lift_by_epoch, point.seed_runs))
    only_bug = analysis_plan(synthetic, analyses=[], compare=["site-order bug"])
    assert only_bug.bug_cost and only_bug.seed_runs and not only_bug.fe2e
    on_real = analysis_plan(real, analyses=ANALYSES, compare=COMPARISONS)
    assert on_real.sweep and not on_real.cue_lifts and not on_real.lift_by_epoch
    assert "1 of 2 test utterances have no cue.pkl" in on_real.skipped
    with pytest.raises(ValueError, match="parameter 'compare': unknown \\['FE2F'\\]"):
        analysis_plan(synthetic, compare=["FE2F"])
