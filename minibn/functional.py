"""The math of batch normalization: pure functions, no state.

Read this file next to section 2 of the article, top to bottom: the training
forward (statistics, then normalize), the backward through the computational
graph, the same backward in closed form, the eval forward, the running
statistics, and ``batch_norm`` with PyTorch's signature.

Shapes: ``x`` is ``(N, C)`` or ``(N, C, *spatial)``; statistics are taken per
channel ``c`` over the ``m = N * prod(spatial)`` values of that channel, so
``mean``, ``var``, ``gamma`` and ``beta`` are ``(C,)``.

Forward (training)::

    mu      = mean(x)                      over the m values of each channel
    var     = mean((x - mu)^2)             biased: divide by m
    x_hat   = (x - mu) / sqrt(var + eps)
    y       = gamma * x_hat + beta

Backward, closed form (derived in ``batch_norm_backward_graph`` step by step)::

    dbeta   = sum(dy)
    dgamma  = sum(dy * x_hat)
    dx      = gamma / sqrt(var + eps) * (dy - dbeta / m - x_hat * dgamma / m)

Statistics are computed in float64 (see ``moments.py``); the element-wise work
is done in the input's dtype, so float32 in gives float32 out.  LayerNorm,
GroupNorm and InstanceNorm, batch norm on a reshaped view, are in
``sample_norms.py``; the layers that hold the state are in ``batchnorm.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .backend import get_array_module
from .checks import (check_channel_vector, check_eps, check_floating, check_momentum,
                     single_value_error)
from .moments import channel_moments, elementwise_dtype, plain_array, reduce_axes

__all__ = [
    "batch_norm_statistics", "normalize", "BNCache", "batch_norm_forward",
    "batch_norm_backward_graph", "batch_norm_backward", "batch_norm_eval_forward",
    "update_running_stats", "batch_norm", "batch_norm_with_cache",
    "channel_shape", "sum_float64", "elementwise_out_of_range", "gradient_in_input_dtype",
]


# =========================================================================== 2.1 training forward

def batch_norm_statistics(x):
    """Step 1: the count ``m``, mean and biased variance of each channel.

    x: (N, C) or (N, C, *spatial)
    returns (m, mean, var): m a Python int, mean and var (C,) float64 arrays

    ``m = N * prod(spatial)``; the variance divides by ``m`` (biased), as the
    normalization uses it.  Stable two-pass moments (``moments.channel_moments``).
    """
    return channel_moments(x, reduce_axes(x.ndim))


def normalize(x, mean, var, weight, bias, eps):
    """Steps 2 and 3: ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with given statistics.

    x: (N, C) or (N, C, *spatial)
    mean, var: (C,), any float dtype
    weight (gamma), bias (beta): (C,) or None (no scale, no shift)
    returns (y, x_hat, inv_std): y and x_hat of x's shape, inv_std (C,) float64

    A float64 mean is first rounded to the element-wise dtype (the *shift*);
    ``x - shift`` is then exact for values near the mean, and the rounding is
    removed per channel afterwards: ``x_hat = (x - shift) / std - (mean - shift) / std``.
    Without that last term a float32 input with ``|mean| >> std`` would be
    normalized around a mean that is off by up to half a float32 ulp of the mean.

    Where the element-wise dtype's range is too small for the numbers
    (:func:`elementwise_out_of_range`: float32 data near ``1e37`` and beyond) the
    work is done in float64: ``x_hat`` is then float64 and ``y`` is rounded to
    the input's dtype once, at the end.
    """
    if x.ndim >= 2 and x.size and elementwise_out_of_range(x.dtype, x.size // x.shape[1], var, weight, eps):
        y, x_hat, inv_std = normalize(x.astype(np.float64), mean, var, weight, bias, eps)
        return y.astype(x.dtype), x_hat, inv_std
    # >>> solution: bn_forward.normalize
    xp = get_array_module(x)
    dt = elementwise_dtype(x.dtype)
    inv_std = 1.0 / xp.sqrt(var.astype(np.float64) + eps)
    shift = mean.astype(dt, copy=False)
    x_hat = (x - _per_channel(shift, x.ndim, dt)) * _per_channel(inv_std, x.ndim, dt)
    if np.promote_types(mean.dtype, dt) != dt:        # the mean was rounded: remove the rounding
        x_hat -= _per_channel((mean - shift.astype(mean.dtype)) * inv_std, x.ndim, dt)
    y = x_hat
    if weight is not None:
        y = y * _per_channel(weight, x.ndim, dt)
    if bias is not None:
        y = y + _per_channel(bias, x.ndim, dt)
    if y is x_hat:
        y = x_hat.copy()  # the caller may modify y; x_hat is kept for backward
    return y.astype(x.dtype, copy=False), x_hat, inv_std
    # <<< solution: bn_forward.normalize


@dataclass
class BNCache:
    """What the backward pass needs from the forward pass.

    x, x_hat: (N, C, *) the input (the cache's own copy) and the normalized input
    mean, var, inv_std: (C,) float64 statistics and ``1/sqrt(var + eps)``
    weight: (C,) gamma, or None
    count: the m of the formulas (the *global* m for SyncBatchNorm)
    frozen: True when the statistics were constants (eval mode: running
    statistics), so the gradient does not flow through mean and variance
    """
    x: object
    x_hat: object
    mean: object
    var: object
    inv_std: object
    weight: object
    eps: float
    count: int
    frozen: bool = False

    def __post_init__(self):
        # the cache's own copy: editing the caller's x in place after the forward
        # must not change the backward (batch_norm_backward_graph reads x)
        self.x = plain_array(self.x).copy()

    @property
    def axes(self):
        return reduce_axes(self.x_hat.ndim)


def batch_norm_forward(x, weight=None, bias=None, eps: float = 1e-5, stats=None):
    """Training-mode forward with the statistics of this batch.

    x: (N, C) or (N, C, *spatial)
    weight, bias: (C,) or None
    stats: (m, mean, var) computed elsewhere (SyncBatchNorm passes the global
    ones), or None for this batch's (:func:`batch_norm_statistics`)
    returns (y, cache): y of x's shape and dtype, cache a :class:`BNCache`
    """
    eps = check_eps(eps)
    _check_bn_arguments(x, None, None, weight, bias)
    # >>> solution: bn_forward.stats
    count, mean, var = stats if stats is not None else batch_norm_statistics(x)
    if count <= 1:
        raise single_value_error(x.shape, detail=f"{count} value(s) per channel")
    y, x_hat, inv_std = normalize(x, mean, var, weight, bias, eps)
    return y, BNCache(x, x_hat, mean, var, inv_std, weight, eps, count)
    # <<< solution: bn_forward.stats


# =========================================================================== backward

def batch_norm_backward_graph(dy, cache: BNCache):
    """Backward by the computational graph, one node at a time (the student's derivation).

    dy: the gradient of the loss with respect to y, of y's shape
    returns (dx, dweight, dbias): dx of x's shape, float64; dweight and dbias
    (C,) float64, or None without affine parameters

    The forward is taken apart into the nodes below; each backward line is the
    chain rule through one node, in reverse order::

        mu   = mean(x)                 xc  = x - mu
        var  = mean(xc^2)              std = sqrt(var + eps)
        istd = 1 / std                 x_hat = xc * istd
        y    = gamma * x_hat + beta

    Everything here is float64; it is the reference the closed form is tested
    against, not the fast path.
    """
    if cache.frozen:
        raise ValueError("batch_norm_backward_graph is the training-mode derivation; "
                         "in eval mode the statistics are constants")
    dy = _check_dy(dy, cache)
    xp = get_array_module(dy)
    axes = cache.axes
    shape = channel_shape(dy.ndim)
    m = cache.count
    dy = dy.astype(np.float64)
    x = cache.x.astype(np.float64)
    mu = cache.mean.reshape(shape)
    xc = x - mu                                        # node: xc = x - mu
    std = xp.sqrt(cache.var.reshape(shape) + cache.eps)  # node: std = sqrt(var + eps)
    istd = 1.0 / std                                   # node: istd = 1 / std
    x_hat = xc * istd                                  # node: x_hat = xc * istd
    gamma = cache.weight.astype(np.float64).reshape(shape) if cache.weight is not None else 1.0

    # >>> solution: bn_backward_graph
    dbeta = dy.sum(axis=axes)                          # y = gamma * x_hat + beta
    dgamma = (dy * x_hat).sum(axis=axes)
    dx_hat = dy * gamma
    dxc = dx_hat * istd                                # x_hat = xc * istd  (path through xc)
    distd = (dx_hat * xc).sum(axis=axes, keepdims=True)  #                 (path through istd)
    dstd = -distd / std ** 2                           # istd = 1 / std
    dvar = dstd * 0.5 / std                            # std = sqrt(var + eps)
    dxc = dxc + dvar * 2.0 * xc / m                    # var = mean(xc^2)
    dmu = -dxc.sum(axis=axes, keepdims=True)           # xc = x - mu
    dx = dxc + dmu / m                                 # mu = mean(x)
    if cache.weight is None:
        return dx, None, None
    return dx, dgamma, dbeta
    # <<< solution: bn_backward_graph


def batch_norm_backward(dy, cache: BNCache, reduce=None):
    """Closed-form backward, training or eval (``cache.frozen``).

    dy: the gradient of the loss with respect to y, of y's shape
    reduce: None, or a function mapping the local per-channel
    ``(sum dy, sum dy*x_hat)`` to the global ones before they enter ``dx``
    (SyncBatchNorm passes an Allreduce here); not called in eval mode
    returns (dx, dweight, dbias): dx of x's shape and dtype; dweight and dbias
    (C,), the sums over *this* batch, or None without affine parameters

    ``dy`` of another float dtype than the forward's input is first cast to the
    input's dtype (PyTorch's autograd does the same), so ``dx`` has the input's
    dtype and the result equals that of ``dy.astype(x.dtype)``.
    """
    dy = _check_dy(dy, cache)
    # >>> solution: bn_backward
    axes = cache.axes
    local_dbias = sum_float64(dy, axes)
    local_dweight = sum_float64(dy * cache.x_hat, axes)
    sum_dy, sum_dy_xhat = local_dbias, local_dweight
    if reduce is not None and not cache.frozen:
        sum_dy, sum_dy_xhat = reduce(local_dbias, local_dweight)
    dt = elementwise_dtype(dy.dtype)
    gamma = cache.weight.astype(np.float64) if cache.weight is not None else 1.0
    scale = gamma * cache.inv_std                       # gamma / sqrt(var + eps), float64
    if cache.frozen:
        dx = dy * _per_channel(scale, dy.ndim, dt)
    else:
        m = cache.count
        dx = (dy - _per_channel(sum_dy / m, dy.ndim, dt)
               - cache.x_hat * _per_channel(sum_dy_xhat / m, dy.ndim, dt))
        dx *= _per_channel(scale, dy.ndim, dt)
    dx = dx.astype(dy.dtype, copy=False)
    if cache.weight is None:
        return dx, None, None
    return dx, local_dweight.astype(cache.weight.dtype), local_dbias.astype(cache.weight.dtype)
    # <<< solution: bn_backward


# =========================================================================== 2.2 eval forward

def batch_norm_eval_forward(x, mean, var, weight=None, bias=None, eps: float = 1e-5):
    """Forward with fixed statistics (inference: the running statistics).

    x: (N, C) or (N, C, *spatial)
    mean, var: (C,) the statistics to normalize with
    weight, bias: (C,) or None
    returns (y, cache): the cache is ``frozen``, so the backward treats the
    statistics as constants
    """
    eps = check_eps(eps)
    _check_bn_arguments(x, mean, var, weight, bias)
    count = x.size // max(x.shape[1], 1) if x.ndim >= 2 else 0
    y, x_hat, inv_std = normalize(x, mean, var, weight, bias, eps)
    return y, BNCache(x, x_hat, mean, var, inv_std, weight, eps, count, frozen=True)


# =========================================================================== 3. running statistics

def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float):
    """The article's EMA, in place: ``running <- (1 - a) running + a batch``.

    running_mean, running_var: (C,) buffers, updated in place (either may be None)
    mean, var: (C,) the batch's mean and *biased* variance over ``count`` values
    momentum: the article's alpha, the weight of the *new* batch (PyTorch's
    convention), a number in [0, 1]

    The running variance is updated with the unbiased batch variance,
    ``var * m / (m - 1)``, as PyTorch does.
    """
    if count < 2:
        raise ValueError(f"running statistics need more than 1 value per channel, got {count}")
    check_channel_vector(running_mean, len(mean), "running_mean")
    check_channel_vector(running_var, len(mean), "running_var")
    get_array_module(running_mean, running_var, mean, var)   # one device
    a = check_momentum(momentum, allow_none=False)
    _check_running_stats_fit(running_mean, running_var, mean, var, count, a)
    # >>> solution: running_stats
    unbiased_var = var * (count / (count - 1))
    if running_mean is not None:
        running_mean *= (1.0 - a)
        running_mean += (a * mean).astype(running_mean.dtype, copy=False)
    if running_var is not None:
        running_var *= (1.0 - a)
        running_var += (a * unbiased_var).astype(running_var.dtype, copy=False)
    # <<< solution: running_stats


def _check_running_stats_fit(running_mean, running_var, mean, var, count, a):
    """``OverflowError``, before anything is written, when a running statistic's new value
    does not fit its buffer's dtype (float32 data of magnitude 1e20 has a variance of
    1e40: exact in float64, infinite in a float32 ``running_var``)."""
    bessel = count / (count - 1)
    for name, buf, batch in (("running_mean", running_mean, mean), ("running_var", running_var, var * bessel)):
        if buf is None or not np.issubdtype(buf.dtype, np.floating) or buf.dtype == np.float64:
            continue
        xp = get_array_module(buf)
        with np.errstate(over="ignore", invalid="ignore"):
            step = xp.abs(a * batch)
            new = xp.abs((1.0 - a) * buf.astype(np.float64) + a * batch)
            limit = float(np.finfo(buf.dtype).max)
            too_big = (xp.isfinite(new) & (new > limit)) | (xp.isfinite(step) & (step > limit))
        if bool(xp.any(too_big)):
            worst = float(xp.max(xp.where(too_big, xp.maximum(new, step), 0.0)))
            raise OverflowError(
                f"{name} would overflow its dtype {buf.dtype}: the new value {worst:.3g} is beyond its "
                f"largest value {limit:.3g} (the batch statistics themselves are exact in float64). "
                f"Keep the running statistics in float64 (e.g. BatchNorm2d(C, dtype=np.float64)) or "
                f"rescale the input; nothing was updated")


# =========================================================================== PyTorch's signature

def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5):
    """Batch norm with PyTorch's ``torch.nn.functional.batch_norm`` signature.

    x: (N, C) or (N, C, *spatial)
    running_mean, running_var, weight, bias: (C,) or None
    returns y, of x's shape and dtype

    In training mode the batch statistics normalize ``x`` and, when given, the
    running statistics are updated in place.  Otherwise the running statistics
    normalize ``x`` (they must be given).
    """
    return batch_norm_with_cache(x, running_mean, running_var, weight, bias, training, momentum, eps)[0]


def batch_norm_with_cache(x, running_mean, running_var, weight=None, bias=None,
                          training: bool = False, momentum: Optional[float] = 0.1,
                          eps: float = 1e-5) -> Tuple[object, BNCache]:
    """:func:`batch_norm`, also returning the cache for :func:`batch_norm_backward`.

    ``momentum=None`` (the cumulative average) needs ``num_batches_tracked``,
    which only the layers keep: with running statistics to update it is a
    ``ValueError`` here (:func:`checks.check_momentum`).
    """
    eps = check_eps(eps)
    _check_bn_arguments(x, running_mean, running_var, weight, bias, names=("running_mean", "running_var"))
    if training:
        y, cache = batch_norm_forward(x, weight, bias, eps)
        if running_mean is not None or running_var is not None:
            update_running_stats(running_mean, running_var, cache.mean, cache.var, cache.count, momentum)
        return y, cache
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: eval mode needs running_mean and running_var")
    return batch_norm_eval_forward(x, running_mean, running_var, weight, bias, eps)


# =========================================================================== helpers

def channel_shape(ndim: int, channel_axis: int = 1):
    """Shape that broadcasts a per-channel vector ``(C,)`` against the input."""
    return tuple(-1 if a == channel_axis else 1 for a in range(ndim))


def _per_channel(v, ndim, dtype):
    """A per-channel vector (any dtype, possibly float64) as a broadcastable array."""
    return v.reshape(channel_shape(ndim)).astype(dtype, copy=False)


def sum_float64(a, axes):
    """Sum of ``a`` over ``axes``, accumulated in float64."""
    xp = get_array_module(a)
    return xp.sum(a, axis=axes, dtype=np.float64)


def _check_bn_arguments(x, mean, var, weight, bias, names=("mean", "var")):
    """Batch-norm input checks: a floating ``(N, C, *)`` input and ``(C,)`` vectors.

    ``names`` are the caller's names for the statistics (``running_mean``/``running_var``
    in :func:`batch_norm`), so that an error names the argument the user passed.
    """
    check_floating(x)
    if x.ndim < 2:
        raise ValueError(f"batch norm expects input of shape (N, C, *), got shape {tuple(x.shape)}")
    for v, what in ((mean, names[0]), (var, names[1]), (weight, "weight"), (bias, "bias")):
        check_channel_vector(v, x.shape[1], what)
    get_array_module(x, mean, var, weight, bias)      # one device: NumPy and CuPy are not mixed


def _check_dy(dy, cache: BNCache):
    """``dy`` checked and cast to the dtype of the forward's input (:func:`gradient_in_input_dtype`)."""
    return gradient_in_input_dtype(dy, cache.x_hat.shape, cache.x.dtype)


