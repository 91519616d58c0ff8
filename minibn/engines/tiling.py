"""The NumPy engine's tiling plan: how an input is cut into tiles, and how a pass runs over them.

Batch norm does a handful of flops per element, so its speed is decided by how
many times the data crosses the memory bus (and, in NumPy, by the number of
Python-level steps), not by the arithmetic.  A pass of the NumPy engine runs
all its operations on one tile before the next, so the second and later ones
find the tile in cache.

* **Tiles.**  The input is viewed as ``(N, C, S)`` (``S`` = product of the
  spatial sizes) and cut into tiles of about ``TILE_BYTES``.
* **Maps.**  A NumPy binary operation is fastest when its operands are
  contiguous and of equal size.  When many tiles share them, per-channel
  constants are expanded once per call into *maps* that line up element by
  element with a tile (``a[c]`` repeated ``S`` times, for the samples of a
  tile); otherwise a map of a block of samples (at most ``MAP_BLOCK_BYTES``)
  is broadcast over the tile's blocks.
* **Run sums.**  Sums run in the input's dtype over short runs only: at most
  ``ROW_RUN`` contiguous values (BLAS dot products through ``np.vecdot``), or
  ``COL_RUN`` rows for ``(N, C)``-like input (down the columns: ``ones @ run``
  through BLAS, ``einsum`` for products).  The run sums of a pass are added up
  in float64, once, at its end (:meth:`TilePlan.fold`).  A float32 run of a few
  hundred values loses at most a few units in the last place; float64 takes it
  from there, as in ``moments.py``.
* **Threads.**  For large inputs the tiles are shared out to ``num_threads()``
  threads in contiguous groups.  Every tile writes its run sums to its own
  place and the float64 totals are added in a fixed order: results do not
  depend on the number of threads.

Two layouts: ``rows`` (``S >= ROW_MIN``) sums along the contiguous spatial
rows of each ``(n, c)``; ``cols`` (``(N, C)`` input and short rows) views the
input as ``(N, C*S)`` and sums down the columns.
"""
from __future__ import annotations

import contextvars
from collections import namedtuple
from functools import lru_cache

import numpy as np

from .workspace import executor, num_threads, work_buffer

__all__ = ["TilePlan", "plan_for", "row_runs", "run_tiles", "add_run_sums"]

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


