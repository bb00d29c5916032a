"""One table of bad inputs and faults (issue "nothing silently wrong, nothing executed from data").

Each row builds one bad file or fault in ``tmp_path`` (from a private copy of a small synthetic corpus)
and returns the call that reads it. ``expect`` is the error type the call must raise, with ``words``
that its message must contain (file name, id, field ...); or ``"log"``: the call must succeed after
logging a warning holding ``words`` (a stale or damaged feature-cache entry is recomputed; the call
itself checks the recomputed features against a computation in an empty cache). After every row, no
pickled payload may have run: the payloads below would create the file ``PWNED``.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from nbsupport import train
from nbsupport.data import DataError, load_split, load_umons_pickles, mesm_dataset, read_cues, synth
from nbsupport.data.datasets import handcrafted_dataset


class Payload:
    """Pickles to a call of ``open(path, "w")``: loading it with plain pickle creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth.generate_corpus(tmp_path_factory.mktemp("bad") / "c", n=10, seed=0, progress=False)


# ------------------------------------------------------------------------------------------ helpers
def _copy(corpus: Path, tmp: Path) -> Path:
    return shutil.copytree(corpus, tmp / "c")


def _ids(root: Path, split: str = "train") -> list[str]:
    return (root / "MOSEI_SPLIT" / f"{split}_split.txt").read_text().split()


def _folder(root: Path, uid: str) -> Path:
    return root / "MOSEI_RAW_PROCESSED" / uid


def _edit_meta(root: Path, uid: str, **fields) -> Path:
    path = root / "MOSEI_RAW_PROCESSED" / "meta.pkl"
    meta = pickle.loads(path.read_bytes())
    meta[uid].update(fields)
    path.write_bytes(pickle.dumps(meta))
    return path


def _meta_row(**fields):
    def make(tmp, corpus):
        root = _copy(corpus, tmp)
        _edit_meta(root, _ids(root)[0], **fields)
        return lambda: load_split(root, "mosei", "train")
    return make


def _umons(tmp: Path, **override) -> Path:
    """UMONS pickles of two utterances (Delbrouck et al. format) with ``override``n entries of 'a_1'."""
    rng = np.random.default_rng(0)
    ids = ["a_1", "b_2"]
    data = {"sentences": {i: ["i", "am", "happy"] for i in ids},
            "mels": {i: rng.normal(size=(30, 80)) for i in ids},
            "emotion": {i: [0, 0, 0, 1.3, 0, 0] for i in ids}, "sentiment": {i: 1.5 for i in ids}}
    for kind, value in override.items():
        data[kind]["a_1"] = value
    folder = tmp / "umons"
    folder.mkdir()
    for kind, d in data.items():
        (folder / f"test_{kind}.p").write_bytes(pickle.dumps(d))
    return folder


def _umons_row(**override):
    def make(tmp, corpus):
        folder = _umons(tmp, **override)
        return lambda: load_umons_pickles(folder, "test")
    return make


class TinyNet(nn.Module):
    def __init__(self, hidden=16, d_in=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 6))

    def forward(self, batch):
        return self.net(batch["x"])


class OtherNet(TinyNet):
    """Same layers and shapes as TinyNet, another class."""


def _collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "emotion": torch.stack([i["emotion"] for i in items])}


