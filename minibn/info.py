"""``python -m minibn info``: what minibn runs on here."""
from __future__ import annotations

import platform


def _version(mod_name):
    try:
        mod = __import__(mod_name)
        return getattr(mod, "__version__", "installed")
    except Exception:
        return "not installed"


def info_lines():
    from . import __version__
    from .backend import backend_name, cupy_available
    lines = [f"minibn       {__version__}",
             f"python       {platform.python_version()} ({platform.machine()})",
             f"numpy        {_version('numpy')}",
             f"matplotlib   {_version('matplotlib')}",
             f"cupy         {_version('cupy')}",
             f"torch        {_version('torch')} (optional oracle)",
             f"backend      {backend_name()} (MINIBN_BACKEND / minibn.set_backend)",
             f"GPU          {'yes (CuPy sees a CUDA device)' if cupy_available() else 'no'}"]
    try:
        from mpi4py import MPI
        lib = MPI.Get_library_version().strip().splitlines()[0]
        lines.append(f"mpi4py       {_version('mpi4py')}")
        lines.append(f"MPI library  {lib}")
        try:
            from .distributed import cuda_aware
            lines.append(f"CUDA-aware   {cuda_aware()}")
        except ImportError:
            pass
    except ImportError:
        lines.append("mpi4py       not installed (pip install 'minibn[mpi]' for SyncBatchNorm)")
    return lines
