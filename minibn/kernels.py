"""Fast batch-norm kernels: the math of ``functional.py``, arranged for memory traffic.

Batch norm does a handful of flops per element, so its speed is decided by how
many times the data crosses the memory bus, not by the arithmetic.  The
readable path in ``functional.py`` takes a fresh pass (and a fresh temporary)
for every formula line.  This module computes the same numbers with few
passes, no full-size temporaries besides the outputs, and both CPU cores.

The math is the closed form of ``functional.py``, with one rewrite: every
element-wise formula is written around ``d = x - shift``, where ``shift`` is
the per-channel mean rounded to the input's dtype.  ``x - shift`` is exact for
values near the mean, so nothing cancels even when ``|mean| >> std``::

    training forward         d = x - shift                      (one pass: d goes into y)
                             var = sum(d^2)/m - (sum(d)/m)^2     (float64, as in moments.py)
                             y = d * a + b                       a = gamma / sqrt(var + eps)
                                                                 b = beta - (mean - shift) * a
    backward                 d = x - shift                      (into dx)
                             sum_dy, sum(dy * d)                 -> sum(dy * x_hat)
                             dx = k * (dy - c0 - c3 * d)         k = gamma / sqrt(var + eps)

Per-channel constants (a, b, k, c0, c3) are computed once in float64 on ``C``
numbers; the element-wise passes run in the input's dtype.

How the passes are arranged:

* **Tiles.**  The input is viewed as ``(N, C, S)`` (``S`` = product of the
  spatial sizes) and cut into tiles of about ``TILE_ELEMENTS`` elements.  All
  passes of one phase run on a tile before moving on, so the second and later
  passes find the tile in cache.
* **Reductions.**  Per-tile sums are taken in the input's dtype by BLAS-backed
  dot products (``np.vecdot`` over contiguous rows) or ``einsum``/``add.reduce``
  over rows, over at most ``MAX_RUN`` values each, and the per-tile partial
  sums are combined in float64.  A float32 partial sum of at most a thousand
  values is accurate to a few units in the last place; float64 takes it from
  there, as in ``moments.py``.
* **Threads.**  NumPy releases the GIL inside its loops, so tiles are shared
  out to ``num_threads()`` threads (``MINIBN_NUM_THREADS``, default: the
  number of CPUs).  Small inputs run on one thread.
* **out= buffers.**  Every pass writes into the output (``y`` or ``dx``) or a
  per-thread scratch tile; no pass allocates a full-size temporary.

Two layouts are used.  ``rows``: for ``S >= ROW_MIN`` the reductions run along
the contiguous spatial rows of each ``(n, c)``.  ``cols``: for ``(N, C)`` and
short rows the input is viewed as ``(N, C*S)`` and reductions run down the
columns; a column's partial sums are folded into its channel afterwards.

Which path runs: :func:`batch_norm_forward`, :func:`batch_norm_eval_forward`,
:func:`batch_norm_backward` and :func:`channel_moments` have the signatures of
their counterparts in ``functional.py``/``moments.py``.  They take the
readable path when the reference path is selected (``MINIBN_KERNELS=reference``,
:func:`use_fast_kernels(False)` or ``with reference_kernels():``), for dtypes
other than float32/float64, and for array modules other than NumPy and CuPy.
CuPy arrays go to the fused GPU kernels of ``kernels_cupy.py``.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from . import functional as F
from .backend import get_array_module
from .moments import channel_moments as _reference_moments, reduce_axes

__all__ = [
    "batch_norm_forward", "batch_norm_eval_forward", "batch_norm_backward", "channel_moments",
    "KernelCache", "use_fast_kernels", "fast_kernels_enabled", "reference_kernels",
    "num_threads", "set_num_threads", "forward_coefficients", "backward_coefficients",
]

# --------------------------------------------------------------------------- tunables

TILE_BYTES = 1 << 18          # bytes per array and tile: the arrays of one phase fit in L2
ROW_RUN = 256                 # rows layout: float32 dot products over at most this many values
COL_RUN = 16                  # cols layout: float32 sums down at most this many rows
ROW_MIN = 32                  # spatial rows shorter than this use the cols layout
MAP_MIN_N = 4                 # expand per-channel constants to full rows when N >= this ...
MAP_MAX_BYTES = 1 << 21       # ... and one sample (C * S values) is at most this big
PARALLEL_MIN_BYTES = 1 << 17  # below this, one thread (a thread hand-off costs ~10 us)
SMALL_BYTES = 1 << 16         # inputs up to this size are one tile with broadcasting constants
REFERENCE_BELOW = 16384       # NumPy inputs with fewer elements take the reference path: for
                              # them the readable code is as fast (fewer Python steps)
SHIFT_SAMPLE = 64             # values per channel averaged for the provisional shift
REDO_RATIO = 1.0              # redo the statistics pass when |mean - shift| > REDO_RATIO * std
EVAL_SHIFT_RATIO = 4.0        # see _NumpyKernels.normalize

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- which path

_use_fast = os.environ.get("MINIBN_KERNELS", "fast").strip().lower() not in ("reference", "ref")


def use_fast_kernels(enabled: bool = True):
    """Select the fast kernels (``True``, the default) or the readable reference path."""
    global _use_fast
    _use_fast = bool(enabled)


def fast_kernels_enabled() -> bool:
    return _use_fast


@contextmanager
def reference_kernels():
    """``with reference_kernels(): ...`` runs the block on the readable ``functional`` path."""
    global _use_fast
    saved, _use_fast = _use_fast, False
    try:
        yield
    finally:
        _use_fast = saved


def _implementation(*arrays):
    """The module that computes for these arrays: this one, ``kernels_cupy``, or ``None``
    (the reference path)."""
    if not _use_fast:
        return None
    xp = get_array_module(*arrays)
    if xp is np:
        return _NUMPY
    from . import kernels_cupy
    return kernels_cupy if xp.__name__ == "cupy" and kernels_cupy.available() else None


# --------------------------------------------------------------------------- threads

_threads = None
_pool = None
_pool_lock = threading.Lock()


def num_threads() -> int:
    """Threads the NumPy kernels use: ``MINIBN_NUM_THREADS`` or the number of CPUs."""
    global _threads
    if _threads is None:
        env = os.environ.get("MINIBN_NUM_THREADS", "").strip()
        try:
            _threads = max(1, int(env)) if env else max(1, len(os.sched_getaffinity(0)))
        except (ValueError, AttributeError):
            _threads = max(1, os.cpu_count() or 1)
    return _threads


def set_num_threads(n: int):
    """Set the number of threads of the NumPy kernels (1 turns threading off)."""
    global _threads
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"set_num_threads: expected a positive integer, got {n!r}")
    _threads = int(n)


def _executor(workers: int):
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minibn-kernel")
        return _pool


def _forget_pool():                       # a forked child must not use the parent's threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


# --------------------------------------------------------------------------- tiling

class _Tile:
    """One block of the input.

    ``ew``: index of the block in the plan's element-wise view; ``mp``: index
    into the per-channel constant arrays (maps) that lines up with it;
    ``red``: index in the reduction view; ``k``, ``lo:hi``: where its partial
    sums go (row ``k``, columns ``lo:hi`` of a ``(K, width)`` array).
    """
    __slots__ = ("ew", "mp", "red", "k", "lo", "hi", "size", "ew_shape", "red_shape")

    def __init__(self, ew, mp, red, k, lo, hi, ew_shape, red_shape):
        self.ew, self.mp, self.red, self.k, self.lo, self.hi = ew, mp, red, k, lo, hi
        self.ew_shape, self.red_shape = ew_shape, red_shape
        self.size = int(np.prod(red_shape))


class _Plan:
    """How an input shape is cut into tiles, and the tiles shared among threads.

    Reduction view: ``(N, C, S)`` (rows layout) or ``(N, W)`` with ``W = C*S``
    (cols layout).  Element-wise view: the flat array when every tile is a
    contiguous segment (then a per-channel constant is expanded to a *map*
    that lines up element by element with a tile, the fastest form of a NumPy
    binary operation), else the reduction view with broadcasting constants.
    """

    def __init__(self, shape, itemsize, threads):
        self.shape = tuple(shape)
        N, C = shape[0], shape[1]
        S = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        self.N, self.C, self.S = N, C, S
        self.count = N * S
        tile = max(ROW_RUN, TILE_BYTES // itemsize)
        self.cols = S < ROW_MIN
        self.reps = 1             # how many rows (samples) one map covers
        self.col_coef = False     # constants as (C, 1) columns instead of maps
        tiles = []
        if N * C * S == 0:        # nothing to do, but the views must still work
            self.width = C * S if self.cols else C
            self.red_shape = (N, C * S) if self.cols else (N, C, S)
            self.ew_shape, self.K = self.red_shape, 0
        elif N * C * S * itemsize <= SMALL_BYTES:   # one tile, broadcasting constants
            self.col_coef = True
            self.width = C * S if self.cols else C
            self.red_shape = (N, C * S) if self.cols else (N, C, S)
            self.ew_shape, self.K = (N, C, S), 1
            tiles.append(_Tile((slice(None),) * 3, slice(None), (slice(None),) * len(self.red_shape),
                               0, 0, self.width, (N, C, S), self.red_shape))
        elif self.cols:
            W = C * S
            self.width, self.red_shape = W, (N, W)
            if W <= tile:         # tiles of whole rows: contiguous
                nb = min(N, max(COL_RUN, tile // W // COL_RUN * COL_RUN))
                self.ew_shape, self.reps = (-1,), nb
                for k, n0 in enumerate(range(0, N, nb)):
                    n1 = min(N, n0 + nb)
                    tiles.append(_Tile(slice(n0 * W, n1 * W), slice(0, (n1 - n0) * W),
                                       (slice(n0, n1), slice(None)), k, 0, W, (-1,), (n1 - n0, W)))
            else:                 # very wide rows: 2-D blocks
                nb = 2 * COL_RUN
                wb = max(1, tile // nb)
                self.ew_shape = (N, W)
                for k, n0 in enumerate(range(0, N, nb)):
                    n1 = min(N, n0 + nb)
                    for w0 in range(0, W, wb):
                        w1 = min(W, w0 + wb)
                        idx = (slice(n0, n1), slice(w0, w1))
                        tiles.append(_Tile(idx, slice(w0, w1), idx, k, w0, w1,
                                           (n1 - n0, w1 - w0), (n1 - n0, w1 - w0)))
            self.K = len(range(0, N, nb)) if N else 0
        else:
            CS = C * S
            self.width, self.red_shape = C, (N, C, S)
            self.ew_shape = (-1,)
            k = 0
            if CS <= tile:        # tiles of whole samples
                nb = min(N, max(1, tile // CS))
                self.reps = max(nb, 1)
                for n0 in range(0, N, nb):
                    n1 = min(N, n0 + nb)
                    tiles.append(_Tile(slice(n0 * CS, n1 * CS), slice(0, (n1 - n0) * CS),
                                       (slice(n0, n1), slice(None), slice(None)), k, 0, C,
                                       (-1,), (n1 - n0, C, S)))
                    k += 1
            else:                 # tiles of channel groups (or of pieces of one long row)
                self.col_coef = N < MAP_MIN_N or CS * itemsize > MAP_MAX_BYTES
                if self.col_coef:
                    self.ew_shape = (N, C, S)
                cb = max(1, tile // S)
                sb = S if S <= tile else tile // ROW_RUN * ROW_RUN
                for n in range(N):
                    for s0 in range(0, S, sb):
                        s1 = min(S, s0 + sb)
                        for c0 in range(0, C, cb if sb == S else 1):
                            c1 = min(C, c0 + (cb if sb == S else 1))
                            red = (slice(n, n + 1), slice(c0, c1), slice(s0, s1))
                            shp = (1, c1 - c0, s1 - s0)
                            if self.col_coef:
                                tiles.append(_Tile(red, slice(c0, c1), red, k, c0, c1, shp, shp))
                            else:
                                start = (n * C + c0) * S + s0
                                seg = slice(start, start + (c1 - c0) * (s1 - s0)) if sb == S \
                                    else slice(start, start + s1 - s0)
                                mp = slice(c0 * S + s0, c1 * S if sb == S else c0 * S + s1)
                                tiles.append(_Tile(seg, mp, red, k, c0, c1, (-1,), shp))
                        k += 1
            self.K = k
        self.tiles = tiles
        self.max_tile = max((t.size for t in tiles), default=0)
        total = N * C * S
        n = 1 if total * itemsize < PARALLEL_MIN_BYTES else max(1, min(threads, len(tiles)))
        groups = [[] for _ in range(n)]          # contiguous runs of tiles, equal in size
        acc = 0
        for t in tiles:
            groups[min(n - 1, acc * n // max(total, 1))].append(t)
            acc += t.size
        self.groups = [g for g in groups if g] or [[]]
        n0 = min(N, max(1, -(-SHIFT_SAMPLE // S)))
        self.sample = (slice(0, n0),)             # the samples averaged for the provisional shift

    def ew_view(self, a):
        return a.reshape(self.ew_shape)

    def red_view(self, a):
        return a.reshape(self.red_shape)

    def maps(self, dtype, *vectors):
        """Per-channel float64 vectors as arrays that line up with the tiles (in ``dtype``)."""
        out = []
        for v in vectors:
            if self.col_coef:
                out.append(v.astype(dtype).reshape(-1, 1))
            elif self.S == 1 and self.reps == 1:
                out.append(v.astype(dtype))
            else:                  # reps copies of each channel's value repeated S times
                m = _buffer(f"map{len(out)}", self.reps * self.C * self.S, dtype)
                m2 = m.reshape(self.reps, self.C * self.S)
                if self.S > 1:
                    m2[0].reshape(self.C, self.S)[...] = v.astype(dtype).reshape(-1, 1)
                else:
                    m2[0] = v
                m2[1:] = m2[0]
                out.append(m)
        return out

    def fold(self, parts):
        """``(K, width)`` float64 partial sums -> ``(C,)`` per-channel sums."""
        s = parts.sum(axis=0)
        return s.reshape(self.C, self.S).sum(axis=1) if self.cols and self.S > 1 else s

    def partials(self, n=1):
        return [np.zeros((self.K, self.width)) for _ in range(n)]


_local = threading.local()


def _buffer(name, n, dtype):
    """A work buffer of ``n`` elements, kept per thread and reused from call to call.

    Fresh large arrays cost page faults on first touch (a few microseconds per
    4 KiB page here, more than the arithmetic); maps and scratch tiles are
    therefore allocated once.  The next request under the same name reuses
    (and overwrites) the buffer.
    """
    bufs = _local.__dict__.setdefault("buffers", {})
    key = (name, np.dtype(dtype).char)
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = bufs[key] = np.empty(n, dtype=dtype)
    return buf[:n]


@lru_cache(maxsize=64)
def _plan_for(shape, itemsize, threads):
    return _Plan(shape, itemsize, threads)


def _plan(x):
    return _plan_for(tuple(x.shape), x.dtype.itemsize, num_threads())


def _run(plan, fn, scratch_dtype=None):
    """Call ``fn(tile, scratch)`` for every tile, one thread per group of tiles.

    ``scratch`` is a per-thread buffer of ``plan.max_tile`` elements of
    ``scratch_dtype`` (``None`` when not asked for).
    """
    def group(tiles):
        scratch = _buffer("scratch", plan.max_tile, scratch_dtype) if scratch_dtype is not None else None
        for t in tiles:
            fn(t, scratch)

    groups = plan.groups
    if len(groups) == 1:
        group(groups[0])
        return
    pool = _executor(len(groups) - 1)
    futures = [pool.submit(group, g) for g in groups[1:]]
    try:
        group(groups[0])
    finally:
        errors = []
        for f in futures:
            try:
                f.result()
            except BaseException as exc:   # keep waiting for the others, then re-raise
                errors.append(exc)
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------- per-tile reductions
# float64 per-column (cols) or per-channel (rows) sums of one tile, ``sum(a)`` or ``sum(a * b)``.
# Float32 partial sums run over at most ROW_RUN (rows: BLAS dot products, which keep several
# accumulators) or COL_RUN (cols: running sums down the rows) values; float64 takes it from there.

_ones_cache = {}


def _ones(n, dtype):
    key = (n, np.dtype(dtype).char)
    v = _ones_cache.get(key)
    if v is None:
        v = _ones_cache[key] = np.ones(n, dtype=dtype)
    return v


@lru_cache(maxsize=256)
def _row_runs(length):
    """Pieces ``(start, stop, run)`` of a row: ``run`` divides ``stop - start``, ``run <= ROW_RUN``."""
    if length <= ROW_RUN:
        return ((0, length, max(length, 1)),)
    for r in range(ROW_RUN, ROW_RUN // 2 - 1, -1):
        if length % r == 0:
            return ((0, length, r),)
    q = length // ROW_RUN * ROW_RUN
    return ((0, q, ROW_RUN), (q, length, length - q))


def _rows_sum(a, b=None):
    """``a``, ``b``: ``(nb, cb, L)`` views -> ``(cb,)`` float64."""
    out = None
    for s0, s1, r in _row_runs(a.shape[-1]):
        shp = a.shape[:-1] + ((s1 - s0) // r, r)
        aa = a[..., s0:s1].reshape(shp)
        v = np.vecdot(aa, _ones(r, a.dtype) if b is None else b[..., s0:s1].reshape(shp))
        part = v.sum(axis=(0, 2), dtype=np.float64)
        out = part if out is None else out + part
    return out


def _cols_sum(a, b=None):
    """``a``, ``b``: ``(nb, wb)`` views -> ``(wb,)`` float64."""
    q = a.shape[0] // COL_RUN * COL_RUN
    out = np.zeros(a.shape[1])
    if q:
        shp = (q // COL_RUN, COL_RUN, a.shape[1])
        aa = a[:q].reshape(shp)
        v = np.add.reduce(aa, axis=1) if b is None else np.einsum("ijk,ijk->ik", aa, b[:q].reshape(shp))
        out += v.sum(axis=0, dtype=np.float64)
    if q < a.shape[0]:
        v = np.add.reduce(a[q:], axis=0) if b is None else np.einsum("ij,ij->j", a[q:], b[q:])
        out += v
    return out


# --------------------------------------------------------------------------- per-channel constants
# Shared by the NumPy and CuPy kernels: (C,) float64 vectors in, (C,) float64 vectors out.

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


# --------------------------------------------------------------------------- the cache

class KernelCache(F.BNCache):
    """What the fast backward needs: ``x``, the statistics and the shift, no ``x_hat``.

    It is a :class:`functional.BNCache`, so the reference backward accepts it
    too: ``x_hat`` is then computed on first access (as the reference does).
    """

    def __init__(self, x, mean, var, inv_std, weight, eps, count, frozen=False):
        self.x, self.mean, self.var, self.inv_std = x, mean, var, inv_std
        self.weight, self.eps, self.count, self.frozen = weight, eps, count, frozen
        self._x_hat = None

    @property
    def x_hat(self):
        if self._x_hat is None:
            xp = get_array_module(self.x)
            dt = np.promote_types(self.x.dtype, np.float32)
            shape = F.channel_shape(self.x.ndim)
            self._x_hat = ((self.x - self.mean.reshape(shape).astype(dt))
                           * self.inv_std.reshape(shape).astype(dt))
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


# --------------------------------------------------------------------------- NumPy kernels

class _NumpyKernels:
    """The NumPy implementation (tiles, threads, out= buffers)."""

    @staticmethod
    def handles(x):
        return x.dtype in _FAST_DTYPES

    # -- statistics -----------------------------------------------------------------
    @staticmethod
    def _shifted_sums(plan, x, shift, out):
        """One pass: ``d = x - shift`` (into ``out`` or scratch tiles), per-channel ``sum(d)``,
        ``sum(d^2)`` in float64."""
        xe, (shift_m,) = plan.ew_view(x), plan.maps(x.dtype, shift)
        oe = plan.ew_view(out) if out is not None else None
        orr = plan.red_view(out) if out is not None else None
        p_d, p_d2 = plan.partials(2)
        rsum = _cols_sum if plan.cols else _rows_sum

        def body(t, scratch):
            if out is not None:
                np.subtract(xe[t.ew], shift_m[t.mp], out=oe[t.ew])
                d = orr[t.red]
            else:
                buf = scratch[:t.size]
                np.subtract(xe[t.ew], shift_m[t.mp], out=buf.reshape(t.ew_shape))
                d = buf.reshape(t.red_shape)
            p_d[t.k, t.lo:t.hi] = rsum(d)
            p_d2[t.k, t.lo:t.hi] = rsum(d, d)

        _run(plan, body, scratch_dtype=None if out is not None else x.dtype)
        return plan.fold(p_d), plan.fold(p_d2)

    @classmethod
    def moments(cls, x, out=None):
        """``(count, mean, var, shift)`` per channel; with ``out``, ``x - shift`` is left there.

        The shifted two-pass method of ``moments.py`` with a cheap first pass:
        the shift is the mean of the first few samples (``SHIFT_SAMPLE`` values
        per channel), rounded to the dtype.  With ``d = x - shift``::

            mean = shift + mean(d)          var = mean(d^2) - mean(d)^2

        which loses nothing while ``|mean(d)|`` is at most about one standard
        deviation.  If the sample was unrepresentative (sorted data, a drift
        across the batch) and ``|mean(d)| > REDO_RATIO * std`` for some channel,
        the pass is repeated with the mean just found as the shift: the
        classic two-pass method.
        """
        plan = _plan(x)
        m, C = plan.count, plan.C
        if m == 0 or x.size == 0:
            z = np.zeros(C)
            return m, z, z.copy(), z.copy()
        sample = plan.red_view(x)[plan.sample]
        axes = (0, 2) if not plan.cols else 0
        guess = sample.mean(axis=axes, dtype=np.float64)
        if plan.cols and plan.S > 1:
            guess = guess.reshape(C, plan.S).mean(axis=1)
        for attempt in range(2):
            shift = guess.astype(x.dtype).astype(np.float64)
            s_d, s_d2 = cls._shifted_sums(plan, x, shift, out)
            dmean = s_d / m
            var = np.maximum(s_d2 / m - dmean * dmean, 0.0)
            mean = shift + dmean
            if not np.any(dmean * dmean > REDO_RATIO * REDO_RATIO * var):
                break
            guess = mean
        return m, mean, var, shift

    # -- forward --------------------------------------------------------------------
    @classmethod
    def forward_train(cls, x, weight, bias, eps):
        """Training forward with this batch's statistics: ``(y, cache)``."""
        y = np.empty_like(x)
        count, mean, var, shift = cls.moments(x, y)      # y holds x - shift now
        inv_std, a, b = forward_coefficients(np, mean, var, shift, weight, bias, eps)
        plan = _plan(x)
        ye = plan.ew_view(y)
        a_m, b_m = plan.maps(x.dtype, a, b)

        def affine(t, _):
            yt = ye[t.ew]
            np.multiply(yt, a_m[t.mp], out=yt)
            np.add(yt, b_m[t.mp], out=yt)

        _run(plan, affine)
        return y, KernelCache(x, mean, var, inv_std, weight, eps, count)

    @staticmethod
    def normalize(x, mean, var, weight, bias, eps):
        """``y`` with given statistics (eval mode, or SyncBN's global ones): ``(y, inv_std)``.

        One pass, two or three operations per tile.  ``x * a + b`` (two) rounds
        ``x * a`` to the dtype, an error of ``eps_dtype * |mean| / std`` relative
        to the output; that is harmless while ``|mean| / std <= EVAL_SHIFT_RATIO``.
        Beyond it, ``(x - shift) * a + b`` (three) subtracts first, as the
        reference does.
        """
        inv = 1.0 / np.sqrt(var + eps)
        ratio = float(np.max(np.abs(mean) * inv)) if mean.size else 0.0
        subtract = not ratio <= EVAL_SHIFT_RATIO
        shift = mean.astype(x.dtype).astype(np.float64) if subtract else np.zeros_like(mean)
        inv_std, a, b = forward_coefficients(np, mean, var, shift, weight, bias, eps)
        y = np.empty_like(x)
        plan = _plan(x)
        xe, ye = plan.ew_view(x), plan.ew_view(y)
        a_m, b_m, s_m = plan.maps(x.dtype, a, b, shift)

        def affine(t, _):
            yt = ye[t.ew]
            if subtract:
                np.subtract(xe[t.ew], s_m[t.mp], out=yt)
                np.multiply(yt, a_m[t.mp], out=yt)
            else:
                np.multiply(xe[t.ew], a_m[t.mp], out=yt)
            np.add(yt, b_m[t.mp], out=yt)

        _run(plan, affine)
        return y, inv_std

    # -- backward -------------------------------------------------------------------
    @staticmethod
    def backward(dy, cache, reduce=None):
        """``(dx, dweight, dbias)``: one pass for the sums, one for ``dx``.

        ``d = x - shift`` with ``shift`` the mean rounded to the dtype; ``dx``
        holds ``d`` between the two passes.
        """
        x = cache.x
        plan = _plan(x)
        dx = np.empty_like(dy)
        xe, dye, dxe = plan.ew_view(x), plan.ew_view(dy), plan.ew_view(dx)
        dyr, dxr = plan.red_view(dy), plan.red_view(dx)
        weight = cache.weight
        shift = cache.mean.astype(x.dtype).astype(np.float64)
        delta = cache.mean - shift
        need_sums = not cache.frozen or weight is not None
        rsum = _cols_sum if plan.cols else _rows_sum
        sum_dy, sum_dy_xhat = np.zeros(plan.C), np.zeros(plan.C)
        if need_sums:
            (shift_m,) = plan.maps(x.dtype, shift)
            p_dy, p_dyd = plan.partials(2)

            def sums(t, _):
                np.subtract(xe[t.ew], shift_m[t.mp], out=dxe[t.ew])
                dyt = dyr[t.red]
                p_dy[t.k, t.lo:t.hi] = rsum(dyt)
                p_dyd[t.k, t.lo:t.hi] = rsum(dyt, dxr[t.red])

            _run(plan, sums)
            sum_dy = plan.fold(p_dy)
            # sum(dy * x_hat) = inv_std * (sum(dy * d) - (mean - shift) * sum(dy))
            sum_dy_xhat = cache.inv_std * (plan.fold(p_dyd) - delta * sum_dy)
        if cache.frozen:
            k = cache.inv_std * weight.astype(np.float64) if weight is not None else cache.inv_std
            (k_m,) = plan.maps(dy.dtype, k)

            def grad(t, _):
                np.multiply(dye[t.ew], k_m[t.mp], out=dxe[t.ew])
        else:
            g_dy, g_dyxh = sum_dy, sum_dy_xhat
            if reduce is not None:
                g_dy, g_dyxh = reduce(sum_dy, sum_dy_xhat)
                g_dy = np.asarray(g_dy, dtype=np.float64)
                g_dyxh = np.asarray(g_dyxh, dtype=np.float64)
            k, c0, c3 = backward_coefficients(g_dy, g_dyxh, cache.count, cache.inv_std, delta, weight)
            k_m, c0_m, c3_m = plan.maps(dy.dtype, k, c0, c3)

            def grad(t, _):                       # dx = k * (dy - c0 - c3 * d), d already in dx
                d = dxe[t.ew]
                np.multiply(d, c3_m[t.mp], out=d)
                np.add(d, c0_m[t.mp], out=d)
                np.subtract(dye[t.ew], d, out=d)
                np.multiply(d, k_m[t.mp], out=d)

        _run(plan, grad)
        if weight is None:
            return dx, None, None
        return dx, sum_dy_xhat.astype(weight.dtype), sum_dy.astype(weight.dtype)


