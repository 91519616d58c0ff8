"""Fast batch-norm kernels: the math of ``functional.py``, arranged for memory traffic.

Batch norm does a handful of flops per element, so its speed is decided by how
many times the data crosses the memory bus (and, in NumPy, by the number of
Python-level steps), not by the arithmetic.  The readable path in
``functional.py`` takes a pass and a fresh full-size temporary for every
formula line.  This module computes the same numbers in a few passes, with no
full-size temporaries besides the outputs.

The math is the closed form of ``functional.py``, written around ``d = x - s``
for a per-channel *shift* ``s``: zero when the data is centred enough, else
the mean rounded to the input's dtype (``x - s`` is then exact for values near
the mean, so nothing cancels when ``|mean| >> std``).  Per channel, in float64::

    statistics     mean = s + sum(d) / m        var = sum(d^2) / m - (sum(d) / m)^2
    forward        y  = d * a + b               a = gamma / sqrt(var + eps),  b = beta - (mean - s) a
    backward       sum(dy * x_hat) = (sum(dy * d) - (mean - s) sum(dy)) / sqrt(var + eps)
                   dx = k * (dy - c0 - c3 * d)  k = gamma / sqrt(var + eps)  (c0, c3: backward_coefficients)

A training step is one pass for the statistics (read-only for centred data),
one pass for ``y``, one read-only pass for the two gradient sums and one pass
for ``dx``.  The per-channel constants are computed on ``C`` numbers in
float64 (:func:`forward_coefficients`, :func:`backward_coefficients`, shared
with the CuPy kernels); the element-wise passes run in the input's dtype.

How the passes are arranged:

* **Tiles.**  The input is viewed as ``(N, C, S)`` (``S`` = product of the
  spatial sizes) and cut into tiles of about ``TILE_BYTES``; all operations
  of a pass run on one tile before the next, so the second and later ones
  find it in cache.
* **Maps.**  A NumPy binary operation is fastest when its operands are
  contiguous and of equal size.  When many tiles share them, per-channel
  constants are expanded once per call into *maps* that line up element by
  element with a tile (``a[c]`` repeated ``S`` times, for the samples of a
  tile); otherwise a map of a block of samples (at most ``MAP_BLOCK_BYTES``)
  is broadcast over the tile's blocks.
* **Reductions.**  Sums run in the input's dtype over short runs only: at
  most ``ROW_RUN`` contiguous values (BLAS dot products through
  ``np.vecdot``), or ``COL_RUN`` rows for ``(N, C)``-like input (down the
  columns: ``ones @ run`` through BLAS, ``einsum`` for products).  The run
  sums of a pass are added up in float64, once, at its end.  A float32 run of a few hundred values loses at most a few units
  in the last place; float64 takes it from there, as in ``moments.py``.
* **Threads.**  NumPy releases the GIL inside its loops, so for large inputs
  the tiles are shared out to ``num_threads()`` threads
  (``MINIBN_NUM_THREADS``, default: the CPUs this process may use).  Every
  tile writes its sums to its own place and the float64 totals are added in
  a fixed order: results do not depend on the number of threads.
* **No fresh memory.**  Maps, scratch tiles and run sums live in per-thread
  buffers reused from call to call, and large outputs are recycled once
  their user has dropped them (``_new_output``): on a virtual machine, the
  page faults of a fresh large array cost as much as the arithmetic of a pass.

Two layouts: ``rows`` (``S >= ROW_MIN``) reduces along the contiguous spatial
rows of each ``(n, c)``; ``cols`` (``(N, C)`` input and short rows) views the
input as ``(N, C*S)`` and reduces down the columns.

Which path runs: :func:`batch_norm_forward`, :func:`batch_norm_eval_forward`,
:func:`batch_norm_backward` and :func:`channel_moments` have the signatures
and errors of their counterparts in ``functional.py``/``moments.py`` and
return the same numbers, to rounding.  What computes is chosen once for the
process: ``MINIBN_KERNELS`` in the environment or :func:`use_kernels` --
``numpy`` (these kernels, the default), ``numba`` (the compiled loops of
``kernels_numba.py``, an optional extra) or ``reference`` (the readable path;
also ``use_fast_kernels(False)`` and ``with reference_kernels():``).  The
readable path also takes dtypes other than float32/float64, NumPy inputs of
fewer than ``REFERENCE_BELOW`` elements when the NumPy kernels are selected
(the readable code is as fast there), and array modules other than NumPy and
CuPy.  CuPy arrays go to the fused GPU kernels of ``kernels_cupy.py``.
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from . import functional as F
from .backend import get_array_module
from .moments import channel_moments as _reference_moments, plain_array, reduce_axes

__all__ = [
    "batch_norm_forward", "batch_norm_eval_forward", "batch_norm_backward", "channel_moments",
    "KernelCache", "use_fast_kernels", "fast_kernels_enabled", "reference_kernels",
    "num_threads", "set_num_threads", "forward_coefficients", "backward_coefficients",
    "gradient_coefficients", "rounded_mean",
    "release_buffers", "use_kernels", "kernels_in_use", "selected_kernels", "KERNELS",
]

# --------------------------------------------------------------------------- tunables

TILE_BYTES = 1 << 20          # bytes per array and tile
ROW_RUN = 256                 # rows layout: float32 dot products over at most this many values
COL_RUN = 8                   # cols layout: float32 sums down at most this many rows
ROW_MIN = 32                  # spatial rows shorter than this use the cols layout
MAP_MIN_N = 4                 # expand per-channel constants into maps when N >= this ...
MAP_MAX_BYTES = 1 << 21       # ... and one sample (C * S values) is at most this big
MAP_TILES_MIN = 8             # maps covering several samples: only if this many tiles use them
MAP_ROW_MAX = 1 << 14         # ... and rows are shorter than this (else broadcasting is as fast)
MAP_BLOCK_BYTES = 1 << 16     # otherwise a map covers a block of rows of at most this size
PARALLEL_MIN_BYTES = 1 << 21  # below this, one thread (hand-offs and the GIL cost more than they save)
SMALL_BYTES = 1 << 16         # inputs up to this size are one tile with broadcasting constants
REFERENCE_BELOW = 16384       # NumPy inputs with fewer elements take the readable path
SHIFT_SAMPLE = 64             # values per channel looked at to choose the shift
DIRECT_RATIO = 0.5            # no shift when the sample's |mean| / std is below this in every channel
REDO_RATIO = 1.0              # redo the statistics pass when |mean - shift| > REDO_RATIO * std
SHIFT_RATIO = 2.0             # given statistics: subtract the mean first when |mean| / std > this
RECYCLE_MIN_BYTES = 1 << 20   # outputs at least this big are recycled once their user drops them
RECYCLE_KEEP = 5              # ... keeping at most this many per shape and dtype (y, dx, the cache's x)
RECYCLE_SHAPES = 8            # ... for at most this many shapes

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- which path
# "numpy": the NumPy kernels below (the default); "numba": the compiled loops of
# kernels_numba.py (optional, needs numba); "reference": the readable functional.py.
# CuPy arrays go to kernels_cupy.py unless "reference" is selected.

KERNELS = ("numpy", "numba", "reference")
_ALIASES = {"": "numpy", "fast": "numpy", "numpy": "numpy", "numba": "numba",
            "reference": "reference", "ref": "reference"}


def _parse_kernels(value, where):
    name = _ALIASES.get(str(value).strip().lower())
    if name is None:
        raise ValueError(f"{where}: expected one of {', '.join(KERNELS)}, got {value!r}")
    return name


_kind = _parse_kernels(os.environ.get("MINIBN_KERNELS", "numpy"), "MINIBN_KERNELS")
_fast_kind = _kind if _kind != "reference" else "numpy"      # what use_fast_kernels(True) restores


def _checked(name, where):
    """A valid kernel name; selecting numba without numba installed fails here, not at the
    first forward."""
    name = _parse_kernels(name, where)
    if name == "numba":
        _numba_kernels()
    return name


def _numba_kernels():
    from . import kernels_numba
    if not kernels_numba.available():
        raise RuntimeError("the numba kernels were selected (MINIBN_KERNELS=numba or "
                           "use_kernels('numba')) but numba is not installed; install it with "
                           "`pip install minibn[jit]`, or select the NumPy kernels")
    return kernels_numba


def use_kernels(name: str):
    """Select the kernels for NumPy arrays: ``"numpy"`` (default), ``"numba"`` or ``"reference"``."""
    global _kind, _fast_kind
    name = _checked(name, "use_kernels")
    _kind = name
    if name != "reference":
        _fast_kind = name


def kernels_in_use() -> str:
    """``"numpy"``, ``"numba"`` or ``"reference"``."""
    return _kind


def use_fast_kernels(enabled: bool = True):
    """Select the fast kernels (``True``, the default) or the readable reference path."""
    global _kind
    _kind = _fast_kind if enabled else "reference"


def fast_kernels_enabled() -> bool:
    return _kind != "reference"


@contextmanager
def selected_kernels(name: str):
    """``with selected_kernels("numba"): ...`` runs the block on the kernels named (see
    :func:`use_kernels`), then restores the previous choice."""
    global _kind
    name = _checked(name, "selected_kernels")
    saved, _kind = _kind, name
    try:
        yield
    finally:
        _kind = saved


def reference_kernels():
    """``with reference_kernels(): ...`` runs the block on the readable ``functional`` path."""
    return selected_kernels("reference")


def _implementation(*arrays):
    """What computes for these arrays: the NumPy kernels, ``kernels_numba``, ``kernels_cupy``,
    or ``None`` (the readable path)."""
    if _kind == "reference":
        return None
    xp = get_array_module(*arrays)
    if xp is np:
        return _NUMPY if _kind == "numpy" else _numba_kernels()
    from . import kernels_cupy
    return kernels_cupy if xp.__name__ == "cupy" and kernels_cupy.available() else None


# --------------------------------------------------------------------------- threads and buffers

_threads = None
_pool = None
_pool_lock = threading.Lock()
_local = threading.local()


def num_threads() -> int:
    """Threads the NumPy kernels use: ``MINIBN_NUM_THREADS`` or the CPUs this process may use."""
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


def _buffer(name, n, dtype):
    """A work array of ``n`` elements, kept per thread and reused from call to call.

    The next request under the same name (in the same thread) returns the same
    memory: a caller uses a buffer only until its next call.
    """
    bufs = _local.__dict__.get("buffers")
    if bufs is None:
        bufs = _local.buffers = {}
        with _outputs_lock:
            _all_buffers.append(bufs)
    key = (name, np.dtype(dtype).char)
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = bufs[key] = np.empty(max(n, 1), dtype=dtype)
    return buf[:n]


_outputs = {}                     # (shape, dtype) -> arrays handed out before
_outputs_lock = threading.Lock()
_all_buffers = []                 # every thread's work-buffer dict


def _new_output(like):
    """An uninitialized array shaped like ``like``, for ``y`` or ``dx``.

    Writing a fresh large array costs a page fault per 4 KiB page on first
    touch (on this kind of machine as much as the arithmetic of the whole
    pass).  So large outputs are recycled: an array handed out earlier is
    handed out again once nothing else refers to it -- its reference count
    (which every view, memoryview or wrapping array adds to) shows that only
    this cache holds it, and it still has its shape, dtype and flags.
    """
    if like.nbytes < RECYCLE_MIN_BYTES or not hasattr(sys, "getrefcount"):
        return np.empty_like(like)
    key = (like.shape, like.dtype.str)
    with _outputs_lock:
        kept = _outputs.pop(key, [])
        _outputs[key] = kept                      # most recently used shape last
        for buf in kept:
            # references: the list, ``buf`` and getrefcount's argument -> 3 when unused
            if sys.getrefcount(buf) == 3 and buf.shape == like.shape and buf.dtype == like.dtype \
                    and buf.flags.c_contiguous and buf.flags.writeable and buf.base is None:
                return buf
        buf = np.empty(like.shape, dtype=like.dtype)
        if len(kept) < RECYCLE_KEEP:
            kept.append(buf)
        while len(_outputs) > RECYCLE_SHAPES:
            del _outputs[next(iter(_outputs))]
        return buf


def release_buffers():
    """Forget the recycled outputs and every thread's work buffers (their memory is
    freed once nothing else refers to them).  Call it between kernel calls."""
    with _outputs_lock:
        _outputs.clear()
        for bufs in _all_buffers:
            bufs.clear()


@lru_cache(maxsize=64)
def _ones(n, dtype):
    """A vector of ones: ``vecdot(run, ones)`` is the BLAS sum of a run (shared, read-only)."""
    v = np.ones(n, dtype=dtype)
    v.flags.writeable = False
    return v


# --------------------------------------------------------------------------- tiling

@lru_cache(maxsize=256)
def _row_runs(S):
    """How a row of ``S`` values is cut into float32 summation runs: ``(run, full_runs, rest)``.

    ``run <= ROW_RUN``; a divisor of ``S`` when one exists between ``ROW_RUN/2``
    and ``ROW_RUN`` (no remainder piece), else ``ROW_RUN`` and a shorter rest.
    """
    if S <= ROW_RUN:
        return S, 1, 0
    for r in range(ROW_RUN, ROW_RUN // 2 - 1, -1):
        if S % r == 0:
            return r, S // r, 0
    return ROW_RUN, S // ROW_RUN, S % ROW_RUN


class _Tile:
    """One block of the input and where its results go.

    ``ew`` indexes the plan's element-wise view and ``mp`` the maps (they line
    up element by element); ``red`` indexes the reduction view.  ``parts``
    says where the tile's sums go: in the rows layout a list of ``(index
    into the tile, run length, index into the run sums)``, in the cols
    layout ``(full runs, rows left over, run sums, partial row, columns)``.
    """
    __slots__ = ("ew", "mp", "red", "parts", "size", "ew_shape", "red_shape")

    def __init__(self, ew, mp, red, parts, ew_shape, red_shape):
        self.ew, self.mp, self.red, self.parts = ew, mp, red, parts
        self.ew_shape, self.red_shape = ew_shape, red_shape
        self.size = int(np.prod(red_shape))


class _Plan:
    """How an input shape is cut into tiles, and the tiles shared among threads.

    Reduction view: ``(N, C, S)`` (rows layout) or ``(N, W)`` with ``W = C*S``
    (cols layout).  Partial sums, in the dtype: the run sums ``(N, C, runs per
    row)`` (rows layout), or the sums of each run of ``COL_RUN`` rows,
    ``(runs, W)`` (cols layout).  Element-wise view: the flat array when
    every tile is a contiguous segment lined up with the maps; ``(N / reps,
    reps * C*S)`` when a map of ``reps`` samples is broadcast over a tile's
    blocks of samples (``reps`` may be 1); ``(N, C, S)`` when
    the constants are ``(C, 1)`` columns (small inputs, or very long samples
    of a small batch).
    """

    def __init__(self, shape, itemsize, threads):
        self.shape = tuple(shape)
        N, C = shape[0], shape[1]
        S = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        self.N, self.C, self.S = N, C, S
        self.itemsize = itemsize
        self.count = N * S
        total = N * C * S
        self.cols = S < ROW_MIN
        self.reps = 1             # samples one map covers
        self.col_coef = False     # constants as (C, 1) columns, broadcast, instead of maps
        tile = max(ROW_RUN, TILE_BYTES // itemsize)
        if self.cols:
            W = C * S
            self.red_shape = (N, W)
            self._rows_per_tile = max(N, 1)         # (one tile of all rows unless set below)
        else:
            self.red_shape = (N, C, S)
            run, full, rest = _row_runs(S)
            self.part_shape = (N, C, full + (rest > 0))
        self.ew_shape = (-1,)
        self.tiles = tiles = []
        if total == 0:
            self.ew_shape = self.red_shape
        elif total * itemsize <= SMALL_BYTES:       # one tile, constants broadcast
            self.col_coef = True
            self.ew_shape = (N, C, S)
            red = (slice(None),) * len(self.red_shape)
            tiles.append(self._tile((slice(None),) * 3, slice(None), red, (N, C, S)))
        elif self.cols:
            W = C * S
            if W <= tile:         # whole rows
                nb = min(N, max(COL_RUN, tile // W // COL_RUN * COL_RUN))
                self._whole_rows(N, W, nb, (slice(None),))
            else:                 # very wide rows: 2-D blocks, maps of one row broadcast
                self.ew_shape = (N, W)
                nb, wb = 4 * COL_RUN, max(1, tile // (4 * COL_RUN))
                self._rows_per_tile = nb
                for n0 in range(0, N, nb):
                    for w0 in range(0, W, wb):
                        n1, w1 = min(N, n0 + nb), min(W, w0 + wb)
                        idx = (slice(n0, n1), slice(w0, w1))
                        tiles.append(self._tile(idx, slice(w0, w1), idx, (n1 - n0, w1 - w0)))
        else:
            CS = C * S
            if CS <= tile:        # whole samples
                self._whole_rows(N, CS, min(N, max(1, tile // CS)), (slice(None), slice(None)))
            else:                 # channel groups of one sample, or pieces of one long row
                self.col_coef = N < MAP_MIN_N or CS * itemsize > MAP_MAX_BYTES
                if self.col_coef:
                    self.ew_shape = (N, C, S)
                run = _row_runs(S)[0]
                cb = max(1, tile // S)
                sb = S if S <= tile else max(run, tile // run * run)
                for n in range(N):
                    for c0 in range(0, C, cb if sb == S else 1):
                        c1 = min(C, c0 + (cb if sb == S else 1))
                        for s0 in range(0, S, sb):
                            s1 = min(S, s0 + sb)
                            red = (slice(n, n + 1), slice(c0, c1), slice(s0, s1))
                            if self.col_coef:
                                tiles.append(self._tile(red, slice(c0, c1), red, (1, c1 - c0, s1 - s0)))
                            else:
                                start = (n * C + c0) * S + s0
                                length = (c1 - c0) * (s1 - s0)
                                tiles.append(self._tile(slice(start, start + length),
                                                        slice(c0 * S + s0, c0 * S + s0 + length),
                                                        red, (-1,)))
        self.tiles = tiles
        if self.cols:             # run sums: ceil(nb / COL_RUN) rows per block of nb rows
            nb = self._rows_per_tile
            per, blocks = -(-nb // COL_RUN), -(-N // nb)
            self.part_shape = (blocks * per, C * S)
            self._used_rows = (blocks - 1) * per + -(-(N - (blocks - 1) * nb) // COL_RUN) if N else 0
        self.max_tile = max((t.size for t in tiles), default=0)
        n = 1 if total * itemsize < PARALLEL_MIN_BYTES else max(1, min(threads, len(tiles)))
        groups = [[] for _ in range(n)]          # contiguous runs of tiles, equal in size
        acc = 0
        for t in tiles:
            groups[min(n - 1, acc * n // max(total, 1))].append(t)
            acc += t.size
        self.groups = [g for g in groups if g] or [[]]
        if self.cols:             # the first rows; or the first values of the first two samples
            self.sample = (slice(0, min(N, SHIFT_SAMPLE)), slice(None))
        else:
            self.sample = (slice(0, min(N, 2)), slice(None), slice(0, min(S, SHIFT_SAMPLE // 2)))

    def _whole_rows(self, N, W, nb, rest):
        """Tiles of about ``nb`` whole rows (samples) of ``W`` values.

        With many such tiles and short rows, the maps cover ``nb`` rows and a
        tile is one flat operation.  Otherwise the maps cover a *block* of
        ``reps`` rows, at most ``MAP_BLOCK_BYTES``, with ``reps`` dividing both
        ``N`` and ``nb``: a tile is then viewed as ``(blocks, reps * W)`` and
        the map broadcast over its blocks, so that the inner loop of every
        operation runs over ``reps * W`` contiguous values of equal-shaped
        operands (for ``(N, C)`` input with a few hundred channels this is
        much faster than broadcasting one row of ``C`` values).  When ``N``
        has no such divisor, ``reps`` is 1: one row broadcast over the tile.
        """
        flat = -(-N // nb) >= MAP_TILES_MIN and W < MAP_ROW_MAX and nb > 1
        if flat:
            self.reps = nb
        else:
            limit = max(1, min(nb, MAP_BLOCK_BYTES // max(W * self.itemsize, 1)))
            reps = next(r for r in range(limit, 0, -1) if N % r == 0)
            nb = max(reps, nb // reps * reps)
            self.reps = reps
            self.ew_shape = (N // reps, reps * W)
        self._rows_per_tile = nb
        for n0 in range(0, N, nb):
            n1 = min(N, n0 + nb)
            red = (slice(n0, n1),) + rest
            if flat:
                self.tiles.append(self._tile(slice(n0 * W, n1 * W), slice(0, (n1 - n0) * W), red, (-1,)))
            else:
                r = self.reps
                self.tiles.append(self._tile((slice(n0 // r, n1 // r), slice(None)), slice(None), red,
                                             ((n1 - n0) // r, r * W)))

    def _tile(self, ew, mp, red, ew_shape):
        """A tile with its reduction pieces, from its index ``red`` in the reduction view."""
        bounds = [(s.start or 0, s.stop if s.stop is not None else dim)
                  for s, dim in zip(red, self.red_shape)]
        red_shape = tuple(b - a for a, b in bounds)
        parts = []
        if self.cols:
            # sums of runs of COL_RUN rows, in the dtype, into the partials' rows from
            # (n0 // nb) * ceil(nb / COL_RUN) on (every tile of a row block has nb rows)
            (n0, n1), (w0, w1) = bounds
            full1, rest1 = divmod(n1 - n0, COL_RUN)
            start = n0 // self._rows_per_tile * -(-self._rows_per_tile // COL_RUN)
            parts = (full1, rest1, start, start + full1 + (rest1 > 0), slice(w0, w1))
        else:
            (n0, n1), (c0, c1), (s0, s1) = bounds
            run, nfull, rest = _row_runs(self.S)
            e = min(s1, nfull * run)                 # tiles start on run boundaries
            if e > s0:
                parts.append(((Ellipsis, slice(0, e - s0)), run,
                              (slice(n0, n1), slice(c0, c1), slice(s0 // run, e // run))))
            if s1 > nfull * run:
                parts.append(((Ellipsis, slice(nfull * run - s0, None)), rest,
                              (slice(n0, n1), slice(c0, c1), slice(nfull, nfull + 1))))
        return _Tile(ew, mp, red, parts, ew_shape, red_shape)

    def ew_view(self, a):
        return a.reshape(self.ew_shape)

    def red_view(self, a):
        return a.reshape(self.red_shape)

    def maps(self, dtype, *vectors):
        """Per-channel float64 vectors as arrays that line up with the tiles, in ``dtype``.

        The arrays are per-thread buffers: valid until the next ``maps`` call.
        """
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

    def partials(self, dtype, n=1):
        """``n`` arrays for the run sums of a pass, in ``dtype`` (per-thread buffers)."""
        size = int(np.prod(self.part_shape))
        return [_buffer(f"parts{i}", size, dtype).reshape(self.part_shape) for i in range(n)]

    def fold(self, parts):
        """Run sums -> ``(C,)`` float64 per-channel sums, added up in float64 in a fixed order."""
        if self.cols:
            s = np.add.reduce(parts[:self._used_rows], axis=0, dtype=np.float64)
            return s.reshape(self.C, self.S).sum(axis=1) if self.S > 1 else s
        N, C, R = parts.shape
        return np.add.reduce(parts.reshape(N, C * R), axis=0, dtype=np.float64).reshape(C, R).sum(axis=1)


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


def _reduce(plan, t, a, b, out):
    """Partial sums of ``sum(a)`` (``b`` is None) or ``sum(a * b)`` over tile ``t`` into ``out``.

    ``a``/``b`` are the tile in the reduction view; float32 data is summed in
    float32 over each run only.  (Even for data centred on zero a long float32
    sum is not safe: clustered data makes partial sums large.)
    """
    if plan.cols:                                     # (full1, r, wb) -> (full1, wb) in out
        full1, rest1, start, stop, cols = t.parts
        level1 = out[start:stop, cols]
        r = COL_RUN
        if full1:
            shp = (full1, r, a.shape[1])
            if b is None:                             # BLAS: ones(r) @ each run, twice as fast
                np.matmul(_ones(r, a.dtype), a[:full1 * r].reshape(shp), out=level1[:full1])
            else:
                np.einsum("ijk,ijk->ik", a[:full1 * r].reshape(shp), b[:full1 * r].reshape(shp),
                          out=level1[:full1])
        if rest1:                                     # the last, shorter run of rows
            if b is None:
                np.matmul(_ones(rest1, a.dtype), a[full1 * r:], out=level1[full1])
            else:
                np.einsum("ij,ij->j", a[full1 * r:], b[full1 * r:], out=level1[full1])
        return
    for idx, run, dest in t.parts:                    # (nb, cb, L) -> (nb, cb, L / run)
        aa = a[idx]
        shp = aa.shape[:-1] + (aa.shape[-1] // run, run)
        np.vecdot(aa.reshape(shp), _ones(run, aa.dtype) if b is None else b[idx].reshape(shp),
                  out=out[dest])


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


def rounded_mean(mean, dtype):
    """``(mean_t, delta)``: the float64 mean rounded to ``dtype``, and ``mean - mean_t``.

    Element-wise kernels that compute in the input's dtype subtract ``mean_t``
    (exact for values near the mean) and fold ``delta`` into their constants.
    """
    mean_t = mean.astype(dtype)
    return mean_t, mean - mean_t.astype(np.float64)


def gradient_coefficients(xp, cache, sum_dy, sum_dy_xhat, delta, reduce=None):
    """``(k, c0, c3)`` of the backward for ``cache``: ``dx = k * (dy - c0 - c3 * (x - shift))``.

    In eval mode (``cache.frozen``) the statistics are constants and
    ``dx = k * dy``: ``c0`` and ``c3`` are ``None``.  In training mode
    ``reduce`` (SyncBatchNorm) first maps the local ``(sum dy, sum dy * x_hat)``
    to the global ones.  ``delta`` is ``mean - shift``; ``xp`` the array module.
    """
    weight = cache.weight
    if cache.frozen:
        k = cache.inv_std * weight.astype(np.float64) if weight is not None else cache.inv_std
        return k, None, None
    if reduce is not None:
        sum_dy, sum_dy_xhat = reduce(sum_dy, sum_dy_xhat)
        sum_dy = xp.asarray(sum_dy, dtype=np.float64)
        sum_dy_xhat = xp.asarray(sum_dy_xhat, dtype=np.float64)
    return backward_coefficients(sum_dy, sum_dy_xhat, cache.count, cache.inv_std, delta, weight)


# --------------------------------------------------------------------------- out of range
# The element-wise passes and the float32 run sums work in the input's dtype.  Inputs
# whose numbers leave its range (float32 data near 1e19 and beyond: squares overflow;
# near 1e37: scales become subnormal) are handed to the readable path, which forms
# what does not fit in float64 (moments.channel_moments, functional.normalize).

class _NeedsFloat64(Exception):
    """Raised by a kernel, before it writes anything the caller sees, for such inputs."""


def _all_finite(*arrays):
    return all(bool(get_array_module(a).isfinite(a).all()) for a in arrays)


def _check_sums(sums, *inputs):
    """``_NeedsFloat64`` when float sums overflowed although every input is finite."""
    if not _all_finite(*sums) and _all_finite(*inputs):
        raise _NeedsFloat64


def _check_range(x, count, var, weight, eps):
    """``_NeedsFloat64`` when normalizing ``x`` in its dtype could overflow or go subnormal."""
    if F.elementwise_out_of_range(x.dtype, count, var, weight, eps):
        raise _NeedsFloat64


# --------------------------------------------------------------------------- the cache

class KernelCache(F.BNCache):
    """What the fast backward needs: ``x`` and the statistics, no ``x_hat``.

    ``x`` is the cache's own copy of the forward's input (the kernels write it
    in the forward's element-wise pass, while each tile is in cache): editing
    the caller's array after the forward does not change the backward.

    It is a :class:`functional.BNCache`, so the reference backward accepts it
    too: ``x_hat`` is then computed on first access, by ``functional.normalize``.
    """

    def __init__(self, x, mean, var, inv_std, weight, eps, count, frozen=False):
        self.x, self.mean, self.var, self.inv_std = x, mean, var, inv_std
        self.weight, self.eps, self.count, self.frozen = weight, eps, count, frozen
        self._x_hat = None

    @property
    def x_hat(self):
        if self._x_hat is None:
            self._x_hat = F.normalize(self.x, self.mean, self.var, None, None, self.eps)[1]
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
    """The NumPy implementation (tiles, maps, run partials, threads)."""

    @staticmethod
    def handles(x):
        return x.dtype in _FAST_DTYPES

    # -- statistics -----------------------------------------------------------------
    @staticmethod
    def _shifted_sums(plan, x, shift, out):
        """One pass: per-channel float64 ``sum(d)`` and ``sum(d^2)`` with ``d = x - shift``.

        ``shift=None`` means ``d = x``: no subtraction at all.  Otherwise ``d``
        is formed tile by tile, in ``out`` if given (and left there), else in a
        per-thread scratch tile.
        """
        xe, xr = plan.ew_view(x), plan.red_view(x)
        shift_m = plan.maps(x.dtype, shift)[0] if shift is not None else None
        oe = plan.ew_view(out) if out is not None else None
        orr = plan.red_view(out) if out is not None else None
        p_d, p_d2 = plan.partials(x.dtype, 2)

        def body(t, scratch):
            if shift_m is None:
                d = xr[t.red]
            elif oe is not None:
                np.subtract(xe[t.ew], shift_m[t.mp], out=oe[t.ew])
                d = orr[t.red]
            else:
                buf = scratch[:t.size]
                np.subtract(xe[t.ew], shift_m[t.mp], out=buf.reshape(t.ew_shape))
                d = buf.reshape(t.red_shape)
            _reduce(plan, t, d, None, p_d)
            _reduce(plan, t, d, d, p_d2)

        _run(plan, body, scratch_dtype=x.dtype if shift_m is not None and oe is None else None)
        return plan.fold(p_d), plan.fold(p_d2)

    @classmethod
    def moments(cls, x, out=None):
        """``(count, mean, var, shift)`` per channel in float64; ``shift`` is None or a vector.

        The shifted method of ``moments.py`` with ``d = x - shift``::

            mean = shift + mean(d)          var = mean(d^2) - mean(d)^2

        loses nothing while ``|mean(d)|`` is at most about one standard
        deviation.  The shift is chosen from ``SHIFT_SAMPLE`` values per channel
        (the first rows, or the first values of the first two samples): if their
        mean is within ``DIRECT_RATIO`` of their standard deviations of zero in
        every channel there is no shift and the pass only reads ``x``; otherwise
        the shift is their mean rounded to the dtype and ``d`` is formed tile by
        tile (into ``out`` when given, and left there for the caller).  If the
        sample was unrepresentative (sorted data, a drift across the batch) and
        ``|mean(d)| > REDO_RATIO * std`` for some channel, the pass is repeated
        with the mean just found as the shift: the classic two-pass method.
        """
        plan = _plan(x)
        m, C = plan.count, plan.C
        if m == 0 or x.size == 0:
            z = np.zeros(C)
            return m, z, z.copy(), None
        sample = plan.red_view(x)[plan.sample]          # rough numbers are enough here
        with np.errstate(over="ignore", invalid="ignore"):   # a guess: overflow is checked below
            if plan.cols:
                n_s = sample.shape[0]
                s1, s2 = np.add.reduce(sample, axis=0), np.einsum("ij,ij->j", sample, sample)
            else:
                n_s = sample.shape[0] * sample.shape[2]
                s1, s2 = sample.sum(axis=(0, 2)), np.einsum("ijk,ijk->j", sample, sample)
            guess = s1.astype(np.float64) / n_s
            spread = s2.astype(np.float64) / n_s - guess * guess
        if plan.cols and plan.S > 1:
            guess = guess.reshape(C, plan.S).mean(axis=1)
            spread = spread.reshape(C, plan.S).mean(axis=1)
        centred = np.all(guess * guess <= DIRECT_RATIO * DIRECT_RATIO * spread)
        shift = None if centred else guess.astype(x.dtype).astype(np.float64)
        for _ in range(2):
            with np.errstate(over="ignore", invalid="ignore"):     # checked below
                s_d, s_d2 = cls._shifted_sums(plan, x, shift, out)
                dmean = s_d / m
                var = np.maximum(s_d2 / m - dmean * dmean, 0.0)
            _check_sums((dmean, var), x)          # squares beyond the dtype: float64 is needed
            mean = dmean if shift is None else shift + dmean
            if not np.any(dmean * dmean > REDO_RATIO * REDO_RATIO * var):
                break
            shift = mean.astype(x.dtype).astype(np.float64)
        return m, mean, var, shift

    # -- forward --------------------------------------------------------------------
    @classmethod
    def forward_train(cls, x, weight, bias, eps):
        """Training forward with this batch's statistics: ``(y, cache)``."""
        y = _new_output(x)
        count, mean, var, shift = cls.moments(x, y)      # y holds x - shift if there is a shift
        _check_range(x, count, var, weight, eps)
        inv_std, a, b = forward_coefficients(np, mean, var, shift if shift is not None else 0.0,
                                             weight, bias, eps)
        plan = _plan(x)
        kept = _new_output(x)                            # the cache's own copy of x
        xe, ye, ke = plan.ew_view(x), plan.ew_view(y), plan.ew_view(kept)
        a_m, b_m = plan.maps(x.dtype, a, b)

        def affine(t, _):
            yt = ye[t.ew]
            np.copyto(ke[t.ew], xe[t.ew])
            np.multiply(xe[t.ew] if shift is None else yt, a_m[t.mp], out=yt)
            np.add(yt, b_m[t.mp], out=yt)

        _run(plan, affine)
        return y, KernelCache(kept, mean, var, inv_std, weight, eps, count)

    @staticmethod
    def _shift_for(x, mean, inv_std):
        """The shift for given statistics: ``None`` while ``|mean| / std <= SHIFT_RATIO``, else
        the mean rounded to the dtype.

        Without a shift, ``x * a`` is rounded to the dtype with ``x`` itself
        (not ``x - mean``): an error of about ``eps_dtype * |mean| / std``
        relative to the output, harmless while that ratio is small.  Beyond
        it the mean is subtracted first, as the reference does.
        """
        ratio = float(np.max(np.abs(mean) * inv_std)) if mean.size else 0.0
        return None if ratio <= SHIFT_RATIO else mean.astype(x.dtype).astype(np.float64)

    @classmethod
    def normalize(cls, x, mean, var, weight, bias, eps):
        """``y`` with given statistics (eval mode, or SyncBN's global ones):
        ``(y, inv_std, kept)``, ``kept`` a copy of ``x`` for the cache.

        One pass, two operations per tile (three with a shift) and the copy.
        """
        shift = cls._shift_for(x, mean, 1.0 / np.sqrt(var + eps))
        inv_std, a, b = forward_coefficients(np, mean, var, shift if shift is not None else 0.0,
                                             weight, bias, eps)
        y, kept = _new_output(x), _new_output(x)
        plan = _plan(x)
        xe, ye, ke = plan.ew_view(x), plan.ew_view(y), plan.ew_view(kept)
        if shift is None:
            a_m, b_m = plan.maps(x.dtype, a, b)
        else:
            a_m, b_m, s_m = plan.maps(x.dtype, a, b, shift)

        def affine(t, _):
            yt = ye[t.ew]
            np.copyto(ke[t.ew], xe[t.ew])
            if shift is None:
                np.multiply(xe[t.ew], a_m[t.mp], out=yt)
            else:
                np.subtract(xe[t.ew], s_m[t.mp], out=yt)
                np.multiply(yt, a_m[t.mp], out=yt)
            np.add(yt, b_m[t.mp], out=yt)

        _run(plan, affine)
        return y, inv_std, kept

    # -- backward -------------------------------------------------------------------
    @classmethod
    def backward(cls, dy, cache, reduce=None):
        """``(dx, dweight, dbias)``: one pass for the sums, one for ``dx``.

        ``d = x - shift`` with the shift of ``_shift_for``: without one, ``d``
        is ``x`` itself and the first pass only reads; with one, the first pass
        forms ``d`` in ``dx`` and the second pass uses it.
        """
        x = cache.x
        plan = _plan(x)
        dx = _new_output(dy)
        xe, dye, dxe = plan.ew_view(x), plan.ew_view(dy), plan.ew_view(dx)
        xr, dyr, dxr = plan.red_view(x), plan.red_view(dy), plan.red_view(dx)
        weight = cache.weight
        shift = cls._shift_for(x, cache.mean, cache.inv_std)
        delta = cache.mean - (shift if shift is not None else 0.0)
        sum_dy, sum_dy_xhat = np.zeros(plan.C), np.zeros(plan.C)
        if not cache.frozen or weight is not None:
            s_m = plan.maps(x.dtype, shift)[0] if shift is not None else None
            p_dy, p_dyd = plan.partials(dy.dtype, 2)

            def sums(t, _):
                dyt = dyr[t.red]
                _reduce(plan, t, dyt, None, p_dy)
                if s_m is not None:
                    np.subtract(xe[t.ew], s_m[t.mp], out=dxe[t.ew])
                _reduce(plan, t, dyt, xr[t.red] if s_m is None else dxr[t.red], p_dyd)

            with np.errstate(over="ignore", invalid="ignore"):     # checked below
                _run(plan, sums)
                sum_dy = plan.fold(p_dy)
                # sum(dy * x_hat) = inv_std * (sum(dy * d) - (mean - shift) * sum(dy))
                sum_dy_xhat = cache.inv_std * (plan.fold(p_dyd) - delta * sum_dy)
            _check_sums((sum_dy, sum_dy_xhat), dy, x)     # float32 run sums overflowed
        k, c0, c3 = gradient_coefficients(np, cache, sum_dy, sum_dy_xhat, delta, reduce)
        if cache.frozen:
            (k_m,) = plan.maps(dy.dtype, k)

            def grad(t, _):
                np.multiply(dye[t.ew], k_m[t.mp], out=dxe[t.ew])
        else:
            k_m, c0_m, c3_m = plan.maps(dy.dtype, k, c0, c3)

            def grad(t, _):                       # dx = k * (dy - c0 - c3 * d)
                d = dxe[t.ew]                     # d is x itself, or x - shift left here
                np.multiply(xe[t.ew] if shift is None else d, c3_m[t.mp], out=d)
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


def _forward_with_given_stats(impl, x, count, mean, var, weight, bias, eps, frozen):
    """``y`` and the cache for statistics computed elsewhere (SyncBN's, or running ones)."""
    y, inv_std, kept = impl.normalize(x, mean, var, weight, bias, eps)
    return y, KernelCache(kept, mean, var, inv_std, weight, eps, count, frozen=frozen)


def _fast_ok(impl, x, *arrays):
    """The fast kernels take ``x`` (and ``arrays``): a known module, dtype and size."""
    if impl is None or not all(a is None or impl.handles(a) for a in (x,) + arrays):
        return False
    return impl is not _NUMPY or x.size >= REFERENCE_BELOW


def channel_moments(x):
    """``(count, mean, var)`` per channel (axis 1) in float64, like
    ``moments.channel_moments(x, reduce_axes(x.ndim))``."""
    x = plain_array(x)
    impl = _implementation(x)
    if not _fast_ok(impl, x) or x.ndim < 2:
        return _reference_moments(x, reduce_axes(x.ndim))
    if isinstance(x, np.ndarray):
        x = _as_kernel_input(x)
    try:
        count, mean, var, _ = impl.moments(x)
    except _NeedsFloat64:
        return _reference_moments(x, reduce_axes(x.ndim))
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
    ones); otherwise they are this batch's.  Inputs whose numbers leave the range
    of their dtype go to the readable path (see ``_NeedsFloat64``).
    """
    x = plain_array(x)
    impl = _implementation(x, weight, bias)
    if not _fast_ok(impl, x):
        return F.batch_norm_forward(x, weight, bias, eps, stats=stats)
    _check_args(x, weight, bias)
    if isinstance(x, np.ndarray):
        x = _as_kernel_input(x)
    if stats is None:
        count = x.size // x.shape[1] if x.shape[1] else 0
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input of "
                             f"shape {tuple(x.shape)} ({count} value(s) per channel)")
        try:
            return impl.forward_train(x, weight, bias, eps)
        except _NeedsFloat64:
            return F.batch_norm_forward(x, weight, bias, eps)
    count, mean, var = stats
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(x.shape)} ({count} value(s) per channel)")
    xp = get_array_module(x)
    mean = xp.asarray(mean, dtype=np.float64)
    var = xp.asarray(var, dtype=np.float64)
    if F.elementwise_out_of_range(x.dtype, count, var, weight, eps):
        return F.batch_norm_forward(x, weight, bias, eps, stats=(count, mean, var))
    return _forward_with_given_stats(impl, x, int(count), mean, var, weight, bias, eps, False)


def batch_norm_eval_forward(x, mean, var, weight=None, bias=None, eps: float = 1e-5):
    """Forward with fixed statistics, like :func:`functional.batch_norm_eval_forward`."""
    x = plain_array(x)
    impl = _implementation(x, mean, var, weight, bias)
    if not _fast_ok(impl, x):
        return F.batch_norm_eval_forward(x, mean, var, weight, bias, eps)
    _check_args(x, weight, bias, mean, var)
    if isinstance(x, np.ndarray):
        x = _as_kernel_input(x)
    xp = get_array_module(x)
    mean64 = xp.asarray(mean, dtype=np.float64)
    var64 = xp.asarray(var, dtype=np.float64)
    count = x.size // max(x.shape[1], 1)
    if F.elementwise_out_of_range(x.dtype, None, var64, weight, eps):   # not x's statistics
        return F.batch_norm_eval_forward(x, mean, var, weight, bias, eps)
    return _forward_with_given_stats(impl, x, count, mean64, var64, weight, bias, eps, True)


def batch_norm_backward(dy, cache, reduce=None):
    """Backward, like :func:`functional.batch_norm_backward`: ``(dx, dweight, dbias)``.

    ``reduce`` maps the local per-channel ``(sum dy, sum dy * x_hat)`` to the
    global ones (SyncBatchNorm); it is not called in eval mode.  ``dy`` of
    another float dtype than the forward's input is cast to the input's dtype
    first (:func:`functional.gradient_in_input_dtype`, PyTorch's rule).
    """
    if not isinstance(cache, KernelCache):
        return F.batch_norm_backward(dy, cache, reduce=reduce)
    dy = F.gradient_in_input_dtype(dy, cache.x.shape, cache.x.dtype)
    impl = _implementation(dy, cache.x)
    if not _fast_ok(impl, dy):
        return F.batch_norm_backward(dy, cache, reduce=reduce)
    if isinstance(dy, np.ndarray):
        dy = _as_kernel_input(dy)
    try:
        return impl.backward(dy, cache, reduce)
    except _NeedsFloat64:          # raised before reduce is called: it is called once either way
        return F.batch_norm_backward(dy, cache, reduce=reduce)
