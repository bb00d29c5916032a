"""Speed of the video preparer (``python -m nbsupport.data.prepare``) in utterances per second.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/prepare_speed.py --out benchmarks/results/prepare_speed.json

Encodes ``--videos`` short H.264 + AAC videos (``--seconds`` long, ``--width`` x ``--height``, 30 fps)
of a real photograph (scikit-image's astronaut, moving) with real speech (espeak-ng), cuts each into
``--per-video`` utterances of 2-4 s, then times :func:`nbsupport.data.prepare.prepare` from a fresh
output folder ``--repeats`` times for each worker count. Reports the median and the range of
utterances per second (the machine is shared, so the spread is part of the answer) and writes JSON.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_videos(folder: Path, n: int, seconds: float, width: int, height: int) -> None:
    """Encode ``n`` videos ``v<i>.mp4`` (H.264 + AAC) of the moving photograph with espeak-ng speech."""
    import av
    import cv2
    import skimage.data
    import soundfile as sf

    speech = folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "I am so happy to see you today. This is wonderful news, "
                    "and I cannot wait to tell everybody about it."], check=True)
    wav, sr = sf.read(speech, dtype="float32")
    photo = cv2.resize(skimage.data.astronaut(), (width, height))
    for i in range(n):
        c = av.open(str(folder / f"v{i}.mp4"), "w")
        vs = c.add_stream("libx264", rate=30)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        a = c.add_stream("aac", rate=sr)
        a.layout = "mono"
        for k in range(int(seconds * 30)):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(photo, 3 * k + i, axis=1)),
                                                          format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        x = np.resize(wav, int(seconds * sr)).astype(np.float32)
        for j in range(0, len(x), 1024):
            fr = av.AudioFrame.from_ndarray(x[None, j:j + 1024].copy(), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = sr, j
            for p in a.encode(fr):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/prepare_speed.json")
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--per-video", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from nbsupport.base import atomic_write_json
    from nbsupport.data.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="prepare_speed-"))
    try:
        (tmp / "videos").mkdir()
        make_videos(tmp / "videos", args.videos, args.seconds, args.width, args.height)
        rng = np.random.default_rng(0)
        with open(tmp / "segments.csv", "w", newline="") as fh, open(tmp / "labels.csv", "w", newline="") as lh:
            seg, lab = csv.writer(fh), csv.writer(lh)
            seg.writerow(["video_id", "clip", "start", "end", "text"])
            lab.writerow(["id", "anger", "disgust", "fear", "happy", "sad", "surprise", "sentiment"])
            for v in range(args.videos):
                starts = np.sort(rng.uniform(0, args.seconds - 4.5, args.per_video))
                for c, s in enumerate(starts):
                    seg.writerow([f"v{v}", c, round(s, 3), round(s + rng.uniform(2, 4), 3), "hello there"])
                    lab.writerow([f"v{v}_{c}", *rng.integers(0, 2, 6), 0.5])
        rows = []
        for w in [int(x) for x in args.workers.split(",")]:
            speeds = []
            for r in range(args.repeats):
                out = tmp / f"out-{w}-{r}"
                rep = prepare(tmp / "videos", tmp / "segments.csv", tmp / "labels.csv", out, workers=w,
                              progress=False)
                if rep.failed:
                    raise SystemExit(f"preparation failed: {rep.failed}")
                speeds.append(rep.per_second)
                shutil.rmtree(out)
            rows.append(dict(workers=w, utterances=args.videos * args.per_video, per_second=speeds,
                             median=statistics.median(speeds), min=min(speeds), max=max(speeds)))
            print(f"workers={w}: {statistics.median(speeds):.2f} utterances/s (range {min(speeds):.2f}-"
                  f"{max(speeds):.2f}, {args.repeats} runs of {args.videos * args.per_video} utterances)")
        atomic_write_json(args.out, {"settings": vars(args), "machine": dict(cpus=os.cpu_count(),
                                     processor=platform.processor() or platform.machine(),
                                     omp_threads=os.environ.get("OMP_NUM_THREADS")), "rows": rows})
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