_NUMPY = _NumpyKernels


# --------------------------------------------------------------------------- public entry points
# Same signatures and errors as functional.py / moments.py.

def _as_kernel_input(x):
    """C-contiguous view or copy (tiles index a reshaped view)."""
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _fast_ok(impl, x, *arrays):
    """The fast kernels take ``x`` (and ``arrays``): a known module, dtype and size."""
    if impl is None or not all(a is None or impl.handles(a) for a in (x,) + arrays):
        return False
    return impl is not _NUMPY or x.size >= REFERENCE_BELOW


def channel_moments(x):
    """``(count, mean, var)`` per channel (axis 1) in float64, like
    ``moments.channel_moments(x, reduce_axes(x.ndim))``."""
    impl = _implementation(x)
    if not _fast_ok(impl, x) or x.ndim < 2:
        return _reference_moments(x, reduce_axes(x.ndim))
    if impl is _NUMPY:
        x = _as_kernel_input(x)
    count, mean, var, _ = impl.moments(x)
    return count, mean, var


def _check_args(x, weight, bias, mean=None, var=None):
    F.check_floating(x)
    if x.ndim < 2:
        raise ValueError(f"batch norm expects input of shape (N, C, *), got shape {tuple(x.shape)}")
    check = getattr(F, "check_channel_vector", None)
    if check is not None:
        for v, what in ((mean, "mean"), (var, "var"), (weight, "weight"), (bias, "bias")):
            check(v, x.shape[1], what)


