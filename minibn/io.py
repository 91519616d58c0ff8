"""Saving and loading state dicts as ``.npz`` files, never with pickle.

A pickle file can run arbitrary code when it is loaded; an ``.npz`` of plain
numeric arrays cannot.  :func:`load` opens files with ``allow_pickle=False`` and
refuses object arrays, so a file that would need pickle is an error.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from .backend import asnumpy

__all__ = ["save", "load"]


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
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load(path) -> "OrderedDict[str, np.ndarray]":
    """Read a state dict written by :func:`save` (NumPy arrays, in file order)."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError(f"load: {path} is a single .npy array, not a state dict (.npz)")
            return OrderedDict((k, data[k]) for k in data.files)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ValueError(f"load: {path} contains object arrays that would need pickle; "
                             "minibn never unpickles (it could run arbitrary code)") from exc
        raise
