"""The numba engine: compiled CPU loops (optional: ``pip install minibn[jit]``).

NumPy runs one formula per pass over memory; a compiled loop runs a whole
phase of batch norm in one pass, like the fused GPU kernels of the cupy
engine and with the same math::

    training forward   one read-only pass  -> sum(d), sum(d^2) per channel,  d = x - shift
                       one element-wise pass -> y = (x - shift) * a + b
    backward           one read-only pass  -> sum(dy), sum(dy * (x - mean)) per channel
                       one element-wise pass -> dx = k * (dy - c0 - c3 * (x - mean))

Deviations, products and sums are float64 inside the statistics loops, so
the statistics are float64-accurate for float32 data.  The shift only has to be
near the mean: it is the mean of the first few values of each channel, and
with float64 sums even a shift a thousand standard deviations off leaves
about ten correct digits, so no second pass is needed (as on the GPU).
The element-wise passes compute in the input's dtype, like the NumPy and GPU
engines, around the mean rounded to the dtype (``x - mean`` is then exact for
values near the mean).

Two loop orders, as in the NumPy engine's tiling: ``rows`` (spatial size
``S >= 32``) walks each ``(n, c)`` row of ``S`` contiguous values; ``cols``
(``(N, C)`` input and short rows) walks blocks of ``ROWS`` rows of ``W = C*S``
values and keeps one float64 accumulator per column.  Work is shared among
threads in fixed pieces (one ``(n, c)`` row, or one block of rows) whose sums
are added in a fixed order, so results do not depend on the thread count.

Selected with ``MINIBN_KERNELS=numba``, ``using_engine("numba")`` or a layer's
``engine="numba"``.  Empty inputs and dtypes other than float32/float64 go to
the reference engine.  The first call of each kernel compiles it (a few
seconds); the machine code is cached on disk next to this module.  Calls from
several Python threads take turns (not every numba threading layer takes
concurrent calls); and, as with any OpenMP-threaded code, a process should
not ``fork`` (without ``exec``) after its first kernel call.
"""
from __future__ import annotations

import threading

import numpy as np

from .coefficients import gradient_coefficients, rounded_mean
from .interface import FusedPassEngine
from .workspace import new_output, num_threads

try:                                            # optional: minibn works without numba
    import numba
    from numba import njit, prange
except ImportError:                             # pragma: no cover - depends on the install
    numba = None

__all__ = ["NumbaEngine"]

ROW_MIN = 32          # spatial rows shorter than this use the cols loop order
ROWS = 64             # cols loop order: rows per block (one block = one piece of work)
SHIFT_SAMPLE = 8      # values per channel averaged for the shift (float64 sums need no more)

# reassociation lets LLVM vectorize the float64 running sums; nothing else is relaxed
# (NaN and infinity propagate as in NumPy)
_FLAGS = dict(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})


# --------------------------------------------------------------------------- the kernels
# rows order: arrays viewed as (N, C, S), per-channel float64 vectors of length C;
# cols order: arrays viewed as (N, W), per-column float64 vectors of length W.

