"""The engine interface: what computes batch norm, as one object.

An engine computes the four steps of batch norm with the signatures, the
errors and (to rounding) the numbers of ``functional.py``:

==================================================  ====================================
engine method                                       ``functional.py``
==================================================  ====================================
``statistics(x) -> (count, mean, var)``             ``batch_norm_statistics``
``forward_train(x, weight, bias, eps, stats)``      ``batch_norm_forward``
``forward_eval(x, mean, var, weight, bias, eps)``   ``batch_norm_eval_forward``
``backward(dy, cache, reduce) -> (dx, dw, db)``     ``batch_norm_backward``
==================================================  ====================================

Shapes: ``x`` and ``dy`` are ``(N, C)`` or ``(N, C, *spatial)``; ``weight``,
``bias``, ``mean`` and ``var`` are ``(C,)``; statistics are float64 ``(C,)``
vectors (biased variance) over the ``count = N * prod(spatial)`` values of each
channel.  ``stats=(count, mean, var)`` supplies the statistics of a training
forward (SyncBatchNorm's global ones); ``reduce`` is SyncBatchNorm's hook in
the backward: it maps the local per-channel ``(sum dy, sum dy * x_hat)`` to
the global ones, and is not called in eval mode.

:class:`FastEngine` is the shared entry code of the fast engines: argument
checks with ``functional.py``'s errors, the hand-off to ``functional.py``
(the reference engine) for inputs an engine does not take, and contiguous
copies; each fast engine only writes its kernels.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..backend import get_array_module
from ..checks import FAST_DTYPES, check_channel_vector, check_eps, check_floating, single_value_error
from ..moments import plain_array
from .coefficients import KernelCache, NeedsFloat64, check_range, forward_coefficients

__all__ = ["Engine", "FastEngine"]


class Engine:
    """Batch norm's statistics, training forward, eval forward and backward (see the module)."""

    name = "engine"

    def available(self) -> bool:
        """True when the engine's dependencies import (and, for a GPU engine, a device is seen)."""
        return True

    def statistics(self, x):
        """``(count, mean, var)`` per channel (axis 1): float64 ``(C,)`` vectors, biased ``var``."""
        raise NotImplementedError

    def forward_train(self, x, weight=None, bias=None, eps=1e-5, stats=None):
        """Training forward with this batch's statistics (or ``stats``): ``(y, cache)``."""
        raise NotImplementedError

    def forward_eval(self, x, mean, var, weight=None, bias=None, eps=1e-5):
        """Forward with fixed statistics (eval mode): ``(y, cache)``."""
        raise NotImplementedError

    def backward(self, dy, cache, reduce=None):
        """``(dx, dweight, dbias)`` for the ``cache`` of this engine's forward."""
        raise NotImplementedError

    def __repr__(self):
        return f"<minibn engine {self.name!r}>"


