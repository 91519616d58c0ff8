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
from .checks import (check_channel_vector, check_eps, check_floating, check_param_shape,
                     single_value_error)
from .moments import channel_moments, plain_array, reduce_axes

__all__ = [
    "BNCache", "check_floating", "check_channel_vector", "channel_shape", "batch_norm_forward",
    "batch_norm_eval_forward",
    "normalize", "batch_norm_backward", "batch_norm_backward_graph", "batch_norm",
    "update_running_stats", "elementwise_out_of_range", "gradient_in_input_dtype",
]


# --------------------------------------------------------------------------- helpers

def channel_shape(ndim: int, channel_axis: int = 1):
    """Shape that broadcasts a per-channel vector ``(C,)`` against the input."""
    return tuple(-1 if a == channel_axis else 1 for a in range(ndim))


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


def _per_channel(v, ndim, dtype):
    """A per-channel vector (any dtype, possibly float64) as a broadcastable array."""
    return v.reshape(channel_shape(ndim)).astype(dtype, copy=False)


def _elementwise_dtype(x):
    return np.promote_types(x.dtype, np.float32)


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
    dt = np.promote_types(dtype, np.float32)
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

    def __post_init__(self):
        # the cache's own copy: editing the caller's x in place after the forward
        # must not change the backward (batch_norm_backward_graph reads x)
        self.x = plain_array(self.x).copy()

    @property
    def axes(self):
        return reduce_axes(self.x_hat.ndim)


def normalize(x, mean, var, weight, bias, eps):
    """``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with given statistics.

    Returns ``(y, x_hat, inv_std)``; ``mean``/``var`` are per-channel (any float
    dtype), ``inv_std`` is returned in float64.

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
    dt = _elementwise_dtype(x)
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


# --------------------------------------------------------------------------- forward

def batch_norm_forward(x, weight=None, bias=None, eps: float = 1e-5, stats=None):
    """Training-mode forward with the statistics of this batch.

    ``stats`` lets a caller supply ``(count, mean, var)`` computed elsewhere
    (SyncBatchNorm passes the global ones); by default they are this batch's.
    Returns ``(y, cache)``.
    """
    eps = check_eps(eps)
    _check_bn_arguments(x, None, None, weight, bias)
    # >>> solution: bn_forward.stats
    count, mean, var = stats if stats is not None else channel_moments(x, reduce_axes(x.ndim))
    if count <= 1:
        raise single_value_error(x.shape, detail=f"{count} value(s) per channel")
    y, x_hat, inv_std = normalize(x, mean, var, weight, bias, eps)
    return y, BNCache(x, x_hat, mean, var, inv_std, weight, eps, count)
    # <<< solution: bn_forward.stats


def batch_norm_eval_forward(x, mean, var, weight=None, bias=None, eps: float = 1e-5):
    """Forward with fixed statistics (inference). Returns ``(y, cache)``."""
    eps = check_eps(eps)
    _check_bn_arguments(x, mean, var, weight, bias)
    count = x.size // max(x.shape[1], 1) if x.ndim >= 2 else 0
    y, x_hat, inv_std = normalize(x, mean, var, weight, bias, eps)
    return y, BNCache(x, x_hat, mean, var, inv_std, weight, eps, count, frozen=True)


# --------------------------------------------------------------------------- backward

def _sum(a, axes):
    """Per-channel sum, accumulated in float64."""
    xp = get_array_module(a)
    return xp.sum(a, axis=axes, dtype=np.float64)


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


def _check_dy(dy, cache: BNCache):
    """``dy`` checked and cast to the dtype of the forward's input (:func:`gradient_in_input_dtype`)."""
    return gradient_in_input_dtype(dy, cache.x_hat.shape, cache.x.dtype)


def batch_norm_backward(dy, cache: BNCache, reduce=None):
    """Closed-form backward.  Returns ``(dx, dweight, dbias)``.

    ``dweight``/``dbias`` are ``None`` when the layer has no affine parameters;
    otherwise they are the sums over *this* batch.  ``reduce``, if given, maps
    the local per-channel ``(sum dy, sum dy*x_hat)`` to the global ones before
    they enter ``dx`` (SyncBatchNorm passes an Allreduce here).

    ``dy`` of another float dtype than the forward's input is first cast to the
    input's dtype (PyTorch's autograd does the same), so ``dx`` has the input's
    dtype and the result equals that of ``dy.astype(x.dtype)``.
    """
    dy = _check_dy(dy, cache)
    # >>> solution: bn_backward
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
    # <<< solution: bn_backward


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


