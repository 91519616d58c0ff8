"""Finite-difference gradient checks, for any layer with a hand-written backward.

The central difference ``(f(x + h) - f(x - h)) / 2h`` has error O(h^2); with
float64 and ``h = 1e-6`` a correct backward agrees to a relative error around
1e-9 or better, a wrong one to 1e-2 or worse.  Use float64: in float32 the
rounding of ``f`` swamps the difference.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from .backend import asnumpy, get_array_module

__all__ = ["numerical_gradient", "rel_error", "check_layer", "check_function"]


def numerical_gradient(f: Callable[[], float], x, h: float = 1e-6):
    """Gradient of the scalar ``f()`` with respect to the array ``x``, by central differences.

    ``f`` takes no argument and reads ``x``; ``x`` is perturbed in place, one
    element at a time, and restored.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    flat = x.reshape(-1)           # a view: writing to it perturbs x
    if flat.size and not np.shares_memory(asnumpy(flat), asnumpy(x)) and get_array_module(x) is np:
        raise ValueError("numerical_gradient needs a contiguous array it can perturb in place")
    g = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i].item()
        flat[i] = old + h
        f_plus = float(f())
        flat[i] = old - h
        f_minus = float(f())
        flat[i] = old
        g[i] = (f_plus - f_minus) / (2.0 * h)
    return grad


def rel_error(a, b, floor: float = 1e-8) -> float:
    """``max|a - b| / max(max|a|, max|b|, floor)``: 0 for equal arrays, 2 for opposite ones.

    Scaled by the largest magnitude rather than element by element, so that an
    element that should be 0 (and is 1e-17 in one and -1e-17 in the other) does
    not count as a 100% error.
    """
    a = np.asarray(asnumpy(a), dtype=np.float64)
    b = np.asarray(asnumpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), floor)
    return float(np.max(np.abs(a - b))) / scale


def check_function(forward: Callable, backward: Callable, x, dy, h: float = 1e-6) -> float:
    """Relative error between ``backward(dy)`` and the numerical gradient of ``sum(forward(x) * dy)``."""
    analytic = backward(dy)
    numeric = numerical_gradient(lambda: float((forward(x) * dy).sum()), x, h)
    return rel_error(analytic, numeric)


def check_layer(layer, x, dy=None, h: float = 1e-6, seed: int = 0) -> Dict[str, float]:
    """Check ``layer.backward`` against finite differences, for the input and every parameter.

    The loss is ``L = sum(layer(x) * dy)`` with a random ``dy`` (seeded), so
    ``dL/dy = dy``.  Parameters are temporarily promoted to float64, and the
    layer's state (running statistics, gradients) is restored afterwards.
    Returns ``{"input": err, "<param name>": err, ...}``.
    """
    if getattr(x, "dtype", None) != np.float64:
        raise TypeError(f"check_layer needs float64 input for a meaningful check, got {getattr(x, 'dtype', None)}")
    xp = get_array_module(x)
    x = x.copy()
    saved_state = layer.state_dict()
    saved_buffers = dict(layer.named_buffers())
    saved_buffers = {k: v.copy() for k, v in saved_buffers.items()}
    params = dict(layer.named_parameters())
    saved = {name: (p.data, p.grad) for name, p in params.items()}
    try:
        for p in params.values():
            p.data = p.data.astype(np.float64)
            p.grad = None
        y = layer(x)
        if dy is None:
            dy = xp.asarray(np.random.default_rng([seed, 7919]).standard_normal(y.shape))
        dx = layer.backward(dy)

        def loss():
            for name, buf in layer.named_buffers():         # running stats must not drift
                buf[...] = saved_buffers[name]
            return float((layer(x) * dy).sum())

        pairs = {"input": (dx, numerical_gradient(loss, x, h))}
        for name, p in params.items():
            pairs[name] = (p.grad, numerical_gradient(loss, p.data, h))
        # A gradient that is exactly zero in theory (e.g. the bias of a layer
        # followed by BatchNorm) is finite-difference noise in practice, so each
        # error is scaled by at least 1% of the largest gradient in the check.
        largest = max(float(np.max(np.abs(asnumpy(g)))) if g.size else 0.0
                      for pair in pairs.values() for g in pair)
        floor = max(1e-8, 1e-2 * largest)
        return {name: rel_error(a, n, floor) for name, (a, n) in pairs.items()}
    finally:
        for name, p in params.items():
            p.data, p.grad = saved[name]
        layer.load_state_dict(saved_state)
