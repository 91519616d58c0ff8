"""minibn: batch normalization from scratch, on NumPy or CuPy, synchronized over MPI."""
from . import backend, functional, moments
from .backend import asnumpy, get_array_module, get_backend, set_backend, to_backend
from .io import load, save
from .nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, CrossEntropyLoss, Linear, Module,
                 Parameter, ReLU, SGD, Sequential)

__version__ = "0.1.0"

__all__ = [
    "backend", "functional", "moments",
    "asnumpy", "get_array_module", "get_backend", "set_backend", "to_backend",
    "load", "save",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "CrossEntropyLoss", "Linear", "Module",
    "Parameter", "ReLU", "SGD", "Sequential",
]