# --------------------------------------------------------------------------- running statistics

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


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float):
    """The article's EMA, in place: ``running <- (1 - a) running + a batch``.

    ``momentum`` is the article's alpha, the weight of the *new* batch (PyTorch's
    convention).  ``var`` is the biased batch variance; the running variance is
    updated with the unbiased one, ``var * m / (m - 1)``, as PyTorch does.
    """
    if count < 2:
        raise ValueError(f"running statistics need more than 1 value per channel, got {count}")
    check_channel_vector(running_mean, len(mean), "running_mean")
    check_channel_vector(running_var, len(mean), "running_var")
    get_array_module(running_mean, running_var, mean, var)   # one device
    a = float(momentum)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (the weight of the new batch), got {momentum!r}")
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
    eps = check_eps(eps)
    _check_bn_arguments(x, running_mean, running_var, weight, bias, names=("running_mean", "running_var"))
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


# =========================================================================== LayerNorm, GroupNorm, InstanceNorm
#
# Section 6.3 of the article: normalizations whose statistics never mix samples,
# so they need no synchronization and behave the same for any batch size.
#
# All three are batch norm on a reshaped view.  Put each group of values that
# shares one mean and one variance into a row: the input becomes a (1, R, m)
# view with R rows (batch norm's "channels") of m values each:
#
#     LayerNorm(shape)   R = prod(leading dims)   m = prod(normalized_shape)
#     GroupNorm(G)       R = N * G                m = (C / G) * prod(spatial)
#     InstanceNorm       R = N * C                m = prod(spatial)      (GroupNorm with G = C)
#
# x_hat and its backward are then exactly batch norm's without affine
# parameters (``normalize`` and ``batch_norm_backward`` above).  Only the affine
# step differs: gamma and beta belong to channels (GroupNorm, InstanceNorm) or
# to the elements of ``normalized_shape`` (LayerNorm), never to rows::
#
#     y      = gamma * x_hat + beta
#     dbeta  = sum(dy)            over every axis gamma is broadcast along
#     dgamma = sum(dy * x_hat)    over the same axes
#     dx     = batch-norm backward, on the row view, of g = dy * gamma

@dataclass
class RowNormCache:
    """What :func:`row_norm_backward` needs: the batch-norm cache of the row view
    and how gamma/beta are laid out against the input."""
    rows: BNCache              # cache of the (1, R, m) view; rows.mean/var are the (R,) statistics
    x_hat: object              # the normalized input, in the input's shape
    weight: object             # gamma (None without affine parameters)
    bias: object               # beta (None without it); only its shape and dtype are used
    param_shape: tuple         # shape gamma/beta are broadcast as against the input
    param_axes: tuple          # the input axes dgamma/dbeta are summed over


def _row_norm_forward(x, rows: int, m: int, weight, bias, param_shape, param_axes, eps):
    """Normalize each of ``rows`` consecutive chunks of ``m`` values, then scale and shift."""
    x3 = x.reshape(1, rows, m)
    count, mean, var = channel_moments(x3, (0, 2))           # float64, one per row
    _, x_hat3, inv_std = normalize(x3, mean, var, None, None, eps)
    x_hat = x_hat3.reshape(x.shape)
    dt = _elementwise_dtype(x)
    y = x_hat
    if weight is not None:
        y = y * weight.reshape(param_shape).astype(dt, copy=False)
    if bias is not None:
        y = y + bias.reshape(param_shape).astype(dt, copy=False)
    if y is x_hat:
        y = x_hat.copy()
    cache = RowNormCache(BNCache(x3, x_hat3, mean, var, inv_std, None, eps, count), x_hat, weight, bias,
                         tuple(param_shape), tuple(param_axes))
    return y.astype(x.dtype, copy=False), cache


