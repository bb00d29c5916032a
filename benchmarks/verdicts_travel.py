"""Do the verdicts travel? Build chapters 4, 6, 7 and 8 under 1 and under 2 CPU threads and compare every
verdict of their ``metrics.json`` (issue #28; the logic is :mod:`nbsupport.book.travel`).

Usage (default sizes, about twice a cold chapter build; the book's Design page cites its table)::

    python benchmarks/verdicts_travel.py --out benchmarks/results/verdicts_travel

``--smoke`` runs the chapters at smoke size, ``--chapters`` picks some, ``-p CHAPTER NAME VALUE`` (VALUE
as JSON) sets a parameter of one chapter in both builds, ``--build-a DIR`` takes a finished build for the
first thread count (only the second runs), ``--compare DIR_A DIR_B`` only compares two finished builds. Writes ``verdicts_travel.json`` and ``verdicts_travel.md`` (one row per chapter and
verdict key: both decisions, both sentences, same?) into ``--out`` and exits with 1 when a verdict reads
differently (or a chapter failed), 0 when every decision is the same.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nbsupport.book import travel  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the two builds and the table")
    ap.add_argument("--chapters", nargs="+", default=list(travel.CHAPTERS), help="notebook stems")
    ap.add_argument("--threads", nargs=2, type=int, default=[1, 2], metavar=("A", "B"))
    ap.add_argument("--smoke", action="store_true", help="smoke-sized chapters (the tests)")
    ap.add_argument("-p", nargs=3, action="append", default=[], metavar=("CHAPTER", "NAME", "VALUE"),
                    help="a chapter parameter for both builds, VALUE as JSON")
    ap.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"), help="compare two finished builds only")
    ap.add_argument("--build-a", metavar="DIR", help="a finished build under A threads (<DIR>/<chapter>/"
                    "metrics.json, e.g. the tests' smoke runs): only the B build runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    labels = tuple(str(t) for t in args.threads)
    runs = {}
    if args.compare:
        dirs = [Path(d) for d in args.compare]
    else:
        params: dict = {}
        for chapter, name, value in args.p:
            params.setdefault(chapter, {})[name] = json.loads(value)
        dirs = [Path(args.build_a) if args.build_a else out / f"threads{args.threads[0]}",
                out / f"threads{args.threads[1]}"]
        for t, d in list(zip(args.threads, dirs))[1 if args.build_a else 0:]:
            runs[t] = travel.build(ROOT / "book", d, t, args.chapters, smoke=args.smoke, parameters=params)
            for chapter, r in runs[t].items():
                print(f"{chapter} with {t} thread(s): {r['seconds']} s{' FAILED' if r['error'] else ''}")
                if r["error"]:
                    print(r["error"], file=sys.stderr)
    rows = travel.compare_builds(*dirs, args.chapters, labels)
    json_path, md_path = travel.write_report(out, rows, runs, labels)
    print(md_path.read_text())
    failed = any(r["error"] for build in runs.values() for r in build.values())
    if not rows:
        print("no seed_verdicts in either build", file=sys.stderr)
    return 1 if failed or not rows or not all(r["same"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
