"""HDF5 files (CMU-MultimodalSDK ``.csd``) read as data, never as pointers elsewhere (Chapter 2).

An HDF5 file can hold more than arrays: an *external link* makes a key open another file anywhere on
the disk, *external raw storage* and *virtual datasets* take a dataset's bytes from other files, a
*soft link* can dangle, and a dataset can declare a shape of gigabytes with nothing written (reading it
allocates the whole shape, filled with the fill value). :class:`SafeHdf5` walks the whole file once
before anything is read -- without following any link -- and refuses, with a
:class:`~nbsupport.data.DataError` naming the file and the key:

* external links (anywhere in the file), user-defined links, dangling soft links;
* datasets with external raw storage or a virtual layout;
* when read: a dataset whose declared size exceeds what the file stores for it (uncompressed), or the
  file's load budget (:func:`nbsupport.data.safe_pickle.load_budget`: 4x the file size + 64 MiB, at
  most ``$NBSUPPORT_MAX_LOAD_BYTES``), non-numeric or 0-d data where rows of numbers are expected, a
  datatype h5py cannot map, text that is not UTF-8, and variable-length strings whose global heap
  collection is damaged (HDF5 itself loops forever on some; :meth:`SafeHdf5._check_heap`);
* any other error HDF5 raises on a damaged file (RuntimeError, KeyError, ...) as a DataError.

Soft links inside the file are fine once the file has no external link (their targets resolve inside).
h5py (HDF5) itself stays trusted code, like the media decoders.
"""
from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np

from .common import DataError
from .safe_pickle import load_budget

__all__ = ["SafeHdf5", "open_hdf5"]

_NUMERIC = "biuf"