def row_norm_backward(dy, cache: RowNormCache):
    """Backward of LayerNorm, GroupNorm and InstanceNorm (training statistics).

    Returns ``(dx, dweight, dbias)``; ``dweight``/``dbias`` are ``None`` for a
    missing parameter.  ``dy`` is cast to the input's dtype first, as in
    :func:`batch_norm_backward`.
    """
    dy = gradient_in_input_dtype(dy, cache.x_hat.shape, cache.rows.x.dtype)
    # >>> solution: ln_gn_backward
    dt = _elementwise_dtype(dy)
    dweight = dbias = None
    g = dy
    if cache.weight is not None:
        w = cache.weight
        dweight = _sum(dy * cache.x_hat, cache.param_axes).reshape(w.shape).astype(w.dtype)
        g = dy * w.reshape(cache.param_shape).astype(dt, copy=False)
    if cache.bias is not None:
        b = cache.bias
        dbias = _sum(dy, cache.param_axes).reshape(b.shape).astype(b.dtype)
    dx3, _, _ = batch_norm_backward(g.reshape(cache.rows.x_hat.shape), cache.rows)
    return dx3.reshape(dy.shape).astype(dy.dtype, copy=False), dweight, dbias
    # <<< solution: ln_gn_backward


def _normalized_shape(normalized_shape):
    """``int`` or sequence of ints to a non-empty tuple of non-negative ints."""
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else normalized_shape
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, "
                        f"got {normalized_shape!r}") from None
    if not shape or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
                        for s in shape):
        raise ValueError(f"normalized_shape must be a non-empty sequence of non-negative ints, "
                         f"got {normalized_shape!r}")
    return tuple(int(s) for s in shape)


# --------------------------------------------------------------------------- LayerNorm

