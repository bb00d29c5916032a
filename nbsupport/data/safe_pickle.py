"""Reading pickles as data, never as a program (Chapter 2's data contract, *Running on your data*).

A pickle is a program: its ``GLOBAL``/``REDUCE``/``BUILD`` opcodes import callables and call them while
loading. An allow-list of callables is not enough: NumPy's own ``dtype.__setstate__`` trusts the flags
in the stream, so a structured dtype whose object field is declared "no object" turns eight bytes of the
file into a memory pointer (a segmentation fault, or worse); and an allowed constructor called with a
huge count allocates gigabytes before any type check. So :class:`SafeUnpickler` never hands file data to
NumPy's unpickling code. Every global the stream names is mapped to a stand-in written here:

* containers and numbers (``list``, ``dict``, ``set``, ``complex``, ``bytearray``, ...): called only with
  values that are already in the stream (an ``int`` count or a lazy ``range`` is refused);
* ``numpy.dtype``: only plain dtypes -- bool, integers, floats, complex, fixed-width ``str``/``bytes``
  -- whose pickled state is exactly what NumPy writes for that dtype (no fields, no subarray, no object,
  no metadata); the dtype is then built from its type code, byte order and width, not from the state;
* ``numpy.ndarray`` (``_reconstruct`` + state, or protocol 5's ``_frombuffer``): shape and byte count
  checked (``prod(shape) * itemsize == len(bytes)``) and the array copied out of those bytes;
* NumPy scalars (``scalar``): a plain dtype and exactly ``itemsize`` bytes.

Every stand-in charges what it allocates to a budget of ``factor`` times the file's size (plus a small
floor), itself capped by an absolute limit (:data:`MAX_BYTES_ENV`, default :data:`DEFAULT_MAX_BYTES`);
reads past the end of the stream and containers nested deeper than :data:`MAX_DEPTH` are errors. The
pure-Python ``pickle._Unpickler`` is the engine (its opcode table can be overridden; the C one cannot).
Pickles of protocols 0-5 written by Python 2 or 3 with NumPy 1.x (``numpy.core``) or 2.x
(``numpy._core``) -- MMSA's, MulT's, UMONS's, the raw layout's ``meta.pkl`` -- load to the same values
as ``pickle.loads``. No maintained library offers this (``fickling`` and ``picklescan`` detect unsafe
imports; they do not make NumPy's rebuild safe), hence this module.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .common import DataError

__all__ = ["SafeUnpickler", "UnsafePickleError", "safe_load", "safe_loads", "load_pickle", "ALLOWED_GLOBALS",
           "MAX_BYTES_ENV", "DEFAULT_MAX_BYTES", "MAX_DEPTH", "load_budget"]

#: Environment variable raising (or lowering) the absolute cap on what one pickle or HDF5 file may
#: allocate, in bytes (e.g. ``NBSUPPORT_MAX_LOAD_BYTES=200e9`` for a very large corpus file).
MAX_BYTES_ENV = "NBSUPPORT_MAX_LOAD_BYTES"
#: Default absolute cap: 32 GiB.
DEFAULT_MAX_BYTES = 32 << 30
#: What a file may allocate relative to its size (values + container overhead), plus a 64 MiB floor.
SIZE_FACTOR, SIZE_FLOOR = 4, 64 << 20
#: Deepest nesting of containers a data file may hold (real labels are 1-2 deep).
MAX_DEPTH = 100

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # NumPy 1.x and 2.x module names
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
#: Plain dtype kinds: bool, signed/unsigned integers, floats, complex, bytes, str; and "O", the object
#: dtype of MMSA's ``id``/``raw_text`` arrays, whose items are rebuilt from the stream's own values.
_PLAIN_KINDS = "biufcSUO"
#: What an object array may hold (MMSA: strings): plain leaves, never containers or other objects.
_OBJECT_ITEMS = (str, bytes, int, float, bool, complex, type(None), np.generic)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS`, or calls one with arguments that are not
    plain data (it could run code, crash the process or exhaust memory when loaded)."""


