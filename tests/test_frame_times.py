"""Frames sampled by their timestamps (issue: real videos at 24, 25, 29.97, 30, 50, 60 fps and variable
frame rate). MESM reads a face every ``img_interval`` = 500 ms of the utterance (Dai et al. 2021,
Sec. 3.1): the n-th face read must be the frame nearest to ``start + n * 500 ms`` in true time, so
within half a frame period at a constant rate.

References are independent of the reader: hand-computed frame numbers, and real mp4 files encoded here
with PyAV whose every frame shows its own number as 8 black/white squares, so the frame a loader read
is identified from its pixels and its true time is its number / fps (or the pts written for variable
rate). Needs no system program (the audio track is a tone)."""
import fractions
import math
import pickle
import warnings

import av
import cv2
import numpy as np
import pytest
import torch
from test_prepare import mux_mono

from nbsupport.data import datasets as D
from nbsupport.data import DataError, load_split
from nbsupport.data import prepare as P
from nbsupport.data.raw import sample_frame_positions

SIDE, BIT = 96, 12  # frame side; the frame number's 8 bits are 12 x 12 squares along the top
RATES = {24: [240, 252, 264, 276], 25: [250, 262, 275, 287], 29.97: [300, 315, 330, 345],
         30: [300, 315, 330, 345], 50: [500, 525, 550, 575], 60: [600, 630, 660, 690]}


def loader_frames(raw, i, monkeypatch, interval=500.0) -> list[str]:
    """Paths of the frames the MESM/UMONS loaders read for item ``i`` (``datasets._sampled_faces``), in
    order: ``read_frame`` is wrapped to record them."""
    seen = []
    real = D.read_frame

    def recording(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(D, "read_frame", recording)
    D._sampled_faces(raw, i, interval)
    monkeypatch.setattr(D, "read_frame", real)
    return seen


def frame_number(path) -> int:
    """The frame number drawn into a frame by :func:`coded_frame`, read back from its pixels."""
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY).astype(float)
    bits = [img[3:BIT - 3, b * BIT + 3:(b + 1) * BIT - 3].mean() > 127 for b in range(8)]
    return int("".join("1" if x else "0" for x in bits), 2)


def coded_frame(j: int) -> np.ndarray:
    """A 96 x 96 RGB frame showing the number ``j`` (0-255) as 8 squares, MSB first (white = 1)."""
    img = np.full((SIDE, SIDE, 3), 90, np.uint8)
    img[BIT:] = np.linspace(40, 200, SIDE, dtype=np.uint8)[None, :, None]
    for b, ch in enumerate(format(j, "08b")):
        img[:BIT, b * BIT:(b + 1) * BIT] = 255 if ch == "1" else 0
    return img


def write_root(base, entries: dict, all_frames: dict, splits=None):
    """A raw-layout root: ``entries`` {id: meta entry}, ``all_frames`` {id: frame indices} (8 x 8 JPEGs),
    a 0.1 s wav each; ``splits`` {split: ids}, default every id in the test split."""
    import soundfile as sf

    raw = base / "MOSEI_RAW_PROCESSED"
    for uid, ks in all_frames.items():
        (raw / uid).mkdir(parents=True)
        for k in ks:
            cv2.imwrite(str(raw / uid / f"image_{k}.jpg"), np.full((8, 8, 3), k % 256, np.uint8))
        sf.write(raw / uid / "audio.wav", np.zeros(1600, np.float32), 16000)
    meta = {uid: {"text": "words", "label": [1, 0, 0, 0, 0, 0], **m} for uid, m in entries.items()}
    (raw / "meta.pkl").write_bytes(pickle.dumps(meta))
    split = base / "MOSEI_SPLIT"
    split.mkdir()
    splits = splits or {"train": [], "valid": [], "test": list(entries)}
    for name, ids in splits.items():
        (split / f"{name}_split.txt").write_text("".join(f"{u}\n" for u in ids))
    return base


def _k(path) -> int:
    return int(str(path).rsplit("image_", 1)[1].split(".")[0])


@pytest.fixture()
def clock_root(tmp_path):
    """Every frame of 10.0-12.2 s stored at each rate; the segment is 10.0-12.0 s; plus a VFR clip."""
    entries, frames = {}, {}
    for f in RATES:
        uid = f"v{str(f).replace('.', '_')}_0"
        frames[uid] = list(range(int(10 * f) - 3, int(12.2 * f)))
        entries[uid] = {"fps": float(f if f != 29.97 else 30000 / 1001), "start": 10.0, "end": 12.0}
    # variable rate: 1 s at 20 fps (j = 0..19), then 50 fps (j = 20..); j is the file's index k
    vfr_times = {j: j * 0.05 if j < 20 else 1.0 + (j - 20) * 0.02 for j in range(70)}
    frames["vfr_0"] = list(vfr_times)
    entries["vfr_0"] = {"fps": 70 / 1.98, "start": 0.24, "end": 2.0, "frame_times": vfr_times}
    return write_root(tmp_path, entries, frames)


