"""LayerNorm, GroupNorm and InstanceNorm: the math (section 6.3 of the article).

Normalizations whose statistics never mix samples, so they need no
synchronization and behave the same for any batch size.

All three are batch norm on a reshaped view.  Put each group of values that
shares one mean and one variance into a row: the input becomes a (1, R, m)
view with R rows (batch norm's "channels") of m values each::

    LayerNorm(shape)   R = prod(leading dims)   m = prod(normalized_shape)
    GroupNorm(G)       R = N * G                m = (C / G) * prod(spatial)
    InstanceNorm       R = N * C                m = prod(spatial)      (GroupNorm with G = C)

x_hat and its backward are then exactly batch norm's without affine
parameters (``functional.normalize`` and ``functional.batch_norm_backward``).
Only the affine step differs: gamma and beta belong to channels (GroupNorm,
InstanceNorm) or to the elements of ``normalized_shape`` (LayerNorm), never to
rows::

    y      = gamma * x_hat + beta
    dbeta  = sum(dy)            over every axis gamma is broadcast along
    dgamma = sum(dy * x_hat)    over the same axes
    dx     = batch-norm backward, on the row view, of g = dy * gamma
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checks import (check_channel_vector, check_eps, check_floating, check_param_shape,
                     check_positive_int, single_value_error)
from .functional import (BNCache, batch_norm_backward, batch_norm_eval_forward, channel_shape,
                         gradient_in_input_dtype, normalize, sum_float64, update_running_stats)
from .moments import channel_moments, elementwise_dtype, reduce_axes

__all__ = [
    "RowNormCache", "row_norm_backward", "normalized_shape_tuple",
    "layer_norm_forward", "layer_norm_backward", "layer_norm",
    "group_norm_forward", "group_norm_backward", "group_norm",
    "instance_norm_forward", "instance_norm_backward", "instance_norm_with_cache", "instance_norm",
]


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
    dt = elementwise_dtype(x.dtype)
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
    dt = elementwise_dtype(dy.dtype)
    dweight = dbias = None
    g = dy
    if cache.weight is not None:
        w = cache.weight
        dweight = sum_float64(dy * cache.x_hat, cache.param_axes).reshape(w.shape).astype(w.dtype)
        g = dy * w.reshape(cache.param_shape).astype(dt, copy=False)
    if cache.bias is not None:
        b = cache.bias
        dbias = sum_float64(dy, cache.param_axes).reshape(b.shape).astype(b.dtype)
    dx3, _, _ = batch_norm_backward(g.reshape(cache.rows.x_hat.shape), cache.rows)
    return dx3.reshape(dy.shape).astype(dy.dtype, copy=False), dweight, dbias
    # <<< solution: ln_gn_backward


def normalized_shape_tuple(normalized_shape):
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
    shape = normalized_shape_tuple(normalized_shape)
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
    check_positive_int(num_groups, "num_groups")
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