@lru_cache(maxsize=256)
def row_runs(S):
    """How a row of ``S`` values is cut into float32 summation runs: ``(run, full_runs, rest)``.

    ``run <= ROW_RUN``; a divisor of ``S`` when one exists between ``ROW_RUN/2``
    and ``ROW_RUN`` (no remainder piece), else ``ROW_RUN`` and a shorter rest.
    """
    if S <= ROW_RUN:
        return S, 1, 0
    for run in range(ROW_RUN, ROW_RUN // 2 - 1, -1):
        if S % run == 0:
            return run, S // run, 0
    return ROW_RUN, S // ROW_RUN, S % ROW_RUN


# Where a tile's run sums go.  Rows layout: a list of RowRuns, one per run length (the
# tile's values ``values[piece]`` cut into runs of ``run`` values, their sums into
# ``run_sums[target]``).  Cols layout: one ColumnRuns (``full_runs`` runs of COL_RUN rows
# and ``rows_left`` rows more, summed into run-sum rows ``first_row:end_row``, ``columns``).
RowRuns = namedtuple("RowRuns", "piece run target")
ColumnRuns = namedtuple("ColumnRuns", "full_runs rows_left first_row end_row columns")


class Tile:
    """One block of the input and where its results go.

    ``elementwise`` indexes the plan's element-wise view and ``in_map`` the maps
    (they line up element by element); ``reduction`` indexes the reduction view;
    ``sum_targets`` says where the tile's run sums go (RowRuns or ColumnRuns).
    """
    __slots__ = ("elementwise", "in_map", "reduction", "sum_targets", "size", "elementwise_shape",
                 "reduction_shape")

    def __init__(self, elementwise, in_map, reduction, sum_targets, elementwise_shape, reduction_shape):
        self.elementwise, self.in_map, self.reduction = elementwise, in_map, reduction
        self.sum_targets = sum_targets
        self.elementwise_shape, self.reduction_shape = elementwise_shape, reduction_shape
        self.size = int(np.prod(reduction_shape))


class TilePlan:
    """How an input shape is cut into tiles, and the tiles shared among threads.

    Reduction view: ``(N, C, S)`` (rows layout) or ``(N, W)`` with ``W = C*S``
    (cols layout).  Run sums, in the dtype: ``(N, C, runs per row)`` (rows
    layout), or the sums of each run of ``COL_RUN`` rows, ``(runs, W)`` (cols
    layout).  Element-wise view: the flat array when every tile is a
    contiguous segment lined up with the maps; ``(N / reps, reps * C*S)`` when
    a map of ``reps = samples_per_map`` samples is broadcast over a tile's
    blocks of samples (``reps`` may be 1); ``(N, C, S)`` when the constants are
    ``(C, 1)`` columns (small inputs, or very long samples of a small batch).
    """

    def __init__(self, shape, itemsize, threads):
        self._set_geometry(shape, itemsize)
        total = self.N * self.C * self.S
        self.tiles = []
        if total == 0:
            self.elementwise_shape = self.reduction_shape
        elif total * itemsize <= SMALL_BYTES:
            self._cut_one_tile()
        elif self.cols:
            self._cut_cols_layout()
        else:
            self._cut_rows_layout()
        if self.cols:
            self._size_column_run_sums()
        self.largest_tile = max((t.size for t in self.tiles), default=0)
        self.thread_groups = self._thread_groups(total, threads)

    # -- geometry ------------------------------------------------------------------------
    def _set_geometry(self, shape, itemsize):
        self.shape = tuple(shape)
        N, C = shape[0], shape[1]
        S = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        self.N, self.C, self.S = N, C, S
        self.itemsize = itemsize
        self.count = N * S
        self.cols = S < ROW_MIN
        self.samples_per_map = 1                  # samples one map covers
        self.constants_as_columns = False         # (C, 1) columns, broadcast, instead of maps
        self.tile_values = max(ROW_RUN, TILE_BYTES // itemsize)
        self.elementwise_shape = (-1,)
        if self.cols:
            self.reduction_shape = (N, C * S)
            self.rows_per_tile = max(N, 1)        # (one tile of all rows unless cut otherwise)
        else:
            self.reduction_shape = (N, C, S)
            run, full_runs, rest = row_runs(S)
            self.run_sums_shape = (N, C, full_runs + (rest > 0))

    # -- cutting the input into tiles ----------------------------------------------------
    def _cut_one_tile(self):
        """Small inputs: one tile, constants broadcast as ``(C, 1)`` columns."""
        N, C, S = self.N, self.C, self.S
        self.constants_as_columns = True
        self.elementwise_shape = (N, C, S)
        whole = (slice(None),) * len(self.reduction_shape)
        self.tiles.append(self._tile((slice(None),) * 3, slice(None), whole, (N, C, S)))

    def _cut_cols_layout(self):
        """Tiles of whole rows of ``W = C*S`` values; very wide rows in 2-D blocks."""
        W = self.C * self.S
        if W <= self.tile_values:
            rows = min(self.N, max(COL_RUN, self.tile_values // W // COL_RUN * COL_RUN))
            self._cut_whole_rows(W, rows, (slice(None),))
        else:
            self._cut_wide_rows(W)

    def _cut_wide_rows(self, W):
        """Very wide rows: blocks of ``4 * COL_RUN`` rows and some columns, maps of one row."""
        N = self.N
        self.elementwise_shape = (N, W)
        rows, columns = 4 * COL_RUN, max(1, self.tile_values // (4 * COL_RUN))
        self.rows_per_tile = rows
        for n0 in range(0, N, rows):
            for w0 in range(0, W, columns):
                n1, w1 = min(N, n0 + rows), min(W, w0 + columns)
                block = (slice(n0, n1), slice(w0, w1))
                self.tiles.append(self._tile(block, slice(w0, w1), block, (n1 - n0, w1 - w0)))

    def _cut_rows_layout(self):
        """Tiles of whole samples; samples larger than a tile in pieces."""
        sample_values = self.C * self.S
        if sample_values <= self.tile_values:
            rows = min(self.N, max(1, self.tile_values // sample_values))
            self._cut_whole_rows(sample_values, rows, (slice(None), slice(None)))
        else:
            self._cut_long_samples()

    def _cut_whole_rows(self, W, rows, rest):
        """Tiles of about ``rows`` whole rows (samples) of ``W`` values.

        With many such tiles and short rows, the maps cover ``rows`` rows and a
        tile is one flat operation.  Otherwise the maps cover a block of rows
        (:meth:`_use_map_blocks`).  ``rest`` indexes the other axes of the
        reduction view.
        """
        flat = -(-self.N // rows) >= MAP_TILES_MIN and W < MAP_ROW_MAX and rows > 1
        if flat:
            self.samples_per_map = rows
        else:
            rows = self._use_map_blocks(W, rows)
        self.rows_per_tile = rows
        for n0 in range(0, self.N, rows):
            n1 = min(self.N, n0 + rows)
            block = (slice(n0, n1),) + rest
            if flat:
                self.tiles.append(self._tile(slice(n0 * W, n1 * W), slice(0, (n1 - n0) * W), block, (-1,)))
            else:
                reps = self.samples_per_map
                self.tiles.append(self._tile((slice(n0 // reps, n1 // reps), slice(None)), slice(None), block,
                                             ((n1 - n0) // reps, reps * W)))

    def _use_map_blocks(self, W, rows):
        """Maps of a block of ``reps`` rows, at most ``MAP_BLOCK_BYTES``, ``reps`` dividing ``N``;
        returns the rows per tile (a multiple of ``reps``).

        A tile is then viewed as ``(blocks, reps * W)`` and the map broadcast over
        its blocks, so that the inner loop of every operation runs over
        ``reps * W`` contiguous values of equal-shaped operands (for ``(N, C)``
        input with a few hundred channels this is much faster than broadcasting
        one row of ``C`` values).  When ``N`` has no such divisor, ``reps`` is 1:
        one row broadcast over the tile.
        """
        most = max(1, min(rows, MAP_BLOCK_BYTES // max(W * self.itemsize, 1)))
        reps = next(r for r in range(most, 0, -1) if self.N % r == 0)
        self.samples_per_map = reps
        self.elementwise_shape = (self.N // reps, reps * W)
        return max(reps, rows // reps * reps)

    def _cut_long_samples(self):
        """Samples larger than a tile: groups of channels of one sample, or pieces of one long row."""
        N, C, S = self.N, self.C, self.S
        self.constants_as_columns = N < MAP_MIN_N or C * S * self.itemsize > MAP_MAX_BYTES
        if self.constants_as_columns:
            self.elementwise_shape = (N, C, S)
        run = row_runs(S)[0]
        piece = S if S <= self.tile_values else max(run, self.tile_values // run * run)
        channels = max(1, self.tile_values // S) if piece == S else 1
        for n in range(N):
            for c0 in range(0, C, channels):
                c1 = min(C, c0 + channels)
                for s0 in range(0, S, piece):
                    self.tiles.append(self._sample_piece(n, c0, c1, s0, min(S, s0 + piece)))

    def _sample_piece(self, n, c0, c1, s0, s1):
        """The tile of sample ``n``, channels ``c0:c1``, spatial values ``s0:s1``."""
        block = (slice(n, n + 1), slice(c0, c1), slice(s0, s1))
        if self.constants_as_columns:
            return self._tile(block, slice(c0, c1), block, (1, c1 - c0, s1 - s0))
        start = (n * self.C + c0) * self.S + s0
        length = (c1 - c0) * (s1 - s0)
        in_map = c0 * self.S + s0
        return self._tile(slice(start, start + length), slice(in_map, in_map + length), block, (-1,))

    # -- where a tile's run sums go ------------------------------------------------------
    def _tile(self, elementwise, in_map, reduction, elementwise_shape):
        """A tile with its run-sum targets, from its index ``reduction`` in the reduction view."""
        bounds = [(s.start or 0, s.stop if s.stop is not None else dim)
                  for s, dim in zip(reduction, self.reduction_shape)]
        reduction_shape = tuple(stop - start for start, stop in bounds)
        targets = self._column_targets(bounds) if self.cols else self._row_targets(bounds)
        return Tile(elementwise, in_map, reduction, targets, elementwise_shape, reduction_shape)

    def _column_targets(self, bounds):
        """Sums of runs of COL_RUN rows, in the dtype, into the run sums' rows from
        ``(n0 // rows_per_tile) * ceil(rows_per_tile / COL_RUN)`` on (every tile of a
        block of rows has ``rows_per_tile`` rows)."""
        (n0, n1), (w0, w1) = bounds
        full_runs, rows_left = divmod(n1 - n0, COL_RUN)
        first = n0 // self.rows_per_tile * -(-self.rows_per_tile // COL_RUN)
        return ColumnRuns(full_runs, rows_left, first, first + full_runs + (rows_left > 0), slice(w0, w1))

    def _row_targets(self, bounds):
        """Runs along the rows; tiles start on run boundaries, the last run may be shorter."""
        (n0, n1), (c0, c1), (s0, s1) = bounds
        run, full_runs, rest = row_runs(self.S)
        full_end = full_runs * run
        end = min(s1, full_end)
        targets = []
        if end > s0:
            targets.append(RowRuns((Ellipsis, slice(0, end - s0)), run,
                                   (slice(n0, n1), slice(c0, c1), slice(s0 // run, end // run))))
        if s1 > full_end:
            targets.append(RowRuns((Ellipsis, slice(full_end - s0, None)), rest,
                                   (slice(n0, n1), slice(c0, c1), slice(full_runs, full_runs + 1))))
        return targets

    def _size_column_run_sums(self):
        """Cols layout: ``ceil(rows_per_tile / COL_RUN)`` run-sum rows per block of rows."""
        N, rows = self.N, self.rows_per_tile
        runs_per_block, blocks = -(-rows // COL_RUN), -(-N // rows)
        self.run_sums_shape = (blocks * runs_per_block, self.C * self.S)
        last_block_rows = N - (blocks - 1) * rows
        self.used_run_rows = (blocks - 1) * runs_per_block + -(-last_block_rows // COL_RUN) if N else 0

    def _thread_groups(self, total, threads):
        """Contiguous runs of tiles, equal in size, one per thread."""
        n = 1 if total * self.itemsize < PARALLEL_MIN_BYTES else max(1, min(threads, len(self.tiles)))
        groups = [[] for _ in range(n)]
        done = 0
        for tile in self.tiles:
            groups[min(n - 1, done * n // max(total, 1))].append(tile)
            done += tile.size
        return [g for g in groups if g] or [[]]

    # -- views, maps and run sums --------------------------------------------------------
    def elementwise_view(self, a):
        return a.reshape(self.elementwise_shape)

    def reduction_view(self, a):
        return a.reshape(self.reduction_shape)

    def maps(self, dtype, *vectors):
        """Per-channel float64 vectors as arrays that line up with the tiles, in ``dtype``.

        The arrays are per-thread buffers: valid until the next ``maps`` call.
        """
        return [self._map(index, vector, dtype) for index, vector in enumerate(vectors)]

    def _map(self, index, vector, dtype):
        if self.constants_as_columns:
            return vector.astype(dtype).reshape(-1, 1)
        if self.S == 1 and self.samples_per_map == 1:
            return vector.astype(dtype)
        # samples_per_map copies of each channel's value repeated S times
        buffer = work_buffer(f"map{index}", self.samples_per_map * self.C * self.S, dtype)
        samples = buffer.reshape(self.samples_per_map, self.C * self.S)
        if self.S > 1:
            samples[0].reshape(self.C, self.S)[...] = vector.astype(dtype).reshape(-1, 1)
        else:
            samples[0] = vector
        samples[1:] = samples[0]
        return buffer

    def run_sums(self, dtype, n=1):
        """``n`` arrays for the run sums of a pass, in ``dtype`` (per-thread buffers)."""
        size = int(np.prod(self.run_sums_shape))
        return [work_buffer(f"parts{i}", size, dtype).reshape(self.run_sums_shape) for i in range(n)]

    def fold(self, run_sums):
        """Run sums -> ``(C,)`` float64 per-channel sums, added up in float64 in a fixed order."""
        if self.cols:
            s = np.add.reduce(run_sums[:self.used_run_rows], axis=0, dtype=np.float64)
            return s.reshape(self.C, self.S).sum(axis=1) if self.S > 1 else s
        N, C, R = run_sums.shape
        return np.add.reduce(run_sums.reshape(N, C * R), axis=0, dtype=np.float64).reshape(C, R).sum(axis=1)


@lru_cache(maxsize=64)
def _cached_plan(shape, itemsize, threads):
    return TilePlan(shape, itemsize, threads)


def plan_for(x) -> TilePlan:
    """The plan of ``x``'s shape and dtype for the current thread count (cached)."""
    return _cached_plan(tuple(x.shape), x.dtype.itemsize, num_threads())


# --------------------------------------------------------------------------- running a pass

def run_tiles(plan, fn, scratch_dtype=None):
    """Call ``fn(tile, scratch)`` for every tile, one thread per group of tiles.

    ``scratch`` is a per-thread buffer of ``plan.largest_tile`` elements of
    ``scratch_dtype`` (``None`` when not asked for).  Every thread runs in a
    copy of the caller's context, so the caller's ``np.errstate`` holds there too.
    """
    def run_group(tiles):
        scratch = work_buffer("scratch", plan.largest_tile, scratch_dtype) if scratch_dtype is not None else None
        for tile in tiles:
            fn(tile, scratch)

    groups = plan.thread_groups
    if len(groups) == 1:
        run_group(groups[0])
        return
    pool = executor(len(groups) - 1)
    futures = [pool.submit(contextvars.copy_context().run, run_group, g) for g in groups[1:]]
    try:
        run_group(groups[0])
    finally:
        errors = []
        for f in futures:
            try:
                f.result()
            except BaseException as exc:   # keep waiting for the others, then re-raise
                errors.append(exc)
        if errors:
            raise errors[0]


@lru_cache(maxsize=64)
def _ones(n, dtype):
    """A vector of ones: ``vecdot(run, ones)`` is the BLAS sum of a run (shared, read-only)."""
    v = np.ones(n, dtype=dtype)
    v.flags.writeable = False
    return v


def add_run_sums(plan, tile, a, b, run_sums):
    """Run sums of ``sum(a)`` (``b`` is None) or ``sum(a * b)`` over ``tile`` into ``run_sums``.

    ``a``/``b`` are the tile in the reduction view; float32 data is summed in
    float32 over each run only.  (Even for data centred on zero a long float32
    sum is not safe: clustered data makes partial sums large.)
    """
    if plan.cols:
        _add_column_run_sums(tile.sum_targets, a, b, run_sums)
    else:
        _add_row_run_sums(tile.sum_targets, a, b, run_sums)


def _add_column_run_sums(targets, a, b, run_sums):
    """``(full_runs, COL_RUN, columns)`` -> ``(full_runs, columns)``, and the shorter last run."""
    full_runs, rows_left, first_row, end_row, columns = targets
    sums = run_sums[first_row:end_row, columns]
    run = COL_RUN
    full = full_runs * run
    if full_runs:
        runs_shape = (full_runs, run, a.shape[1])
        if b is None:                             # BLAS: ones(run) @ each run, twice as fast
            np.matmul(_ones(run, a.dtype), a[:full].reshape(runs_shape), out=sums[:full_runs])
        else:
            np.einsum("ijk,ijk->ik", a[:full].reshape(runs_shape), b[:full].reshape(runs_shape),
                      out=sums[:full_runs])
    if rows_left:
        if b is None:
            np.matmul(_ones(rows_left, a.dtype), a[full:], out=sums[full_runs])
        else:
            np.einsum("ij,ij->j", a[full:], b[full:], out=sums[full_runs])


def _add_row_run_sums(targets, a, b, run_sums):
    """``(rows, channels, L)`` -> ``(rows, channels, L / run)`` for each run length."""
    for piece, run, target in targets:
        values = a[piece]
        runs_shape = values.shape[:-1] + (values.shape[-1] // run, run)
        other = _ones(run, values.dtype) if b is None else b[piece].reshape(runs_shape)
        np.vecdot(values.reshape(runs_shape), other, out=run_sums[target])