@pytest.mark.parametrize("fps", list(RATES))
def test_every_500_ms_hand_computed_at_each_rate(clock_root, fps, monkeypatch):
    """10.0, 10.5, 11.0, 11.5 s -> the nearest frame of the rate, e.g. 25 fps: 262.5 -> 262 (the earlier of a
    tie), 287.5 -> 287; 29.97 fps: 314.685 -> 315, 344.655 -> 345; 24 fps: 252, 264, 276."""
    raw = load_split(clock_root, "mosei", "test")
    uid = f"v{str(fps).replace('.', '_')}_0"
    read = [_k(p) for p in loader_frames(raw, raw.ids.index(uid), monkeypatch)]
    assert read == RATES[fps]
    true_fps = 30000 / 1001 if fps == 29.97 else fps
    worst = max(abs(k / true_fps - (10.0 + 0.5 * n)) for n, k in enumerate(read))
    assert worst <= 0.5 / true_fps + 1e-9  # within half a frame


def test_variable_frame_rate_uses_the_recorded_frame_times(clock_root, monkeypatch):
    """Targets 0.24, 0.74, 1.24, 1.74 s: 0.25 s (frame 5 of the 20 fps part), 0.75 s (15), then the 50 fps
    part at 1.24 s (20 + 12 = 32) and 1.74 s (20 + 37 = 57)."""
    raw = load_split(clock_root, "mosei", "test")
    read = [_k(p) for p in loader_frames(raw, raw.ids.index("vfr_0"), monkeypatch)]
    assert read == [5, 15, 32, 57]


