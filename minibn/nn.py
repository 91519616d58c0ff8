"""The layers, in one namespace: ``minibn.nn.BatchNorm1d`` and the rest.

Where each one lives: the module system in ``module.py``, batch norm in
``batchnorm.py``, LayerNorm/GroupNorm/InstanceNorm in ``sample_norm_layers.py``,
Linear/ReLU/CrossEntropyLoss in ``layers.py``, SGD in ``optim.py``.
"""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .layers import CrossEntropyLoss, Linear, ReLU
from .module import Module, Parameter, Sequential
from .optim import SGD
from .sample_norm_layers import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm

__all__ = [
    "Parameter", "Module", "Sequential", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "Linear", "ReLU", "CrossEntropyLoss", "SGD",
    "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
]
