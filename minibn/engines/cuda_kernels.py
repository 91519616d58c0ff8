"""The cuda engine: batch norm's GPU kernels written with numba's CUDA target.

One kernel source runs in two places:

* on an NVIDIA GPU (``pip install minibn[gpu]``: CuPy and ``numba-cuda``), where
  the kernels are compiled by numba and launched on CuPy arrays, which they
  read through the CUDA array interface;
* on the CPU, under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` before
  numba is imported), which runs every thread, block, shared-memory access
  and ``syncthreads`` of the same Python source, on NumPy arrays.  This is how
  the tests execute every line of the kernels on a machine without a GPU.

Sums are float64 by explicit casts (``float64(v)``), so that the simulator, which
computes with NumPy scalars, adds in float64 as the GPU does.  The math is the
other fast engines' (:mod:`.coefficients`); per phase::

    statistics         channel_partials: per (block, channel), float64 sums of
                       d = x - shift and d * d, tree-reduced in shared memory;
                       combine_partials: the blocks of each channel added in
                       block order (a fixed order: results are deterministic)
    training forward   normalize: y = (x - shift') * a + b and kept = x, one pass
    eval forward       normalize, with the running statistics' constants
    backward           gradient_partials + combine_partials: sum dy, sum dy * (x - mean)
                       input_gradient: dx = k * (dy - c0 - c3 * (x - mean'))

(``shift'``/``mean'``: the per-channel mean rounded to the input dtype.)  The
reductions work in float64 whatever the input dtype; the element-wise kernels
compute in the input's dtype, like every engine.  The per-channel constants
are computed between the kernels on ``C`` numbers, with the array module of
the inputs (CuPy on the GPU, NumPy under the simulator).

A reduction block holds ``values_per_block`` consecutive values of one
channel (the grid is ``(blocks per channel, C)``); its threads stride over
them.  The element-wise kernels run a grid of at most ``max_blocks`` blocks
whose threads stride over the flat array.  :class:`Launch` holds these sizes:
the tests use tiny ones to reach every edge (one value per block, partial
last blocks, threads with nothing to do) in little simulated time.

Selected with ``using_engine("cuda")`` or a layer's ``engine="cuda"``; CuPy
arrays get the ``cupy`` engine by default (see the README's GPU section).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .coefficients import gradient_coefficients, rounded_mean
from .interface import FusedPassEngine

try:                                            # optional: minibn works without numba
    from numba import config as numba_config
    from numba import cuda, float64
except ImportError:                             # pragma: no cover - depends on the install
    cuda = None

try:                                            # optional: the GPU's array type
    import cupy
except ImportError:                             # pragma: no cover - depends on the machine
    cupy = None

__all__ = ["CudaEngine", "Launch", "simulated", "channel_sums", "kernels"]

SHIFT_SAMPLE = 64             # values per channel averaged for the shift of the statistics


def simulated() -> bool:
    """True when numba's CUDA simulator stands in for a GPU (``NUMBA_ENABLE_CUDASIM=1``)."""
    return cuda is not None and bool(numba_config.ENABLE_CUDASIM)


@dataclass(frozen=True)
class Launch:
    """Launch sizes: threads per block (a power of two: the tree reduction halves it),
    values of one channel per reduction block, and the element-wise grid's block limit."""

    threads: int = 256
    values_per_block: int = 4096
    max_blocks: int = 8192

    def __post_init__(self):
        if self.threads < 1 or self.threads & (self.threads - 1):
            raise ValueError(f"Launch.threads must be a power of two, got {self.threads}")
        if self.values_per_block < 1 or self.max_blocks < 1:
            raise ValueError("Launch.values_per_block and Launch.max_blocks must be positive")


SIMULATOR_LAUNCH = Launch(threads=8, values_per_block=64, max_blocks=16)   # Python per thread


# --------------------------------------------------------------------------- the kernels