def batch_norm_forward(x, weight=None, bias=None, eps: float = 1e-5, stats=None):
    """Training-mode forward, like :func:`functional.batch_norm_forward`: ``(y, cache)``.

    ``stats=(count, mean, var)`` supplies the statistics (SyncBatchNorm's global
    ones); otherwise they are this batch's.
    """
    impl = _implementation(x, weight, bias)
    if not _fast_ok(impl, x):
        return F.batch_norm_forward(x, weight, bias, eps, stats=stats)
    _check_args(x, weight, bias)
    if impl is _NUMPY:
        x = _as_kernel_input(x)
    if stats is None:
        count = x.size // x.shape[1] if x.shape[1] else 0
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input of "
                             f"shape {tuple(x.shape)} ({count} value(s) per channel)")
        return impl.forward_train(x, weight, bias, eps)
    count, mean, var = stats
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(x.shape)} ({count} value(s) per channel)")
    xp = get_array_module(x)
    mean = xp.asarray(mean, dtype=np.float64)
    var = xp.asarray(var, dtype=np.float64)
    y, inv_std = impl.normalize(x, mean, var, weight, bias, eps)
    return y, KernelCache(x, mean, var, inv_std, weight, eps, int(count))


def batch_norm_eval_forward(x, mean, var, weight=None, bias=None, eps: float = 1e-5):
    """Forward with fixed statistics, like :func:`functional.batch_norm_eval_forward`."""
    impl = _implementation(x, mean, var, weight, bias)
    if not _fast_ok(impl, x):
        return F.batch_norm_eval_forward(x, mean, var, weight, bias, eps)
    _check_args(x, weight, bias, mean, var)
    if impl is _NUMPY:
        x = _as_kernel_input(x)
    xp = get_array_module(x)
    mean64 = xp.asarray(mean, dtype=np.float64)
    var64 = xp.asarray(var, dtype=np.float64)
    count = x.size // max(x.shape[1], 1)
    y, inv_std = impl.normalize(x, mean64, var64, weight, bias, eps)
    return y, KernelCache(x, mean64, var64, inv_std, weight, eps, count, frozen=True)


def batch_norm_backward(dy, cache, reduce=None):
    """Backward, like :func:`functional.batch_norm_backward`: ``(dx, dweight, dbias)``.

    ``reduce`` maps the local per-channel ``(sum dy, sum dy * x_hat)`` to the
    global ones (SyncBatchNorm); it is not called in eval mode.
    """
    impl = _implementation(dy, cache.x) if isinstance(cache, KernelCache) else None
    if not _fast_ok(impl, dy) or dy.dtype != cache.x.dtype:
        return F.batch_norm_backward(dy, cache, reduce=reduce)
    F.check_floating(dy, "dy")
    if tuple(dy.shape) != tuple(cache.x.shape):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected the forward output's shape "
                         f"{tuple(cache.x.shape)}")
    if impl is _NUMPY:
        dy = _as_kernel_input(dy)
    return impl.backward(dy, cache, reduce)