class FastEngine(Engine):
    """The entry code of a fast engine around its kernels.

    A subclass names the array module it computes on (``array_module``), the
    smallest input it takes (``min_size``: smaller and empty inputs go to
    ``functional.py``) and writes four kernels:

    * ``_moments(x) -> (count, mean, var, shift)``
    * ``_forward_train(x, weight, bias, eps) -> (y, KernelCache)``
    * ``_normalize(x, mean, var, weight, bias, eps) -> (y, inv_std, kept)``, ``kept`` a copy of ``x``
    * ``_backward(dy, cache, reduce) -> (dx, dweight, dbias)``

    The kernels get C-contiguous ``x`` of a fast dtype (float32, float64) and
    raise :class:`NeedsFloat64`, before anything the caller sees is written,
    when the numbers leave the range of the dtype; the input then goes to
    ``functional.py``, which works in float64 where needed.
    """

    min_size = 1

    def array_module(self):
        """The module of the arrays this engine computes on (``numpy`` or ``cupy``)."""
        raise NotImplementedError

    # -- which inputs the kernels take -------------------------------------------------
    def _takes(self, x, *arrays):
        """The kernels take ``x``: this engine's module, a fast dtype, ``(N, C, *)``, large enough.

        Arrays of another module are an error: an engine computes on one module.
        """
        xp = get_array_module(x, *arrays)
        if xp is not self.array_module():
            raise TypeError(f"the {self.name} engine computes on {self.array_module().__name__} arrays, "
                            f"got {xp.__name__} arrays; select the engine of that module or 'reference'")
        return getattr(x, "dtype", None) in FAST_DTYPES and x.ndim >= 2 and x.size >= max(self.min_size, 1)

    def _contiguous(self, x):
        """C-contiguous view or copy (the kernels index reshaped views)."""
        return x if x.flags.c_contiguous else self.array_module().ascontiguousarray(x)

    @staticmethod
    def _check_channel_vectors(x, **vectors):
        check_floating(x)
        for what, v in vectors.items():
            check_channel_vector(v, x.shape[1], what)

    @staticmethod
    def _check_count(x, count):
        if count <= 1:
            raise single_value_error(x.shape, detail=f"{count} value(s) per channel")

    # -- the interface -------------------------------------------------------------------
    def statistics(self, x):
        x = plain_array(x)
        if not self._takes(x):
            return F.batch_norm_statistics(x)
        x = self._contiguous(x)
        try:
            count, mean, var, _ = self._moments(x)
        except NeedsFloat64:
            return F.batch_norm_statistics(x)
        return count, mean, var

    def forward_train(self, x, weight=None, bias=None, eps=1e-5, stats=None):
        x = plain_array(x)
        if not self._takes(x, weight, bias):
            return F.batch_norm_forward(x, weight, bias, eps, stats=stats)
        eps = check_eps(eps)
        self._check_channel_vectors(x, weight=weight, bias=bias)
        x = self._contiguous(x)
        if stats is None:
            return self._forward_with_batch_statistics(x, weight, bias, eps)
        return self._forward_with_given_statistics(x, weight, bias, eps, stats)

    def _forward_with_batch_statistics(self, x, weight, bias, eps):
        self._check_count(x, x.size // x.shape[1] if x.shape[1] else 0)
        try:
            return self._forward_train(x, weight, bias, eps)
        except NeedsFloat64:
            return F.batch_norm_forward(x, weight, bias, eps)

    def _forward_with_given_statistics(self, x, weight, bias, eps, stats):
        count, mean, var = stats
        self._check_count(x, count)
        xp = self.array_module()
        mean = xp.asarray(mean, dtype=np.float64)
        var = xp.asarray(var, dtype=np.float64)
        if F.elementwise_out_of_range(x.dtype, count, var, weight, eps):
            return F.batch_norm_forward(x, weight, bias, eps, stats=(count, mean, var))
        y, inv_std, kept = self._normalize(x, mean, var, weight, bias, eps)
        return y, KernelCache(kept, mean, var, inv_std, weight, eps, int(count))

    def forward_eval(self, x, mean, var, weight=None, bias=None, eps=1e-5):
        x = plain_array(x)
        if not self._takes(x, mean, var, weight, bias):
            return F.batch_norm_eval_forward(x, mean, var, weight, bias, eps)
        eps = check_eps(eps)
        self._check_channel_vectors(x, mean=mean, var=var, weight=weight, bias=bias)
        x = self._contiguous(x)
        xp = self.array_module()
        mean64 = xp.asarray(mean, dtype=np.float64)
        var64 = xp.asarray(var, dtype=np.float64)
        if F.elementwise_out_of_range(x.dtype, None, var64, weight, eps):   # not x's statistics
            return F.batch_norm_eval_forward(x, mean, var, weight, bias, eps)
        y, inv_std, kept = self._normalize(x, mean64, var64, weight, bias, eps)
        count = x.size // max(x.shape[1], 1)
        return y, KernelCache(kept, mean64, var64, inv_std, weight, eps, count, frozen=True)

    def backward(self, dy, cache, reduce=None):
        if not isinstance(cache, KernelCache):          # the forward went to functional.py
            return F.batch_norm_backward(dy, cache, reduce=reduce)
        dy = F.gradient_in_input_dtype(dy, cache.x.shape, cache.x.dtype)
        if not self._takes(dy, cache.x):
            return F.batch_norm_backward(dy, cache, reduce=reduce)
        dy = self._contiguous(dy)
        try:
            return self._backward(dy, cache, reduce)
        except NeedsFloat64:       # raised before reduce is called: it is called once either way
            return F.batch_norm_backward(dy, cache, reduce=reduce)


class FusedPassEngine(FastEngine):
    """A fast engine whose forward is one fused element-wise pass around the exact mean.

    The numba and GPU engines: ``_affine(x, mean, a, b) -> (y, kept)`` computes
    ``y = (x - mean) * a + b`` per channel and a copy ``kept`` of ``x`` in the same
    pass; the per-channel constants come from :func:`forward_coefficients`.
    """

    @staticmethod
    def _affine(x, mean, a, b):
        raise NotImplementedError

    def _forward_train(self, x, weight, bias, eps):
        """Training forward with this batch's statistics: ``(y, cache)``."""
        count, mean, var, _ = self._moments(x)
        check_range(x, count, var, weight, eps)
        y, inv_std, kept = self._normalize(x, mean, var, weight, bias, eps)
        return y, KernelCache(kept, mean, var, inv_std, weight, eps, count)

    def _normalize(self, x, mean, var, weight, bias, eps):
        """``y`` with given statistics: ``(y, inv_std, kept)``, ``kept`` a copy of ``x``."""
        inv_std, a, b = forward_coefficients(self.array_module(), mean, var, mean, weight, bias, eps)
        y, kept = self._affine(x, mean, a, b)
        return y, inv_std, kept
