"""The NumPy engine: the math of ``functional.py``, arranged for memory traffic.

The readable path in ``functional.py`` takes a pass and a fresh full-size
temporary for every formula line.  This engine computes the same numbers in a
few passes over tiles (:mod:`.tiling`), with no full-size temporaries besides
the outputs (:mod:`.workspace`), around ``d = x - s`` for a per-channel shift
``s`` (:mod:`.coefficients`)::

    statistics     mean = s + sum(d) / m        var = sum(d^2) / m - (sum(d) / m)^2
    forward        y  = d * a + b
    backward       sum(dy * x_hat) = (sum(dy * d) - (mean - s) sum(dy)) / sqrt(var + eps)
                   dx = k * (dy - c0 - c3 * d)

A training step is one pass for the statistics (read-only for centred data),
one pass for ``y``, one read-only pass for the two gradient sums and one pass
for ``dx``; the element-wise passes run in the input's dtype.

Inputs of fewer than ``REFERENCE_BELOW`` elements (the readable code is as
fast there), empty inputs and dtypes other than float32/float64 go to the
reference engine (``functional.py``).
"""
from __future__ import annotations

import numpy as np

from .coefficients import KernelCache, check_range, check_sums, forward_coefficients, gradient_coefficients
from .interface import FastEngine
from .tiling import add_run_sums, plan_for, run_tiles
from .workspace import new_output

__all__ = ["NumpyEngine"]

REFERENCE_BELOW = 16384       # NumPy inputs with fewer elements go to the reference engine
SHIFT_SAMPLE = 64             # values per channel looked at to choose the shift
DIRECT_RATIO = 0.5            # no shift when the sample's |mean| / std is below this in every channel
REDO_RATIO = 1.0              # redo the statistics pass when |mean - shift| > REDO_RATIO * std
SHIFT_RATIO = 2.0             # given statistics: subtract the mean first when |mean| / std > this


