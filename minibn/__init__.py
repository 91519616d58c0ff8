"""minibn: batch normalization from scratch, on NumPy or CuPy, synchronized over MPI."""
from . import backend, functional, moments, sample_norms
from .backend import asnumpy, get_array_module, get_backend, set_backend, to_backend
from .io import load, save
from .nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, CrossEntropyLoss, Linear, Module,
                 Parameter, ReLU, SGD, Sequential)
from . import momentum
from .precise import precise_bn

__version__ = "0.1.0"

__all__ = [
    "backend", "functional", "moments", "sample_norms",
    "asnumpy", "get_array_module", "get_backend", "set_backend", "to_backend",
    "load", "save",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "CrossEntropyLoss", "Linear", "Module",
    "Parameter", "ReLU", "SGD", "Sequential",
    "momentum", "precise_bn",
]

# section 6.3: normalizations that never mix samples
from .nn import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm  # noqa: E402
__all__ += ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm"]

# sections 5-6: SyncBatchNorm over MPI (mpi4py is imported only when a communicator is made)
from . import distributed  # noqa: E402
from .distributed import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402
__all__ += ["distributed", "SyncBatchNorm", "convert_sync_batchnorm"]
