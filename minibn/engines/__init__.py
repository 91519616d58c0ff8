"""Engines: what computes batch norm, chosen once per call, behind one interface.

=============  =========================================================================
``reference``  ``functional.py`` itself: the readable math, any array module and dtype
``numpy``      tiled NumPy kernels (the default for NumPy arrays; inputs of fewer than
               16384 elements, empty ones and other dtypes go to ``reference``)
``numba``      compiled loops (optional: ``pip install minibn[jit]``)
``cupy``       fused CuPy kernels (the default for CuPy arrays)
``cuda``       numba CUDA kernels: CuPy arrays on a GPU (``numba-cuda``), NumPy arrays
               under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``: how CI runs them)
=============  =========================================================================

Selection: ``select_engine(x, override)`` (see :mod:`.selection`), ``with
using_engine(name): ...``, the ``MINIBN_KERNELS`` environment variable, and a
layer's ``engine`` attribute.  The NumPy engine's threads and buffers:
:func:`num_threads`, :func:`set_num_threads`, :func:`release_buffers`,
:func:`no_output_recycling`.
"""
from .interface import Engine
from .selection import (default_engine_name, engine_available, engine_names, get_engine, select_engine,
                        using_engine)
from .workspace import no_output_recycling, num_threads, release_buffers, set_num_threads

__all__ = ["Engine", "get_engine", "select_engine", "using_engine", "engine_names", "engine_available",
           "default_engine_name", "num_threads", "set_num_threads", "release_buffers", "no_output_recycling"]
