"""Reading pickles without running code from them (Chapter 2's data contract, *Running on your data*).

A pickle is a program: its ``GLOBAL``/``REDUCE`` opcodes import any callable and call it while loading,
so ``pickle.load`` on a downloaded ``meta.pkl`` can run anything. The data formats the book reads --
the MESM raw layout's ``meta.pkl``, UMONS's pre-extracted ``{split}_*.p`` and the synthetic corpus'
``cue.pkl`` -- only ever hold plain containers, numbers, strings and NumPy arrays, so
:class:`SafeUnpickler` rebuilds exactly those and refuses every other global with
:class:`UnsafePickleError` (nothing is imported or called). Every pickle loader of the data package
goes through :func:`load_pickle`.

Hand-written because no maintained library offers an allow-list unpickler for NumPy data; the
standard library documents this pattern ("Restricting Globals", ``pickle.Unpickler.find_class``).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from .common import DataError

__all__ = ["SafeUnpickler", "UnsafePickleError", "safe_load", "safe_loads", "load_pickle", "ALLOWED_GLOBALS"]

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # NumPy 1.x and 2.x module names

#: (module, name) pairs a pickle may refer to: builtin containers/numbers and what NumPy needs to rebuild
#: an ndarray, a dtype or a NumPy scalar. None of them runs code beyond building that value.
ALLOWED_GLOBALS = frozenset(
    {("builtins", n) for n in ("set", "frozenset", "complex", "bytearray", "list", "dict", "tuple", "int",
                               "float", "str", "bytes", "bool", "slice", "range")}
    | {("__builtin__", n) for n in ("set", "frozenset", "complex", "bytearray", "list", "dict", "tuple", "int",
                                    "float", "str", "bytes", "bool", "slice", "xrange", "unicode", "long")}
    | {("collections", "OrderedDict"), ("_codecs", "encode")}  # protocol 2 writes bytes via _codecs.encode
    | {(m, n) for m in _NUMPY_CORE for n in ("_reconstruct", "scalar")}
    | {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}  # protocol-5 arrays
    | {("numpy", "ndarray"), ("numpy", "dtype")}
    | {("numpy.dtypes", n) for n in ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType",
                                     "Int32DType", "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType",
                                     "UInt64DType", "BoolDType", "StrDType", "BytesDType")}
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle refers to a global outside :data:`ALLOWED_GLOBALS` (it could run code when loaded)."""


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that rebuilds plain containers, numbers, strings and NumPy arrays/dtypes/scalars
    only; any other class or function in the stream raises :class:`UnsafePickleError` before it is imported
    (data files of Chapter 2 never need more). Python 2 pickles are read with ``encoding="latin1"``, the
    setting NumPy documents for arrays pickled by Python 2."""

    def __init__(self, file, *, encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)

    def find_class(self, module: str, name: str):  # noqa: D102 - see class docstring
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refused global '{module}.{name}' (only plain containers, numbers, strings "
                                "and NumPy arrays are allowed: a pickle can run code when loaded)")

    def persistent_load(self, pid):  # noqa: D102
        raise UnsafePickleError(f"refused persistent id {pid!r}")


def safe_load(fh) -> Any:
    """Unpickle from the binary file ``fh`` with :class:`SafeUnpickler`."""
    return SafeUnpickler(fh).load()


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`."""
    return safe_load(io.BytesIO(data))


def load_pickle(path, what: str = "pickle") -> Any:
    """Read the pickle at ``path`` safely (:class:`SafeUnpickler`); :class:`~nbsupport.data.DataError`
    naming the file and ``what`` it should be when it is missing, unreadable or refers to code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} missing")
    try:
        with open(path, "rb") as fh:
            return safe_load(fh)
    except UnsafePickleError as e:
        raise DataError(f"{path}: {what} not loaded: {e}") from None
    except Exception as e:  # truncated stream, not a pickle, ...
        raise DataError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
