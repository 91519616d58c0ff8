"""``python -m minibn info``: what minibn runs on here."""
from __future__ import annotations

import os
import platform

from .engines import default_engine_name, num_threads


def _version(mod_name):
    """The installed version, read from the package metadata (fast: nothing is imported)."""
    from importlib import metadata, util
    try:
        return metadata.version(mod_name)
    except metadata.PackageNotFoundError:
        pass
    if util.find_spec(mod_name) is None:      # e.g. CuPy ships as cupy-cuda12x: import to ask it
        return "not installed"
    try:
        mod = __import__(mod_name)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:
        return f"installed but fails to import ({type(exc).__name__})"


def _gpu_line():
    """``yes (N x device name)`` when CuPy sees a CUDA device, else ``no (why)``."""
    from .backend import cupy_available
    if not cupy_available():
        why = "CuPy not installed" if _version("cupy") == "not installed" else "CuPy sees no CUDA device"
        return f"no ({why})"
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return f"yes ({n} x {name})"
    except Exception:  # pragma: no cover - depends on the machine
        return "yes (CuPy sees a CUDA device)"


def _mpi_lines():
    try:
        from mpi4py import MPI
    except ImportError:
        return ["mpi4py       not installed (pip install 'minibn[mpi]' for SyncBatchNorm)"]
    except Exception as exc:  # e.g. the MPI shared library cannot be loaded
        return [f"mpi4py       {_version('mpi4py')}, but MPI failed to load: {exc}"]
    lines = [f"mpi4py       {_version('mpi4py')}"]
    try:
        lib = MPI.Get_library_version().strip().splitlines()[0]
    except Exception as exc:  # pragma: no cover
        lib = f"unknown ({exc})"
    lines.append(f"MPI library  {lib}")
    try:
        from .distributed import cuda_aware
    except ImportError:
        lines.append("CUDA-aware   unknown (minibn.distributed is not available)")
    else:
        try:
            lines.append(f"CUDA-aware   {cuda_aware()}")
        except Exception as exc:
            lines.append(f"CUDA-aware   unknown ({type(exc).__name__}: {exc})")
    return lines


def info_lines():
    from . import __version__
    from .backend import backend_name
    lines = [f"minibn       {__version__}",
             f"python       {platform.python_version()} ({platform.machine()}, {platform.system()})",
             f"CPU cores    {os.cpu_count()}",
             f"numpy        {_version('numpy')}",
             f"matplotlib   {_version('matplotlib')}",
             f"tqdm         {_version('tqdm')}",
             f"cupy         {_version('cupy')}",
             f"numba        {_version('numba')} (optional numba engine)",
             f"torch        {_version('torch')} (optional oracle)"]
    try:
        lines.append(f"backend      {backend_name()} (MINIBN_BACKEND / minibn.set_backend)")
    except RuntimeError as exc:     # MINIBN_BACKEND=cupy on a machine without a usable GPU
        lines.append(f"backend      unusable: {exc}")
    lines.append(f"CPU engine   {default_engine_name()}, {num_threads()} thread(s) "
                 "(MINIBN_KERNELS = numpy | numba | reference; MINIBN_NUM_THREADS)")
    lines.append(f"GPU          {_gpu_line()}")
    lines.extend(_mpi_lines())
    return lines