if numba is not None:

    @njit(**_FLAGS)
    def _rows_sums(u, su, v, sv, same, out):
        """out[n, c] = (sum p, sum p * q) over row (n, c), p = u - su[c], q = v - sv[c].

        Statistics: u = v = x, su = sv = shift, and ``same`` says so (q is p: one read
        and one subtraction less).  Gradient sums: u = dy, su = 0, v = x, sv = mean.
        """
        N, C, S = u.shape
        for i in prange(N * C):
            n, c = i // C, i % C
            a, b, s1, s2 = su[c], sv[c], 0.0, 0.0
            if same:
                for k in range(S):
                    p = np.float64(u[n, c, k]) - a
                    s1 += p
                    s2 += p * p
            else:
                for k in range(S):
                    p = np.float64(u[n, c, k]) - a
                    s1 += p
                    s2 += p * (np.float64(v[n, c, k]) - b)
            out[n, c, 0] = s1
            out[n, c, 1] = s2

    @njit(**_FLAGS)
    def _rows_affine(x, shift, a, b, y, kept):
        """y = (x - shift) * a + b, per channel (in the dtype of the constants); kept = x."""
        N, C, S = x.shape
        for i in prange(N * C):
            n, c = i // C, i % C
            s, ac, bc = shift[c], a[c], b[c]
            for k in range(S):
                v = x[n, c, k]
                kept[n, c, k] = v
                y[n, c, k] = (v - s) * ac + bc

    @njit(**_FLAGS)
    def _rows_grad(dy, x, mean, scale, c0, c3, dx):
        """dx = scale * (dy - c0 - c3 * (x - mean)), per channel (in the dtype of the constants)."""
        N, C, S = x.shape
        for i in prange(N * C):
            n, c = i // C, i % C
            m, kc, c0c, c3c = mean[c], scale[c], c0[c], c3[c]
            for k in range(S):
                dx[n, c, k] = kc * (dy[n, c, k] - c0c - c3c * (x[n, c, k] - m))

    @njit(**_FLAGS)
    def _cols_sums(u, su, v, sv, same, out):
        """out[b] = (sum p, sum p * q) per column over block b of ROWS rows, p = u - su,
        q = v - sv (as in _rows_sums)."""
        N, W = u.shape
        for b in prange(out.shape[0]):
            s1, s2 = out[b, 0], out[b, 1]
            s1[:] = 0.0
            s2[:] = 0.0
            for n in range(b * ROWS, min(N, (b + 1) * ROWS)):
                if same:
                    for w in range(W):
                        p = np.float64(u[n, w]) - su[w]
                        s1[w] += p
                        s2[w] += p * p
                else:
                    for w in range(W):
                        p = np.float64(u[n, w]) - su[w]
                        s1[w] += p
                        s2[w] += p * (np.float64(v[n, w]) - sv[w])

    @njit(**_FLAGS)
    def _cols_affine(x, shift, a, b, y, kept):
        """y = (x - shift) * a + b, per column (in the dtype of the constants); kept = x."""
        N, W = x.shape
        for blk in prange((N + ROWS - 1) // ROWS):
            for n in range(blk * ROWS, min(N, (blk + 1) * ROWS)):
                for w in range(W):
                    v = x[n, w]
                    kept[n, w] = v
                    y[n, w] = (v - shift[w]) * a[w] + b[w]

    @njit(**_FLAGS)
    def _cols_grad(dy, x, mean, scale, c0, c3, dx):
        """dx = scale * (dy - c0 - c3 * (x - mean)), per column (in the dtype of the constants)."""
        N, W = x.shape
        for blk in prange((N + ROWS - 1) // ROWS):
            for n in range(blk * ROWS, min(N, (blk + 1) * ROWS)):
                for w in range(W):
                    dx[n, w] = scale[w] * (dy[n, w] - c0[w] - c3[w] * (x[n, w] - mean[w]))


# --------------------------------------------------------------------------- layout


class _Layout:
    """How an ``(N, C, *)`` array is walked: its view, and per-channel vectors widened to it."""

    def __init__(self, shape):
        N, C = shape[0], shape[1]
        S = 1
        for s in shape[2:]:
            S *= s
        self.N, self.C, self.S = N, C, S
        self.cols = S < ROW_MIN
        self.shape = (N, C * S) if self.cols else (N, C, S)

    def view(self, a):
        return a.reshape(self.shape)

    def vec(self, v, dtype=np.float64):
        """A per-channel vector in the kernels' form (repeated ``S`` times for cols)."""
        v = np.ascontiguousarray(v, dtype=dtype)
        return np.repeat(v, self.S) if self.cols and self.S > 1 else v

    def fold(self, partial_sums):
        """Partial sums -> two ``(C,)`` float64 vectors, added in a fixed order."""
        if self.cols:                                   # (blocks, 2, W)
            s = partial_sums.sum(axis=0)
            if self.S > 1:
                s = s.reshape(2, self.C, self.S).sum(axis=2)
            return s[0], s[1]
        s = partial_sums.sum(axis=0)                    # (N, C, 2)
        return s[:, 0], s[:, 1]

    def partial_sums(self):
        if self.cols:
            return np.empty(((self.N + ROWS - 1) // ROWS, 2, self.C * self.S))
        return np.empty((self.N, self.C, 2))


def _sums(layout, u, su, v=None, sv=None):
    """``(sum (u - su), sum (u - su) * (v - sv))`` per channel, float64; without ``v``
    and ``sv``: ``(sum (u - su), sum (u - su)^2)``."""
    partial_sums = layout.partial_sums()
    same = v is None
    u, su = layout.view(u), layout.vec(su)
    _call(_cols_sums if layout.cols else _rows_sums, u, su, u if same else layout.view(v),
          su if same else layout.vec(sv), same, partial_sums)
    return layout.fold(partial_sums)


_lock = threading.Lock()


def _call(kernel, *args):
    """Run a kernel on the thread count of the NumPy engine (``MINIBN_NUM_THREADS``, within
    numba's).  One call at a time: not every numba threading layer takes concurrent calls."""
    n = max(1, min(num_threads(), numba.config.NUMBA_NUM_THREADS))
    with _lock:
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
        kernel(*args)


def _affine(x, mean, a, b):
    """``y = (x - mean') * a + b`` in the dtype, with ``mean'`` the mean rounded to the dtype
    (so that ``x - mean'`` is exact near the mean) and ``b`` corrected for the rounding.
    Returns ``(y, kept)``, ``kept`` a copy of ``x`` written in the same pass (for the cache)."""
    layout = _Layout(x.shape)
    dt = x.dtype
    shift, delta = rounded_mean(mean, dt)
    b = b - delta * a
    y, kept = new_output(x), new_output(x)
    if x.size:
        _call(_cols_affine if layout.cols else _rows_affine, layout.view(x), layout.vec(shift, dt),
              layout.vec(a, dt), layout.vec(b, dt), layout.view(y), layout.view(kept))
    return y, kept


# --------------------------------------------------------------------------- the engine

class NumbaEngine(FusedPassEngine):
    """Compiled loops: one pass per phase of batch norm."""

    name = "numba"

    def available(self) -> bool:
        """True when numba imports."""
        return numba is not None

    def array_module(self):
        return np

    @staticmethod
    def _moments(x):
        """``(count, mean, var, shift)`` per channel, float64, in one pass over ``x``."""
        layout = _Layout(x.shape)
        count = layout.N * layout.S
        if count == 0 or x.size == 0:
            zeros = np.zeros(layout.C)
            return count, zeros, zeros.copy(), zeros.copy()
        k = min(layout.N, max(1, -(-SHIFT_SAMPLE // layout.S)))
        shift = x[:k].reshape(k, layout.C, layout.S).mean(axis=(0, 2), dtype=np.float64)
        sum_d, sum_d2 = _sums(layout, x, shift)
        mean_d = sum_d / count
        var = np.maximum(sum_d2 / count - mean_d * mean_d, 0.0)
        return count, shift + mean_d, var, shift

    _affine = staticmethod(_affine)

    @staticmethod
    def _backward(dy, cache, reduce=None):
        """``(dx, dweight, dbias)``: one read-only pass for the sums, one pass for ``dx``."""
        x, weight = cache.x, cache.weight
        layout = _Layout(x.shape)
        mean = cache.mean
        zero = np.zeros(layout.C)
        sum_dy, sum_dyd = zero, zero
        if dy.size and (not cache.frozen or weight is not None):
            sum_dy, sum_dyd = _sums(layout, dy, zero, x, mean)
        sum_dy_xhat = cache.inv_std * sum_dyd
        dx = new_output(dy)
        dt = dy.dtype
        mean_t, delta = rounded_mean(mean, dt)            # x - mean_t is exact near the mean
        k, c0, c3 = gradient_coefficients(np, cache, sum_dy, sum_dy_xhat, delta, reduce)
        if cache.frozen:                                  # eval mode: dx = k * dy, x plays no part
            scale = layout.vec(k) if layout.cols else k.reshape(-1, 1)
            np.multiply(layout.view(dy), scale, out=layout.view(dx), casting="unsafe")
        elif dy.size:
            _call(_cols_grad if layout.cols else _rows_grad, layout.view(dy), layout.view(x),
                  layout.vec(mean_t, dt), layout.vec(k, dt), layout.vec(c0, dt), layout.vec(c3, dt),
                  layout.view(dx))
        if weight is None:
            return dx, None, None
        return dx, sum_dy_xhat.astype(weight.dtype), sum_dy.astype(weight.dtype)
