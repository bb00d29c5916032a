"""Hostile and broken data files (issue "nothing from a data file can crash the process, exhaust memory,
escape its folder or pass as valid when it is not"), the successor table of ``test_bad_inputs.py``.

Each case builds one bad file in ``tmp_path`` -- written by the field's own writers (``pickle``, h5py,
the MMSA/MulT/SDK structures of ``test_formats.py``) and then damaged -- and checks the reader's answer:
a ``DataError``-family error whose message names the file and key and says what was expected, or a
logged warning. Crashes and memory bombs run in a child process (a segmentation fault kills only the
child; its peak memory is read from ``getrusage``), full disks are real: the child's file-size limit
(``RLIMIT_FSIZE``) makes the kernel refuse the write, as a full disk does.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch

from nbsupport import train
from nbsupport.data import DataError, load_split, mesm_dataset, synth
from nbsupport.data import formats, prepare as P
from nbsupport.data.raw import _emotion_vector

from test_bad_inputs import _copy, _ids
from test_formats import SDK_NAMES, SDK_ROWS, SEGMENTS as SDK_SEGMENTS, _mmsa_split, _mult_data, _write_csd, \
    _write_mult

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth.generate_corpus(tmp_path_factory.mktemp("hostile") / "c", n=10, seed=0, progress=False)


def _meta_path(root: Path) -> Path:
    return root / "MOSEI_RAW_PROCESSED" / "meta.pkl"


def _meta_with(root: Path, uid: str, marker_bytes: bytes) -> Path:
    """meta.pkl (protocol 2) whose entry ``uid`` has ``label`` = the pickle opcodes ``marker_bytes``."""
    path = _meta_path(root)
    meta = pickle.loads(path.read_bytes())
    meta[uid]["label"] = "@@MARK@@"
    data = pickle.dumps(meta, protocol=2)
    mark = b"X\x08\x00\x00\x00@@MARK@@"
    assert data.count(mark) == 1
    path.write_bytes(data.replace(mark, marker_bytes))
    return path


# ------------------------------------------------------------------------------- forged NumPy objects
class ForgedDtype:
    """A structured dtype holding an object field while its flags (0) say it holds none."""

    def __reduce__(self):
        return (np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))


class ForgedArray:
    """An ndarray of the forged dtype whose 8 data bytes become a memory pointer when read."""

    def __reduce__(self):
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (1,), ForgedDtype(), False, (0x4141414141414141).to_bytes(8, "little")))


class ForgedScalar:
    """The same through NumPy's scalar rebuild."""

    def __reduce__(self):
        return (np._core.multiarray.scalar, (ForgedDtype(), (0x4141414141414141).to_bytes(8, "little")))


class Bomb:
    """An allowed constructor called with a huge count: 1.5 GB from a few bytes."""

    def __reduce__(self):
        return (bytearray, (1_500_000_000,))