def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """LayerNorm: statistics over the trailing ``normalized_shape`` axes of each sample.

    ``x`` has shape ``(*, *normalized_shape)``; ``weight``/``bias`` have shape
    ``normalized_shape`` (one value per normalized element).  Returns ``(y, cache)``.

    A ``normalized_shape`` of one element is a ``ValueError``: each row would be
    its own mean, and the output the bias whatever the input.  (Deliberate
    difference: PyTorch returns that output without a word.)
    """
    shape = _normalized_shape(normalized_shape)
    eps = check_eps(eps)
    check_floating(x, "LayerNorm input")
    k = len(shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(f"LayerNorm: normalized_shape={list(shape)} expects input of shape "
                         f"[*, {', '.join(map(str, shape))}], got input of shape {tuple(x.shape)}")
    check_param_shape(weight, shape, "weight", "LayerNorm")
    check_param_shape(bias, shape, "bias", "LayerNorm")
    m = int(np.prod(shape))
    if m == 1:
        raise single_value_error(x.shape, "value in normalized_shape", when="", detail=(
            f"normalized_shape={shape}: each row would be normalized over one value, so the "
            f"output would be the bias (0 without it) whatever the input"))
    rows = int(np.prod(x.shape[:x.ndim - k]))
    return _row_norm_forward(x, rows, m, weight, bias, shape, tuple(range(x.ndim - k)), eps)


def layer_norm_backward(dy, cache: RowNormCache):
    """``(dx, dweight, dbias)`` of :func:`layer_norm_forward`."""
    return row_norm_backward(dy, cache)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``torch.nn.functional.layer_norm``'s signature; returns ``y``."""
    return layer_norm_forward(x, normalized_shape, weight, bias, eps)[0]


# --------------------------------------------------------------------------- GroupNorm

def group_norm_forward(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """GroupNorm: the ``C`` channels of each sample split into ``num_groups`` groups of
    consecutive channels; statistics over each group's channels and spatial positions.

    ``x`` has shape ``(N, C, *)``; ``weight``/``bias`` have shape ``(C,)``.
    Returns ``(y, cache)``.

    One value per group (``C / num_groups * prod(spatial) == 1``) is a
    ``ValueError``, as batch norm's one value per channel is: the output would be
    the bias whatever the input.  (Deliberate difference: PyTorch raises only
    when the whole batch holds one value per group, ``N = 1``, and otherwise
    returns that output.)
    """
    eps = check_eps(eps)
    check_floating(x, "GroupNorm input")
    if x.ndim < 2:
        raise ValueError(f"GroupNorm expects input of shape (N, C, *), got shape {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if C % num_groups:
        raise ValueError(f"GroupNorm: the {C} channels of the input (shape {tuple(x.shape)}) must be "
                         f"divisible by num_groups ({num_groups})")
    check_param_shape(weight, (C,), "weight", "GroupNorm")
    check_param_shape(bias, (C,), "bias", "GroupNorm")
    rows = N * int(num_groups)
    m = (C // int(num_groups)) * int(np.prod(x.shape[2:]))
    if m == 1:
        raise single_value_error(x.shape, "value per group", when="", detail=(
            f"num_groups={num_groups}: each group holds one value, so the output would be the "
            f"bias (0 without it) whatever the input"))
    return _row_norm_forward(x, rows, m, weight, bias, channel_shape(x.ndim),
                             reduce_axes(x.ndim), eps)


def group_norm_backward(dy, cache: RowNormCache):
    """``(dx, dweight, dbias)`` of :func:`group_norm_forward`."""
    return row_norm_backward(dy, cache)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """``torch.nn.functional.group_norm``'s signature; returns ``y``."""
    return group_norm_forward(x, num_groups, weight, bias, eps)[0]


# --------------------------------------------------------------------------- InstanceNorm

def _check_spatial_size(x):
    spatial = int(np.prod(x.shape[2:]))
    if spatial == 1:
        raise single_value_error(x.shape, "spatial element", detail=(
            "instance norm takes its statistics over the spatial positions of each sample and channel"))


def instance_norm_forward(x, weight=None, bias=None, eps: float = 1e-5):
    """InstanceNorm with the statistics of each (sample, channel): GroupNorm with G = C.

    ``x`` has shape ``(N, C, *spatial)`` with more than one spatial element
    (``ValueError`` otherwise, as in PyTorch).  Returns ``(y, cache)``;
    ``cache.rows.mean``/``.var`` hold the ``N * C`` statistics, sample-major.
    """
    eps = check_eps(eps)
    check_floating(x, "InstanceNorm input")
    if x.ndim < 3:
        raise ValueError(f"InstanceNorm expects input of shape (N, C, *spatial), got shape "
                         f"{tuple(x.shape)}")
    check_param_shape(weight, (x.shape[1],), "weight", "InstanceNorm")
    check_param_shape(bias, (x.shape[1],), "bias", "InstanceNorm")
    _check_spatial_size(x)
    return group_norm_forward(x, x.shape[1], weight, bias, eps)


def instance_norm_backward(dy, cache):
    """``(dx, dweight, dbias)`` of :func:`instance_norm_with_cache` (either mode)."""
    if isinstance(cache, BNCache):          # running statistics: batch norm's eval backward
        return batch_norm_backward(dy, cache)
    return row_norm_backward(dy, cache)


def instance_norm_with_cache(x, running_mean=None, running_var=None, weight=None, bias=None,
                             use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5):
    """:func:`instance_norm`, also returning the cache for :func:`instance_norm_backward`."""
    eps = check_eps(eps)
    check_floating(x, "InstanceNorm input")
    if x.ndim >= 2:
        check_channel_vector(running_mean, x.shape[1], "running_mean")
        check_channel_vector(running_var, x.shape[1], "running_var")
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm: use_input_stats=False needs running_mean and running_var")
        return batch_norm_eval_forward(x, running_mean, running_var, weight, bias, eps)
    y, cache = instance_norm_forward(x, weight, bias, eps)
    if running_mean is not None or running_var is not None:
        N, C = x.shape[0], x.shape[1]
        if N > 0:
            # PyTorch's rule: each sample updates the running statistics as if it
            # were its own batch, which averages the per-sample statistics over N.
            mean = cache.rows.mean.reshape(N, C).mean(axis=0)
            var = cache.rows.var.reshape(N, C).mean(axis=0)
            update_running_stats(running_mean, running_var, mean, var, cache.rows.count, momentum)
    return y, cache


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5):
    """``torch.nn.functional.instance_norm``'s signature; returns ``y``.

    With ``use_input_stats`` each (sample, channel) is normalized with its own
    statistics, and the running statistics, when given, are updated in place
    with the average over the batch of the per-sample mean and unbiased
    variance.  Otherwise the running statistics normalize ``x``.
    """
    return instance_norm_with_cache(x, running_mean, running_var, weight, bias,
                                    use_input_stats, momentum, eps)[0]


__all__ += [
    "RowNormCache", "row_norm_backward",
    "layer_norm_forward", "layer_norm_backward", "layer_norm",
    "group_norm_forward", "group_norm_backward", "group_norm",
    "instance_norm_forward", "instance_norm_backward", "instance_norm_with_cache", "instance_norm",
]
