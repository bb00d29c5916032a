"""Mutation fuzzer of the data readers (issue: nothing from a data file can crash, hang, exhaust memory or
pass as valid when it is not).

Seeds are valid files written by the field's own writers (``pickle`` of the raw layout's ``meta.pkl``,
MMSA's and MulT's structures; h5py computational sequences as the CMU SDK writes them; split files).
Each input is a seed mutated by a deterministic generator (input ``k`` of target ``t`` is always the same
bytes): bit flips, boundary integers written over 1/2/4/8-byte windows (forged lengths and counts),
inserted, deleted and duplicated ranges, splices of two seeds, truncation, and -- for pickles -- opcodes
inserted from a dictionary of the ones a forged file uses (GLOBAL of every allowed name, REDUCE, BUILD,
MARK, long-length strings). The reader then runs on it. The property: a
:class:`~nbsupport.data.DataError` (the data family's error, message naming the file), or a dataset whose
labels and features pass the book's rules -- never another exception type, a crash, a hang or a memory
blow-up.

Inputs run in batches in child processes (one Python per batch, so the imports are paid once): the child
caps its address space (``RLIMIT_AS``: what it holds after the imports + 1 GiB) and reports each input
on a line before and after running it; a child that dies (segmentation fault), stops answering for
``--hang`` seconds or hits the memory cap leaves the input it was on as a finding (written to
``--findings``), and a new child goes on after it.

Usage (``make fuzz`` runs it for ``FUZZ_SECONDS``, default 600)::

    python tests/fuzz_data.py --seconds 600 [--targets pickle,meta,mmsa,mult,csd] [--findings DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("pickle", "meta", "mmsa", "mult", "csd")

# ------------------------------------------------------------------------------------------ seeds
_BOUNDARY = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF,
             0xFFFFFFFFFFFFFFFF, 1 << 31, 1 << 40, 1500000000]
_OPCODES = [b"cbuiltins\nbytearray\n", b"cbuiltins\nlist\n", b"cbuiltins\nset\n", b"c__builtin__\nbytes\n",
            b"cnumpy\ndtype\n", b"cnumpy\nndarray\n", b"cnumpy._core.multiarray\n_reconstruct\n",
            b"cnumpy.core.multiarray\nscalar\n", b"cnumpy._core.numeric\n_frombuffer\n", b"c_codecs\nencode\n",
            b"ccollections\nOrderedDict\n", b"R", b"b", b"(", b"t", b"]", b"}", b"e", b"u", b"a", b"s", b"0", b"2",
            b"N", b"\x88", b"\x89", b"\x85", b"\x86", b"\x87", b"\x93", b"\x94", b"\x81", b"\x92", b"\x97",
            b"K\xff", b"J\xff\xff\xff\x7f", b"\x8a\x08" + b"\xff" * 8, b"X\xff\xff\xff\x7f", b"B\x00\x00\x00\x80",
            b"\x8e" + b"\xff" * 8, b"\x95" + b"\xff" * 8, b"\x96" + b"\xff" * 8, b"S'x'\n", b"I999999999999\n",
            b"U\x02V8", b"U\x02O8", b"U\x02f8", b"U\x03<U9", b"(K\x01tq\x00", b"h\x00", b"j\xff\xff\xff\xff"]


def _mmsa_data(rng: np.random.Generator) -> dict:
    def split(name, n):
        la = rng.integers(1, 6, n)
        return {"raw_text": np.array([f"utt {i}" for i in range(n)], dtype=object),
                "id": np.array([f"v{name}{i}$_${i}" for i in range(n)], dtype=object),
                "text": rng.normal(size=(n, 4, 3)).astype(np.float32),
                "text_bert": np.stack([np.ones((n, 4)), (np.arange(4) < 3)[None].repeat(n, 0), np.zeros((n, 4))], 1),
                "audio": np.where(rng.random((n, 5, 2)) < 0.1, -np.inf, rng.normal(size=(n, 5, 2))).astype(np.float32),
                "vision": rng.normal(size=(n, 5, 2)).astype(np.float32),
                "audio_lengths": [int(v) for v in la], "vision_lengths": [5] * n,
                "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
                "emotion_labels": rng.uniform(0, 3, (n, 6)).astype(np.float32),
                "emotion_names": np.array(["happy", "sad", "anger", "surprise", "disgust", "fear"])}
    return {s: split(s, n) for s, n in (("train", 4), ("valid", 2), ("test", 2))}


def _mult_data(rng: np.random.Generator) -> dict:
    out = {}
    for s, n in (("train", 4), ("valid", 2), ("test", 2)):
        lab = np.zeros((n, 4, 2), np.float32)
        lab[np.arange(n)[:, None], np.arange(4)[None], rng.integers(0, 2, (n, 4))] = 1
        out[s] = {k: np.concatenate([np.zeros((n, 2, d)), rng.normal(size=(n, 3, d))], 1).astype(np.float32)
                  for k, d in (("text", 3), ("audio", 2), ("vision", 2))} | {"labels": lab}
    return out


def _write_csd(path: Path, name: str, data: dict, meta: dict) -> None:
    import h5py

    with h5py.File(path, "w") as fh:
        root = fh.create_group(name)
        for vid, (feats, iv) in data.items():
            v = root.create_group(f"data/{vid}")
            v.create_dataset("features", data=feats)
            v.create_dataset("intervals", data=iv)
        for k, val in meta.items():
            ds = root.create_dataset(f"metadata/{k}", (1,), dtype=h5py.special_dtype(vlen=str))
            ds[0] = json.dumps(val)


def make_seeds(folder: Path, corpus: Path | None = None) -> dict:
    """Valid seed files per target in ``folder`` -> {target: [(relative path, bytes), ...]} plus the fixed
    files each target reads beside the mutated one."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    seeds: dict = {}
    meta = {f"u{i}": {"text": f"words {i}", "label": [float(i % 2), 0, 1.5, 0, 0, 3.0], "sentiment": 0.5 * i - 1,
                      "video": "v", "start": 0.0, "end": 1.0, "fps": 30.0} for i in range(4)}
    seeds["pickle"] = [pickle.dumps(meta, protocol=p) for p in range(6)] + \
        [pickle.dumps(_mmsa_data(rng), protocol=p) for p in (2, 4, 5)]
    seeds["meta"] = [pickle.dumps(meta, protocol=p) for p in (2, 4)]
    seeds["mmsa"] = [pickle.dumps(_mmsa_data(rng), protocol=p) for p in (2, 4, 5)]
    seeds["mult"] = [pickle.dumps(_mult_data(rng), protocol=p) for p in (2, 4)]
    labels = {v: (np.array([[1.0, 2.0, 0, 0, 0, 0, 0], [-1.5, 0, 0, 1.3, 0, 0.6, 0]]),
                  np.array([[0.0, 2.0], [2.5, 4.0]])) for v in ("va", "vb", "vc")}
    feats = {v: (rng.normal(size=(20, 3)).astype(np.float32),
                 np.stack([np.arange(20) * 0.2, np.arange(20) * 0.2 + 0.2], 1)) for v in labels}
    csd = folder / "csd"
    csd.mkdir(exist_ok=True)
    _write_csd(csd / "CMU_MOSEI_Labels.csd", "All Labels", labels, {"root name": "All Labels"})
    _write_csd(csd / "CMU_MOSEI_COVAREP.csd", "COVAREP", feats, {"root name": "COVAREP"})
    for s, t in (("train", "va\n"), ("valid", "vb\n"), ("test", "vc\n")):
        (csd / f"{s}_split.txt").write_text(t)
    seeds["csd"] = [(csd / "CMU_MOSEI_Labels.csd").read_bytes(), (csd / "CMU_MOSEI_COVAREP.csd").read_bytes()]
    raw = folder / "raw"
    for i in range(4):
        (raw / "MOSEI_RAW_PROCESSED" / f"u{i}").mkdir(parents=True, exist_ok=True)
    (raw / "MOSEI_SPLIT").mkdir(exist_ok=True)
    for s, ids in (("train", "u0\nu1\n"), ("valid", "u2\n"), ("test", "u3\n")):
        (raw / "MOSEI_SPLIT" / f"{s}_split.txt").write_text(ids)
    return seeds