def absolute_cap(max_bytes=None) -> int:
    """The absolute allocation cap: ``max_bytes`` when given, else ``$NBSUPPORT_MAX_LOAD_BYTES``, else
    :data:`DEFAULT_MAX_BYTES` (``ParameterError``-free: a bad variable is a :class:`DataError` naming it)."""
    if max_bytes is not None:
        return int(max_bytes)
    env = os.environ.get(MAX_BYTES_ENV)
    if not env:
        return DEFAULT_MAX_BYTES
    try:
        return int(float(env))
    except ValueError:
        raise DataError(f"environment variable {MAX_BYTES_ENV}={env!r} must be a number of bytes") from None


def load_budget(file_size: int, max_bytes=None) -> int:
    """Bytes a data file of ``file_size`` bytes may allocate when loaded: ``SIZE_FACTOR * file_size +
    SIZE_FLOOR``, at most :func:`absolute_cap` (shared by the pickle and the HDF5 readers)."""
    return min(SIZE_FACTOR * int(file_size) + SIZE_FLOOR, absolute_cap(max_bytes))


class _Big:
    """A long byte string of the stream read straight into a NumPy buffer (no second copy when it is an
    array's data); anywhere else it becomes ``bytes``."""

    __slots__ = ("buf", "used")

    def __init__(self, buf: np.ndarray):
        self.buf, self.used = buf, False

    def to_bytes(self) -> bytes:
        return self.buf.tobytes()


#: Byte strings at least this long are read into a NumPy buffer (:class:`_Big`).
_BIG = 1 << 20


class _Stub:
    """A NumPy array or dtype under construction: created by REDUCE, completed by BUILD (our code)."""

    __slots__ = ("kind", "args", "value")

    def __init__(self, kind: str, args):
        self.kind, self.args, self.value = kind, args, None


class _Memo(dict):
    """The unpickler's memo; a completed stub read back (GET) is its finished value."""

    def __getitem__(self, key):
        v = dict.__getitem__(self, key)
        if isinstance(v, _Stub):
            if v.value is None:
                raise UnsafePickleError(f"a NumPy {v.kind} is used before its state is set")
            return v.value
        return v


class _BoundedReader:
    """File-like view of ``fh`` that refuses reads past ``size`` instead of allocating what a length
    field of the stream declares (a 4-byte ``BINBYTES8`` length must not reserve 1 TB)."""

    def __init__(self, fh, size: int):
        self.fh, self.left = fh, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        if n > self.left:
            raise EOFError(f"the stream declares {n} bytes where {self.left} are left (truncated, or a forged "
                           "length)")
        data = self.fh.read(n)
        self.left -= len(data)
        return data

    def readinto(self, buf) -> int:
        n = len(buf)
        if n > self.left:
            raise EOFError(f"the stream declares {n} bytes where {self.left} are left (truncated, or a forged "
                           "length)")
        got = self.fh.readinto(buf) if hasattr(self.fh, "readinto") else None
        if got is None:
            data = self.fh.read(n)
            buf[:len(data)] = data
            got = len(data)
        self.left -= got
        if got != n:
            raise EOFError(f"the stream ends {n - got} bytes early")
        return got

    def readline(self) -> bytes:
        line = self.fh.readline(self.left)
        self.left -= len(line)
        return line

    def peek(self, n: int = 1) -> bytes:
        return self.fh.peek(n)[:self.left] if hasattr(self.fh, "peek") else b""


