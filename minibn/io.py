"""Saving and loading state dicts as ``.npz`` files, never with pickle.

A pickle file can run arbitrary code when it is loaded; an ``.npz`` of plain
numeric arrays cannot.  :func:`save` writes each array in NumPy's ``.npy``
format (with ``allow_pickle=False``) into a zip archive; :func:`load` opens files
with ``allow_pickle=False``, so a file that would need pickle is an error.

The archive is written entry by entry (rather than with ``numpy.savez``) for two
reasons: any key is allowed (``numpy.savez(file, **arrays)`` cannot take a key
named ``file`` and silently drops one named ``allow_pickle``), and the bytes are
reproducible (every entry carries the same fixed timestamp).
"""
from __future__ import annotations

import os
import zipfile
from collections import OrderedDict

import numpy as np

from .backend import asnumpy

__all__ = ["save", "load"]

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)   # the earliest date a zip entry can carry


def save(path, state_dict) -> str:
    """Write ``state_dict`` (name -> array) to ``path`` (``.npz``); returns the path written."""
    arrays = OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"save: state dict keys must be non-empty strings, got {key!r}")
        a = np.asarray(asnumpy(value))
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise TypeError(f"save: {key!r} has dtype {a.dtype}; only numeric arrays can be saved")
        arrays[key] = a
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=_FIXED_DATE)
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    return path


def load(path) -> "OrderedDict[str, np.ndarray]":
    """Read a state dict written by :func:`save` (NumPy arrays, in file order)."""
    try:
        data = np.load(os.fspath(path), allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"load: {path} holds a single array (.npy), not a state dict (.npz); "
                             "expected a file written by minibn.save")
        with data:
            return OrderedDict((k, data[k]) for k in data.files)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ValueError(f"load: {path} can only be read with pickle (object arrays or a pickled "
                             "object); expected plain numeric arrays: minibn never unpickles, "
                             "since unpickling can run arbitrary code") from exc
        raise
