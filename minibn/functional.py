"""The math of batch normalization: pure functions, no state.

Read this file next to section 2 of the article.  Shapes: ``x`` is
``(N, C)`` or ``(N, C, *spatial)``; statistics are taken per channel ``c`` over
the ``m = N * prod(spatial)`` values of that channel.

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
is done in the input's dtype, so float32 in gives float32 out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .backend import get_array_module
from .moments import channel_moments, reduce_axes

__all__ = [
    "BNCache", "check_floating", "channel_shape", "batch_norm_forward", "batch_norm_eval_forward",
    "normalize", "batch_norm_backward", "batch_norm_backward_graph", "batch_norm",
    "update_running_stats",
]


# --------------------------------------------------------------------------- helpers

def check_floating(x, what: str = "input"):
    """Raise TypeError unless ``x`` is a real floating-point array."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not np.issubdtype(dtype, np.floating):
        raise TypeError(f"{what} must be a real floating-point array (float16/32/64), "
                        f"got {type(x).__name__} of dtype {dtype}")


def channel_shape(ndim: int, channel_axis: int = 1):
    """Shape that broadcasts a per-channel vector ``(C,)`` against the input."""
    return tuple(-1 if a == channel_axis else 1 for a in range(ndim))


def _per_channel(v, ndim, dtype):
    """A per-channel vector (any dtype, possibly float64) as a broadcastable array."""
    return v.reshape(channel_shape(ndim)).astype(dtype, copy=False)


def _elementwise_dtype(x):
    return np.promote_types(x.dtype, np.float32)


@dataclass
class BNCache:
    """What the backward pass needs from the forward pass.

    ``mean``/``var`` are float64 per-channel statistics; ``inv_std`` is
    ``1/sqrt(var + eps)``; ``x_hat`` the normalized input; ``count`` the m of the
    formulas (the *global* m for SyncBatchNorm).  ``frozen`` is True when the
    statistics were constants (eval mode: running statistics), so the gradient
    does not flow through mean and variance.
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

    @property
    def axes(self):
        return reduce_axes(self.x_hat.ndim)


def normalize(x, mean, var, weight, bias, eps):
    """``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with given statistics.

    Returns ``(y, x_hat, inv_std)``; ``mean``/``var`` are per-channel (any float
    dtype), ``inv_std`` is returned in float64.
    """
    xp = get_array_module(x)
    dt = _elementwise_dtype(x)
    inv_std = 1.0 / xp.sqrt(var.astype(np.float64) + eps)
    x_hat = (x - _per_channel(mean, x.ndim, dt)) * _per_channel(inv_std, x.ndim, dt)
    y = x_hat
    if weight is not None:
        y = y * _per_channel(weight, x.ndim, dt)
    if bias is not None:
        y = y + _per_channel(bias, x.ndim, dt)
    if y is x_hat:
        y = x_hat.copy()  # the caller may modify y; x_hat is kept for backward
    return y.astype(x.dtype, copy=False), x_hat, inv_std


# --------------------------------------------------------------------------- forward

def batch_norm_forward(x, weight=None, bias=None, eps: float = 1e-5, stats=None):
    """Training-mode forward with the statistics of this batch.

    ``stats`` lets a caller supply ``(count, mean, var)`` computed elsewhere
    (SyncBatchNorm passes the global ones); by default they are this batch's.
    Returns ``(y, cache)``.
    """
    check_floating(x)
    if x.ndim < 2:
        raise ValueError(f"batch norm expects input of shape (N, C, *), got shape {tuple(x.shape)}")
    count, mean, var = stats if stats is not None else channel_moments(x, reduce_axes(x.ndim))
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(x.shape)} ({count} value(s) per channel)")
    y, x_hat, inv_std = normalize(x, mean, var, weight, bias, eps)
    return y, BNCache(x, x_hat, mean, var, inv_std, weight, eps, count)


def batch_norm_eval_forward(x, mean, var, weight=None, bias=None, eps: float = 1e-5):
    """Forward with fixed statistics (inference). Returns ``(y, cache)``."""
    check_floating(x)
    count = x.size // max(x.shape[1], 1) if x.ndim >= 2 else 0
    y, x_hat, inv_std = normalize(x, mean, var, weight, bias, eps)
    return y, BNCache(x, x_hat, mean, var, inv_std, weight, eps, count, frozen=True)


# --------------------------------------------------------------------------- backward

def _sum(a, axes):
    """Per-channel sum, accumulated in float64."""
    xp = get_array_module(a)
    return xp.sum(a, axis=axes, dtype=np.float64)


def batch_norm_backward(dy, cache: BNCache, reduce=None):
    """Closed-form backward.  Returns ``(dx, dweight, dbias)``.

    ``dweight``/``dbias`` are ``None`` when the layer has no affine parameters;
    otherwise they are the sums over *this* batch.  ``reduce``, if given, maps
    the local per-channel ``(sum dy, sum dy*x_hat)`` to the global ones before
    they enter ``dx`` (SyncBatchNorm passes an Allreduce here).
    """
    axes = cache.axes
    local_dbias = _sum(dy, axes)
    local_dweight = _sum(dy * cache.x_hat, axes)
    sum_dy, sum_dy_xhat = local_dbias, local_dweight
    if reduce is not None and not cache.frozen:
        sum_dy, sum_dy_xhat = reduce(local_dbias, local_dweight)
    dt = _elementwise_dtype(dy)
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


def batch_norm_backward_graph(dy, cache: BNCache):
    """Backward by the computational graph, one node at a time (the student's derivation).

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


# --------------------------------------------------------------------------- running statistics

def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float):
    """The article's EMA, in place: ``running <- (1 - a) running + a batch``.

    ``momentum`` is the article's alpha, the weight of the *new* batch (PyTorch's
    convention).  ``var`` is the biased batch variance; the running variance is
    updated with the unbiased one, ``var * m / (m - 1)``, as PyTorch does.
    """
    if count < 2:
        raise ValueError(f"running statistics need more than 1 value per channel, got {count}")
    a = float(momentum)
    unbiased_var = var * (count / (count - 1))
    if running_mean is not None:
        running_mean *= (1.0 - a)
        running_mean += (a * mean).astype(running_mean.dtype, copy=False)
    if running_var is not None:
        running_var *= (1.0 - a)
        running_var += (a * unbiased_var).astype(running_var.dtype, copy=False)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5):
    """Batch norm with PyTorch's ``torch.nn.functional.batch_norm`` signature.

    In training mode the batch statistics normalize ``x`` and, when given, the
    running statistics are updated in place.  Otherwise the running statistics
    normalize ``x`` (they must be given).  Returns ``y``.
    """
    return batch_norm_with_cache(x, running_mean, running_var, weight, bias, training, momentum, eps)[0]


def batch_norm_with_cache(x, running_mean, running_var, weight=None, bias=None,
                          training: bool = False, momentum: Optional[float] = 0.1,
                          eps: float = 1e-5) -> Tuple[object, BNCache]:
    """:func:`batch_norm`, also returning the cache for :func:`batch_norm_backward`."""
    if training:
        y, cache = batch_norm_forward(x, weight, bias, eps)
        if running_mean is not None or running_var is not None:
            if momentum is None:
                raise ValueError("batch_norm: momentum must be a number in [0, 1]; the cumulative "
                                 "average (momentum=None) needs num_batches_tracked: use BatchNorm*d")
            update_running_stats(running_mean, running_var, cache.mean, cache.var, cache.count, momentum)
        return y, cache
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: eval mode needs running_mean and running_var")
    return batch_norm_eval_forward(x, running_mean, running_var, weight, bias, eps)