# ------------------------------------------------------------------------------------------ mutation
def mutate(seeds: list[bytes], target: str, k: int, base_seed: int) -> bytes:
    """Input ``k`` of ``target``: a deterministic mutation of one of the seeds."""
    r = random.Random(f"{base_seed}:{target}:{k}")
    data = bytearray(r.choice(seeds))
    for _ in range(r.choice((1, 1, 2, 3, 5, 8))):
        op = r.randrange(9 if target in ("pickle", "meta", "mmsa", "mult") else 7)
        n = len(data)
        if n == 0:
            data = bytearray(r.choice(seeds))
            continue
        i = r.randrange(n)
        if op == 0:
            data[i] ^= 1 << r.randrange(8)
        elif op == 1:
            w = r.choice((1, 2, 4, 8))
            v = r.choice(_BOUNDARY) & ((1 << (8 * w)) - 1)
            data[i:i + w] = v.to_bytes(w, r.choice(("little", "big")))
        elif op == 2:
            data[i:i] = bytes(r.randrange(256) for _ in range(r.randrange(1, 9)))
        elif op == 3:
            del data[i:i + r.randrange(1, 64)]
        elif op == 4:
            j = r.randrange(n)
            data[i:i] = data[j:j + r.randrange(1, 128)]
        elif op == 5:
            other = r.choice(seeds)
            j = r.randrange(len(other))
            data = data[:i] + other[j:j + r.randrange(1, 512)] + data[i + r.randrange(0, 64):]
        elif op == 6:
            data = data[:r.randrange(n)]
        else:  # pickle opcodes from the dictionary
            data[i:i] = r.choice(_OPCODES)
    return bytes(data)


