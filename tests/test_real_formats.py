"""Files written the way the field writes them (issue: real data as researchers download it).

* ``.csd`` label and feature sequences are written by the CMU-MultimodalSDK itself: the PyPI release
  ``cmu-multimodal-sdk==0.0.6`` (a test-only dependency; its writer stores each metadata value as
  ``str(value)``), and by :func:`write_csd_current_sdk`, which reproduces the current SDK source's
  writer (CMU-MultiComp-Lab/CMU-MultimodalSDK, mmsdk/mmdatasdk/computational_sequence/file_ops.py,
  ``write_CSD`` at commit 4f2eadc, called by ``computational_sequence.deploy`` with gzip level 9:
  each metadata value is ``json.dumps(value)`` in a one-element variable-length string dataset).
* Utterance ids are computed by the SDK's own ``mmdataset.align()`` (0.0.6), never by hand.
* MMSA pickles have the keys and dtypes MMSA's ``MMDataset`` (thuiar/MMSA src/MMSA/data_loader.py)
  reads, ids ``<video_id>$_$<clip_id>`` as its data builder (data/DataPre.py) makes them.

The three silent errors of the issue (emotion columns swapped, another clip's emotions attached,
utterance ids numbered in time order) each have a test here that failed on the code before the fix.
"""
import json
import os
import pickle
import sys
import types
import uuid

import h5py
import numpy as np
import pytest

from nbsupport import protocol
from nbsupport.base import ParameterError
from nbsupport.book import chapters
from nbsupport.data import DataError, EMOTIONS, formats

from test_formats import SIZES, _mmsa_split

SDK_ORDER = ["sentiment", "happy", "sad", "anger", "surprise", "disgust", "fear"]
#: A label file that names its columns in another order than the SDK's documented one.
OTHER_ORDER = ["sentiment", "fear", "surprise", "disgust", "anger", "sad", "happy"]


# ----------------------------------------------------------------------------------------------
# The SDK's writers and its align()
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdk():
    """``mmsdk.mmdatasdk`` of the PyPI release 0.0.6; its model package (which imports torch and is
    not needed to read, write or align data) is replaced by an empty module before the import."""
    sys.modules.setdefault("mmsdk.mmmodelsdk", types.ModuleType("mmsdk.mmmodelsdk"))
    if os.environ.get("CI"):  # pinned in requirements.txt: CI must have it
        from mmsdk import mmdatasdk
        return mmdatasdk
    return pytest.importorskip("mmsdk.mmdatasdk", reason="pip install cmu-multimodal-sdk==0.0.6 (requirements.txt)")


def write_csd_sdk006(sdk, path, name, data, metadata=None):
    """A computational sequence written by the SDK 0.0.6's ``computational_sequence.deploy``."""
    from mmsdk.mmdatasdk.configurations.metadataconfigs import featuresetMetadataTemplate

    seq = sdk.computational_sequence(name)
    seq.setData({v: {"features": f, "intervals": iv} for v, (f, iv) in data.items()}, name)
    meta = {k: f"test {k}" for k in featuresetMetadataTemplate}  # deploy() asks for missing ones on stdin
    meta.update({"root name": name}, **(metadata or {}))
    seq.setMetadata(meta, name)
    seq.deploy(str(path))
    return path


def write_csd_current_sdk(path, name, data, metadata=None):
    """The current SDK source's ``write_CSD`` (see the module docstring), reproduced step by step."""
    meta = {"root name": name, **(metadata or {}), "uuid": str(uuid.uuid4()), "md5": None}
    with h5py.File(path, "w") as fh:
        root = fh.create_group(name)
        grp = root.create_group("data")
        for vid, (feats, iv) in data.items():
            v = grp.create_group(vid)
            v.create_dataset("features", data=feats, compression="gzip", compression_opts=9)
            v.create_dataset("intervals", data=iv, compression="gzip", compression_opts=9)
        mgrp = root.create_group("metadata")
        for k, val in meta.items():
            mgrp.create_dataset(k, (1,), dtype=h5py.special_dtype(vlen=str))
            mgrp[k][0] = str(json.dumps(val))
    return path


