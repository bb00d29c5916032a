"""The preparer's ``--segments`` on UMONS's own segment tables (issue: a real file refused).

The fixture reproduces the storage of ``data/d_test.pkl`` in the UMONS repository (jbdel/MOSEI_UMONS,
commit c198feb, read with ``fetch``): a pickle protocol 4 dict ``{row index: ['<video>[<clip>]',
np.float64(start), np.float64(end)]}`` (4,662 rows, keys 0..4661), written by NumPy 1.x, so its floats
refer to ``numpy.core.multiarray.scalar`` and ``numpy.dtype('f8', 0, 1)``; 46 of its rows start before
0 s (down to -0.4875 s: '-ri04Z7vwnc[0]' is [-0.487528344671, 3.23628117914]). NumPy 2 pickles scalars
under ``numpy._core``, so :class:`Numpy1Pickler` writes those two globals as NumPy 1.x did. Fed the
real file's 4,662 rows, :func:`umons_table` wrote it again byte for byte (282,929 bytes, sha256
265d16333b8d03339c61ea512f51b0f6...; checked once by hand, the file itself is not in this repository)."""
import pickle
import pickletools

import numpy as np
import pytest

from nbsupport.data import DataError
from nbsupport.data import prepare as P

REAL_FIRST_ROWS = {0: ["-6rXp3zJ3kc[0]", 14.468, 22.882], 1: ["-6rXp3zJ3kc[1]", 45.428, 58.151],
                   2: ["-6rXp3zJ3kc[2]", 58.109, 71.96]}  # the first rows of the real d_test.pkl


def _numpy1_scalar(dtype, data):  # pickled under NumPy 1.x's name, see Numpy1Pickler
    return np.frombuffer(data, dtype)[0]


class Numpy1Pickler(pickle._Pickler):
    """Pickles NumPy float64 scalars as NumPy 1.x does: ``numpy.core.multiarray.scalar(dtype('f8', 0, 1),
    8 bytes)``."""

    def save(self, obj, save_persistent_id=True):
        if obj is not _numpy1_scalar:
            return super().save(obj, save_persistent_id)
        if id(obj) in self.memo:  # later rows refer back to it, as in the real file
            self.write(self.get(self.memo[id(obj)][0]))
            return
        self.save("numpy.core.multiarray")  # protocol 4 names a global by two strings + STACK_GLOBAL
        self.save("scalar")
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    def reducer_override(self, obj):
        if isinstance(obj, np.float64):
            return _numpy1_scalar, (np.dtype("f8"), obj.tobytes())
        if isinstance(obj, np.dtype) and obj == np.dtype("f8"):
            return np.dtype, ("f8", 0, 1), obj.__reduce__()[2]
        return NotImplemented


def umons_table(path, rows):
    """Write ``rows`` [(video, clip, start, end)] as UMONS's ``d_*.pkl``."""
    table = {i: [f"{v}[{c}]", np.float64(s), np.float64(e)] for i, (v, c, s, e) in enumerate(rows)}
    with open(path, "wb") as fh:
        Numpy1Pickler(fh, protocol=4).dump(table)
    return path


def globals_of(data: bytes) -> set:
    strings, out = [], set()
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            out.add(tuple(strings[-2:]))
    return out


def test_fixture_has_the_real_files_storage(tmp_path):
    rows = [(r[0].split("[")[0], int(r[0][-2]), r[1], r[2]) for r in REAL_FIRST_ROWS.values()]
    path = umons_table(tmp_path / "d_test.pkl", rows)
    data = path.read_bytes()
    assert data[:2] == b"\x80\x04"  # protocol 4, as the real file
    assert globals_of(data) == {("numpy", "dtype"), ("numpy.core.multiarray", "scalar")}  # as the real file
    table = pickle.loads(data)
    assert list(table) == [0, 1, 2] and type(table[0][1]) is np.float64
    assert [[r[0], float(r[1]), float(r[2])] for r in table.values()] == list(REAL_FIRST_ROWS.values())


def test_read_segments_accepts_the_umons_table(tmp_path):
    rows = [("-6rXp3zJ3kc", 0, 14.468, 22.882), ("-6rXp3zJ3kc", 1, 45.428, 58.151),
            ("-ri04Z7vwnc", 0, -0.487528344671, 3.23628117914), ("221153", 0, -0.228117913832, 2.74739229025)]
    segs = P.read_segments(umons_table(tmp_path / "d_test.pkl", rows))
    assert [(s.id, s.video, s.start, s.end) for s in segs] == [
        ("-6rXp3zJ3kc_0", "-6rXp3zJ3kc", 14.468, 22.882), ("-6rXp3zJ3kc_1", "-6rXp3zJ3kc", 45.428, 58.151),
        ("-ri04Z7vwnc_0", "-ri04Z7vwnc", 0.0, 3.23628117914),  # a start before the video: from 0 s
        ("221153_0", "221153", 0.0, 2.74739229025)]


def test_read_segments_full_size_umons_table(tmp_path):
    """4,662 rows, as the real d_test.pkl."""
    rng = np.random.default_rng(0)
    rows = [(f"vid{v:04d}", c, float(s), float(s + rng.uniform(1, 20)))
            for v in range(1554) for c, s in enumerate(rng.uniform(0, 100, 3))]
    segs = P.read_segments(umons_table(tmp_path / "d_test.pkl", rows))
    assert len(segs) == 4662 and segs[4661].id == "vid1553_2" and segs[4661].end == rows[-1][3]


def test_read_segments_still_refuses_rows_that_are_no_segment(tmp_path):
    with open(tmp_path / "bad.pkl", "wb") as fh:
        Numpy1Pickler(fh, protocol=4).dump({0: ["no clip number", np.float64(1.0), np.float64(2.0)]})
    with pytest.raises(DataError, match=r"row 0 .*expected \['<video>\[<clip>\]', start, end\]"):
        P.read_segments(tmp_path / "bad.pkl")