def test_old_root_without_fps_reads_30_fps_and_warns_once(tmp_path, monkeypatch):
    frames = {u: list(range(0, 91)) for u in ("a_0", "b_0", "c_0")}
    root = write_root(tmp_path, {u: {} for u in frames}, frames,
                      {"train": ["a_0"], "valid": ["b_0"], "test": ["c_0"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = [load_split(root, "mosei", s) for s in ("train", "valid", "test")]
    said = [w for w in caught if "record no frame rate" in str(w.message)]
    assert len(said) == 1 and "30 fps" in str(said[0].message) and "meta.pkl" in str(said[0].message)
    read = [_k(p) for p in loader_frames(splits[2], 0, monkeypatch)]
    assert read == [0, 15, 30, 45, 60, 75, 90] == sample_frame_positions(frames["c_0"], 500)


@pytest.mark.parametrize("bad, field", [({"fps": "25"}, "fps"), ({"fps": 0}, "fps"), ({"fps": float("nan")}, "fps"),
                                        ({"fps": 25, "start": "x"}, "start"),
                                        ({"fps": 25, "frame_times": {1.5: 0.1}}, "frame_times"),
                                        ({"fps": 25, "frame_times": {float("inf"): 0.1}}, "frame_times")])
def test_bad_frame_clock_names_the_file_id_and_field(tmp_path, bad, field):
    root = write_root(tmp_path, {"a_0": bad}, {"a_0": [0]})
    with pytest.raises(DataError, match=rf"meta.pkl \[id 'a_0'\]: field '{field}'"):
        load_split(root, "mosei", "test")


def test_feature_cache_entry_sampled_without_the_clock_is_recomputed(clock_root, tmp_path, caplog):
    """An entry written before frames were sampled by time (no ``frame_times`` in its fingerprint) is
    recomputed, and so is one whose recorded frame rate changed since."""
    raw = load_split(clock_root, "mosei", "test")
    calls = []

    def compute(raw, i):
        calls.append(i)
        return {"k": torch.tensor(raw.sample_frames(i, 500)[1])}

    def dataset():
        return D.FeatureDataset(raw, "probe", {"img_interval": 500.0}, compute, lambda i, c: c,
                                tmp_path / "cache", keys=("k",))

    ds = dataset()
    i = raw.ids.index("v25_0")
    ds.features(i)
    assert calls == [i] and "frame_times" in ds.fingerprint(i)
    entry = torch.load(ds.cache_path(i), weights_only=True)
    del entry["fingerprint"]["frame_times"]  # as the reader before this change wrote it
    torch.save(entry, ds.cache_path(i))
    with caplog.at_level("WARNING", logger="nbsupport.data.datasets"):
        ds.features(i)
    assert calls == [i, i] and "frame_times" in caplog.text
    ds.features(i)
    assert calls == [i, i]  # fresh now: reused
    raw.timing[i] = {**raw.timing[i], "fps": 24.0}  # the meta.pkl of a root prepared again
    dataset().features(i)
    assert calls == [i, i, i]


# ---------------------------------------------------------------------------------------------
# Real mp4 files through the preparer
# ---------------------------------------------------------------------------------------------
def encode_coded(path, fps, seconds=4.0, pts_ms=None):
    """An H.264 + AAC mp4 of coded frames: constant ``fps`` (pts j in time base 1/fps), or, with
    ``pts_ms``, variable rate (frame j at pts_ms[j] ms). Returns each frame's true time (s)."""
    c = av.open(str(path), "w")
    if pts_ms is None:
        rate = fractions.Fraction(30000, 1001) if fps == 29.97 else fractions.Fraction(fps)
        vs = c.add_stream("libx264", rate=rate)
        vs.time_base = 1 / rate
        times = [j / float(rate) for j in range(int(seconds * float(rate)))]
        pts = list(range(len(times)))
    else:
        vs = c.add_stream("libx264", rate=fps)
        vs.time_base = vs.codec_context.time_base = fractions.Fraction(1, 1000)
        times, pts = [p / 1000 for p in pts_ms], list(pts_ms)
    vs.width, vs.height, vs.pix_fmt = SIDE, SIDE, "yuv420p"
    vs.options = {"crf": "10"}
    a = c.add_stream("aac", rate=16000)
    a.layout = "mono"
    for j, p in enumerate(pts):
        fr = av.VideoFrame.from_ndarray(coded_frame(j), format="rgb24")
        fr.pts = p
        for pkt in vs.encode(fr):
            c.mux(pkt)
    for pkt in vs.encode():
        c.mux(pkt)
    mux_mono(c, a, (0.3 * np.sin(np.arange(int((times[-1] + 0.1) * 16000)) * 0.05)).astype(np.float32))
    c.close()
    return np.asarray(times)


def prepare_and_read(tmp_path, monkeypatch, fps, segments, pts_ms=None):
    """Encode one video, prepare ``segments`` [(start, end)], and return, per segment, the true times of
    the frames the loader reads, and the source frame times."""
    (tmp_path / "videos").mkdir()
    times = encode_coded(tmp_path / "videos" / "vid.mp4", fps, pts_ms=pts_ms)
    (tmp_path / "seg.csv").write_text("id,start,end,text\n" + "".join(
        f"vid_{c},{s},{e},clip {c}\n" for c, (s, e) in enumerate(segments)))
    (tmp_path / "lab.csv").write_text("id,happiness,sadness,anger,surprise,disgust,fear\n" + "".join(
        f"vid_{c},1,0,0,0,0,0\n" for c in range(len(segments))))
    split = tmp_path / "splits"
    split.mkdir()
    for s in ("train", "valid", "test"):
        (split / f"{s}_split.txt").write_text("".join(f"vid_{c}\n" for c in range(len(segments))) if s == "test"
                                             else "")
    rep = P.prepare(tmp_path / "videos", tmp_path / "seg.csv", tmp_path / "lab.csv", tmp_path / "out",
                    splits=split, progress=False)
    assert not rep.failed, rep.failed
    raw = load_split(tmp_path / "out", "mosei", "test")
    read = []
    for c in range(len(segments)):
        paths = loader_frames(raw, raw.ids.index(f"vid_{c}"), monkeypatch)
        read.append(times[[frame_number(p) for p in paths]])
    return read, times


def check_nearest(read, times, segments):
    """The n-th frame read is the source frame nearest to start + n * 0.5 s; returns the worst error (s)."""
    worst = 0.0
    for got, (s, e) in zip(read, segments):
        targets = s + 0.5 * np.arange(math.ceil((e - s) / 0.5 - 1e-9))
        assert len(got) == len(targets), (got, targets)
        for t, g in zip(targets, got):
            best = np.min(np.abs(times - t))
            assert abs(g - t) <= best + 1e-6, (t, g, best)  # no other frame is nearer
            worst = max(worst, abs(g - t))
    return worst


SEGMENTS = [(0.3, 2.9), (1.13, 3.6)]


@pytest.mark.parametrize("fps", [25, 60])
def test_prepared_mp4_frames_read_at_their_times(tmp_path, monkeypatch, fps):
    read, times = prepare_and_read(tmp_path, monkeypatch, fps, SEGMENTS)
    worst = check_nearest(read, times, SEGMENTS)
    assert worst <= 0.5 / fps + 1e-6
    meta = pickle.loads((tmp_path / "out" / "MOSEI_RAW_PROCESSED" / "meta.pkl").read_bytes())
    assert meta["vid_0"]["fps"] == pytest.approx(fps)
    for k, t in meta["vid_1"]["frame_times"].items():  # recorded times are the frames' true times
        assert k == round(t * fps) and np.min(np.abs(times - t)) < 1e-6


def test_prepared_variable_frame_rate_mp4(tmp_path, monkeypatch):
    """Frame gaps cycling 20, 40, 60 ms (25 fps on average), so the frame index is no clock."""
    pts = np.cumsum([0] + [20, 40, 60] * 33).tolist()  # 100 frames over 3.96 s
    read, times = prepare_and_read(tmp_path, monkeypatch, 25, [(0.3, 2.9), (1.13, 3.6)], pts_ms=pts)
    check_nearest(read, times, [(0.3, 2.9), (1.13, 3.6)])