def _plain_dtype(code, where: str) -> np.dtype:
    """np.dtype from a type string naming a plain dtype (never a structured, object or datetime one)."""
    if isinstance(code, bytes):
        code = code.decode("latin1")
    if not isinstance(code, str) or len(code) > 24 or not code.isprintable():
        raise UnsafePickleError(f"{where}: dtype code {code!r:.40} is not a plain type string")
    try:
        dt = np.dtype(code)
    except TypeError as e:
        raise UnsafePickleError(f"{where}: dtype {code!r} ({e})") from None
    if dt.kind not in _PLAIN_KINDS or dt.fields is not None or dt.subdtype is not None or dt.metadata:
        raise UnsafePickleError(f"{where}: dtype {code!r} is not plain (only bool, integers, floats, complex, "
                                "fixed-width str/bytes and arrays of strings are read)")
    return dt


def _finish_dtype(stub: _Stub, state) -> np.dtype:
    """Check a dtype's pickled state against what NumPy writes for that plain dtype, then build it."""
    code = stub.args
    if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3):
        raise UnsafePickleError(f"dtype {code!r}: state {state!r:.80} is not a plain dtype's (version 3, 8 fields)")
    _, order, subarray, names, fields, elsize, alignment, flags = state
    if isinstance(order, bytes):
        order = order.decode("latin1")
    if order not in ("<", ">", "|", "="):
        raise UnsafePickleError(f"dtype {code!r}: byte order {order!r:.20}")
    if subarray is not None or names is not None or fields is not None:
        raise UnsafePickleError(f"dtype {code!r}: structured or subarray dtypes are refused")
    dt = _plain_dtype(code, "dtype")
    if dt.kind in "SU":
        if not (isinstance(elsize, int) and 0 <= elsize <= (1 << 31) and elsize % (4 if dt.kind == "U" else 1) == 0):
            raise UnsafePickleError(f"dtype {code!r}: width {elsize!r:.20}")
        dt = np.dtype(f"{dt.kind}{elsize // (4 if dt.kind == 'U' else 1)}")
    if order in "<>" and dt.itemsize > 1 and dt.kind != "S":
        dt = dt.newbyteorder(order)
    want = dt.__reduce__()[2]
    if tuple(state[5:]) != tuple(want[5:]):
        raise UnsafePickleError(f"dtype {code!r}: width/alignment/flags {tuple(state[5:])} differ from NumPy's "
                                f"{tuple(want[5:])} for that type (a forged dtype)")
    return dt


def _check_text(a: np.ndarray, where: str) -> np.ndarray:
    """A fixed-width str array must hold Unicode code points (UCS-4 values up to 0x10FFFF): NumPy turns
    any other value into a SystemError when the item is read."""
    if a.dtype.kind == "U" and a.size and a.dtype.itemsize:
        codes = np.ascontiguousarray(a).view(np.dtype("u4").newbyteorder(a.dtype.byteorder))
        if (codes > 0x10FFFF).any():
            raise UnsafePickleError(f"{where}: str data holds values that are not Unicode code points")
    return a


def _dtype_of(value, where: str) -> np.dtype:
    if isinstance(value, np.dtype):  # built by _finish_dtype only
        return value
    raise UnsafePickleError(f"{where}: expected a NumPy dtype, got {type(value).__name__}")


def _shape(shape, where: str) -> tuple:
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or len(shape) > 32 or \
            not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s for s in shape):
        raise UnsafePickleError(f"{where}: shape {shape!r:.80} is not a tuple of sizes >= 0")
    return tuple(shape)


def _raw_bytes(raw, where: str):
    if isinstance(raw, _Big):
        return raw.to_bytes()
    if isinstance(raw, str):  # Python 2 pickles hold the bytes as a latin-1 str
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise UnsafePickleError(f"{where}: array data of type {type(raw).__name__} (object arrays are refused)")
    return raw