def sdk_align(sdk, files: dict, reference: str, sequence: str | None = None) -> dict:
    """From the SDK's own ``mmdataset(files).align(reference)``: {utterance id: label features row}, or
    with ``sequence`` {utterance id: that sequence's aligned features (rows, D)}."""
    ds = sdk.mmdataset(files)
    ds.align(reference)
    if sequence is not None:
        return {k: np.asarray(v["features"]) for k, v in ds[sequence].data.items()}
    return {k: np.asarray(v["features"][0]) for k, v in ds[reference].data.items()}


def _label_table(rng, n_videos=8, per_video=5, time_order=False):
    """CMU-MOSEI-like labels: 40 utterances, each video's rows stored out of time order (as in the real
    file; ``time_order``: in time order), sentiments on the 1/3 grid so that clips of one video share
    one, emotions in SDK_ORDER."""
    rows, segs = {}, {}
    for v in range(n_videos):
        vid = f"-vid{v}_X"
        starts = np.sort(rng.uniform(0, 60, per_video)).round(3) + 3 * np.arange(per_video)
        iv = np.stack([starts, starts + rng.uniform(1.5, 3, per_video).round(3)], 1)
        sent = rng.choice([-1.0, -1 / 3, 1 / 3, 1.0], per_video)
        emo = rng.integers(0, 2, (per_video, 6)) * rng.choice([1 / 3, 2 / 3, 1.0, 2.0], (per_video, 6))
        emo[np.arange(per_video), rng.integers(0, 6, per_video)] = 1.0  # at least one emotion present
        order = np.arange(per_video) if time_order else rng.permutation(per_video)  # stored != time order
        rows[vid] = np.column_stack([sent, emo])[order]
        segs[vid] = iv[order]
    return rows, segs


def _book_presence(sdk_row):
    named = dict(zip(SDK_ORDER, sdk_row))
    return [float(named[e] > 0) for e in EMOTIONS["mosei"]]


def _in_order(sdk_rows, names):
    """The same rows with their columns stored in the order ``names``."""
    return sdk_rows[:, [SDK_ORDER.index(n) for n in names]]


@pytest.fixture(scope="module")
def table():
    return _label_table(np.random.default_rng(25))


def _feature_seq(rng, segs, dim, step):
    out = {}
    for vid, iv in segs.items():
        starts = np.arange(0, iv.max() + step, step)
        out[vid] = (rng.normal(size=(len(starts), dim)).astype(np.float32), np.stack([starts, starts + step], 1))
    return out


def _csd_folder(sdk, folder, table, names=OTHER_ORDER, labels_meta=None, writer="sdk006"):
    """Labels (columns stored in ``names`` order) + COVAREP, written by the SDK; folds list every video."""
    rows, segs = table
    folder.mkdir(parents=True, exist_ok=True)
    labels = {v: (_in_order(rows[v], names), segs[v]) for v in rows}
    meta = {"dimension names": list(names)} if labels_meta is None else labels_meta
    if writer == "sdk006":
        write_csd_sdk006(sdk, folder / "CMU_MOSEI_Labels.csd", "All Labels", labels, meta)
    else:
        write_csd_current_sdk(folder / "CMU_MOSEI_Labels.csd", "All Labels", labels, meta)
    audio = _feature_seq(np.random.default_rng(1), segs, 74, 0.5)
    write_csd_sdk006(sdk, folder / "CMU_MOSEI_COVAREP.csd", "COVAREP", audio)
    vids = sorted(rows)
    (folder / "train_split.txt").write_text("\n".join(vids[:6]) + "\n")
    (folder / "valid_split.txt").write_text(vids[6] + "\n")
    (folder / "test_split.txt").write_text(vids[7] + "\n")
    return folder


