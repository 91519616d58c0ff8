"""The cupy engine: fused batch-norm kernels for CuPy arrays (NVIDIA GPUs).

The same math as the NumPy engine (and as the readable ``functional.py``), with
each phase one GPU kernel, so the data crosses device memory the minimum
number of times::

    training forward   one reduction   -> sum(d), sum(d^2) per channel,  d = x - shift
                       one element-wise -> y = (x - shift') * a + b
    backward           one reduction   -> sum(dy), sum(dy * (x - mean)) per channel
                       one element-wise -> dx = k * (dy - c0 - c3 * (x - mean'))

(``shift'``/``mean'`` are the per-channel values rounded to the input dtype.)
The reductions carry *two* float64 sums through one pass: their reduce type
is a small struct, defined in the kernel preamble.  Deviations and their
products are formed in float64 inside the reduction, so the statistics are
float64-accurate for float32 data; the element-wise kernels compute in the
input's dtype, like the CPU engines.

The shift of the statistics pass is the mean of the first samples.  On the
GPU the sums are float64 all the way, so even a shift a thousand standard
deviations off leaves about ten correct digits of the variance; unlike the
NumPy engine no second pass is needed, and nothing waits for the host.

The per-channel constants come from :mod:`.coefficients`, shared with the CPU
engines, so the only GPU-specific code here is the four kernels.  The
reference engine (``functional.py`` on CuPy arrays) stays available; empty
inputs and dtypes other than float32/float64 go to it.
"""
from __future__ import annotations

import numpy as np

from .coefficients import gradient_coefficients, rounded_mean
from .interface import FusedPassEngine

try:                                            # optional: minibn works without CuPy
    import cupy
except ImportError:                             # pragma: no cover - depends on the machine
    cupy = None

__all__ = ["CupyEngine"]

SHIFT_SAMPLE = 64             # values per channel averaged for the shift


# --------------------------------------------------------------------------- the kernels

_PREAMBLE = r"""
// Two float64 running sums carried through one reduction.
struct minibn_pair {
    double s, q;
    __device__ minibn_pair() : s(0.0), q(0.0) {}
    __device__ minibn_pair(double s_, double q_) : s(s_), q(q_) {}
};
__device__ minibn_pair minibn_pair_add(const minibn_pair& a, const minibn_pair& b) {
    return minibn_pair(a.s + b.s, a.q + b.q);
}
__device__ minibn_pair minibn_moments(double d) { return minibn_pair(d, d * d); }
"""

_kernels = {}


def _get(name):
    """Build the kernels on first use (CuPy compiles each one on its first call)."""
    if not _kernels:
        _kernels["moments"] = cupy.ReductionKernel(
            "T x, float64 shift",
            "float64 sum_d, float64 sum_d2",
            "minibn_moments((double)x - shift)",        # d = x - shift, in float64
            "minibn_pair_add(a, b)",
            "sum_d = a.s, sum_d2 = a.q",
            "minibn_pair()",
            "minibn_shifted_moments",
            reduce_type="minibn_pair",
            preamble=_PREAMBLE)
        _kernels["grad_sums"] = cupy.ReductionKernel(
            "T dy, T x, float64 mean",
            "float64 sum_dy, float64 sum_dy_d",
            "minibn_pair((double)dy, (double)dy * ((double)x - mean))",
            "minibn_pair_add(a, b)",
            "sum_dy = a.s, sum_dy_d = a.q",
            "minibn_pair()",
            "minibn_grad_sums",
            reduce_type="minibn_pair",
            preamble=_PREAMBLE)
        _kernels["affine"] = cupy.ElementwiseKernel(      # also kept = x: the cache's own copy
            "T x, T shift, T a, T b",
            "T y, T kept",
            "kept = x; y = (x - shift) * a + b",
            "minibn_affine_kept")
        _kernels["grad"] = cupy.ElementwiseKernel(
            "T dy, T x, T mean, T k, T c0, T c3",
            "T dx",
            "dx = k * (dy - c0 - c3 * (x - mean))",
            "minibn_grad")
    return _kernels[name]


