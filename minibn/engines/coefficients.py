"""What the fast engines share: per-channel float64 constants, the range guard, and the cache.

The fast engines compute the closed form of ``functional.py`` around
``d = x - s`` for a per-channel *shift* ``s`` (zero, or the mean rounded to
the input's dtype: ``x - s`` is then exact for values near the mean).  Per
channel, in float64::

    forward    y  = d * a + b               a = gamma / sqrt(var + eps),  b = beta - (mean - s) a
    backward   dx = k * (dy - c0 - c3 * d)  k = gamma / sqrt(var + eps)

The constants are computed here on ``C`` numbers (:func:`forward_coefficients`,
:func:`backward_coefficients`); the element-wise passes of each engine run in
the input's dtype.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..functional import BNCache, elementwise_out_of_range, normalize

__all__ = ["forward_coefficients", "backward_coefficients", "rounded_mean", "gradient_coefficients",
           "KernelCache", "NeedsFloat64", "check_sums", "check_range"]


# --------------------------------------------------------------------------- per-channel constants
# (C,) float64 vectors in, (C,) float64 vectors out; ``xp`` is the array module.

def forward_coefficients(xp, mean, var, shift, weight, bias, eps):
    """``y = (x - shift) * a + b`` equals ``gamma * (x - mean) / sqrt(var + eps) + beta``.

    Returns ``(inv_std, a, b)`` in float64.  ``shift`` is the per-channel value
    subtracted first (the mean rounded to the input dtype, or 0).
    """
    inv_std = 1.0 / xp.sqrt(var + eps)
    a = inv_std * weight.astype(np.float64) if weight is not None else inv_std
    b = -(mean - shift) * a
    if bias is not None:
        b = b + bias.astype(np.float64)
    return inv_std, a, b


def backward_coefficients(sum_dy, sum_dy_xhat, count, inv_std, delta, weight):
    """``dx = k * (dy - c0 - c3 * (x - shift))``, the closed form of ``functional``.

    ``sum_dy``/``sum_dy_xhat`` are the (possibly all-reduced) sums, ``delta`` is
    ``mean - shift``.  Returns ``(k, c0, c3)`` in float64.
    """
    k = inv_std * weight.astype(np.float64) if weight is not None else inv_std
    c3 = inv_std * sum_dy_xhat / count        # x_hat * sum_dy_xhat / m = c3 * (d - delta)
    c0 = sum_dy / count - c3 * delta
    return k, c0, c3


def rounded_mean(mean, dtype):
    """``(mean_t, delta)``: the float64 mean rounded to ``dtype``, and ``mean - mean_t``.

    Element-wise kernels that compute in the input's dtype subtract ``mean_t``
    (exact for values near the mean) and fold ``delta`` into their constants.
    """
    mean_t = mean.astype(dtype)
    return mean_t, mean - mean_t.astype(np.float64)


def gradient_coefficients(xp, cache, sum_dy, sum_dy_xhat, delta, reduce=None):
    """``(k, c0, c3)`` of the backward for ``cache``: ``dx = k * (dy - c0 - c3 * (x - shift))``.

    In eval mode (``cache.frozen``) the statistics are constants and
    ``dx = k * dy``: ``c0`` and ``c3`` are ``None``.  In training mode
    ``reduce`` (SyncBatchNorm) first maps the local ``(sum dy, sum dy * x_hat)``
    to the global ones.  ``delta`` is ``mean - shift``; ``xp`` the array module.
    """
    weight = cache.weight
    if cache.frozen:
        k = cache.inv_std * weight.astype(np.float64) if weight is not None else cache.inv_std
        return k, None, None
    if reduce is not None:
        sum_dy, sum_dy_xhat = reduce(sum_dy, sum_dy_xhat)
        sum_dy = xp.asarray(sum_dy, dtype=np.float64)
        sum_dy_xhat = xp.asarray(sum_dy_xhat, dtype=np.float64)
    return backward_coefficients(sum_dy, sum_dy_xhat, cache.count, cache.inv_std, delta, weight)


# --------------------------------------------------------------------------- out of range
# The element-wise passes and the float32 run sums work in the input's dtype.  Inputs
# whose numbers leave its range (float32 data near 1e19 and beyond: squares overflow;
# near 1e37: scales become subnormal) are handed to the reference engine, which forms
# what does not fit in float64 (moments.channel_moments, functional.normalize).

class NeedsFloat64(Exception):
    """Raised by a kernel, before it writes anything the caller sees, for such inputs."""


def _all_finite(*arrays):
    return all(bool(get_array_module(a).isfinite(a).all()) for a in arrays)


def check_sums(sums, *inputs):
    """``NeedsFloat64`` when float sums overflowed although every input is finite."""
    if not _all_finite(*sums) and _all_finite(*inputs):
        raise NeedsFloat64


def check_range(x, count, var, weight, eps):
    """``NeedsFloat64`` when normalizing ``x`` in its dtype could overflow or go subnormal."""
    if elementwise_out_of_range(x.dtype, count, var, weight, eps):
        raise NeedsFloat64


# --------------------------------------------------------------------------- the cache

class KernelCache(BNCache):
    """What a fast backward needs: ``x`` and the statistics, no ``x_hat``.

    ``x`` is the cache's own copy of the forward's input (the kernels write it
    in the forward's element-wise pass, while each tile is in cache): editing
    the caller's array after the forward does not change the backward.

    It is a :class:`functional.BNCache`, so the reference backward accepts it
    too: ``x_hat`` is then computed on first access, by ``functional.normalize``.
    """

    def __init__(self, x, mean, var, inv_std, weight, eps, count, frozen=False):
        self.x, self.mean, self.var, self.inv_std = x, mean, var, inv_std
        self.weight, self.eps, self.count, self.frozen = weight, eps, count, frozen
        self._x_hat = None

    @property
    def x_hat(self):
        if self._x_hat is None:
            self._x_hat = normalize(self.x, self.mean, self.var, None, None, self.eps)[1]
        return self._x_hat

    @x_hat.setter
    def x_hat(self, value):
        self._x_hat = value

    @property
    def shape(self):
        return tuple(self.x.shape)

    def __repr__(self):
        return (f"KernelCache(shape={self.shape}, dtype={self.x.dtype}, count={self.count}, "
                f"frozen={self.frozen})")