def _loader(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    emo = (x @ torch.randn(4, 6, generator=g) > 0).float()
    items = [{"x": x[i], "emotion": emo[i]} for i in range(n)]
    return train.make_loader(items, batch_size=8, collate_fn=_collate)


def _fit(ck: Path, model=None, n_train=24, **kw):
    args = dict(epochs=2, lr=1e-2, seed=0) | kw
    torch.manual_seed(0)
    return train.fit(model or TinyNet(), _loader(n_train), _loader(12, 1), device="cpu", progress=False,
                     checkpoint_dir=ck, **args)


def _ckpt_row(first: dict, second: dict):
    def make(tmp, corpus):
        _fit(tmp / "ck", **first)
        return lambda: _fit(tmp / "ck", **second)
    return make


def _ckpt_file_row(damage: Callable[[Path, Path], None]):
    def make(tmp, corpus):
        _fit(tmp / "ck")
        damage(tmp / "ck" / "last.pt", tmp)
        return lambda: _fit(tmp / "ck")
    return make


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def _cache_row(damage: Callable[[Path, object], None], kind=mesm_dataset, item: int = 0):
    """Fill the cache of ``item``, damage it (or its sources) and check that the reload gives exactly
    the features computed from scratch in an empty cache (the independent reference)."""
    def make(tmp, corpus):
        root = _copy(corpus, tmp)
        ds = kind(root, "mosei", "train", cache_dir=tmp / "fc")
        ds.features(item)
        ds.features(1 - item)
        ds = damage(root, ds) or ds  # a damage may reload the split (e.g. after editing meta.pkl)

        def call():
            got = ds.features(item)
            ref = kind(root, "mosei", "train", cache_dir=tmp / "reference").features(item)
            assert set(got) == set(ref)
            for k in ref:
                assert torch.equal(got[k], ref[k]), k
        return call
    return make


def _rewrite_audio_same_size_and_time(root: Path, ds) -> None:
    """Re-export audio.wav with other samples, same length, same mtime: only the content hash differs."""
    wav_path = ds.raw.audio_path(0)
    st = wav_path.stat()
    wav, sr = sf.read(wav_path, dtype="int16")
    sf.write(wav_path, (wav // 2).astype(np.int16), sr, subtype="PCM_16")
    os.utime(wav_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert wav_path.stat().st_size == st.st_size


def _reexport_frame(root: Path, ds) -> None:
    import cv2

    path = Path(ds.raw.frames(0)[0][0])
    img = cv2.imread(str(path))
    cv2.imwrite(str(path), 255 - img)


def _copy_entry_from_other_utterance(root: Path, ds) -> None:
    shutil.copy(ds.cache_path(1), ds.cache_path(0))


def _drop_mel(root: Path, ds) -> None:
    entry = torch.load(ds.cache_path(0), weights_only=True)
    del entry["features"]["mel"]
    torch.save(entry, ds.cache_path(0))


def _payload_entry(root: Path, ds) -> None:
    torch.save({"features": Payload(root.parent / "PWNED")}, ds.cache_path(0))


def _edit_text(root: Path, ds):
    _edit_meta(root, ds.raw.ids[0], text="a completely different sentence now")
    return handcrafted_dataset(root, "mosei", "train", cache_dir=ds.cache_dir.parent)  # same cache folder


# ------------------------------------------------------------------------------------------ media
def _wav_row(mutate: Callable[[Path], None]):
    def make(tmp, corpus):
        root = _copy(corpus, tmp)
        mutate(_folder(root, _ids(root)[0]) / "audio.wav")
        return lambda: load_split(root, "mosei", "train")[0]
    return make


def _cut_wav_to_a_third(path: Path) -> None:
    _truncate(path, 1 / 3)


def _float_wav_with_nan(path: Path) -> None:
    wav, sr = sf.read(path, dtype="float32")
    wav[100] = np.nan
    sf.write(path, wav, sr, subtype="FLOAT")


def _frame_row(name: str, mutate: Callable[[Path], None]):
    def make(tmp, corpus):
        root = _copy(corpus, tmp)
        mutate(_folder(root, _ids(root)[0]) / name)
        return lambda: mesm_dataset(root, "mosei", "train", cache_dir=tmp / "fc")[0]
    return make


def _png_cut(path: Path) -> None:
    import cv2

    png = path.with_suffix(".png")
    cv2.imwrite(str(png), cv2.imread(str(path)))
    path.unlink()
    _truncate(png, 0.5)


# ------------------------------------------------------------------------------------------ splits
def _split_row(edit: Callable[[Path], None], call=lambda root: load_split(root, "mosei", "train")):
    def make(tmp, corpus):
        root = _copy(corpus, tmp)
        edit(root)
        return lambda: call(root)
    return make


def _duplicate_id(root: Path) -> None:
    f = root / "MOSEI_SPLIT" / "train_split.txt"
    ids = f.read_text().split()
    f.write_text("\n".join(ids + [ids[2]]) + "\n")


def _shared_id(root: Path) -> None:
    f = root / "MOSEI_SPLIT" / "test_split.txt"
    f.write_text(f.read_text() + _ids(root, "train")[1] + "\n")


# ------------------------------------------------------------------------------------------ pickles
def _payload_meta(tmp, corpus):
    root = _copy(corpus, tmp)
    _edit_meta(root, _ids(root)[0], extra=Payload(tmp / "PWNED"))
    return lambda: load_split(root, "mosei", "train")


def _payload_cue(tmp, corpus):
    root = _copy(corpus, tmp)
    folder = _folder(root, _ids(root)[0])
    cue = pickle.loads((folder / "cue.pkl").read_bytes())
    cue["extra"] = Payload(tmp / "PWNED")
    (folder / "cue.pkl").write_bytes(pickle.dumps(cue))
    return lambda: read_cues(folder)


def _truncated_meta(tmp, corpus):
    root = _copy(corpus, tmp)
    _truncate(root / "MOSEI_RAW_PROCESSED" / "meta.pkl", 0.5)
    return lambda: load_split(root, "mosei", "train")


@dataclass
class Case:
    name: str
    make: Callable  # (tmp_path, corpus) -> the call that reads the bad input
    expect: str  # an error type name, or "log" (recomputed with a logged warning)
    words: tuple


ERRORS = {"DataError": DataError, "CheckpointError": "CheckpointError"}

CASES = [
    # 1. checkpoints: a resume of another run stops, naming the file and the differing fields
    Case("ckpt-other-seed", _ckpt_row({}, {"seed": 1}),
         "CheckpointError", ("last.pt", "seed", "resume='fresh'")),
    Case("ckpt-other-lr", _ckpt_row({}, {"lr": 1e-3}),
         "CheckpointError", ("last.pt", "lr (checkpoint 0.01, now 0.001)")),
    Case("ckpt-fewer-epochs", _ckpt_row({"epochs": 4}, {"epochs": 2}), "CheckpointError",
         ("last.pt", "trained 4 epochs", "epochs=2")),
    Case("ckpt-other-weight-decay", _ckpt_row({}, {"weight_decay": 0.1}),
         "CheckpointError", ("last.pt", "weight_decay")),
    Case("ckpt-other-task-setting", _ckpt_row({}, {"thresholds": "validation"}), "CheckpointError",
         ("last.pt", "thresholds")),
    Case("ckpt-other-architecture", _ckpt_row({}, {"model": TinyNet(hidden=32)}), "CheckpointError",
         ("last.pt", "model_parameters", "net.0.weight (16, 4) -> (32, 4)")),
    Case("ckpt-other-class", _ckpt_row({}, {"model": OtherNet()}),
         "CheckpointError", ("last.pt", "model_class")),
    Case("ckpt-other-data", _ckpt_row({}, {"n_train": 32}), "CheckpointError", ("last.pt", "train_data")),
    Case("ckpt-truncated", _ckpt_file_row(lambda p, tmp: _truncate(p)), "CheckpointError",
         ("last.pt", "cannot read checkpoint")),
    Case("ckpt-payload", _ckpt_file_row(lambda p, tmp: torch.save({"x": Payload(tmp / "PWNED")}, p)),
         "CheckpointError", ("last.pt", "weights_only")),
    Case("ckpt-without-fingerprint", _ckpt_file_row(lambda p, tmp: torch.save({"model": {}, "state": {}}, p)),
         "CheckpointError", ("last.pt", "no run fingerprint")),
    # 2. feature cache: stale or damaged entries are recomputed, with the file name in the log
    Case("cache-audio-reexported", _cache_row(_rewrite_audio_same_size_and_time), "log",
         ("recomputed", "audio.wav")),
    Case("cache-frame-reexported", _cache_row(_reexport_frame), "log", ("recomputed", "image_0.jpg")),
    Case("cache-from-other-utterance", _cache_row(_copy_entry_from_other_utterance), "log",
         ("recomputed", "holds utterance")),
    Case("cache-lacks-mel", _cache_row(_drop_mel), "log", ("recomputed", "lacks", "mel")),
    Case("cache-truncated", _cache_row(lambda root, ds: _truncate(ds.cache_path(0))), "log",
         ("recomputed", "unreadable")),
    Case("cache-payload", _cache_row(_payload_entry), "log", ("recomputed", "unreadable")),
    Case("cache-text-edited", _cache_row(_edit_text, kind=handcrafted_dataset),
         "log", ("recomputed", "text")),
    # 3. labels, sentiment and text of meta.pkl
    Case("label-nan", _meta_row(label=[float("nan"), 1, 0, 0, 0, 0]),
         "DataError", ("meta.pkl", "label", "NaN")),
    Case("label-negative", _meta_row(label=[-1, 1, 0, 0, 0, 0]),
         "DataError", ("meta.pkl", "label", "outside")),
    Case("label-string-inside", _meta_row(label=["yes", 1, 0, 0, 0, 0]), "DataError",
         ("meta.pkl", "label", "6 numbers")),
    Case("label-none", _meta_row(label=None), "DataError", ("meta.pkl", "label")),
    Case("sentiment-string", _meta_row(sentiment="positive"),
         "DataError", ("meta.pkl", "sentiment", "positive")),
    Case("sentiment-out-of-range", _meta_row(sentiment=42),
         "DataError", ("meta.pkl", "sentiment", "[-3, 3]")),
    Case("sentiment-inf", _meta_row(sentiment=float("inf")), "DataError", ("meta.pkl", "sentiment", "inf")),
    Case("text-none", _meta_row(text=None), "DataError", ("meta.pkl", "text", "None")),
    Case("text-number", _meta_row(text=3), "DataError", ("meta.pkl", "text", "string")),
    # 4. pickles that would run code on load
    Case("meta-payload", _payload_meta, "DataError", ("meta.pkl", "refused", "open")),
    Case("cue-payload", _payload_cue, "DataError", ("cue.pkl", "refused")),
    Case("umons-payload", lambda tmp, c: _umons_row(mels=Payload(tmp / "PWNED"))(tmp, c), "DataError",
         ("test_mels.p", "refused")),
    Case("meta-truncated", _truncated_meta, "DataError", ("meta.pkl", "cannot read")),
    # 6. truncated or corrupt media
    Case("wav-cut-to-a-third", _wav_row(_cut_wav_to_a_third), "DataError", ("audio.wav", "truncated")),
    Case("jpg-cut-in-half", _frame_row("image_0.jpg", lambda p: _truncate(p)), "DataError",
         ("image_0.jpg", "truncated")),
    Case("png-cut-in-half", _frame_row("image_0.jpg", _png_cut), "DataError", ("image_0.png", "decode")),
    # 7. split hygiene
    Case("split-duplicate-id", _split_row(_duplicate_id), "DataError", ("train_split.txt", "more than once")),
    Case("split-shared-id", _split_row(_shared_id),
         "DataError", ("train_split.txt", "test_split.txt", "disjoint")),
    Case("split-shared-id-feature-dataset",
         _split_row(_shared_id, lambda root: mesm_dataset(root, "mosei", "test")),
         "DataError", ("test_split.txt", "train_split.txt", "allow_overlap")),
    # 8. clear errors naming the file
    Case("wav-nan-samples", _wav_row(_float_wav_with_nan), "DataError", ("audio.wav", "NaN")),
    Case("umons-mel-40-bins", _umons_row(mels=np.zeros((30, 40))),
         "DataError", ("test_mels.p", "'a_1'", "80")),
    Case("umons-emotion-nan", _umons_row(emotion=[np.nan, 0, 0, 1, 0, 0]), "DataError",
         ("test_emotion.p", "'a_1'", "emotion")),
    Case("umons-sentiment-string", _umons_row(sentiment="positive"), "DataError",
         ("test_sentiment.p", "'a_1'", "sentiment")),
    Case("umons-sentences-none", _umons_row(sentences=None),
         "DataError", ("test_sentences.p", "'a_1'", "sentences")),
    Case("umons-mel-nan", _umons_row(mels=np.full((30, 80), np.nan)), "DataError", ("test_mels.p", "NaN")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, corpus, tmp_path, caplog):
    call = case.make(tmp_path, corpus)
    if case.expect == "log":
        with caplog.at_level(logging.WARNING, logger="nbsupport.data"):
            call()
        text = caplog.text
        assert text, "no warning was logged"
    else:
        exc = ERRORS[case.expect]
        exc = getattr(train, exc) if isinstance(exc, str) else exc
        with pytest.raises(exc) as info:
            call()
        text = str(info.value)
    for word in case.words:
        assert word in text, f"{word!r} not in message: {text}"
    assert not (tmp_path / "PWNED").exists(), "a pickled payload ran"