def _child(code: str, *, fsize: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python (this worktree's nbsupport); ``fsize``: the kernel refuses writes past
    that many bytes per file (EFBIG, the full-disk path). The child prints ``PEAK_MIB <n>``: its peak
    resident memory growth during the code."""
    head = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from nbsupport.data import DataError
        import nbsupport.data.formats, nbsupport.data.prepare, nbsupport.train
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if {fsize is not None}:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize!r}, resource.RLIM_INFINITY))
        try:
    """)
    tail = textwrap.dedent("""
        except Exception as e:
            print("ERROR", type(e).__name__, e)
        print("PEAK_MIB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", head + body + "\n" + tail], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _peak_mib(out: str) -> float:
    return float(out.rsplit("PEAK_MIB", 1)[1].split()[0])


# ------------------------------------------------------------------------------- crashes (child process)
@pytest.mark.slow  # a child process (imports torch)
def test_forged_dtype_meta_pkl_is_refused_not_a_segfault(corpus, tmp_path):
    """load_split on a meta.pkl holding the forged array: today a segmentation fault (exit -11)."""
    root = _copy(corpus, tmp_path)
    meta = pickle.loads(_meta_path(root).read_bytes())
    meta[_ids(root)[0]]["label"] = ForgedArray()
    _meta_path(root).write_bytes(pickle.dumps(meta, protocol=2))
    r = _child(f"print(repr(nbsupport.data.load_split({str(root)!r}, 'mosei', 'train').labels))")
    assert r.returncode == 0, f"child died with {r.returncode}: {r.stderr[-500:]}"
    assert "ERROR DataError" in r.stdout and "meta.pkl" in r.stdout and "not plain" in r.stdout, r.stdout


@pytest.mark.slow  # a child process (imports torch)
def test_forged_dtype_numpy_scalar_is_refused(tmp_path):
    path = tmp_path / "scalar.pkl"
    path.write_bytes(pickle.dumps({"x": ForgedScalar()}, protocol=2))
    r = _child(f"from nbsupport.data.safe_pickle import load_pickle\nprint(repr(load_pickle({str(path)!r})))")
    assert r.returncode == 0, f"child died with {r.returncode}: {r.stderr[-500:]}"
    assert "ERROR DataError" in r.stdout and "scalar.pkl" in r.stdout, r.stdout


@pytest.mark.slow  # a child process (imports torch)
def test_forged_dtype_mmsa_pickle_is_refused(tmp_path):
    data = {s: _mmsa_split(np.random.default_rng(0), 3, s, dims=(4, 6, 2), lt=3, la=3, lv=3)
            for s in ("train", "valid", "test")}
    data["train"]["id"] = ForgedArray()  # _text() reads the item: a pointer from the file
    path = tmp_path / "unaligned_50.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    r = _child(f"print(len(nbsupport.data.formats.load_mmsa({str(path)!r}, 'train')))")
    assert r.returncode == 0, f"child died with {r.returncode}: {r.stderr[-500:]}"
    assert "ERROR DataError" in r.stdout and "unaligned_50.pkl" in r.stdout, r.stdout


# ------------------------------------------------------------------------------- memory bombs (child process)
@pytest.mark.slow  # a child process (imports torch)
def test_tiny_meta_pkl_bomb_allocates_nothing(corpus, tmp_path):
    """A meta.pkl of a few dozen bytes that calls bytearray(1.5e9): refused before it allocates."""
    root = _copy(corpus, tmp_path)
    data = pickle.dumps(Bomb(), protocol=0)
    _meta_path(root).write_bytes(data)
    r = _child(f"nbsupport.data.load_split({str(root)!r}, 'mosei', 'train')")
    peak = _peak_mib(r.stdout)
    print(f"meta.pkl bomb: {len(data)} bytes, peak memory growth {peak:.1f} MiB")
    assert "ERROR DataError" in r.stdout and "meta.pkl" in r.stdout and "bytearray" in r.stdout, r.stdout
    assert peak < 64, f"the {len(data)}-byte pickle made the reader grow by {peak:.0f} MiB"


def _csd_declaring(path: Path, rows: int, dim: int, *, nothing_written: bool = True) -> Path:
    with h5py.File(path, "w") as fh:
        v = fh.create_group("COVAREP/data/zz9")
        v.create_dataset("features", shape=(rows, dim), dtype="f4")  # declared, never written
        v.create_dataset("intervals", data=np.array([[0.0, 1.0]]))
    return path


@pytest.mark.slow  # a child process (imports torch)
def test_small_csd_declaring_gigabytes_allocates_nothing(tmp_path):
    path = _csd_declaring(tmp_path / "CMU_MOSEI_COVAREP.csd", 1_200_000, 300)  # 1.34 GiB declared
    r = _child(f"nbsupport.data.formats.read_csd({str(path)!r})")
    peak = _peak_mib(r.stdout)
    print(f".csd bomb: {path.stat().st_size} bytes, peak memory growth {peak:.1f} MiB")
    assert "ERROR DataError" in r.stdout and "COVAREP/data/zz9/features" in r.stdout, r.stdout
    assert "nothing written" in r.stdout and peak < 64, (peak, r.stdout)


@pytest.mark.slow  # a child process (imports torch)
def test_damaged_global_heap_is_refused_not_a_hang(tmp_path):
    """A .csd metadata string whose HDF5 global heap has a free-space size of 0: HDF5 itself loops forever
    reading it (found by the fuzzer); the reader checks the heap first."""
    import struct

    path = tmp_path / "CMU_MOSEI_COVAREP.csd"
    _write_csd(path, "COVAREP", {"zz9": (np.ones((2, 3), np.float32), np.array([[0.0, 1.0], [1.0, 2.0]]))},
               {"root name": "COVAREP"})
    data = bytearray(path.read_bytes())
    addr = data.index(b"GCOL")
    size = struct.unpack_from("<Q", data, addr + 24)[0]  # object 1's size
    free = addr + 32 + ((size + 7) // 8) * 8  # the free-space object's header
    assert struct.unpack_from("<H", data, free)[0] == 0
    data[free + 8:free + 16] = bytes(8)
    path.write_bytes(bytes(data))
    try:
        r = _child(f"nbsupport.data.formats.read_csd({str(path)!r})", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("reading the .csd hung for 60 s")
    assert "ERROR DataError" in r.stdout and "COVAREP/metadata/root name" in r.stdout and "global heap" in r.stdout


# ------------------------------------------------------------------------------- full disks (child process)
@pytest.mark.slow  # a child process (imports torch)
def test_full_disk_under_the_feature_cache_names_the_entry(corpus, tmp_path):
    root = _copy(corpus, tmp_path)
    r = _child(f"nbsupport.data.mesm_dataset({str(root)!r}, 'mosei', 'train', "
               f"cache_dir={str(tmp_path / 'fc')!r}).features(0)", fsize=4096)
    assert "ERROR WriteError" in r.stdout and str(tmp_path / "fc") in r.stdout and ".pt" in r.stdout, r.stdout
    assert not list((tmp_path / "fc").rglob("*.pt")), "a half-written cache entry was left"


@pytest.mark.slow  # a child process (imports torch)
def test_full_disk_during_checkpointing_names_the_checkpoint(tmp_path):
    code = f"""
    from test_bad_inputs import _fit
    _fit(__import__('pathlib').Path({str(tmp_path / 'ck')!r}))
    """
    r = _child(code, fsize=1024)
    assert "ERROR WriteError" in r.stdout and str(tmp_path / "ck" / "last.pt") in r.stdout, r.stdout


def _video(path: Path, seconds: float = 2.0) -> Path:
    """A small H.264 + AAC mp4 (moving gradient, a 440 Hz tone) written with PyAV."""
    import av

    c = av.open(str(path), "w")
    vs = c.add_stream("libx264", rate=30)
    vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
    a = c.add_stream("aac", rate=16000)
    a.layout = "mono"
    for k in range(int(seconds * 30)):
        img = np.full((32, 32, 3), (4 * k) % 256, np.uint8)
        for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    t = np.arange(int(seconds * 16000)) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    for i in range(0, x.shape[1], 1024):
        fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i:i + 1024]), format="fltp", layout="mono")
        fr.sample_rate, fr.pts = 16000, i
        for p in a.encode(fr):
            c.mux(p)
    for p in a.encode():
        c.mux(p)
    c.close()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    base = tmp_path_factory.mktemp("videos")
    (base / "videos").mkdir()
    for v in ("vidA", "vidB", "vidC"):
        _video(base / "videos" / f"{v}.mp4")
    return base


def _tables(folder: Path, ids=(("vidA", 0), ("vidB", 0), ("vidC", 0)), sentiment="1.0") -> tuple[Path, Path]:
    (folder / "segments.csv").write_text("id,video_id,start,end,text\n" + "".join(
        f"{v}_{c},{v},0.1,1.5,words of {v}\n" for v, c in ids))
    (folder / "labels.csv").write_text("id,happiness,sadness,anger,surprise,disgust,fear,sentiment\n" + "".join(
        f"{v}_{c},1,0,0,0,0,0,{sentiment}\n" for v, c in ids))
    return folder / "segments.csv", folder / "labels.csv"


@pytest.mark.slow  # a child process (imports torch)
def test_full_disk_in_the_preparer_names_the_output_not_the_video(videos, tmp_path):
    seg, lab = _tables(tmp_path)
    out = tmp_path / "out"
    code = f"""
    rc = nbsupport.data.prepare.main(['--videos', {str(videos / 'videos')!r}, '--segments', {str(seg)!r},
                                      '--labels', {str(lab)!r}, '--out', {str(out)!r}, '--workers', '1',
                                      '--no-progress'])
    print('RC', rc)
    """
    r = _child(code, fsize=8000)  # frames fit, the audio does not
    assert "RC 1" in r.stdout, r.stdout + r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 3 and all("cannot write" in f and str(out) in f for f in failed), r.stderr


# ------------------------------------------------------------------------------- the preparer
def test_preparer_keeps_fps_after_kill_and_resume(videos, tmp_path):
    """kill -9 after the utterances were renamed into place but before meta.pkl was written: the resumed
    run still records each utterance's frame rate."""
    seg, lab = _tables(tmp_path)
    out = tmp_path / "out"
    P.prepare(videos / "videos", seg, lab, out, progress=False)
    fps = {u: m["fps"] for u, m in pickle.loads((out / "MOSEI_RAW_PROCESSED" / "meta.pkl").read_bytes()).items()}
    assert fps and all(abs(f - 30) < 1e-6 for f in fps.values())
    (out / "MOSEI_RAW_PROCESSED" / "meta.pkl").unlink()  # the state a kill -9 before the end leaves
    rep = P.prepare(videos / "videos", seg, lab, out, progress=False)
    assert len(rep.skipped) == 3
    meta = pickle.loads((out / "MOSEI_RAW_PROCESSED" / "meta.pkl").read_bytes())
    assert {u: m.get("fps") for u, m in meta.items()} == fps


@pytest.mark.parametrize("uid", ["../../escaped", "ABSOLUTE", "a/b", ".."])
def test_preparer_refuses_ids_that_leave_out(videos, tmp_path, uid):
    outside = tmp_path / "outside" / "abs_escape"
    uid = str(outside) if uid == "ABSOLUTE" else uid
    (tmp_path / "segments.csv").write_text(f"id,video_id,start,end\n{uid},vidA,0.1,1.5\n")
    (tmp_path / "labels.csv").write_text(f"id,happiness,sadness,anger,surprise,disgust,fear\n{uid},1,0,0,0,0,0\n")
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(DataError, match=r"segments.csv: utterance id .* one path component"):
        P.prepare(videos / "videos", tmp_path / "segments.csv", tmp_path / "labels.csv", out, progress=False)
    assert set(tmp_path.rglob("*")) == before and not outside.exists()


def test_preparer_sentiment_not_a_number(videos, tmp_path):
    seg, lab = _tables(tmp_path, sentiment="n/a")
    with pytest.raises(DataError, match=r"labels.csv line 2 column 'sentiment': expected a sentiment score"):
        P.prepare(videos / "videos", seg, lab, tmp_path / "out", progress=False)


def test_preparer_out_not_writable_exit_2(videos, tmp_path, capsys):
    seg, lab = _tables(tmp_path)
    (tmp_path / "a_file").write_text("")
    outs = [tmp_path / "a_file" / "out"]
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        outs.append(ro / "out")
    for out in outs:
        rc = P.main(["--videos", str(videos / "videos"), "--segments", str(seg), "--labels", str(lab),
                     "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and f"--out {out}" in err and "writable" in err, err


# ------------------------------------------------------------------------------- table of in-process cases
def _mmsa(tmp: Path, edit: Callable[[dict], None] | None = None, name="unaligned_50.pkl") -> Path:
    rng = np.random.default_rng(0)
    data = {s: _mmsa_split(rng, n, s, dims=(8, 6, 4), lt=6, la=7, lv=5)
            for s, n in (("train", 6), ("valid", 3), ("test", 6))}
    if edit:
        edit(data)
    path = tmp / name
    path.write_bytes(pickle.dumps(data, protocol=4))
    formats._PICKLES.clear()
    return path


def _mmsa_row(edit, split="train"):
    def make(tmp, corpus):
        path = _mmsa(tmp, edit)
        return lambda: formats.load_mmsa(path, split)
    return make


def _merged_emotions(rows_nan, partial=False):
    def edit(data):
        for s, d in data.items():
            n = len(d["id"])
            emo = np.zeros((n, 6), np.float32)
            emo[:, 3] = 1.0
            if s == "test":
                for i in rows_nan:
                    emo[i] = np.nan
                    if partial:
                        emo[i, 1:] = 0.0
            d["emotion_labels"], d["emotion_names"] = emo, np.array(["happy", "sad", "anger", "surprise",
                                                                      "disgust", "fear"])
    return edit


def _set(split, key, value):
    def edit(data):
        v = data[split][key]
        if callable(value):
            data[split][key] = value(v)
        else:
            data[split][key] = value
    return edit


def _mult_row(edit, iemocap=True):
    def make(tmp, corpus):
        data = _mult_data(np.random.default_rng(0), iemocap, dims=(6, 5, 4))
        edit(data)
        path = _write_mult(tmp / ("iemocap_data.pkl" if iemocap else "mosei_senti_data.pkl"), data)
        formats._PICKLES.clear()
        return lambda: formats.load_mult(path, "train", dataset="iemocap" if iemocap else None)
    return make


def _nan_at(index):
    def f(a):
        a = np.array(a, np.float32)
        a[index] = np.nan
        return a
    return f


def _csd(tmp: Path, labels_edit=None, split_edit=None, features_edit=None) -> Path:
    """A folder with the SDK's label sequence, one COVAREP sequence and split files (test_formats' data)."""
    folder = tmp / "csd"
    folder.mkdir()
    labels = {v: (np.asarray(r, np.float64), np.asarray(SDK_SEGMENTS[v], np.float64)) for v, r in SDK_ROWS.items()}
    if labels_edit:
        labels_edit(labels)
    _write_csd(folder / "CMU_MOSEI_Labels.csd", "All Labels", labels,
               {"root name": "All Labels", "dimension names": list(SDK_NAMES)})
    rng = np.random.default_rng(1)
    data = {v: (rng.normal(size=(60, 3)).astype(np.float32), np.stack([np.arange(60) * 0.1,
                                                                        np.arange(60) * 0.1 + 0.1], 1))
            for v in SDK_ROWS}
    if features_edit:
        features_edit(data)
    _write_csd(folder / "CMU_MOSEI_COVAREP.csd", "COVAREP", data, {"root name": "COVAREP"})
    splits = {"train": "-6rXp3zJ3kc\nabc_DEF-123\n", "valid": "zz9[0]\n", "test": "zz9[1]\n"}
    if split_edit:
        split_edit(splits)
    for s, text in splits.items():
        (folder / f"{s}_split.txt").write_text(text)
    return folder


def _csd_row(split="train", **edits):
    def make(tmp, corpus):
        folder = _csd(tmp, **edits)
        return lambda: formats.load_csd(folder, split)
    return make


def _label_cell(vid, row, col, value):
    def edit(labels):
        labels[vid][0][row, col] = value
    return edit


def _csd_link(kind: str):
    """A .csd whose features dataset is an external link / external raw storage / virtual dataset /
    dangling soft link; the other file holds real numbers."""
    def make(tmp, corpus):
        other = tmp / "elsewhere.h5"
        with h5py.File(other, "w") as fh:
            fh.create_dataset("secret", data=np.arange(6, dtype=np.float64).reshape(2, 3))
        path = tmp / "CMU_MOSEI_COVAREP.csd"
        with h5py.File(path, "w") as fh:
            v = fh.create_group("COVAREP/data/zz9")
            v.create_dataset("intervals", data=np.array([[0.0, 1.0], [1.0, 2.0]]))
            if kind == "external-link":
                v["features"] = h5py.ExternalLink(str(other), "/secret")
            elif kind == "external-storage":
                raw = tmp / "raw.bin"
                raw.write_bytes(np.arange(6, dtype="<f8").tobytes())
                v.create_dataset("features", shape=(2, 3), dtype="<f8", external=[(str(raw), 0, 48)])
            elif kind == "virtual":
                layout = h5py.VirtualLayout(shape=(2, 3), dtype="f8")
                layout[:] = h5py.VirtualSource(str(other), "secret", shape=(2, 3))
                v.create_virtual_dataset("features", layout)
            elif kind == "dangling":
                v["features"] = h5py.SoftLink("/COVAREP/data/nowhere")
        return lambda: formats.read_csd(path)
    return make


def _csd_features(dtype=None, shape=None):
    def make(tmp, corpus):
        path = tmp / "CMU_MOSEI_COVAREP.csd"
        with h5py.File(path, "w") as fh:
            v = fh.create_group("COVAREP/data/zz9")
            v.create_dataset("intervals", data=np.array([[0.0, 1.0], [1.0, 2.0]]))
            if dtype is not None:
                v.create_dataset("features", data=np.array([[b"1.5", b"2"], [b"3", b"4"]], dtype=dtype))
            else:
                v.create_dataset("features", shape=shape, dtype="f8")
        return lambda: formats.read_csd(path)
    return make


def _csd_scalar_features(tmp, corpus):
    path = tmp / "CMU_MOSEI_Labels.csd"
    with h5py.File(path, "w") as fh:
        v = fh.create_group("All Labels/data/zz9")
        v.create_dataset("features", data=1.5)  # 0-d: no rows (found by the fuzzer: IndexError)
        v.create_dataset("intervals", data=np.array([[0.0, 1.0]]))
    return lambda: formats.read_csd(path)


def _ucs4_not_unicode(tmp, corpus):
    """An MMSA id array whose str data is not Unicode (found by the fuzzer: a SystemError when read)."""
    data = bytearray(pickle.dumps({"train": {"id": np.array(["ab"])}}, protocol=4))
    i = data.index("ab".encode("utf-32-le"))
    data[i + 3] = 0x7F  # code point 0x7f000061 > 0x10FFFF
    path = tmp / "unaligned_50.pkl"
    path.write_bytes(bytes(data))
    formats._PICKLES.clear()
    return lambda: formats.load_mmsa(path, "train")


def _csd_metadata_not_utf8(tmp, corpus):
    path = tmp / "CMU_MOSEI_COVAREP.csd"
    _write_csd(path, "COVAREP", {"zz9": (np.ones((2, 3), np.float32), np.array([[0.0, 1.0], [1.0, 2.0]]))}, {})
    with h5py.File(path, "a") as fh:
        ds = fh.create_dataset("COVAREP/metadata/root name", (1,), dtype=h5py.special_dtype(vlen=bytes))
        ds[0] = b'"\xff\xfe"'
    return lambda: formats.read_csd(path)


def _nested_label(tmp, corpus):
    root = _copy(corpus, tmp)
    n = 200_000
    _meta_with(root, _ids(root)[0], b"]" * n + b"a" * (n - 1))  # a list nested 200,000 deep
    return lambda: load_split(root, "mosei", "train")


def _split_escape(tmp, corpus):
    root = _copy(corpus, tmp)
    f = root / "MOSEI_SPLIT" / "train_split.txt"
    f.write_text(f.read_text() + "../MOSEI_SPLIT\n")
    return lambda: load_split(root, "mosei", "train")


def _zero_byte_cache_entry(tmp, corpus):
    root = _copy(corpus, tmp)
    ds = mesm_dataset(root, "mosei", "train", cache_dir=tmp / "fc")
    ref = ds.features(0)
    ds.cache_path(0).write_bytes(b"")

    def call():
        got = ds.features(0)
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    return call


def _iemocap_two_classes(tmp, corpus):
    return lambda: _emotion_vector("iemocap", [1, 1, 0, 0, 0, 0], "meta.pkl [id 'Ses01F_impro01_F000']")


class LabelledItems(torch.utils.data.Dataset):
    """Items with ids and labels (``label_rows``, as FeatureSplit and FeatureDataset offer)."""

    def __init__(self, emotion: torch.Tensor, x: torch.Tensor):
        self.ids = [f"u{i}" for i in range(len(x))]
        self.emotion, self.x = emotion, x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"id": self.ids[i], "x": self.x[i], "emotion": self.emotion[i]}

    def label_rows(self):
        return {"ids": list(self.ids), "emotion": self.emotion.clone(),
                "sentiment": torch.full((len(self.x),), float("nan"))}


def _shuffled_labels(tmp, corpus):
    from test_bad_inputs import TinyNet

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    emo = (torch.rand(16, 6, generator=g) > 0.5).float()

    def fit(emotion):
        loader = train.make_loader(LabelledItems(emotion, x), batch_size=8,
                                   collate_fn=lambda b: {"x": torch.stack([i["x"] for i in b]),
                                                         "emotion": torch.stack([i["emotion"] for i in b])})
        torch.manual_seed(0)
        return train.fit(TinyNet(), loader, None, device="cpu", progress=False, epochs=1, seed=0,
                         checkpoint_dir=tmp / "ck")
    fit(emo)
    return lambda: fit(emo[torch.randperm(16, generator=g)])


def _newer_checkpoint(tmp, corpus):
    from test_bad_inputs import _fit

    _fit(tmp / "ck")
    ck = torch.load(tmp / "ck" / "last.pt", weights_only=True)
    ck["format"] = train.CHECKPOINT_FORMAT + 1
    torch.save(ck, tmp / "ck" / "last.pt")
    return lambda: _fit(tmp / "ck")


@dataclass
class Case:
    name: str
    make: Callable  # (tmp_path, corpus) -> the call that reads the bad input
    expect: type | str  # an error type, or "log" (the call succeeds after logging ``words``)
    words: tuple


def _ids_twice(data):
    data["train"]["id"][1] = data["train"]["id"][0]


def _id_in_train_and_test(data):
    data["test"]["id"][0] = data["train"]["id"][2]


CASES = [
    # escapes
    Case("csd-external-link", _csd_link("external-link"), DataError,
         ("CMU_MOSEI_COVAREP.csd", "COVAREP/data/zz9/features", "external link")),
    Case("csd-external-raw-storage", _csd_link("external-storage"), DataError,
         ("CMU_MOSEI_COVAREP.csd", "COVAREP/data/zz9/features", "external raw storage")),
    Case("csd-virtual-dataset", _csd_link("virtual"), DataError,
         ("CMU_MOSEI_COVAREP.csd", "COVAREP/data/zz9/features", "virtual")),
    Case("csd-dangling-soft-link", _csd_link("dangling"), DataError,
         ("CMU_MOSEI_COVAREP.csd", "COVAREP/data/zz9/features", "dangling")),
    Case("raw-split-id-leaves-the-layout", _split_escape, DataError,
         ("train_split.txt", "'../MOSEI_SPLIT'", "one path component")),
    # sizes and types in .csd
    Case("csd-declares-89-GB", _csd_features(shape=(37_000_000, 300)), DataError,
         ("CMU_MOSEI_COVAREP.csd", "COVAREP/data/zz9/features", "nothing written")),
    Case("csd-string-features", _csd_features(dtype="S3"), DataError,
         ("CMU_MOSEI_COVAREP.csd", "COVAREP/data/zz9/features", "expected numbers")),
    Case("csd-scalar-features", _csd_scalar_features, DataError,
         ("CMU_MOSEI_Labels.csd", "All Labels/data/zz9/features", "expected an array of rows")),
    Case("csd-metadata-not-utf8", _csd_metadata_not_utf8, DataError,
         ("CMU_MOSEI_COVAREP.csd", "COVAREP/metadata/root name", "not UTF-8")),
    Case("pickle-str-not-unicode", _ucs4_not_unicode, DataError, ("unaligned_50.pkl", "not Unicode code points")),
    # silently wrong: .csd
    Case("csd-emotions-all-nan", _csd_row(labels_edit=lambda L: L["zz9"][0][1].__setitem__(slice(1, 7), np.nan)),
         DataError, ("CMU_MOSEI_Labels.csd", "'zz9'", "all NaN")),
    Case("csd-sentiment-42", _csd_row(labels_edit=_label_cell("zz9", 0, 0, 42.0)), DataError,
         ("CMU_MOSEI_Labels.csd", "'zz9'", "[-3, 3]")),
    Case("csd-interval-end-before-start",
         _csd_row(labels_edit=lambda L: L["zz9"][1].__setitem__((1, 1), 0.5)), DataError,
         ("CMU_MOSEI_Labels.csd", "'zz9'", "end >= start")),
    Case("csd-repeated-id", _csd_row(split_edit=lambda s: s.__setitem__("valid", "zz9[0]\nzz9[0]\n"),
                                     split="valid"), DataError, ("valid_split.txt", "more than once", "zz9[0]")),
    Case("csd-id-in-train-and-test", _csd_row(split_edit=lambda s: s.__setitem__("test", "zz9[1]\nzz9[0]\n"),
                                              split="test"), DataError, ("'valid' and 'test'", "zz9[0]")),
    Case("csd-nan-features", _csd_row(features_edit=lambda D: D["zz9"][0].__setitem__((12, 1), np.nan),
                                      split="valid"), DataError, ("CMU_MOSEI_COVAREP.csd", "'zz9'", "NaN")),
    # silently wrong: MMSA
    Case("mmsa-nan-emotion-rows-dropped-loudly", _mmsa_row(_merged_emotions([1, 3, 4]), "test"), "log",
         ("unaligned_50.pkl", "3 of 6 utterances", "left out")),
    Case("mmsa-partly-nan-emotion", _mmsa_row(_merged_emotions([2], partial=True), "test"), DataError,
         ("unaligned_50.pkl", "emotion_labels", "NaN")),
    Case("mmsa-repeated-id", _mmsa_row(_ids_twice), DataError, ("unaligned_50.pkl", "['train']['id']",
                                                                "more than once")),
    Case("mmsa-id-in-train-and-test", _mmsa_row(_id_in_train_and_test), DataError,
         ("unaligned_50.pkl", "'train' and 'test'")),
    Case("mmsa-length-1e6", _mmsa_row(_set("train", "audio_lengths", lambda v: [10**6] + v[1:])), DataError,
         ("unaligned_50.pkl", "audio_lengths", "[1, 7]")),
    Case("mmsa-length-negative", _mmsa_row(_set("train", "vision_lengths", lambda v: [-5] + v[1:])), DataError,
         ("unaligned_50.pkl", "vision_lengths", "[1, 5]")),
    Case("mmsa-length-zero", _mmsa_row(_set("train", "audio_lengths", lambda v: v[:2] + [0] + v[3:])), DataError,
         ("unaligned_50.pkl", "audio_lengths", "rows [2]")),
    Case("mmsa-nan-features", _mmsa_row(_set("train", "vision", _nan_at((1, 0, 2)))), DataError,
         ("unaligned_50.pkl", "['vision']", "1 NaN")),
    # silently wrong: MulT
    Case("mult-iemocap-nan-label", _mult_row(_set("train", "labels", _nan_at((0, 1, 0)))), DataError,
         ("iemocap_data.pkl", "['labels']", "one-hot")),
    Case("mult-iemocap-nan-pair", _mult_row(_set("train", "labels", _nan_at((3, 2)))), DataError,
         ("iemocap_data.pkl", "['labels']", "rows [3]")),
    Case("mult-nan-features", _mult_row(_set("train", "text", _nan_at((0, -1, 0)))), DataError,
         ("iemocap_data.pkl", "['text']", "NaN")),
    # silently wrong: raw layout and training
    Case("raw-iemocap-two-classes", _iemocap_two_classes, DataError, ("meta.pkl", "exactly one class")),
    Case("ckpt-resume-on-shuffled-labels", _shuffled_labels, train.CheckpointError,
         ("last.pt", "train_data", "labels_sha1")),
    # unclear errors
    Case("ckpt-newer-format", _newer_checkpoint, train.CheckpointError, ("last.pt", "newer", "format 3")),
    Case("cache-zero-byte-entry", _zero_byte_cache_entry, "log", ("recomputed", "unreadable", "empty")),
    Case("label-nested-200000-deep", _nested_label, DataError, ("meta.pkl", "nested deeper")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case, corpus, tmp_path, caplog):
    call = case.make(tmp_path, corpus)
    if case.expect == "log":
        with caplog.at_level(logging.WARNING, logger="nbsupport.data"):
            call()
        text = caplog.text
        assert text, "no warning was logged"
    else:
        with pytest.raises(case.expect) as info:
            call()
        text = str(info.value)
    for word in case.words:
        assert word in text, f"{word!r} not in message: {text}"


def test_child_path_is_the_one_check():
    """child_path: one component, inside the folder; the feature cache and the preparer use it."""
    from nbsupport.base import UnsafePathError, child_path

    for bad in ("../x", "/abs/x", "a/b", "..", ".", "", "x\x00", "a\\b", 7):
        with pytest.raises(UnsafePathError):
            child_path("/tmp/folder", bad)
    assert child_path("/tmp/folder", "-6rXp3zJ3kc_0") == Path("/tmp/folder/-6rXp3zJ3kc_0")
    with pytest.raises(DataError):
        child_path("/tmp/folder", "../x", error=DataError)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    from nbsupport.base import UnsafePathError, child_path

    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="outside the folder"):
        child_path(tmp_path / "inside", "link")


# ------------------------------------------------------------------------------- trusted data still loads
def _same(a, b) -> bool:
    """Deep equality with types, dtypes, shapes and memory order (the reference: pickle.loads)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (a.dtype == b.dtype and a.shape == b.shape and a.flags.f_contiguous == b.flags.f_contiguous
                and b.flags.writeable and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and (a == b or (a != a and b != b))
    return a == b or (a != a and b != b)  # NaN equals NaN here


def _numpy1_names():
    """Pickle as NumPy 1.x does: the rebuild functions under ``numpy.core`` (NumPy 2 keeps that alias)."""
    import contextlib

    import numpy._core.multiarray as ma
    import numpy._core.numeric as nm

    @contextlib.contextmanager
    def names():
        funcs = (ma._reconstruct, ma.scalar, nm._frombuffer)
        saved = [f.__module__ for f in funcs]
        try:
            for f, m in zip(funcs, ("numpy.core.multiarray", "numpy.core.multiarray", "numpy.core.numeric")):
                f.__module__ = m
            yield
        finally:
            for f, m in zip(funcs, saved):
                f.__module__ = m
    return names()


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-names", "numpy1-names"])
def test_field_pickles_load_as_pickle_loads_does(numpy1):
    """MMSA's, MulT's, UMONS's and the raw layout's structures, protocols 2-5, NumPy 1.x and 2.x module
    names: safe_pickle gives exactly what pickle.loads gives on the same trusted bytes."""
    import contextlib
    import warnings

    from nbsupport.data.safe_pickle import safe_loads

    rng = np.random.default_rng(0)
    mmsa = {s: _mmsa_split(rng, 4, s, dims=(8, 6, 4), lt=5, la=6, lv=5) for s in ("train", "valid", "test")}
    mult = _mult_data(np.random.default_rng(1), True, dims=(6, 5, 4))
    mult_senti = _mult_data(np.random.default_rng(2), False, dims=(6, 5, 4))
    umons = {"sentences": {"a_1": ["i", "am"], "b_2": "hello"}, "mels": {"a_1": rng.normal(size=(30, 80))},
             "emotion": {"a_1": [0, 0, 0, 1.3, 0, 0]}, "sentiment": {"a_1": np.array([[1.5]]), "b_2": np.float64(2)}}
    meta = {"u0": {"text": "words", "label": np.array([0, 1, 0, 0, 2.5, 0], np.float32), "sentiment": float("nan"),
                   "fps": 29.97, "start": np.float64(1.5)}, "u1": {"text": "ses", "label": "ang"}}
    big = {"text": np.asfortranarray(rng.normal(size=(64, 40, 100)).astype(np.float32)),  # > 1 MiB
           "id": np.array([f"v{i}" for i in range(64)]), "be": np.arange(10, dtype=">i4")}
    names = _numpy1_names if numpy1 else contextlib.nullcontext
    for obj in (mmsa, mult, mult_senti, umons, meta, big):
        for protocol in (2, 3, 4, 5):
            with names():
                data = pickle.dumps(obj, protocol=protocol)
            assert (b"numpy.core" in data) == numpy1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ref = pickle.loads(data)
            assert _same(ref, safe_loads(data)), protocol