# ----------------------------------------------------------------------------------------------
# 1. Emotion columns: the SDK 0.0.6 writes its metadata with str()
# ----------------------------------------------------------------------------------------------
def test_sdk006_metadata_is_a_python_literal_and_is_read_by_name(sdk, tmp_path):
    """Failed before: the str() literal was not understood, the SDK's default order was used instead
    and most utterances got swapped emotions. Rows stored in time order: only the columns matter here."""
    table = _label_table(np.random.default_rng(25), time_order=True)
    folder = _csd_folder(sdk, tmp_path / "csd", table)
    with h5py.File(folder / "CMU_MOSEI_Labels.csd") as fh:  # the writer's own form, not JSON
        assert fh["All Labels/metadata/dimension names"][0].decode() == str(OTHER_ORDER)
    rows, _ = table
    checked = 0
    for split in ("train", "valid", "test"):
        ds = formats.load_csd(folder, split)
        assert ds.emotion_names == EMOTIONS["mosei"]
        for i, uid in enumerate(ds.ids):
            vid, k = uid[:-3], int(uid[-2])
            assert ds[i]["emotion"].tolist() == _book_presence(rows[vid][k]), uid
            checked += 1
    assert checked == 40


@pytest.mark.parametrize("form", ["json", "json-of-literal", "bytes-literal"])
def test_every_metadata_form_gives_the_same_names(sdk, table, tmp_path, form):
    """The current SDK's JSON; a 0.0.6 file re-deployed by the current SDK (its reader keeps the literal
    as text, its writer JSON-encodes that text); a literal stored as fixed-length bytes."""
    folder = _csd_folder(sdk, tmp_path / "csd", table, writer="current")
    path = folder / "CMU_MOSEI_Labels.csd"
    if form != "json":
        with h5py.File(path, "r+") as fh:
            del fh["All Labels/metadata/dimension names"]
            if form == "json-of-literal":  # what write_CSD does with the text it was given
                ds = fh["All Labels/metadata"].create_dataset("dimension names", (1,),
                                                               dtype=h5py.special_dtype(vlen=str))
                ds[0] = json.dumps(str(OTHER_ORDER))
            else:
                fh["All Labels/metadata"].create_dataset("dimension names", data=np.array([str(OTHER_ORDER).encode()]))
    assert formats.read_csd(path)[2]["dimension names"] == OTHER_ORDER
    rows, _ = table
    out = formats.csd_emotion_labels(path)
    vid = sorted(rows)[0]
    assert out[vid][2].tolist() == _in_order(rows[vid], EMOTIONS["mosei"]).astype(np.float32).tolist()


def test_unreadable_or_unknown_names_stop_unless_sdk_default_is_chosen(sdk, table, tmp_path):
    rows, segs = table
    labels = {v: (rows[v], segs[v]) for v in rows}  # the SDK's documented order, unnamed
    nameless = write_csd_sdk006(sdk, tmp_path / "nameless.csd", "All Labels", labels)
    with pytest.raises(DataError, match=r"nameless\.csd: the label sequence has no 'dimension names'.*"
                                        r"columns='sdk-default'"):
        formats.csd_emotion_labels(nameless)
    vid = sorted(rows)[0]
    out = formats.csd_emotion_labels(nameless, columns="sdk-default")
    assert out[vid][2].tolist() == _in_order(rows[vid], EMOTIONS["mosei"]).astype(np.float32).tolist()
    unknown = write_csd_sdk006(sdk, tmp_path / "unknown.csd", "All Labels", labels,
                               {"dimension names": ["sentiment", "joy", "sad", "anger", "surprise", "disgust",
                                                    "fear"]})
    with pytest.raises(DataError, match=r"unknown\.csd: .*\['joy'\]"):
        formats.csd_emotion_labels(unknown)
    garbled = write_csd_sdk006(sdk, tmp_path / "garbled.csd", "All Labels", labels,
                               {"dimension names": "sentiment happy sad"})
    with pytest.raises(DataError, match=r"garbled\.csd: .*not a list of names"):
        formats.csd_emotion_labels(garbled)
    with pytest.raises(ParameterError, match="label_columns"):
        formats.csd_emotion_labels(nameless, columns="sdk")
    # through the loaders and the chapters' parameter
    folder = _csd_folder(sdk, tmp_path / "nameless", table, names=SDK_ORDER, labels_meta={})
    with pytest.raises(DataError, match="sdk-default"):
        protocol.loaders("handcrafted", folder, data_format="csd", progress=False)
    sets, _ = protocol.loaders("handcrafted", folder, data_format="csd", label_columns="sdk-default",
                               progress=False)
    assert len(sets["train"]) == 30