def shift_sample(plan):
    """The values the shift is chosen from, as an index of the reduction view: the first
    rows (cols layout), or the first values of the first two samples (rows layout)."""
    if plan.cols:
        return (slice(0, min(plan.N, SHIFT_SAMPLE)), slice(None))
    return (slice(0, min(plan.N, 2)), slice(None), slice(0, min(plan.S, SHIFT_SAMPLE // 2)))


def _rough_moments(plan, x):
    """``(mean, variance)`` per channel of the shift sample, in float64 (a guess is enough)."""
    sample = plan.reduction_view(x)[shift_sample(plan)]
    with np.errstate(over="ignore", invalid="ignore"):   # a guess: overflow is checked later
        if plan.cols:
            n = sample.shape[0]
            s1, s2 = np.add.reduce(sample, axis=0), np.einsum("ij,ij->j", sample, sample)
        else:
            n = sample.shape[0] * sample.shape[2]
            s1, s2 = sample.sum(axis=(0, 2)), np.einsum("ijk,ijk->j", sample, sample)
        mean = s1.astype(np.float64) / n
        spread = s2.astype(np.float64) / n - mean * mean
    if plan.cols and plan.S > 1:
        mean = mean.reshape(plan.C, plan.S).mean(axis=1)
        spread = spread.reshape(plan.C, plan.S).mean(axis=1)
    return mean, spread


class NumpyEngine(FastEngine):
    """Tiled NumPy kernels: tiles, maps, run sums, threads."""

    name = "numpy"

    @property
    def min_size(self):
        return REFERENCE_BELOW

    def array_module(self):
        return np

    # -- statistics ----------------------------------------------------------------------
    @staticmethod
    def _shifted_sums(plan, x, shift, out):
        """One pass: per-channel float64 ``sum(d)`` and ``sum(d^2)`` with ``d = x - shift``.

        ``shift=None`` means ``d = x``: no subtraction at all.  Otherwise ``d``
        is formed tile by tile, in ``out`` if given (and left there), else in a
        per-thread scratch tile.
        """
        x_elementwise, x_reduction = plan.elementwise_view(x), plan.reduction_view(x)
        shift_map = plan.maps(x.dtype, shift)[0] if shift is not None else None
        out_elementwise = plan.elementwise_view(out) if out is not None else None
        out_reduction = plan.reduction_view(out) if out is not None else None
        sums_d, sums_d2 = plan.run_sums(x.dtype, 2)

        def add_sums(tile, scratch):
            if shift_map is None:
                d = x_reduction[tile.reduction]
            elif out_elementwise is not None:
                np.subtract(x_elementwise[tile.elementwise], shift_map[tile.in_map],
                            out=out_elementwise[tile.elementwise])
                d = out_reduction[tile.reduction]
            else:
                d = scratch[:tile.size]
                np.subtract(x_elementwise[tile.elementwise], shift_map[tile.in_map],
                            out=d.reshape(tile.elementwise_shape))
                d = d.reshape(tile.reduction_shape)
            add_run_sums(plan, tile, d, None, sums_d)
            add_run_sums(plan, tile, d, d, sums_d2)

        needs_scratch = shift_map is not None and out_elementwise is None
        run_tiles(plan, add_sums, scratch_dtype=x.dtype if needs_scratch else None)
        return plan.fold(sums_d), plan.fold(sums_d2)

    @classmethod
    def _moments(cls, x, out=None):
        """``(count, mean, var, shift)`` per channel in float64; ``shift`` is None or a vector.

        The shifted method of ``moments.py`` with ``d = x - shift``::

            mean = shift + mean(d)          var = mean(d^2) - mean(d)^2

        loses nothing while ``|mean(d)|`` is at most about one standard
        deviation.  The shift is chosen from ``SHIFT_SAMPLE`` values per channel
        (:func:`shift_sample`): if their mean is within ``DIRECT_RATIO`` of their
        standard deviations of zero in every channel there is no shift and the
        pass only reads ``x``; otherwise the shift is their mean rounded to the
        dtype and ``d`` is formed tile by tile (into ``out`` when given, and left
        there for the caller).  If the sample was unrepresentative (sorted data,
        a drift across the batch) and ``|mean(d)| > REDO_RATIO * std`` for some
        channel, the pass is repeated with the mean just found as the shift: the
        classic two-pass method.
        """
        plan = plan_for(x)
        count, C = plan.count, plan.C
        if count == 0 or x.size == 0:
            zeros = np.zeros(C)
            return count, zeros, zeros.copy(), None
        guess, spread = _rough_moments(plan, x)
        centred = np.all(guess * guess <= DIRECT_RATIO * DIRECT_RATIO * spread)
        shift = None if centred else guess.astype(x.dtype).astype(np.float64)
        for _ in range(2):
            with np.errstate(over="ignore", invalid="ignore"):     # checked below
                sum_d, sum_d2 = cls._shifted_sums(plan, x, shift, out)
                mean_d = sum_d / count
                var = np.maximum(sum_d2 / count - mean_d * mean_d, 0.0)
            check_sums((mean_d, var), x)          # squares beyond the dtype: float64 is needed
            mean = mean_d if shift is None else shift + mean_d
            if not np.any(mean_d * mean_d > REDO_RATIO * REDO_RATIO * var):
                break
            shift = mean.astype(x.dtype).astype(np.float64)
        return count, mean, var, shift

    # -- forward -------------------------------------------------------------------------
    @classmethod
    def _forward_train(cls, x, weight, bias, eps):
        """Training forward with this batch's statistics: ``(y, cache)``."""
        y = new_output(x)
        count, mean, var, shift = cls._moments(x, y)     # y holds x - shift if there is a shift
        check_range(x, count, var, weight, eps)
        inv_std, a, b = forward_coefficients(np, mean, var, shift if shift is not None else 0.0,
                                             weight, bias, eps)
        plan = plan_for(x)
        kept = new_output(x)                             # the cache's own copy of x
        x_elementwise, y_elementwise = plan.elementwise_view(x), plan.elementwise_view(y)
        kept_elementwise = plan.elementwise_view(kept)
        a_map, b_map = plan.maps(x.dtype, a, b)

        def affine(tile, _):
            y_tile = y_elementwise[tile.elementwise]
            np.copyto(kept_elementwise[tile.elementwise], x_elementwise[tile.elementwise])
            np.multiply(x_elementwise[tile.elementwise] if shift is None else y_tile, a_map[tile.in_map],
                        out=y_tile)
            np.add(y_tile, b_map[tile.in_map], out=y_tile)

        run_tiles(plan, affine)
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
    def _normalize(cls, x, mean, var, weight, bias, eps):
        """``y`` with given statistics (eval mode, or SyncBN's global ones):
        ``(y, inv_std, kept)``, ``kept`` a copy of ``x`` for the cache.

        One pass, two operations per tile (three with a shift) and the copy.
        """
        shift = cls._shift_for(x, mean, 1.0 / np.sqrt(var + eps))
        inv_std, a, b = forward_coefficients(np, mean, var, shift if shift is not None else 0.0,
                                             weight, bias, eps)
        y, kept = new_output(x), new_output(x)
        plan = plan_for(x)
        x_elementwise, y_elementwise = plan.elementwise_view(x), plan.elementwise_view(y)
        kept_elementwise = plan.elementwise_view(kept)
        if shift is None:
            a_map, b_map = plan.maps(x.dtype, a, b)
        else:
            a_map, b_map, shift_map = plan.maps(x.dtype, a, b, shift)

        def affine(tile, _):
            y_tile = y_elementwise[tile.elementwise]
            np.copyto(kept_elementwise[tile.elementwise], x_elementwise[tile.elementwise])
            if shift is None:
                np.multiply(x_elementwise[tile.elementwise], a_map[tile.in_map], out=y_tile)
            else:
                np.subtract(x_elementwise[tile.elementwise], shift_map[tile.in_map], out=y_tile)
                np.multiply(y_tile, a_map[tile.in_map], out=y_tile)
            np.add(y_tile, b_map[tile.in_map], out=y_tile)

        run_tiles(plan, affine)
        return y, inv_std, kept

    # -- backward ------------------------------------------------------------------------
    @classmethod
    def _backward(cls, dy, cache, reduce=None):
        """``(dx, dweight, dbias)``: one pass for the sums, one for ``dx``.

        ``d = x - shift`` with the shift of ``_shift_for``: without one, ``d``
        is ``x`` itself and the first pass only reads; with one, the first pass
        forms ``d`` in ``dx`` and the second pass uses it.
        """
        x, weight = cache.x, cache.weight
        plan = plan_for(x)
        dx = new_output(dy)
        shift = cls._shift_for(x, cache.mean, cache.inv_std)
        delta = cache.mean - (shift if shift is not None else 0.0)
        sum_dy, sum_dy_xhat = np.zeros(plan.C), np.zeros(plan.C)
        if not cache.frozen or weight is not None:
            sum_dy, sum_dy_xhat = cls._gradient_sums(plan, dy, x, shift, delta, dx, cache.inv_std)
        k, c0, c3 = gradient_coefficients(np, cache, sum_dy, sum_dy_xhat, delta, reduce)
        cls._gradient(plan, dy, x, shift, k, c0, c3, dx)
        if weight is None:
            return dx, None, None
        return dx, sum_dy_xhat.astype(weight.dtype), sum_dy.astype(weight.dtype)

    @staticmethod
    def _gradient_sums(plan, dy, x, shift, delta, dx, inv_std):
        """``(sum dy, sum dy * x_hat)`` per channel in one read-only pass (with a shift, the
        pass also leaves ``d = x - shift`` in ``dx`` for the next one)."""
        x_elementwise, dx_elementwise = plan.elementwise_view(x), plan.elementwise_view(dx)
        x_reduction, dy_reduction = plan.reduction_view(x), plan.reduction_view(dy)
        dx_reduction = plan.reduction_view(dx)
        shift_map = plan.maps(x.dtype, shift)[0] if shift is not None else None
        sums_dy, sums_dy_d = plan.run_sums(dy.dtype, 2)

        def add_sums(tile, _):
            dy_tile = dy_reduction[tile.reduction]
            add_run_sums(plan, tile, dy_tile, None, sums_dy)
            if shift_map is not None:
                np.subtract(x_elementwise[tile.elementwise], shift_map[tile.in_map],
                            out=dx_elementwise[tile.elementwise])
            d = x_reduction[tile.reduction] if shift_map is None else dx_reduction[tile.reduction]
            add_run_sums(plan, tile, dy_tile, d, sums_dy_d)

        with np.errstate(over="ignore", invalid="ignore"):     # checked below
            run_tiles(plan, add_sums)
            sum_dy = plan.fold(sums_dy)
            # sum(dy * x_hat) = inv_std * (sum(dy * d) - (mean - shift) * sum(dy))
            sum_dy_xhat = inv_std * (plan.fold(sums_dy_d) - delta * sum_dy)
        check_sums((sum_dy, sum_dy_xhat), dy, x)      # float32 run sums overflowed
        return sum_dy, sum_dy_xhat

    @staticmethod
    def _gradient(plan, dy, x, shift, k, c0, c3, dx):
        """``dx = k * dy`` (eval mode: ``c0`` is None) or ``dx = k * (dy - c0 - c3 * d)``,
        ``d`` being ``x`` itself or ``x - shift`` left in ``dx`` by the sums' pass."""
        x_elementwise, dy_elementwise = plan.elementwise_view(x), plan.elementwise_view(dy)
        dx_elementwise = plan.elementwise_view(dx)
        if c0 is None:
            (k_map,) = plan.maps(dy.dtype, k)

            def gradient(tile, _):
                np.multiply(dy_elementwise[tile.elementwise], k_map[tile.in_map],
                            out=dx_elementwise[tile.elementwise])
        else:
            k_map, c0_map, c3_map = plan.maps(dy.dtype, k, c0, c3)

            def gradient(tile, _):
                d = dx_elementwise[tile.elementwise]
                np.multiply(x_elementwise[tile.elementwise] if shift is None else d, c3_map[tile.in_map], out=d)
                np.add(d, c0_map[tile.in_map], out=d)
                np.subtract(dy_elementwise[tile.elementwise], d, out=d)
                np.multiply(d, k_map[tile.in_map], out=d)

        run_tiles(plan, gradient)
