"""The float64 reference: batch, layer and group norm written from the article's formulas.

Nothing here imports minibn: this is an independent second implementation
(plain NumPy, float64, two-pass statistics: the mean first, then the mean of
squared deviations).  The grader compares student code with it, in the grading
subprocess next to the student's package; the test suite compares minibn with
it.  It lives with the grader because a course copy leaves ``grading/`` out.
"""
from __future__ import annotations

import numpy as np

__all__ = ["channel_axes", "channel_shape", "two_pass", "bn_stats", "bn_forward", "bn_backward", "ema",
           "bn_running", "numerical_gradient", "ln_forward", "ln_backward", "gn_forward", "gn_backward"]


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def channel_axes(ndim):
    """The axes a batch statistic reduces over: every axis of an ``(N, C, *)`` array but the channel axis 1."""
    return (0,) + tuple(range(2, ndim))


def channel_shape(ndim):
    """``(1, -1, 1, ...)``: the shape that makes a ``(C,)`` vector broadcast along axis 1 of ``ndim`` axes."""
    return (1, -1) + (1,) * (ndim - 2)


def _channel(v, ndim):
    """A ``(C,)`` vector shaped to broadcast along axis 1 of an ``ndim``-D array."""
    return np.asarray(v, dtype=np.float64).reshape(channel_shape(ndim))


def two_pass(x, axes):
    """``(count, mean, biased var)`` of ``x`` over ``axes`` in float64: mean first, then squared deviations."""
    x = _f64(x)
    axes = tuple(axes)
    count = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return count, mean, var


def bn_stats(x):
    """Per-channel ``(m, mean (C,), biased var (C,))`` of an ``(N, C, *)`` array."""
    m, mean, var = two_pass(x, channel_axes(np.ndim(x)))
    return m, mean.reshape(-1), var.reshape(-1)


def bn_forward(x, gamma=None, beta=None, eps=1e-5, stats=None):
    """Article 2.1 in float64. Returns a dict: y, x_hat, mean, var, inv_std, count."""
    x64 = _f64(x)
    m, mean, var = bn_stats(x64) if stats is None else (int(stats[0]), _f64(stats[1]).reshape(-1),
                                                         _f64(stats[2]).reshape(-1))
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x64 - _channel(mean, x64.ndim)) * _channel(inv_std, x64.ndim)
    y = x_hat
    if gamma is not None:
        y = y * _channel(gamma, x64.ndim)
    if beta is not None:
        y = y + _channel(beta, x64.ndim)
    return {"y": y, "x_hat": x_hat, "mean": mean, "var": var, "inv_std": inv_std, "count": m}


def bn_backward(dy, x_hat, inv_std, gamma, count, frozen=False, sums=None):
    """Gradients of ``L = sum(dy * y)`` with respect to ``x``, gamma and beta (float64).

    With batch statistics, ``x`` reaches ``y`` three ways (directly, through the
    mean and through the variance), which gives
    ``dx = gamma * inv_std / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))``.
    ``sums`` replaces the two per-channel sums by global ones (SyncBN); with
    frozen statistics only the direct path is left.
    """
    dy, x_hat = _f64(dy), _f64(x_hat)
    axes = channel_axes(dy.ndim)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    g = np.ones_like(dbeta) if gamma is None else _f64(gamma).reshape(-1)
    scale = _channel(g * _f64(inv_std).reshape(-1), dy.ndim)
    if frozen:
        dx = scale * dy
    else:
        s_dy, s_dyx = (dbeta, dgamma) if sums is None else (_f64(sums[0]), _f64(sums[1]))
        dx = scale / count * (count * dy - _channel(s_dy, dy.ndim) - x_hat * _channel(s_dyx, dy.ndim))
    return dx, dgamma, dbeta


def ema(running, batch, alpha):
    """One step of the article's 3.2: ``(1 - alpha) * running + alpha * batch``."""
    return (1.0 - alpha) * _f64(running) + alpha * _f64(batch)