def test_current_sdk_writer_metadata_and_data_read(sdk, table, tmp_path):
    """The reproduced current writer (gzip, JSON metadata) is what the SDK 0.0.6 reader reads too."""
    rows, segs = table
    path = write_csd_current_sdk(tmp_path / "labels.csd", "All Labels",
                                 {v: (rows[v], segs[v]) for v in rows}, {"dimension names": SDK_ORDER})
    seq = sdk.computational_sequence(str(path))
    vid = sorted(rows)[0]
    np.testing.assert_array_equal(seq[vid]["features"][()], rows[vid])
    _, data, meta = formats.read_csd(path)
    assert meta["dimension names"] == SDK_ORDER and meta["md5"] is None and meta["root name"] == "All Labels"
    np.testing.assert_array_equal(data[vid][0], rows[vid])


# ----------------------------------------------------------------------------------------------
# 3. Utterance ids: the SDK's align() numbers the stored rows
# ----------------------------------------------------------------------------------------------
def test_utterance_ids_are_the_sdk_align_ids(sdk, table, tmp_path):
    """Failed before: ids were numbered by start time (25 of 40 differed from the SDK's)."""
    folder = _csd_folder(sdk, tmp_path / "csd", table, names=SDK_ORDER)
    aligned = sdk_align(sdk, {"All Labels": str(folder / "CMU_MOSEI_Labels.csd"),
                              "COVAREP": str(folder / "CMU_MOSEI_COVAREP.csd")}, "All Labels")
    assert len(aligned) == 40
    seen = {}
    for split in ("train", "valid", "test"):
        ds = formats.load_csd(folder, split)
        for i, uid in enumerate(ds.ids):
            row = aligned[uid]  # KeyError: an id the SDK does not make
            assert ds[i]["sentiment"] == pytest.approx(row[0], abs=1e-6), uid
            assert ds[i]["emotion"].tolist() == _book_presence(row), uid
            seen[uid] = True
    assert sorted(seen) == sorted(aligned)
    # a split listing the SDK's utterance ids selects exactly those utterances (of the test video:
    # the splits stay disjoint)
    test_video = (folder / "test_split.txt").read_text().split()[0]
    pick = sorted(u for u in aligned if u.rsplit("[", 1)[0] == test_video)[1:][::-1]
    assert len(pick) >= 2
    (folder / "test_split.txt").write_text("\n".join(pick) + "\n")
    ds = formats.load_csd(folder, "test")
    assert ds.ids == pick
    assert [ds[i]["emotion"].tolist() for i in range(len(pick))] == [_book_presence(aligned[u]) for u in pick]


def test_utterance_features_are_the_rows_align_gives_it(sdk, table, tmp_path):
    """Feature rows stored out of time order, and frames that touch an utterance by less (0.5 ms) or
    more (2 ms) than the SDK's 1 ms epsilon: each utterance gets exactly the SDK's aligned rows."""
    rows, segs = table
    folder = _csd_folder(sdk, tmp_path / "csd", table, names=SDK_ORDER)
    rng = np.random.default_rng(4)
    audio = {}
    for vid, iv in segs.items():
        feats, fiv = _feature_seq(rng, {vid: iv}, 6, 0.5)[vid]
        s, e = iv[0]
        edge = np.array([[e - 0.0005, e + 0.7], [s - 0.7, s + 0.002]])
        fiv = np.vstack([fiv, edge])
        feats = np.vstack([feats, rng.normal(size=(2, 6)).astype(np.float32)])
        perm = rng.permutation(len(fiv))
        audio[vid] = (feats[perm], fiv[perm])
    write_csd_sdk006(sdk, folder / "CMU_MOSEI_COVAREP.csd", "COVAREP", audio)
    aligned = sdk_align(sdk, {"All Labels": str(folder / "CMU_MOSEI_Labels.csd"),
                              "COVAREP": str(folder / "CMU_MOSEI_COVAREP.csd")}, "All Labels", "COVAREP")
    n = 0
    for split in ("train", "valid", "test"):
        ds = formats.load_csd(folder, split)
        for i, uid in enumerate(ds.ids):
            np.testing.assert_array_equal(ds[i]["audio"].numpy(), aligned[uid], err_msg=uid)
            n += 1
    assert n == 40