class SafeUnpickler(pickle._Unpickler):
    """Unpickler for data files (see the module docstring): plain containers, numbers, strings, plain
    NumPy arrays, dtypes and scalars, each rebuilt by this module's code from checked parts, within a
    byte ``budget``. Python 2 pickles are read with ``encoding="latin1"``, the setting NumPy documents
    for arrays pickled by Python 2."""

    def __init__(self, file, *, budget: int | None = None, size: int | None = None, encoding: str = "latin1"):
        if size is not None:
            file = _BoundedReader(file, size)
        super().__init__(file, encoding=encoding)
        self.memo = _Memo()
        self.budget = load_budget(size or 0) if budget is None else budget
        self.dispatch = dict(pickle._Unpickler.dispatch)
        self.dispatch[pickle.BUILD[0]] = SafeUnpickler._load_build
        self.dispatch[pickle.BINBYTES[0]] = SafeUnpickler._load_binbytes
        self.dispatch[pickle.BINBYTES8[0]] = SafeUnpickler._load_binbytes8
        self.dispatch[pickle.BYTEARRAY8[0]] = SafeUnpickler._load_bytearray8
        self._reader = file if isinstance(file, _BoundedReader) else None
        for op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2,
                   pickle.EXT4):
            self.dispatch[op[0]] = SafeUnpickler._refuse_opcode

    # -- budget and the stand-ins -----------------------------------------------------------------
    def _charge(self, n: int, what: str) -> None:
        self.budget -= int(n)
        if self.budget < 0:
            raise UnsafePickleError(f"{what} would allocate past the limit for this file (a file may allocate "
                                    f"{SIZE_FACTOR}x its size + {SIZE_FLOOR >> 20} MiB, at most "
                                    f"${MAX_BYTES_ENV} = {absolute_cap() / 2**30:.1f} GiB)")

    def _container(self, ctor, name: str, empty_ok: bool = True):
        def make(*args):
            if not args:
                return ctor()
            if len(args) != 1 or not isinstance(args[0], (list, tuple, set, frozenset, dict)):
                raise UnsafePickleError(f"{name}() called with {', '.join(type(a).__name__ for a in args)}; "
                                        "only an already-read list, tuple, set or dict is accepted")
            self._charge(64 * len(args[0]) + 64, f"{name}() of {len(args[0])} items")
            return ctor(args[0])
        return make

    def _scalar_ctor(self, ctor, name: str):
        def make(*args):
            if len(args) > 2 or not all(isinstance(a, (int, float, str, bytes, bool)) for a in args) \
                    or sum(len(a) for a in args if isinstance(a, (str, bytes))) > (1 << 16):
                raise UnsafePickleError(f"{name}() called with {args!r:.80}; expected numbers or a short string")
            if name in ("bytes", "bytearray", "str") and any(isinstance(a, int) for a in args):
                raise UnsafePickleError(f"{name}() called with a count {args!r:.40} (would allocate from a number)")
            return ctor(*args)
        return make

    def _bytes_ctor(self, ctor, name: str):
        def make(*args):
            if not args:
                return ctor()
            args = tuple(a.to_bytes() if isinstance(a, _Big) else a for a in args)
            data = args[0]
            if isinstance(data, str) and len(args) == 2 and args[1] in ("latin1", "latin-1"):
                data = data.encode("latin1")
            elif len(args) != 1 or not isinstance(data, (bytes, bytearray)):
                raise UnsafePickleError(f"{name}() called with {args!r:.60}; only bytes (or a latin-1 str) accepted")
            self._charge(len(data), f"{name}() of {len(data)} bytes")
            return ctor(data)
        return make

    def _encode(self, text="", encoding="latin1", *rest):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or rest:
            raise UnsafePickleError(f"_codecs.encode({type(text).__name__}, {encoding!r:.20}) is not how pickle "
                                    "writes bytes")
        self._charge(len(text), "bytes")
        return text.encode("latin1")

    def _reconstruct(self, cls=None, shape=None, code=None, *rest):
        if cls is not _NDARRAY or rest:
            raise UnsafePickleError("numpy _reconstruct of something other than a plain ndarray")
        return _Stub("array", None)

    def _dtype(self, code=None, align=False, copy=True, *rest):
        if rest or not isinstance(align, (bool, int)) or not isinstance(copy, (bool, int)) or align:
            raise UnsafePickleError(f"numpy.dtype({code!r:.40}, align={align!r:.10}) is not a plain dtype")
        _plain_dtype(code, "numpy.dtype")
        return _Stub("dtype", code)

    def _scalar(self, dtype=None, raw=None, *rest):
        dt = _dtype_of(dtype, "numpy scalar")
        if dt.kind == "O":
            raise UnsafePickleError("numpy object scalar refused")
        raw = _raw_bytes(raw, "numpy scalar")
        if rest or len(raw) != dt.itemsize:
            raise UnsafePickleError(f"numpy scalar of dtype {dt}: {len(raw)} bytes, expected {dt.itemsize}")
        return _check_text(np.frombuffer(bytes(raw), dt), "numpy scalar")[0].copy()

    def _frombuffer(self, buf=None, dtype=None, shape=None, order="C", *rest):
        if _dtype_of(dtype, "numpy array").kind == "O":
            raise UnsafePickleError("numpy object array from a raw buffer refused")
        return self._array(_shape(shape, "numpy array"), _dtype_of(dtype, "numpy array"), order == "F", buf)

    def _array(self, shape: tuple, dt: np.dtype, fortran: bool, raw) -> np.ndarray:
        n = 1
        for s in shape:
            n *= s
        if dt.kind == "O":  # items are values the stream already held (a list), never bytes read as pointers
            if not isinstance(raw, list) or len(raw) != n or not all(isinstance(v, _OBJECT_ITEMS) for v in raw):
                raise UnsafePickleError(f"numpy object array of shape {shape}: expected a list of {n} strings or "
                                        "numbers")
            self._charge(8 * n, f"numpy object array of shape {shape}")
            a = np.empty(n, dt)
            for i, v in enumerate(raw):
                a[i] = v
            a = a.reshape(shape)  # NumPy lists the items in C order, also for a Fortran-ordered array
            return np.asfortranarray(a) if fortran else a
        if isinstance(raw, _Big) and not raw.used:
            if n * dt.itemsize != raw.buf.size:
                raise UnsafePickleError(f"numpy array of shape {shape} and dtype {dt}: {raw.buf.size} bytes, "
                                        f"expected {n * dt.itemsize}")
            raw.used = True  # the array owns the buffer from now on; a second use copies
            return _check_text(raw.buf.view(dt).reshape(shape, order="F" if fortran else "C"), "numpy array")
        raw = _raw_bytes(raw, "numpy array")
        if n * dt.itemsize != len(raw):
            raise UnsafePickleError(f"numpy array of shape {shape} and dtype {dt}: {len(raw)} bytes, expected "
                                    f"{n * dt.itemsize}")
        self._charge(len(raw), f"numpy array of shape {shape}")
        a = np.frombuffer(raw, dt, count=n) if n else np.empty(0, dt)
        return _check_text(a.reshape(shape, order="F" if fortran else "C").copy(order="K"), "numpy array")

    def _long_bytes(self, n: int, mutable: bool):
        """Bytes of a length-prefixed opcode: the length checked against what the stream holds before
        anything is allocated; long strings outside a frame read straight into a NumPy buffer."""
        frame = self._unframer.current_frame
        in_frame = frame is not None and frame.tell() < len(frame.getbuffer())
        left = (len(frame.getbuffer()) - frame.tell()) if in_frame else (
            self._reader.left if self._reader is not None else None)
        if left is not None and n > left:
            raise EOFError(f"the stream declares {n} bytes where {left} are left (truncated, or a forged length)")
        if left is None:
            self._charge(n, f"a byte string of {n} bytes")
        if n >= _BIG and not in_frame and self._reader is not None:
            self._unframer.current_frame = None
            buf = np.empty(n, np.uint8)
            self._reader.readinto(memoryview(buf))
            return _Big(buf) if not mutable else bytearray(buf.tobytes())
        if mutable:
            b = bytearray(n)
            self.readinto(b)
            return b
        return self.read(n)

    def _load_binbytes(self):
        n, = struct.unpack("<I", self.read(4))
        self.append(self._long_bytes(n, False))

    def _load_binbytes8(self):
        n, = struct.unpack("<Q", self.read(8))
        self.append(self._long_bytes(n, False))

    def _load_bytearray8(self):
        n, = struct.unpack("<Q", self.read(8))
        self.append(self._long_bytes(n, True))

    def _refuse_opcode(self):
        raise UnsafePickleError("object-building opcode refused (INST/OBJ/NEWOBJ/EXT): data files only hold "
                                "plain containers and NumPy arrays")

    def _load_build(self):
        state = self.stack.pop()
        stub = self.stack[-1]
        if not isinstance(stub, _Stub) or stub.value is not None:
            raise UnsafePickleError(f"state set on a {type(stub).__name__} (only NumPy arrays and dtypes have a "
                                    "pickled state here)")
        if stub.kind == "dtype":
            stub.value = _finish_dtype(stub, state)
        else:
            if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
                raise UnsafePickleError(f"numpy array state {state!r:.80} is not (1, shape, dtype, fortran, data)")
            _, shape, dt, fortran, raw = state
            a = self._array(_shape(shape, "numpy array"), _dtype_of(dt, "numpy array"), bool(fortran), raw)
            if not a.dtype.isnative:  # what ndarray.__setstate__ does: values kept, native byte order
                a = a.astype(a.dtype.newbyteorder("="), order="K")
            stub.value = a
        self.stack[-1] = stub.value

    def find_class(self, module: str, name: str):  # noqa: D102 - see class docstring
        key = (module, name)
        if key not in ALLOWED_GLOBALS:
            raise UnsafePickleError(f"refused global '{module}.{name}' (only plain containers, numbers, strings "
                                    "and NumPy arrays are allowed: a pickle can run code when loaded)")
        if module in ("builtins", "__builtin__"):
            if name in ("list", "tuple", "set", "frozenset", "dict"):
                return self._container(_BUILTIN_TYPES[name], name)
            if name in ("bytes", "bytearray"):
                return self._bytes_ctor(_BUILTIN_TYPES[name], name)
            return self._scalar_ctor(_BUILTIN_TYPES[name], name)
        if key == ("collections", "OrderedDict"):
            return self._container(OrderedDict, "OrderedDict")
        if key == ("_codecs", "encode"):
            return self._encode
        if name == "_reconstruct":
            return self._reconstruct
        if name == "scalar":
            return self._scalar
        if name == "_frombuffer":
            return self._frombuffer
        if key == ("numpy", "dtype"):
            return self._dtype
        return _NDARRAY  # ("numpy", "ndarray"): only ever an argument of _reconstruct

    def persistent_load(self, pid):  # noqa: D102
        raise UnsafePickleError(f"refused persistent id {pid!r:.60}")

    def load(self):  # noqa: D102 - pickle.Unpickler.load, then the depth and stub checks
        obj = super().load()
        if isinstance(obj, _Big):
            return obj.to_bytes()
        return _check_tree(obj)


