"""Argument rules shared by the layers and the functional API: one rule, one message each.

Every check raises with a message that names the argument, what was expected
and what was given.  ``TypeError`` means the kind of value is wrong (a list
where an array is needed, an integer array where floats are needed, a string
for ``eps``); ``ValueError`` means the kind is right but the value is not (a
negative ``eps``, a vector of the wrong length).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np

from .moments import plain_array

__all__ = [
    "check_eps", "check_momentum", "check_positive_int", "check_dtype_arg", "check_floating",
    "check_channel_vector", "check_param_shape", "check_state_array", "single_value_error",
    "FAST_DTYPES",
]

FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))   # the dtypes the fast engines compute in


def check_eps(eps) -> float:
    """``eps`` as a Python float, after checking that it is a finite real number > 0.

    Any real number type is accepted (Python ``int``/``float``, NumPy integer and
    floating scalars); ``bool`` is not.  ``eps = 0`` is refused: a constant
    channel (or group, or row) has variance 0 and would be divided by zero.
    """
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number (float or int), got {type(eps).__name__} {eps!r}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return value


def check_momentum(momentum, allow_none: bool = True, what: str = "momentum") -> Optional[float]:
    """``momentum`` as a Python float, after checking PyTorch's rule: a real number in ``[0, 1]``.

    The momentum is the weight of the *new* batch in the running statistics'
    average, ``running <- (1 - momentum) running + momentum batch``: 0 freezes
    them, 1 keeps only the last batch.  ``None`` is the cumulative average over
    ``num_batches_tracked`` batches; it is accepted where the caller keeps that
    counter (``allow_none``: BatchNorm*d, SyncBatchNorm) and refused elsewhere
    (the functional API, InstanceNorm, which does not count batches, and the
    momentum schedules, which compute a number).
    """
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= float(momentum) <= 1.0:
        or_none = " or None" if allow_none else ""
        why_not_none = ("; None, the cumulative average over num_batches_tracked, is a setting of "
                        "BatchNorm*d and SyncBatchNorm only" if momentum is None else "")
        raise ValueError(f"{what} must be a number in [0, 1]{or_none}, got {momentum!r} (the weight "
                         f"of the new batch){why_not_none}")
    return float(momentum)


def check_positive_int(value, what: str) -> int:
    """``value`` as a Python int, after checking that it is an integer >= 1 (``bool`` is not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_dtype_arg(dtype) -> np.dtype:
    """A layer's ``dtype`` argument as a NumPy dtype: float32 for ``None``, else a floating dtype."""
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return dtype


def check_floating(x, what: str = "input"):
    """Raise TypeError unless ``x`` is a real floating-point array (array subclasses:
    :func:`moments.plain_array`)."""
    plain_array(x, what)
    dtype = getattr(x, "dtype", None)
    if dtype is None or not hasattr(x, "shape") or not np.issubdtype(dtype, np.floating):
        raise TypeError(f"{what} must be a real floating-point array (float16/32/64), "
                        f"got {type(x).__name__} of dtype {dtype}")


def _shape_of(v):
    shape = getattr(v, "shape", None)
    return None if shape is None else tuple(shape)


def check_channel_vector(v, num_channels: int, what: str):
    """Raise ``ValueError`` unless ``v`` is ``None`` or an array of shape ``(num_channels,)``.

    Without this check a vector of the wrong length could broadcast silently
    (a ``(3,)`` gamma against a one-channel input gives three output channels).
    """
    if v is None:
        return
    plain_array(v, what)
    shape = _shape_of(v)
    if shape != (num_channels,):
        given = f"shape {shape}" if shape is not None else type(v).__name__
        raise ValueError(f"{what} must have shape ({num_channels},), one value per channel of the "
                         f"input, got {given}")


def check_param_shape(v, shape, what: str, owner: str):
    """Raise unless ``v`` is ``None`` or a floating array of exactly ``shape``.

    ``owner`` names the normalization (``"LayerNorm"``), ``what`` the argument.
    """
    if v is None:
        return
    check_floating(v, f"{owner} {what}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"{owner}: {what} must have shape {tuple(shape)}, got {tuple(v.shape)}")


def check_state_array(value, shape, what: str, floating: bool = True):
    """A parameter or buffer assigned to a layer: an array of ``shape``, floating
    (or, with ``floating=False``, integer, like ``num_batches_tracked``)."""
    dtype = getattr(value, "dtype", None)
    given = _shape_of(value)
    if dtype is None or given is None:
        raise TypeError(f"{what} must be an array of shape {tuple(shape)}, got {type(value).__name__}")
    kind_ok = (np.issubdtype(dtype, np.floating) if floating
               else np.issubdtype(dtype, np.integer) and dtype != np.bool_)
    if not kind_ok:
        raise TypeError(f"{what} must be {'a floating' if floating else 'an integer'} array, "
                        f"got dtype {dtype}")
    if given != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got shape {given}")


def single_value_error(input_shape, what: str = "value per channel", when: str = "when training",
                       detail: str = "") -> ValueError:
    """The error for statistics taken over a single value.

    One value has variance 0 and is its own mean, so the normalized output
    would be 0 (the bias, with affine parameters) whatever the input, and the
    gradient would be 0.  Batch norm in training, instance norm, group norm and
    layer norm all refuse it with this message::

        Expected more than 1 <what> <when>, got input of shape <shape> (<detail>)
    """
    when = f" {when}" if when else ""
    detail = f" ({detail})" if detail else ""
    return ValueError(f"Expected more than 1 {what}{when}, got input of shape "
                      f"{tuple(input_shape)}{detail}")