def test_a_zero_length_row_is_skipped_without_renumbering_as_align_does(sdk, tmp_path):
    labels = {"v": (np.array([[1.0, 1, 0, 0, 0, 0, 0], [0.0, 0, 1, 0, 0, 0, 0], [-1.0, 0, 0, 1, 0, 0, 0]]),
                    np.array([[4.0, 6.0], [1.0, 1.0], [0.0, 2.0]]))}
    write_csd_sdk006(sdk, tmp_path / "CMU_MOSEI_Labels.csd", "All Labels", labels,
                     {"dimension names": SDK_ORDER})
    write_csd_sdk006(sdk, tmp_path / "CMU_MOSEI_COVAREP.csd", "COVAREP", _feature_seq(
        np.random.default_rng(0), {"v": np.array([[0.0, 6.0]])}, 4, 0.5))
    aligned = sdk_align(sdk, {"All Labels": str(tmp_path / "CMU_MOSEI_Labels.csd"),
                              "COVAREP": str(tmp_path / "CMU_MOSEI_COVAREP.csd")}, "All Labels")
    (tmp_path / "train_split.txt").write_text("v\n")
    assert formats.load_csd(tmp_path, "train").ids == sorted(aligned) == ["v[0]", "v[2]"]
    (tmp_path / "train_split.txt").write_text("v[0]\n")  # the splits stay disjoint
    (tmp_path / "test_split.txt").write_text("v[1]\nv[2]\n")
    ds = formats.load_csd(tmp_path, "test")
    assert ds.ids == ["v[2]"] and ds.left_out == ["v[1] (zero-length segment: the SDK makes no utterance of it)"]


# ----------------------------------------------------------------------------------------------
# 2. merge-emotions: an MMSA clip is the SDK utterance its id names
# ----------------------------------------------------------------------------------------------
def _mmsa_for(table, tmp_path, name="unaligned_50.pkl"):
    """An MMSA pickle whose clips are the SDK's utterances of the label table (clip c = ``vid[c]``),
    with MMSA's regression label = the utterance's sentiment."""
    rows, _ = table
    uids = [(v, k) for v in sorted(rows) for k in range(len(rows[v]))]
    rng = np.random.default_rng(7)
    data, start = {}, 0
    for split, n in (("train", 30), ("valid", 5), ("test", 5)):
        d = _mmsa_split(rng, n, split)
        part = uids[start:start + n]
        start += n
        d["id"] = np.array([f"{v}$_${k}" for v, k in part], dtype=object)
        d["regression_labels"] = np.array([rows[v][k][0] for v, k in part], np.float32)
        data[split] = d
    path = tmp_path / name
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def test_merge_attaches_each_clips_own_emotions(sdk, table, tmp_path):
    """Failed before: clips were matched by time-order position and an equal sentiment; clips of one
    video that share a sentiment received each other's emotions (35 of 37 wrong in the issue)."""
    folder = _csd_folder(sdk, tmp_path / "csd", table, names=SDK_ORDER)
    mmsa = _mmsa_for(table, tmp_path)
    out = tmp_path / "merged" / "unaligned_50.pkl"
    formats.merge_emotions(mmsa, folder / "CMU_MOSEI_Labels.csd", out)
    aligned = sdk_align(sdk, {"All Labels": str(folder / "CMU_MOSEI_Labels.csd"),
                              "COVAREP": str(folder / "CMU_MOSEI_COVAREP.csd")}, "All Labels")
    n = 0
    for split in ("train", "valid", "test"):
        ds = formats.load_mmsa(out, split)
        for i, uid in enumerate(ds.ids):
            vid, _, clip = uid.rpartition("$_$")
            assert ds[i]["emotion"].tolist() == _book_presence(aligned[f"{vid}[{clip}]"]), uid
            n += 1
    assert n == 40