@lru_cache(maxsize=None)
def kernels(threads: int):
    """The kernels for blocks of ``threads`` threads (a compile-time constant: the size of
    the shared arrays), as a dict of numba CUDA kernels."""

    @cuda.jit(device=True)
    def block_sums(p, q, partials, c, block):
        """Sum each thread's ``(p, q)`` over the block in shared memory; thread 0 writes the
        block's sums to ``partials[c, block]``."""
        t = cuda.threadIdx.x
        shared_p = cuda.shared.array(threads, float64)
        shared_q = cuda.shared.array(threads, float64)
        shared_p[t] = p
        shared_q[t] = q
        cuda.syncthreads()
        step = threads // 2
        while step > 0:                      # tree: thread t adds thread t + step's partial
            if t < step:
                shared_p[t] += shared_p[t + step]
                shared_q[t] += shared_q[t + step]
            cuda.syncthreads()
            step //= 2
        if t == 0:
            partials[c, block, 0] = shared_p[0]
            partials[c, block, 1] = shared_q[0]

    @cuda.jit
    def channel_partials(x, shift, values_per_block, partials):
        """``partials[c, block] = (sum d, sum d * d)``, ``d = x - shift[c]`` in float64, over the
        block's values of channel ``c``.  ``x`` is ``(N, C, S)``; channel c holds ``N * S``
        values, value ``j`` at ``x[j // S, c, j % S]``."""
        block, c, t = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        S = x.shape[2]
        first = block * values_per_block
        end = min(first + values_per_block, x.shape[0] * S)
        s = shift[c]
        sum_d = float64(0.0)
        sum_dd = float64(0.0)
        for j in range(first + t, end, threads):
            n = j // S
            d = float64(x[n, c, j - n * S]) - s
            sum_d += d
            sum_dd += d * d
        block_sums(sum_d, sum_dd, partials, c, block)

    @cuda.jit
    def gradient_partials(dy, x, mean, values_per_block, partials):
        """``partials[c, block] = (sum dy, sum dy * (x - mean[c]))`` in float64 over the block's
        values of channel ``c`` (``dy`` and ``x`` are ``(N, C, S)``)."""
        block, c, t = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        S = x.shape[2]
        first = block * values_per_block
        end = min(first + values_per_block, x.shape[0] * S)
        m = mean[c]
        sum_dy = float64(0.0)
        sum_dy_d = float64(0.0)
        for j in range(first + t, end, threads):
            n = j // S
            g = float64(dy[n, c, j - n * S])
            sum_dy += g
            sum_dy_d += g * (float64(x[n, c, j - n * S]) - m)
        block_sums(sum_dy, sum_dy_d, partials, c, block)

    @cuda.jit
    def combine_partials(partials, sums):
        """``sums[:, c]``: channel c's block sums added in block order (one thread per channel)."""
        c = cuda.grid(1)
        if c < partials.shape[0]:
            p = float64(0.0)
            q = float64(0.0)
            for block in range(partials.shape[1]):
                p += partials[c, block, 0]
                q += partials[c, block, 1]
            sums[0, c] = p
            sums[1, c] = q

    @cuda.jit
    def normalize(x, shift, a, b, channels, spatial, y, kept):
        """``y = (x - shift[c]) * a[c] + b[c]`` and ``kept = x`` on flat arrays, channel
        ``c = (i // spatial) % channels`` of element ``i``."""
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            c = (i // spatial) % channels
            v = x[i]
            kept[i] = v
            y[i] = (v - shift[c]) * a[c] + b[c]

    @cuda.jit
    def input_gradient(dy, x, mean, k, c0, c3, channels, spatial, dx):
        """``dx = k[c] * (dy - c0[c] - c3[c] * (x - mean[c]))`` on flat arrays."""
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            c = (i // spatial) % channels
            dx[i] = k[c] * (dy[i] - c0[c] - c3[c] * (x[i] - mean[c]))

    return dict(channel_partials=channel_partials, gradient_partials=gradient_partials,
                combine_partials=combine_partials, normalize=normalize, input_gradient=input_gradient)


# --------------------------------------------------------------------------- launching

def _device(a):
    """What a kernel is given: a NumPy array under the simulator; on a GPU, a numba view of
    the CuPy array (no copy, and no stream synchronization: both use the default stream)."""
    return a if simulated() else cuda.as_cuda_array(a, sync=False)


def _launch(kernel, grid, threads, *args):
    with warnings.catch_warnings():          # numba-cuda warns about small grids; tests are small
        warnings.filterwarnings("ignore", message=".*[Gg]rid size.*")
        kernel[grid, threads](*(_device(a) if hasattr(a, "shape") else a for a in args))


def _geometry(x):
    N, C = x.shape[0], x.shape[1]
    S = 1
    for s in x.shape[2:]:
        S *= s
    return N, C, S


def channel_sums(xp, launch, kernel_name, u, *per_channel):
    """Two float64 ``(C,)`` sums per channel of the ``(N, C, S)`` array ``u``:
    ``channel_partials`` (``per_channel``: the shift) or ``gradient_partials``
    (``per_channel``: ``x`` and the mean), then ``combine_partials``."""
    N, C, S = u.shape
    blocks = max(1, -(-(N * S) // launch.values_per_block))
    partials = xp.empty((C, blocks, 2), dtype=np.float64)
    sums = xp.empty((2, C), dtype=np.float64)
    k = kernels(launch.threads)
    _launch(k[kernel_name], (blocks, C), launch.threads, u, *per_channel, launch.values_per_block, partials)
    _launch(k["combine_partials"], -(-C // launch.threads), launch.threads, partials, sums)
    return sums[0], sums[1]


def _elementwise_grid(launch, size):
    return min(launch.max_blocks, -(-size // launch.threads))


# --------------------------------------------------------------------------- the engine

class CudaEngine(FusedPassEngine):
    """numba CUDA kernels: CuPy arrays on a GPU, NumPy arrays under the simulator."""

    name = "cuda"

    def __init__(self, launch=None):
        self.launch = launch or (SIMULATOR_LAUNCH if simulated() else Launch())

    def available(self) -> bool:
        """True under the simulator, or with numba's CUDA target, CuPy and a GPU."""
        if cuda is None:
            return False
        if simulated():
            return True
        try:
            return cupy is not None and cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:                       # pragma: no cover - depends on the machine
            return False

    def array_module(self):
        return np if simulated() else cupy

    def _moments(self, x):
        """``(count, mean, var, shift)`` per channel, float64, in one pass over ``x``."""
        xp = self.array_module()
        N, C, S = _geometry(x)
        count = N * S
        if count == 0 or x.size == 0:
            zeros = xp.zeros(C)
            return count, zeros, zeros.copy(), zeros.copy()
        x3 = x.reshape(N, C, S)
        k = min(N, max(1, -(-SHIFT_SAMPLE // S)))
        shift = x3[:k].mean(axis=(0, 2), dtype=np.float64)
        sum_d, sum_dd = channel_sums(xp, self.launch, "channel_partials", x3, shift)
        mean_d = sum_d / count
        var = xp.maximum(sum_dd / count - mean_d * mean_d, 0.0)
        return count, shift + mean_d, var, shift

    def _affine(self, x, mean, a, b):
        """``y = (x - mean') * a + b`` in the dtype, ``mean'`` the mean rounded to it and ``b``
        corrected for the rounding; ``kept``, a copy of ``x``, written by the same kernel."""
        xp = self.array_module()
        dt = x.dtype
        shift, delta = rounded_mean(mean, dt)
        b = b - delta * a
        y, kept = xp.empty_like(x), xp.empty_like(x)
        if x.size:
            _, C, S = _geometry(x)
            _launch(kernels(self.launch.threads)["normalize"], _elementwise_grid(self.launch, x.size),
                    self.launch.threads, x.reshape(-1), shift, a.astype(dt), b.astype(dt), C, S,
                    y.reshape(-1), kept.reshape(-1))
        return y, kept

    def _backward(self, dy, cache, reduce=None):
        """``(dx, dweight, dbias)``: one reduction (two kernels), one element-wise kernel."""
        xp = self.array_module()
        x, weight, mean = cache.x, cache.weight, cache.mean
        N, C, S = _geometry(x)
        dt = dy.dtype
        if dy.size and (not cache.frozen or weight is not None):
            sum_dy, sum_dyd = channel_sums(xp, self.launch, "gradient_partials", dy.reshape(N, C, S),
                                           x.reshape(N, C, S), mean)
        else:
            sum_dy, sum_dyd = xp.zeros(C), xp.zeros(C)
        sum_dy_xhat = cache.inv_std * sum_dyd
        dx = xp.empty_like(dy)
        mean_t, delta = rounded_mean(mean, dt)              # x - mean_t is exact near the mean
        k, c0, c3 = gradient_coefficients(xp, cache, sum_dy, sum_dy_xhat, delta, reduce)
        if cache.frozen:                                    # eval mode: dx = k * dy
            xp.multiply(dy.reshape(N, C, S), k.astype(dt).reshape(1, C, 1), out=dx.reshape(N, C, S))
        elif dy.size:
            _launch(kernels(self.launch.threads)["input_gradient"], _elementwise_grid(self.launch, dy.size),
                    self.launch.threads, dy.reshape(-1), x.reshape(-1), mean_t, k.astype(dt),
                    c0.astype(dt), c3.astype(dt), C, S, dx.reshape(-1))
        if weight is None:
            return dx, None, None
        return dx, sum_dy_xhat.astype(weight.dtype), sum_dy.astype(weight.dtype)