_NDARRAY = np.ndarray
_BUILTIN_TYPES = {"set": set, "frozenset": frozenset, "complex": complex, "bytearray": bytearray, "list": list,
                  "dict": dict, "tuple": tuple, "int": int, "float": float, "str": str, "bytes": bytes,
                  "bool": bool, "unicode": str, "long": int}


#: (module, name) pairs a pickle may name; each is served by a stand-in of :class:`SafeUnpickler`.
ALLOWED_GLOBALS = frozenset(
    {(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset", "complex", "bytearray", "list",
                                                            "dict", "tuple", "int", "float", "str", "bytes",
                                                            "bool")}
    | {("__builtin__", "unicode"), ("__builtin__", "long")}
    | {("collections", "OrderedDict"), ("_codecs", "encode")}  # protocol 2 writes bytes via _codecs.encode
    | {(m, n) for m in _NUMPY_CORE for n in ("_reconstruct", "scalar")}
    | {(m, "_frombuffer") for m in _NUMPY_NUMERIC}  # protocol-5 arrays
    | {("numpy", "ndarray"), ("numpy", "dtype")}
)


def _check_tree(obj):
    """Walk the loaded value without recursion: no stub left unfinished, nesting at most MAX_DEPTH."""
    todo = [(obj, 0)]
    seen = set()
    while todo:
        x, depth = todo.pop()
        if isinstance(x, _Stub):
            raise UnsafePickleError(f"a NumPy {x.kind} was never given its state")
        if isinstance(x, (list, dict)):  # long byte strings that were not array data become bytes
            for k, v in (x.items() if isinstance(x, dict) else enumerate(x)):
                if isinstance(v, _Big):
                    x[k] = v.to_bytes()
        elif isinstance(x, (tuple, set, frozenset)) and any(isinstance(v, _Big) for v in x):
            raise UnsafePickleError("a byte string of 1 MiB or more inside a tuple or set (data files hold "
                                    "long byte strings as array data only)")
        if isinstance(x, (list, tuple, set, frozenset, dict)):
            if depth >= MAX_DEPTH:
                raise UnsafePickleError(f"containers nested deeper than {MAX_DEPTH} levels (data files hold "
                                        "flat labels)")
            if id(x) in seen:
                continue
            seen.add(id(x))
            items = list(x.keys()) + list(x.values()) if isinstance(x, dict) else x
            todo.extend((v, depth + 1) for v in items)
    return obj