class SafeHdf5:
    """Checked read access to an open ``h5py.File`` ``fh`` of the file at ``path`` (see module docstring).

    Construction walks and checks every link; :meth:`read` reads one dataset within the budget."""

    def __init__(self, fh, path, *, max_bytes=None):
        self.fh, self.path = fh, Path(path)
        self.budget = load_budget(self.path.stat().st_size, max_bytes)
        self._key = ""
        try:
            self._check_links()
        except DataError:
            raise
        except Exception as e:  # HDF5's own errors on a damaged file: RuntimeError, KeyError, OSError, ...
            raise self._err(self._key or "/", f"damaged HDF5 structure ({type(e).__name__}: {str(e)[:200]})") \
                from None

    def _err(self, key: str, msg: str) -> DataError:
        return DataError(f"{self.path}: key '{key}': {msg}")

    def _check_links(self) -> None:
        soft = []
        seen = set()
        todo = [(self.fh["/"], "")]
        while todo:
            group, prefix = todo.pop()
            for name in group.keys():
                key = self._key = f"{prefix}/{name}"
                link = group.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    raise self._err(key.lstrip("/"), f"is an HDF5 external link to '{link.filename}:{link.path}' "
                                    "(a data file must not read other files)")
                if isinstance(link, h5py.SoftLink):
                    soft.append((key, link.path))
                    continue
                if not isinstance(link, h5py.HardLink):
                    raise self._err(key.lstrip("/"), f"is a {type(link).__name__} (only plain groups and datasets "
                                    "are read)")
                obj = group.get(name)
                if obj is None:
                    raise self._err(key.lstrip("/"), "cannot be opened (damaged object header)")
                addr = _address(obj)
                if isinstance(obj, h5py.Group):
                    if addr not in seen:
                        seen.add(addr)
                        todo.append((obj, key))
                elif isinstance(obj, h5py.Dataset):
                    self._check_storage(obj, key.lstrip("/"))
        for key, target in soft:
            try:
                ok = self.fh.get(target) is not None
            except (KeyError, ValueError, RuntimeError):
                ok = False
            if not ok:
                raise self._err(key.lstrip("/"), f"is a soft link to '{target}', which does not exist in the file "
                                "(dangling link)")

    def _check_storage(self, ds, key: str) -> None:
        plist = ds.id.get_create_plist()
        if plist.get_external_count() > 0:
            name = plist.get_external(0)[0]
            name = name.decode(errors="replace") if isinstance(name, bytes) else name
            raise self._err(key, f"stores its data in external file(s) such as '{name}' (HDF5 external raw "
                            "storage; a data file must not read other files)")
        if plist.get_layout() == h5py.h5d.VIRTUAL:
            raise self._err(key, "is a virtual dataset (its data comes from other files)")

    def read(self, ds, key: str, *, numeric: bool = True) -> np.ndarray:
        """The values of dataset ``ds`` (at ``key``, for messages) after checking its type and size:
        numbers only when ``numeric``; the declared size within what the file stores (uncompressed data)
        and within the file's remaining budget."""
        if not isinstance(ds, h5py.Dataset):
            raise self._err(key, f"expected a dataset, found a {type(ds).__name__}")
        try:
            dt, shape = ds.dtype, ds.shape
        except Exception as e:  # a datatype h5py cannot map (damaged type message), ...
            raise self._err(key, f"has a datatype that cannot be read ({type(e).__name__}: {str(e)[:200]})") \
                from None
        if numeric and (dt.kind not in _NUMERIC or dt.fields is not None or dt.subdtype is not None):
            raise self._err(key, f"holds {dt} values; expected numbers (integers or floats)")
        if dt.fields is not None or dt.kind not in _NUMERIC + "SUO":
            raise self._err(key, f"holds {dt} values; expected numbers or strings")
        if shape is None or len(shape) > 32 or (numeric and len(shape) < 1):
            raise self._err(key, f"has shape {shape}; expected an array of rows")
        count = 1
        for s in shape:
            count *= int(s)
        declared = count * dt.itemsize
        stored = ds.id.get_storage_size()
        filtered = ds.id.get_create_plist().get_nfilters() > 0
        if dt.kind != "O" and not filtered and declared > stored:
            raise self._err(key, f"declares shape {shape} of {dt} ({declared} bytes) but the file stores "
                            f"{stored} bytes for it (a declared shape with nothing written)")
        if dt.kind == "O":
            self._check_heap(ds, key, count)
        self.budget -= declared
        if self.budget < 0:
            raise self._err(key, f"declares shape {shape} of {dt} ({declared / 2**20:.1f} MiB), more than a file "
                            f"of {self.path.stat().st_size} bytes may allocate (4x its size + 64 MiB; "
                            "$NBSUPPORT_MAX_LOAD_BYTES raises the absolute cap)")
        try:
            value = ds[()]
        except Exception as e:  # HDF5 errors on damaged data: OSError, RuntimeError, ValueError, ...
            raise self._err(key, f"cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
        if not numeric:  # text must be UTF-8 (the SDK writes JSON strings)
            for item in (value.reshape(-1) if isinstance(value, np.ndarray) and value.dtype.kind in "OS" else [value]):
                if isinstance(item, bytes):
                    try:
                        item.decode("utf8")
                    except UnicodeDecodeError as e:
                        raise self._err(key, f"holds text that is not UTF-8 ({e})") from None
        return value


    def _check_heap(self, ds, key: str, count: int) -> None:
        """Variable-length strings (the SDK's metadata) live in HDF5 global heap collections; HDF5 itself
        loops forever on a collection whose size field is damaged (found by the fuzzer), so each element's
        collection is checked here first, from the file's bytes: signature ``GCOL``, version 1, a size
        within the file, and objects that tile it up to the element's object of at least its length.
        Checked for contiguous datasets of 16-byte references (what h5py writes); DataError otherwise."""
        plist = ds.id.get_create_plist()
        size = self.path.stat().st_size
        offset = ds.id.get_offset() if plist.get_layout() == h5py.h5d.CONTIGUOUS else None
        stored = ds.id.get_storage_size()
        if offset is None or count == 0 or stored != 16 * count or count > 100_000:
            if count:
                raise self._err(key, "holds variable-length strings in a layout this reader does not check "
                                "(expected a contiguous array of strings, as h5py writes metadata)")
            return
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            refs = fh.read(stored)
            for j in range(count):
                length, addr, index = struct.unpack_from("<IQI", refs, 16 * j)
                if length and not _heap_object_fits(fh, addr, index, length, size):
                    raise self._err(key, f"string {j} points into a damaged HDF5 global heap (address {addr})")


def _heap_object_fits(fh, addr: int, index: int, length: int, file_size: int) -> bool:
    """True when the global heap collection at ``addr`` is well formed -- its objects tile it, the free
    space (object 0) spans exactly the rest -- and object ``index`` holds at least ``length`` bytes
    (HDF5 file format spec, "Global Heap")."""
    if addr + 16 > file_size:
        return False
    fh.seek(addr)
    head = fh.read(16)
    if head[:4] != b"GCOL" or head[4] != 1:
        return False
    coll = struct.unpack_from("<Q", head, 8)[0]
    if coll < 4096 or addr + coll > file_size:
        return False
    pos, end, found = addr + 16, addr + coll, False
    while pos + 16 <= end:
        fh.seek(pos)
        idx, _, _, osize = struct.unpack("<HHIQ", fh.read(16))
        if idx == 0:  # free space: exactly the rest of the collection, header included
            return found and osize == end - pos
        if osize > end - pos - 16:
            return False
        found = found or (idx == index and osize >= length)
        pos += 16 + ((osize + 7) // 8) * 8
    return found


def _address(obj):
    info = h5py.h5o.get_info(obj.id)
    return getattr(info, "token", None) or getattr(info, "addr", None) or id(obj)


def open_hdf5(path, what: str = "HDF5 file"):
    """``(h5py.File, SafeHdf5)`` for the file at ``path``, links checked; DataError naming the file when
    it is missing or not HDF5. Close the file (``with``) when done."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} missing")
    try:
        fh = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not an HDF5 {what} ({e})") from None
    try:
        return fh, SafeHdf5(fh, path)
    except BaseException:
        fh.close()
        raise
