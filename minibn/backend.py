"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

Two separate questions are answered here, and only here:

* *Which array module does the math use?*  Always the module of the arrays it
  is given: ``xp = get_array_module(x)``.  A kernel never asks which backend is
  "active"; a NumPy array is computed with NumPy and a CuPy array with CuPy.
* *Where are new arrays created?*  Parameters and buffers of a layer are created
  on the backend chosen once with :func:`set_backend` (or the environment
  variable ``MINIBN_BACKEND``), NumPy by default.
"""
from __future__ import annotations

import os

import numpy

__all__ = [
    "get_array_module", "set_backend", "get_backend", "backend_name",
    "asnumpy", "to_backend", "cupy_available", "is_cupy_array",
]

_BACKEND_NAMES = ("numpy", "cupy")
_active = None  # the module new arrays are created with; resolved lazily


def _import_cupy():
    """Import CuPy and check that a GPU is usable; raise one clear error otherwise."""
    try:
        import cupy  # noqa: F401  (optional dependency)
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "minibn: the 'cupy' backend needs CuPy, which is not installed "
            "(pip install 'minibn[gpu]', i.e. cupy-cuda12x)") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            f"minibn: CuPy is installed but no CUDA GPU is usable ({exc})") from exc
    if count < 1:  # pragma: no cover
        raise RuntimeError("minibn: CuPy is installed but no CUDA GPU was found")
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        _import_cupy()
    except RuntimeError:
        return False
    return True


def is_cupy_array(a) -> bool:
    """True for a CuPy ndarray, without importing CuPy."""
    return type(a).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays):
    """The array module (``numpy`` or ``cupy``) of the given arrays.

    Arrays that are ``None`` or Python scalars are ignored.  Mixing NumPy and
    CuPy arrays is an error, never a silent copy.
    """
    modules = set()
    for a in arrays:
        if a is None or isinstance(a, (int, float, bool, complex)):
            continue
        modules.add("cupy" if is_cupy_array(a) else "numpy")
    if len(modules) > 1:
        raise TypeError("minibn: got both NumPy and CuPy arrays in one call; "
                        "move them to one device first (minibn.to_backend)")
    if modules == {"cupy"}:
        import cupy
        return cupy
    return numpy


def set_backend(name: str):
    """Choose where new parameters and buffers are created: ``"numpy"`` or ``"cupy"``."""
    global _active
    if name not in _BACKEND_NAMES:
        raise ValueError(f"minibn: backend must be one of {_BACKEND_NAMES}, got {name!r}")
    _active = _import_cupy() if name == "cupy" else numpy
    return _active


def get_backend():
    """The module new arrays are created with (``MINIBN_BACKEND`` decides on first use)."""
    global _active
    if _active is None:
        set_backend(os.environ.get("MINIBN_BACKEND", "numpy").strip().lower() or "numpy")
    return _active


def backend_name() -> str:
    return get_backend().__name__


def asnumpy(a):
    """A NumPy copy (or view) of ``a``, wherever it lives."""
    if is_cupy_array(a):
        return a.get()
    return numpy.asarray(a)


def to_backend(a, dtype=None):
    """``a`` as an array of the active backend (copied to the GPU if needed)."""
    xp = get_backend()
    if xp is numpy:
        return numpy.asarray(asnumpy(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)