def safe_load(fh, *, size: int | None = None, budget: int | None = None) -> Any:
    """Unpickle from the binary file ``fh`` with :class:`SafeUnpickler` (``size``: bytes left in ``fh``,
    which bounds every read and sets the allocation budget)."""
    if size is None:
        try:
            size = os.fstat(fh.fileno()).st_size - fh.tell()
        except (AttributeError, OSError, io.UnsupportedOperation):
            size = None
    return SafeUnpickler(fh, size=size, budget=budget).load()


def safe_loads(data: bytes, *, budget: int | None = None) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`."""
    return safe_load(io.BytesIO(data), size=len(data), budget=budget)


def load_pickle(path, what: str = "pickle", *, max_bytes=None) -> Any:
    """Read the pickle at ``path`` safely (:class:`SafeUnpickler`); :class:`~nbsupport.data.DataError`
    naming the file and ``what`` it should be when it is missing, unreadable, refers to code, is forged
    or would allocate more than :func:`load_budget` allows (``max_bytes`` overrides the absolute cap,
    as ``$NBSUPPORT_MAX_LOAD_BYTES`` does)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} missing")
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            return safe_load(fh, size=size, budget=load_budget(size, max_bytes))
    except UnsafePickleError as e:
        raise DataError(f"{path}: {what} not loaded: {e}") from None
    except DataError as e:
        raise DataError(f"{path}: {what} not loaded: {e}") from None
    except RecursionError:
        raise DataError(f"{path}: {what} not loaded: nested too deep") from None
    except MemoryError:
        raise DataError(f"{path}: {what} not loaded: out of memory") from None
    except Exception as e:  # truncated stream, not a pickle, ...
        raise DataError(f"{path}: cannot read {what} ({type(e).__name__}: {str(e)[:300]})") from None


if sys.version_info < (3, 8):  # pragma: no cover - pickle._Unpickler's API is the 3.8+ one
    raise ImportError("nbsupport.data.safe_pickle needs Python 3.8 or newer")