def bn_running(batches, momentum, mean0=None, var0=None):
    """Running ``(mean, var)`` after training steps on ``batches`` (article 3.2), from ``(0, 1)``
    or ``(mean0, var0)``: an EMA of the batch mean and the *unbiased* batch variance, with
    ``alpha = momentum``, or ``alpha = 1 / t`` at step ``t`` (the cumulative average) for ``None``."""
    channels = np.shape(batches[0])[1]
    mean = np.zeros(channels) if mean0 is None else _f64(mean0)
    var = np.ones(channels) if var0 is None else _f64(var0)
    for step, x in enumerate(batches, start=1):
        m, batch_mean, batch_var = bn_stats(x)
        alpha = 1.0 / step if momentum is None else momentum
        mean, var = ema(mean, batch_mean, alpha), ema(var, batch_var * m / (m - 1), alpha)
    return mean, var


def numerical_gradient(f, x, h=1e-6):
    """Central differences of the scalar ``f()`` with respect to the float64 array ``x`` (perturbed in place)."""
    grad = np.zeros(x.shape)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
    return grad


# --------------------------------------------------------------------------- layer and group norm

def ln_forward(x, normalized_ndim, gamma=None, beta=None, eps=1e-5):
    """LayerNorm over the last ``normalized_ndim`` axes. Returns dict: y, x_hat, mean, var, inv_std, count."""
    x64 = _f64(x)
    axes = tuple(range(x64.ndim - normalized_ndim, x64.ndim))
    m, mean, var = two_pass(x64, axes)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x64 - mean) * inv_std
    y = x_hat
    if gamma is not None:
        y = y * _f64(gamma)
    if beta is not None:
        y = y + _f64(beta)
    return {"y": y, "x_hat": x_hat, "mean": mean, "var": var, "inv_std": inv_std, "count": m}


def _per_sample_backward(g, x_hat, inv_std, axes):
    """``dx`` when ``x_hat`` is normalized over ``axes`` and ``g = dL/dx_hat``."""
    return inv_std * (g - g.mean(axis=axes, keepdims=True)
                      - x_hat * (g * x_hat).mean(axis=axes, keepdims=True))


def ln_backward(dy, x_hat, inv_std, normalized_ndim, gamma=None):
    dy, x_hat = _f64(dy), _f64(x_hat)
    axes = tuple(range(dy.ndim - normalized_ndim, dy.ndim))
    batch_axes = tuple(range(dy.ndim - normalized_ndim))
    g = dy if gamma is None else dy * _f64(gamma)
    dx = _per_sample_backward(g, x_hat, _f64(inv_std), axes)
    return dx, (dy * x_hat).sum(axis=batch_axes), dy.sum(axis=batch_axes)


def _grouped(a, groups):
    """``(N, C, *)`` viewed as ``(N, G, C/G * prod(spatial))``."""
    return a.reshape(a.shape[0], groups, -1)


def gn_forward(x, groups, gamma=None, beta=None, eps=1e-5):
    """GroupNorm: statistics per sample and group of ``C/G`` channels. Returns the same dict as ln_forward."""
    x64 = _f64(x)
    xg = _grouped(x64, groups)
    m, mean, var = two_pass(xg, (2,))
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = ((xg - mean) * inv_std).reshape(x64.shape)
    y = x_hat
    if gamma is not None:
        y = y * _channel(gamma, x64.ndim)
    if beta is not None:
        y = y + _channel(beta, x64.ndim)
    return {"y": y, "x_hat": x_hat, "mean": mean.reshape(x64.shape[0], groups),
            "var": var.reshape(x64.shape[0], groups), "inv_std": inv_std.reshape(x64.shape[0], groups),
            "count": m}


def gn_backward(dy, x_hat, inv_std, groups, gamma=None):
    dy, x_hat = _f64(dy), _f64(x_hat)
    axes = channel_axes(dy.ndim)
    g = dy if gamma is None else dy * _channel(gamma, dy.ndim)
    istd = _f64(inv_std).reshape(dy.shape[0], groups, 1)
    dx = _per_sample_backward(_grouped(g, groups), _grouped(x_hat, groups), istd, (2,)).reshape(dy.shape)
    return dx, (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)
