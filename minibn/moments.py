"""Per-channel mean and variance, computed so that they stay accurate.

Two facts drive this file.

1. ``E[x^2] - E[x]^2`` cancels catastrophically when ``|mean| >> std``: for
   float32 data with mean 1000 and std 1, both terms are about 1e6 and their
   float32 difference has no correct digit left.  We therefore use a *shifted*
   two-pass method: subtract an approximate mean first, then average the squared
   deviations.  What is left of the mean in the deviations is removed exactly by
   the correction term ``- mean(d)^2`` (Chan, Golub & LeVeque), which is tiny.
2. Sums of many float32 numbers lose digits; all reductions accumulate in
   float64 (``dtype=float64`` in the reduction: NumPy and CuPy convert block by
   block, no float64 copy of the whole tensor is made).

The merge of per-part moments is the article's section 6:

    mu  = sum_g n_g mu_g / N
    var = sum_g n_g (var_g + (mu_g - mu)^2) / N
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module

__all__ = ["reduce_axes", "channel_moments", "merge_moments", "unbiased", "plain_array", "elementwise_dtype"]


def plain_array(x, what: str = "input"):
    """``x`` as a plain array, or ``TypeError`` for an array subclass whose meaning would be lost.

    Batch statistics are plain sums over every value, so:

    * ``np.ma.MaskedArray``: its mask cannot be honoured without ambiguity (which
      values make up a channel's ``m``?), so it is refused; ``x.filled(value)`` or
      ``x.compressed()`` says what is meant.
    * ``np.matrix``: always 2-D, ``*`` is a matrix product; refused (``np.asarray(x)``).
    * ``np.memmap``: plain values on disk; returned as an ``ndarray`` view.
    * any other ``ndarray`` subclass (units, lazy or tracked arrays ...): refused, since
      dropping what the subclass adds would be silent; ``np.asarray(x)`` passes the values.

    Non-NumPy arrays (CuPy) and non-arrays are returned unchanged (other checks name them).
    """
    if not isinstance(x, np.ndarray) or type(x) is np.ndarray:
        return x
    if type(x) is np.memmap:
        return np.asarray(x)
    name = f"{type(x).__module__}.{type(x).__qualname__}"
    if isinstance(x, np.ma.MaskedArray):
        hint = ("batch statistics cannot honour a mask without ambiguity; pass x.filled(value) "
                "to replace the masked values, or x.compressed() to drop them")
    elif isinstance(x, np.matrix):
        hint = "np.matrix changes what * and reductions mean; pass np.asarray(x)"
    else:
        hint = "pass np.asarray(x) to use its plain values"
    raise TypeError(f"{what} must be a plain numpy.ndarray (or np.memmap), got {name}: {hint}")


def reduce_axes(ndim: int, channel_axis: int = 1):
    """All axes but the channel axis: the axes BatchNorm averages over."""
    return tuple(a for a in range(ndim) if a != channel_axis)


def elementwise_dtype(dtype):
    """The dtype element-wise work is done in: the input's, but at least float32.

    float16 data is computed in float32 (its range and precision are too small
    for deviations and products); float32 and float64 in their own dtype.
    """
    return np.promote_types(dtype, np.float32)


def channel_moments(x, axes, keepdims: bool = False):
    """Count, mean and biased variance of ``x`` over ``axes``, in float64.

    Returns ``(count, mean, var)`` where ``count`` is a Python int (the number
    of elements each statistic averages) and ``mean``/``var`` are float64
    arrays of the array module of ``x``.  ``count`` may be 0, in which case
    mean and var are zeros (an empty part contributes nothing to a merge).
    """
    x = plain_array(x)
    count, mean, var = _moments_in(x, axes, keepdims, elementwise_dtype(x.dtype))
    if count and elementwise_dtype(x.dtype) != np.float64 and not _all_finite(mean, var) and _all_finite(x):
        # finite values whose squares overflow the work dtype (float32 beyond ~1e19):
        # the statistics fit in float64, so the deviations are formed there
        count, mean, var = _moments_in(x, axes, keepdims, np.dtype(np.float64))
    return count, mean, var


def _all_finite(*arrays):
    return all(bool(get_array_module(a).isfinite(a).all()) for a in arrays)


def _moments_in(x, axes, keepdims, work_dtype):
    """:func:`channel_moments` with the deviations formed in ``work_dtype``."""
    xp = get_array_module(x)
    axes = tuple(sorted({int(a) % x.ndim for a in axes})) if x.ndim else ()
    count = 1
    for a in axes:
        count *= x.shape[a]
    kept = tuple(1 if a in axes else s for a, s in enumerate(x.shape))
    if count == 0:
        mean = xp.zeros(kept, dtype=np.float64)
        var = xp.zeros(kept, dtype=np.float64)
    else:
        # pass 1: the mean, accumulated in float64
        mean = xp.mean(x, axis=axes, dtype=np.float64, keepdims=True)
        # pass 2: deviations from the shift = the mean rounded to the work dtype
        shift = mean.astype(work_dtype)
        with np.errstate(over="ignore", invalid="ignore"):   # overflow: checked by the caller
            d = x.astype(shift.dtype, copy=False) - shift
            d_mean = xp.mean(d, axis=axes, dtype=np.float64, keepdims=True)
            d2_mean = xp.mean(xp.square(d), axis=axes, dtype=np.float64, keepdims=True)
            var = xp.maximum(d2_mean - d_mean * d_mean, 0.0)
        # mean(d) is measured from the *rounded* shift: shift + mean(d) is the mean again.
        # It refines the pass-1 mean only when d is as precise as float64 (float64 input,
        # where shift == mean); for float32 input d carries float32 roundings, while the
        # pass-1 mean of the float32 values, summed in float64, is already exact to float64.
        if shift.dtype == np.float64:
            mean = shift + d_mean
    if not keepdims:
        mean = mean.reshape(tuple(s for a, s in enumerate(kept) if a not in axes))
        var = var.reshape(mean.shape)
    return count, mean, var


def merge_moments(counts, means, variances):
    """Merge per-part ``(n_g, mu_g, var_g)`` into the moments of the whole.

    ``counts`` has shape ``(P,)``; ``means`` and ``variances`` have shape
    ``(P, ...)`` (a leading part axis).  Variances are biased (divide by n_g).
    Returns ``(N, mu, var)`` with ``N = sum n_g``, computed in float64 with the
    article's section 6 formulas.  Parts with ``n_g = 0`` contribute nothing.
    """
    xp = get_array_module(means, variances)
    counts = xp.asarray(counts, dtype=np.float64)
    means = xp.asarray(means, dtype=np.float64)
    variances = xp.asarray(variances, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"merge_moments: counts must be 1-d (one per part), got shape {counts.shape}")
    if means.shape != variances.shape or means.shape[:1] != counts.shape:
        raise ValueError("merge_moments: means and variances must have shape (P, ...) with "
                         f"P = len(counts) = {counts.shape[0]}; got {means.shape} and {variances.shape}")
    if bool(xp.any(counts < 0)):
        raise ValueError("merge_moments: counts must be non-negative")
    total = float(counts.sum())
    if total == 0:
        raise ValueError("merge_moments: all parts are empty (total count 0)")
    # >>> solution: merge_moments
    w = (counts / total).reshape((-1,) + (1,) * (means.ndim - 1))
    mean = (w * means).sum(axis=0)
    var = (w * (variances + (means - mean) ** 2)).sum(axis=0)
    return int(round(total)), mean, var
    # <<< solution: merge_moments


def unbiased(var, count: int):
    """Bessel's correction: biased variance (divide by m) to unbiased (m - 1)."""
    if count < 2:
        raise ValueError(f"unbiased variance needs at least 2 values, got {count}")
    return var * (count / (count - 1))