def test_merge_report_counts_and_the_cli(sdk, table, tmp_path, capsys):
    rows, segs = table
    folder = _csd_folder(sdk, tmp_path / "csd", table, names=OTHER_ORDER)
    mmsa = _mmsa_for(table, tmp_path)
    with open(mmsa, "rb") as fh:
        data = pickle.load(fh)
    v0 = sorted(rows)[0]
    data["train"]["id"][0] = f"{v0}$_$9"  # no such clip
    data["train"]["id"][1] = "nosuchvideo$_$0"
    data["train"]["regression_labels"][2] = 3.0  # MMSA says another sentiment: another utterance
    mmsa.write_bytes(pickle.dumps(data, protocol=4))
    out = tmp_path / "merged.pkl"
    assert formats.main(["merge-emotions", str(mmsa), "--emotions", str(folder / "CMU_MOSEI_Labels.csd"),
                         "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train: 27 of 30 clips matched (90.0%), 3 left out, 0 ambiguous" in text
    assert "valid: 5 of 5 clips matched" in text and f"wrote {out}" in text
    assert f"no SDK utterance with that clip number: 1 (e.g. {v0}$_$9)" in text


def _transcripts(table, folder, shift=1):
    """CMU-MOSEI's segmented transcripts ``<video>___<segment>___<start>___<end>___<text>``, segments
    numbered from ``shift`` in time order (not the SDK's stored-row numbers)."""
    rows, segs = table
    folder.mkdir()
    for vid, iv in segs.items():
        lines = [f"{vid}___{j + shift}___{iv[k, 0]}___{iv[k, 1]}___words of segment {j}"
                 for j, k in enumerate(np.argsort(iv[:, 0]))]
        (folder / f"{vid}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_merge_by_transcript_interval_and_ambiguous_clips(sdk, table, tmp_path):
    rows, segs = table
    tr = _transcripts(table, tmp_path / "Combined")
    # an MMSA pickle numbered as the transcripts (time order from 1)
    order = {v: np.argsort(segs[v][:, 0]) for v in rows}
    data = {}
    rng = np.random.default_rng(3)
    uids = [(v, j + 1, k) for v in sorted(rows) for j, k in enumerate(order[v])]
    for split, (a, b) in (("train", (0, 30)), ("valid", (30, 35)), ("test", (35, 40))):
        d = _mmsa_split(rng, b - a, split)
        d["id"] = np.array([f"{v}$_${c}" for v, c, _ in uids[a:b]], dtype=object)
        d["regression_labels"] = np.array([rows[v][k][0] for v, _, k in uids[a:b]], np.float32)
        data[split] = d
    mmsa = tmp_path / "aligned_50.pkl"
    mmsa.write_bytes(pickle.dumps(data, protocol=4))
    # a second row with the same interval and other emotions makes one clip ambiguous
    v0 = sorted(rows)[0]
    k0 = order[v0][0]
    dup = np.vstack([rows[v0], rows[v0][k0] + np.r_[0, 1, 0, 0, 0, 0, 0]])
    labels = {**{v: (rows[v], segs[v]) for v in rows}, v0: (dup, np.vstack([segs[v0], segs[v0][k0]]))}
    path = write_csd_sdk006(sdk, tmp_path / "labels.csd", "All Labels", labels, {"dimension names": SDK_ORDER})
    report = formats.merge_emotions(mmsa, path, tmp_path / "out.pkl", segments=tr)
    assert report["train"]["ambiguous"] == [f"{v0}$_$1"]
    assert report["train"]["matched"] == 29 and report["train"]["left_out"] == {}
    ds = formats.load_mmsa(tmp_path / "out.pkl", "train")
    truth = {f"{v}$_${c}": _book_presence(rows[v][k]) for v, c, k in uids}
    assert len(ds) == 29 and all(ds[i]["emotion"].tolist() == truth[u] for i, u in enumerate(ds.ids))
    # the same pickle matched by clip number: its numbers are not the SDK's, and it is refused whole
    with pytest.raises(DataError, match=r"aligned_50\.pkl: for \d+ of \d+ clips .* not the SDK's utterance "
                                        r"numbers; nothing was merged; pass segments"):
        formats.merge_emotions(mmsa, path, tmp_path / "bynumber.pkl")
    assert not (tmp_path / "bynumber.pkl").exists()


# ----------------------------------------------------------------------------------------------
# Friction: several sequences of a role; fold videos missing from the labels
# ----------------------------------------------------------------------------------------------
def test_csd_sequences_picks_the_visual_and_text_sequence(sdk, table, tmp_path):
    rows, segs = table
    folder = _csd_folder(sdk, tmp_path / "csd", table)
    rng = np.random.default_rng(2)
    for fname, name, dim in (("CMU_MOSEI_VisualFacet42.csd", "FACET 4.2", 35),
                             ("CMU_MOSEI_VisualOpenFace2.csd", "OpenFace_2", 713),
                             ("CMU_MOSEI_TimestampedWordVectors.csd", "glove_vectors", 300),
                             ("CMU_MOSEI_TimestampedGloveVectors_with_SP.csd", "glove_vectors_with_sp", 301)):
        write_csd_sdk006(sdk, folder / fname, name, _feature_seq(rng, segs, dim, 1.0))
    with pytest.raises(DataError, match=r"several text sequences: .*; several video sequences: "
                                        r"CMU_MOSEI_VisualFacet42\.csd \(sequence 'FACET 4\.2'\), "
                                        r"CMU_MOSEI_VisualOpenFace2\.csd.*parameter csd_sequences"):
        formats.load_csd(folder, "valid")
    ds = formats.load_csd(folder, "valid", sequences={"video": "OpenFace_2", "text": "glove_vectors"})
    assert ds.feature_dims() == {"text": 300, "audio": 74, "video": 713}
    sets, _ = protocol.loaders("umons", folder, data_format="csd", progress=False, seq_len=8,
                               csd_sequences={"video": "CMU_MOSEI_VisualFacet42.csd",
                                              "text": "CMU_MOSEI_TimestampedGloveVectors_with_SP"})
    assert sets["test"].feature_dims() == {"text": 301, "audio": 74, "video": 35}
    with pytest.raises(DataError, match=r"csd_sequences\['video'\] = 'FACET' names 0"):
        formats.load_csd(folder, "valid", sequences={"video": "FACET", "text": "glove_vectors"})
    with pytest.raises(ParameterError, match="unknown role"):
        formats.load_csd(folder, "valid", sequences={"visual": "FACET 4.2"})
    assert formats.main(["inspect", str(folder), "--sequence", "video=FACET 4.2", "--sequence",
                         "text=glove_vectors"]) == 0
    assert formats.main(["inspect", str(folder)]) == 2  # several sequences: the error, not a traceback


def test_fold_videos_missing_from_the_labels_are_left_out_and_listed(sdk, table, tmp_path, capsys):
    folder = _csd_folder(sdk, tmp_path / "csd", table)
    listed = (folder / "train_split.txt").read_text().split()
    (folder / "train_split.txt").write_text("\n".join(["gone1", *listed, "gone2"]) + "\n")
    ds = formats.load_csd(folder, "train")
    assert len(ds) == 30 and ds.left_out == ["gone1", "gone2"]
    assert ("train_split.txt: 2 of 8 listed ids are not utterances of CMU_MOSEI_Labels.csd, left out: "
            "gone1, gone2") in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The dataset parameter
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chapter", ["03_umons_monomodal", "04_umons_multimodal", "07_two_phase_vs_end_to_end"])
def test_chapter_specs_check_dataset_and_the_csd_parameters(chapter):
    spec = chapters.spec(chapter)
    for name, bad in (("dataset", "mosi"), ("label_columns", "names"), ("csd_sequences", {"visual": "x"})):
        with pytest.raises(ParameterError, match=name):
            spec.rules[name](name, bad)
    assert spec.rules["dataset"]("dataset", "iemocap") == "iemocap"
    assert spec.rules["csd_sequences"]("csd_sequences", {"video": "FACET 4.2"}) == {"video": "FACET 4.2"}


def test_formats_that_do_not_hold_iemocap_say_so(tmp_path, table, sdk):
    mmsa = _mmsa_for(table, tmp_path)
    with pytest.raises(DataError, match="not dataset='iemocap'"):
        protocol.loaders("umons", mmsa, dataset="iemocap", progress=False)