# ------------------------------------------------------------------------------------------ the property
def _valid_feature_split(ds) -> None:
    """A FeatureSplit that loaded must hold what the book's rules allow."""
    assert len(ds) > 0
    assert len(set(ds.ids)) == len(ds.ids), "repeated ids"
    s = np.asarray(ds.sentiment)
    assert np.all(np.isnan(s) | ((s >= -3 - 1e-6) & (s <= 3 + 1e-6))), "sentiment out of range"
    e = np.asarray(ds.emotion)
    assert np.isin(e, (0.0, 1.0)).all(), "emotion not presence"
    for i in range(len(ds)):
        it = ds[i]
        for key in ("text", "audio", "video"):
            if key in it:
                assert it[key].ndim == 2 and it[key].shape[0] >= 1 and bool(it[key].isfinite().all()), key


def run_one(target: str, path: Path, work: Path) -> None:
    """Read ``path`` (the mutated file) as ``target``; raises AssertionError when a loaded value breaks the
    rules, DataError when refused."""
    from nbsupport.data import formats, load_split
    from nbsupport.data.safe_pickle import load_pickle

    if target == "pickle":
        load_pickle(path)
    elif target == "meta":
        dest = work / "raw" / "MOSEI_RAW_PROCESSED" / "meta.pkl"
        shutil.copyfile(path, dest)
        for split in ("train", "valid", "test"):
            raw = load_split(work / "raw", "mosei", split)
            for lab, s, t in zip(raw.labels, raw.sentiments, raw.texts):
                assert np.isin(lab, (0.0, 1.0)).all() and (np.isnan(s) or -3 <= s <= 3) and isinstance(t, str)
    elif target in ("mmsa", "mult"):
        name = "unaligned_50.pkl" if target == "mmsa" else "iemocap_data.pkl"
        dest = work / name
        shutil.copyfile(path, dest)
        formats._PICKLES.clear()
        for split in ("train", "valid", "test"):
            loader = formats.load_mmsa if target == "mmsa" else formats.load_mult
            _valid_feature_split(loader(dest, split))
    elif target == "csd":
        which = "CMU_MOSEI_Labels.csd" if path.name == "labels.bin" else "CMU_MOSEI_COVAREP.csd"
        shutil.copyfile(path, work / "csd" / which)
        try:
            for split in ("train", "valid", "test"):
                _valid_feature_split(formats.load_csd(work / "csd", split))
        finally:
            shutil.copyfile(work / "csd_seeds" / which, work / "csd" / which)


def child_main(target: str, work: Path, start: int, count: int, base_seed: int) -> None:
    """Batch ``[start, start + count)`` of ``target``: one line per input (``START k``, then ``DONE k
    outcome detail``), memory capped."""
    import resource

    from nbsupport.data import DataError
    import nbsupport.data.formats  # noqa: F401 - imported before the address-space cap

    seeds = [p.read_bytes() for p in sorted((work / "seeds" / target).iterdir())]
    with open("/proc/self/statm") as fh:
        vm = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    inp = work / f"input-{target}-{os.getpid()}" / ("labels.bin" if target == "csd" else "input.bin")
    inp.parent.mkdir(exist_ok=True)
    for k in range(start, start + count):
        data = mutate(seeds, target, k, base_seed)
        if target == "csd":  # which of the two sequences this input replaces
            inp = inp.with_name("labels.bin" if k % 2 == 0 else "features.bin")
            data = mutate([seeds[k % 2]], target, k, base_seed)
        inp.write_bytes(data)
        print(f"START {k}", flush=True)
        try:
            run_one(target, inp, work)
            outcome, detail = "ok", ""
        except DataError as e:
            outcome, detail = "data_error", str(e).splitlines()[0][:160] if str(e) else ""
        except MemoryError:
            outcome, detail = "FINDING", "MemoryError (the memory cap was reached)"
        except AssertionError as e:
            outcome, detail = "FINDING", f"loaded but invalid: {e}"
        except RecursionError:
            outcome, detail = "FINDING", "RecursionError"
        except Exception as e:  # noqa: BLE001 - any other type is a finding
            outcome, detail = "FINDING", f"{type(e).__name__}: {str(e)[:160]}"
        print(f"DONE {k} {outcome} {detail}".replace("\n", " "), flush=True)