def gradient_in_input_dtype(dy, shape, dtype):
    """``dy`` checked against the forward's output ``shape`` and cast to the input's ``dtype``.

    The incoming gradient takes the dtype of the output it belongs to, as
    PyTorch's autograd does: float64 ``dy`` for a float32 forward gives the
    result of ``dy.astype(float32)``.  A finite value that does not fit that
    dtype (float64 ``dy`` beyond 65504 for float16) is an ``OverflowError``.
    """
    check_floating(dy, "dy")
    dy = plain_array(dy, "dy")
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected the forward output's shape "
                         f"{tuple(shape)}")
    if dy.dtype == dtype:
        return dy
    xp = get_array_module(dy)
    with np.errstate(over="ignore"):
        cast = dy.astype(dtype)
    if not bool(xp.isfinite(cast).all()) and bool(xp.isfinite(dy).all()):
        raise OverflowError(f"dy ({dy.dtype}) has values beyond the range of the forward input's dtype "
                            f"{np.dtype(dtype)} (max {np.finfo(dtype).max:g}), to which the gradient "
                            f"is cast; run the forward in float64")
    return cast


def elementwise_out_of_range(dtype, count, var, weight, eps) -> bool:
    """True when the element-wise work of a normalization may leave the range of ``dtype``.

    The element-wise passes compute in the input's dtype (float32 for float16).
    That is exact enough unless the numbers involved approach the ends of its
    range: deviations ``x - mean`` beyond ``max / 4`` (they are at most
    ``sqrt(count * var)``, ``var`` the biased variance of ``count`` values; not
    checked when ``count`` is None, for statistics not taken from ``x``), or a
    per-channel scale ``gamma / sqrt(var + eps)`` or ``1 / sqrt(var + eps)`` that
    is subnormal (digits lost) or beyond ``max / 4``.  float32 data of magnitude
    ``1e37`` and more trips it; the normalization is then done in float64.
    Channels with a non-finite variance (``inf``/``NaN`` in the data) are left out.
    """
    dt = elementwise_dtype(dtype)
    if dt == np.float64:
        return False
    info = np.finfo(dt)
    xp = get_array_module(var)
    var = var.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        finite = xp.isfinite(var)
        var = xp.where(finite, var, 0.0)
        inv_std = 1.0 / xp.sqrt(var + eps)
        scale = inv_std * xp.abs(weight.astype(np.float64)) if weight is not None else inv_std
        small, large = info.tiny * 16, info.max / 4
        bad = ((inv_std < small) | (inv_std > large)
               | ((scale != 0) & (scale < small)) | (xp.isfinite(scale) & (scale > large)))
        if count is not None:
            bad |= xp.sqrt(count * var) > large
    return bool(xp.any(finite & bad))