# --------------------------------------------------------------------------- helpers

def _geometry(x):
    N, C = x.shape[0], x.shape[1]
    S = 1
    for s in x.shape[2:]:
        S *= s
    return N, C, S


def _view(x):
    """``(N, C, S)`` view of a C-contiguous array."""
    return x.reshape(_geometry(x))


def _column(v, dtype):
    """Per-channel vector as a ``(1, C, 1)`` array that broadcasts against ``(N, C, S)``."""
    return v.astype(dtype).reshape(1, -1, 1)


def _affine(x, mean, a, b):
    """``y = (x - mean') * a + b`` with ``mean'`` the mean rounded to the dtype; ``b`` is
    corrected for the rounding.  Returns ``(y, kept)``, ``kept`` a copy of ``x`` written by
    the same kernel (the cache's own copy)."""
    dt = x.dtype
    shift, delta = rounded_mean(mean, dt)
    b = b - delta * a
    y, kept = cupy.empty_like(x), cupy.empty_like(x)
    _get("affine")(_view(x), _column(shift, dt), _column(a, dt), _column(b, dt), _view(y), _view(kept))
    return y, kept


# --------------------------------------------------------------------------- the engine

class CupyEngine(FusedPassEngine):
    """Fused CuPy kernels: one reduction and one element-wise kernel per phase."""

    name = "cupy"

    def available(self) -> bool:
        """True when CuPy imports and sees a GPU."""
        if cupy is None:
            return False
        try:
            return cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:                       # pragma: no cover - depends on the machine
            return False

    def array_module(self):
        return cupy

    @staticmethod
    def _moments(x):
        """``(count, mean, var, shift)`` per channel, float64, in one pass over ``x``."""
        N, C, S = _geometry(x)
        count = N * S
        if count == 0 or x.size == 0:
            zeros = cupy.zeros(C)
            return count, zeros, zeros.copy(), zeros.copy()
        x3 = _view(x)
        k = min(N, max(1, -(-SHIFT_SAMPLE // S)))
        shift = x3[:k].mean(axis=(0, 2), dtype=np.float64)
        sum_d, sum_d2 = _get("moments")(x3, shift.reshape(1, C, 1), axis=(0, 2))
        mean_d = sum_d / count
        var = cupy.maximum(sum_d2 / count - mean_d * mean_d, 0.0)
        return count, shift + mean_d, var, shift

    _affine = staticmethod(_affine)

    @staticmethod
    def _backward(dy, cache, reduce=None):
        """``(dx, dweight, dbias)``: one reduction, one element-wise kernel."""
        x, weight = cache.x, cache.weight
        N, C, S = _geometry(x)
        dt = dy.dtype
        mean = cache.mean
        if dy.size:
            sum_dy, sum_dyd = _get("grad_sums")(_view(dy), _view(x), mean.reshape(1, C, 1), axis=(0, 2))
        else:
            sum_dy, sum_dyd = cupy.zeros(C), cupy.zeros(C)
        sum_dy_xhat = cache.inv_std * sum_dyd
        dx = cupy.empty_like(dy)
        mean_t, delta = rounded_mean(mean, dt)
        k, c0, c3 = gradient_coefficients(cupy, cache, sum_dy, sum_dy_xhat, delta, reduce)
        if cache.frozen:                                  # eval mode: dx = k * dy
            cupy.multiply(_view(dy), _column(k, dt), out=_view(dx))
        elif dy.size:
            _get("grad")(_view(dy), _view(x), _column(mean_t, dt), _column(k, dt), _column(c0, dt),
                         _column(c3, dt), _view(dx))
        if weight is None:
            return dx, None, None
        return dx, sum_dy_xhat.astype(weight.dtype), sum_dy.astype(weight.dtype)