def fuzz(seconds: float, targets=TARGETS, *, findings: Path | None = None, base_seed: int = 0, batch: int = 400,
         hang: float = 30.0, min_inputs: int = 100, log=print) -> dict:
    """Fuzz each target for ``seconds / len(targets)`` seconds, and at least ``min_inputs`` inputs; returns
    {target: {outcome: count}, "findings": [...], "inputs": n} (a finding: target, input number, what
    happened; its bytes under ``findings``)."""
    work = Path(tempfile.mkdtemp(prefix="nbsupport-fuzz-"))
    try:
        seeds = make_seeds(work)
        for t, blobs in seeds.items():
            (work / "seeds" / t).mkdir(parents=True)
            for j, b in enumerate(blobs):
                (work / "seeds" / t / f"{j:02d}.bin").write_bytes(b)
        shutil.copytree(work / "csd", work / "csd_seeds")
        report: dict = {"findings": [], "inputs": 0}
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        for target in targets:
            counts: dict = {}
            k, deadline = 0, time.monotonic() + seconds / len(targets)
            while time.monotonic() < deadline or sum(counts.values()) < min_inputs:
                proc = subprocess.Popen([sys.executable, __file__, "--child", target, str(work), str(k), str(batch),
                                         str(base_seed)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
                current, last, buf, fd = None, time.monotonic(), b"", proc.stdout.fileno()
                while True:
                    ready, _, _ = select.select([fd], [], [], 0.2)
                    chunk = os.read(fd, 1 << 16) if ready else b""
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        line = line.decode(errors="replace")
                        last = time.monotonic()
                        if line.startswith("START "):
                            current = int(line.split()[1])
                        elif line.startswith("DONE "):
                            _, num, outcome, *rest = line.split(" ", 3) + [""]
                            counts[outcome] = counts.get(outcome, 0) + 1
                            current = None
                            k = int(num) + 1
                            if outcome == "FINDING":
                                _record(report, findings, target, int(num), " ".join(rest).strip(), seeds, base_seed)
                    if ready and not chunk:  # end of the child's output
                        proc.wait()
                        break
                    if current is not None and time.monotonic() - last > hang:
                        proc.kill()
                        proc.wait()
                        break
                    if current is None and time.monotonic() > deadline and sum(counts.values()) >= min_inputs:
                        proc.kill()
                        proc.wait()
                        break
                proc.stdout.close()
                if current is not None:  # the child died or hung on this input
                    why = (f"hang (no answer in {hang:.0f} s)" if proc.returncode == -9 else
                           f"child died (exit {proc.returncode})")
                    counts["FINDING"] = counts.get("FINDING", 0) + 1
                    _record(report, findings, target, current, why, seeds, base_seed)
                    k = current + 1
            report[target] = counts
            report["inputs"] += sum(counts.values())
            log(f"{target}: {sum(counts.values())} inputs, {counts}")
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _record(report: dict, findings: Path | None, target: str, k: int, what: str, seeds: dict, base_seed: int):
    report["findings"].append({"target": target, "input": k, "what": what})
    if findings is not None:
        findings.mkdir(parents=True, exist_ok=True)
        blobs = seeds[target] if target != "csd" else [seeds["csd"][k % 2]]
        (findings / f"{target}-{k}.bin").write_bytes(mutate(blobs, target, k, base_seed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--findings", default=None, help="folder for the inputs that broke the property")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        target, work, start, count, seed = args.child
        child_main(target, Path(work), int(start), int(count), int(seed))
        return 0
    t0 = time.monotonic()
    report = fuzz(args.seconds, [t for t in args.targets.split(",") if t],
                  findings=Path(args.findings) if args.findings else None, base_seed=args.seed)
    print(f"{report['inputs']} inputs in {time.monotonic() - t0:.0f} s; {len(report['findings'])} finding(s)")
    for f in report["findings"][:50]:
        print(f"  FINDING {f['target']} input {f['input']}: {f['what']}")
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
