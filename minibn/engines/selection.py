"""Which engine computes: the registry, the default, a context manager, and the choice for an input.

The choice for an input ``x`` (:func:`select_engine`), first match wins:

1. an explicit choice (a layer's ``engine`` attribute): a name or an :class:`Engine`;
2. the innermost ``with using_engine(name):`` block (per thread and task: a ContextVar);
3. the default for ``x``'s array module: NumPy arrays get ``MINIBN_KERNELS``
   (``numpy``, the default, ``numba`` or ``reference``; read once, at import),
   CuPy arrays the ``cupy`` engine (``reference`` when ``MINIBN_KERNELS=reference``);
   the ``cuda`` engine (numba CUDA kernels) only when named.

Engines are made once, on first use (their modules are imported then: ``numba``
and ``cupy`` are optional dependencies).
"""
from __future__ import annotations

import importlib
import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar

from ..backend import is_cupy_array
from .interface import Engine

__all__ = ["get_engine", "select_engine", "using_engine", "engine_names", "engine_available",
           "default_engine_name"]

# name -> (module in this package, class)
_REGISTRY = {
    "numpy": ("numpy_tiled", "NumpyEngine"),
    "numba": ("numba_loops", "NumbaEngine"),
    "reference": ("reference", "ReferenceEngine"),
    "cupy": ("cupy_fused", "CupyEngine"),
    "cuda": ("cuda_kernels", "CudaEngine"),
}
_ALIASES = {"": "numpy", "fast": "numpy", "ref": "reference"}
_CPU_ENGINES = ("numpy", "numba", "reference")       # what MINIBN_KERNELS may name
_WHY_UNAVAILABLE = {
    "numba": "numba is not installed; install it with `pip install minibn[jit]`, or select the numpy engine",
    "cupy": "CuPy is not installed or sees no GPU (`pip install minibn[gpu]`)",
    "cuda": ("numba's CUDA target, CuPy or a GPU is missing (`pip install minibn[gpu]`; on a machine "
             "without a GPU, NUMBA_ENABLE_CUDASIM=1 runs its kernels on NumPy arrays)"),
}
_engines = {}
_making = threading.Lock()


def engine_names() -> tuple:
    """The names of the known engines (available or not)."""
    return tuple(_REGISTRY)


def _canonical(name, where, known=tuple(_REGISTRY)):
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in known:
        raise ValueError(f"{where}: expected one of {', '.join(known)}, got {name!r}")
    return key


def _made(name) -> Engine:
    """The one instance of the engine ``name``, made (and its module imported) on first use."""
    engine = _engines.get(name)
    if engine is None:
        with _making:
            engine = _engines.get(name)
            if engine is None:
                module_name, class_name = _REGISTRY[name]
                try:
                    module = importlib.import_module(f"{__package__}.{module_name}")
                except ModuleNotFoundError as exc:
                    if exc.name != f"{__package__}.{module_name}":
                        raise                      # a dependency of the engine (numba, cupy) is missing
                    raise RuntimeError(f"the {name} engine is not part of this copy of minibn (the course's "
                                       "student copy has the reference engine only: functional.py)") from None
                engine = _engines[name] = getattr(module, class_name)()
    return engine


def engine_available(name) -> bool:
    """True when the engine ``name`` can run here (its dependencies import, a GPU for cupy)."""
    try:
        return _made(_canonical(name, "engine_available")).available()
    except RuntimeError:                           # not part of this copy
        return False


def get_engine(name) -> Engine:
    """The engine called ``name`` (an :class:`Engine` is returned as it is).

    ``ValueError`` for an unknown name, ``RuntimeError`` for an engine that cannot
    run here (numba not installed, no CuPy or GPU).
    """
    if isinstance(name, Engine):
        return name
    engine = _made(_canonical(name, "get_engine"))
    if not engine.available():
        raise RuntimeError(f"the {engine.name} engine was selected but {_WHY_UNAVAILABLE[engine.name]}")
    return engine


_DEFAULT = _canonical(os.environ.get("MINIBN_KERNELS", "numpy"), "MINIBN_KERNELS", _CPU_ENGINES)
_chosen = ContextVar("minibn_engine", default=None)


def default_engine_name() -> str:
    """The engine of NumPy arrays outside any ``using_engine`` block (``MINIBN_KERNELS``)."""
    return _DEFAULT


@contextmanager
def using_engine(name):
    """``with using_engine("reference"): ...`` computes the block's batch norms on that engine
    (for every array module: a NumPy-only engine given CuPy arrays raises ``TypeError``)."""
    token = _chosen.set(get_engine(name))
    try:
        yield _chosen.get()
    finally:
        _chosen.reset(token)


def select_engine(x, override=None) -> Engine:
    """The engine for input ``x``: ``override`` (a name or an Engine), else the innermost
    ``using_engine`` block, else the default for ``x``'s array module."""
    if override is not None:
        return get_engine(override)
    chosen = _chosen.get()
    if chosen is not None:
        return chosen
    if is_cupy_array(x) and _DEFAULT != "reference":
        return get_engine("cupy")
    return get_engine(_DEFAULT)
