"""Batch-norm layers: BatchNorm1d/2d/3d, the state around the math in ``functional.py``.

A layer holds the affine parameters (gamma ``weight``, beta ``bias``), the
running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``)
and the train/eval mode; an *engine* (:mod:`minibn.engines`) computes.  Under
the reference engine the engine's methods are ``functional.py``'s functions,
so ``BatchNorm1d.forward`` calls ``functional.batch_norm_forward`` directly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import functional as F
from .backend import get_array_module, get_backend
from .checks import (check_dtype_arg, check_eps, check_floating, check_momentum, check_positive_int,
                     single_value_error)
from .engines import Engine, get_engine, select_engine
from .module import Module, Parameter, Validated

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "RunningStatistics", "init_affine"]


def init_affine(layer, shape, affine: bool, bias: bool, dtype):
    """Register ``weight`` (gamma, ones) and ``bias`` (beta, zeros) of ``shape`` on ``layer``;
    ``None`` entries without ``affine`` (both) or without ``bias`` (the shift only)."""
    xp = get_backend()
    layer.register_parameter("weight", Parameter(xp.ones(shape, dtype=dtype)) if affine else None)
    layer.register_parameter("bias", Parameter(xp.zeros(shape, dtype=dtype)) if affine and bias else None)


class RunningStatistics:
    """The running-statistics buffers that BatchNorm and InstanceNorm share (PyTorch's names).

    ``running_mean`` starts at 0, ``running_var`` at 1, ``num_batches_tracked``
    at 0; without ``track_running_stats`` all three are ``None``.  Parameters and
    buffers are per channel: assigning one of another shape raises at once.
    """

    def _state_shape(self, name):
        if name == "num_batches_tracked":
            return ()
        if name in ("weight", "bias", "running_mean", "running_var"):
            return (self.num_features,)
        return None

    def _init_running_stats(self, dtype):
        xp, C = get_backend(), self.num_features
        if self.track_running_stats:
            self.register_buffer("running_mean", xp.zeros(C, dtype=dtype))
            self.register_buffer("running_var", xp.ones(C, dtype=dtype))
            self.register_buffer("num_batches_tracked", xp.zeros((), dtype=np.int64))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self._parameters.get('bias') is not None}, "
                f"track_running_stats={self.track_running_stats}")


def _engine_choice(engine) -> Optional[Engine]:
    """A layer's ``engine``: ``None`` (chosen per input by ``engines.select_engine``), or an
    engine given by name or as an :class:`~minibn.engines.Engine` (``get_engine``'s errors)."""
    return None if engine is None else get_engine(engine)


class _BatchNorm(RunningStatistics, Module):
    """Shared by BatchNorm1d/2d/3d (and SyncBatchNorm): they differ only in the input ranks.

    Training mode normalizes with the batch statistics of each channel (biased
    variance, over the ``m = N * prod(spatial)`` values of the channel) and, when
    ``track_running_stats``, updates ``running <- (1 - momentum) running +
    momentum * batch`` with the *unbiased* batch variance, as PyTorch does;
    ``momentum=None`` is the cumulative average over ``num_batches_tracked``
    batches.  Eval mode normalizes with the running statistics (with the batch
    statistics when ``track_running_stats=False``).

    dtypes: the output and ``dx`` have the input's dtype (float16, float32 or
    float64); statistics are accumulated in float64 and float16 element-wise
    work is done in float32.  Non-floating input is a ``TypeError``.

    Deliberate difference from PyTorch: an empty training batch (``N = 0``)
    returns an empty output and leaves ``running_mean``, ``running_var`` *and*
    ``num_batches_tracked`` untouched (PyTorch increments the counter).  An
    empty batch carries no statistics, so counting it would only shift the
    weights of a ``momentum=None`` cumulative average.  Its backward gives an
    empty ``dx`` and zero parameter gradients.

    ``bias=False`` (keyword only, as in PyTorch) keeps the scale ``weight`` of an
    affine layer but drops the shift: ``bias`` is ``None`` and is not in the
    state dict.  ``eps`` must be a finite number > 0 and ``momentum`` a number
    in [0, 1] or None, in the constructor and in any later assignment.

    ``engine`` (keyword only) fixes the engine that computes this layer: a name
    (``"reference"``, ``"numpy"``, ``"numba"``, ``"cupy"``) or an Engine; the
    default ``None`` selects one per input (``minibn.engines.select_engine``:
    a ``using_engine`` block, else ``MINIBN_KERNELS``, else the array's
    default).  The backward runs on the engine of the forward.
    """

    _ranks: Optional[Tuple[int, ...]] = ()     # accepted input ranks; None: any rank >= 2
    _rank_words = ""

    eps = Validated(check_eps)
    momentum = Validated(check_momentum)      # the article's alpha: a number in [0, 1], or None
    engine = Validated(_engine_choice)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype=None, *,
                 bias: bool = True, engine=None):
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.engine = engine
        dtype = check_dtype_arg(dtype)
        init_affine(self, (self.num_features,), self.affine, bias, dtype)
        self._init_running_stats(dtype)
        self._cache = None               # the last forward's cache, for backward
        self._engine_in_use = None       # the engine of the last forward (it made the cache)
        self._empty_shape = None         # the shape of the last forward's empty batch

    def extra_repr(self):
        chosen = "" if self.engine is None else f", engine={self.engine.name!r}"
        return super().extra_repr() + chosen

    # -- input checks --------------------------------------------------------
    def _check_input(self, x):
        check_floating(x, f"{type(self).__name__} input")
        if (x.ndim < 2) if self._ranks is None else (x.ndim not in self._ranks):
            raise ValueError(f"{type(self).__name__}: expected {self._rank_words} input, "
                             f"got {x.ndim}-D input of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels "
                             f"(input.shape[1]), got input of shape {tuple(x.shape)}")

    # -- hooks that SyncBatchNorm overrides ----------------------------------
    def _batch_statistics(self, x):
        """``(count, mean, var)`` of the batch: here this process's, in SyncBN the global ones."""
        return self._engine_in_use.statistics(x)

    def _reduce_gradient_sums(self, sum_dy, sum_dy_xhat):
        """The per-channel sums of the backward: here local, in SyncBN all-reduced."""
        return sum_dy, sum_dy_xhat

    # -- forward / backward ---------------------------------------------------
    def _params(self):
        """``(weight, bias)`` arrays; ``bias`` is ``None`` for a layer without shift."""
        if not self.affine:
            return None, None
        w, b = self._parameters.get("weight"), self._parameters.get("bias")
        if w is None:
            raise ValueError(f"{type(self).__name__} was built with affine=True but its "
                             "weight is None; build it with affine=False for a layer without "
                             "scale and shift (bias=False for one without shift)")
        return w.data, (None if b is None else b.data)

    def forward(self, x):
        self._check_input(x)
        self._cache = self._empty_shape = None       # a failed forward leaves nothing to backpropagate
        engine = self._engine_in_use = select_engine(x, self.engine)
        w, b = self._params()
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            y, self._cache = engine.forward_eval(x, self.running_mean, self.running_var, w, b, self.eps)
            return y
        count, mean, var = self._batch_statistics(x)
        if count == 1:
            raise single_value_error(x.shape, detail="1 value(s) per channel")
        if count == 0:               # an empty batch carries no statistics: nothing to update
            self._empty_shape = tuple(x.shape)
            return x.copy()
        y, cache = engine.forward_train(x, w, b, self.eps, stats=(count, mean, var))
        if self.training and self.track_running_stats:
            # counted after the update, which raises before writing anything when a value overflows
            factor = (1.0 / float(self.num_batches_tracked + 1)) if self.momentum is None else self.momentum
            F.update_running_stats(self.running_mean, self.running_var, mean, var, count, factor)
            self.num_batches_tracked += 1
        self._cache = cache
        return y

    def _check_dy(self, dy, expected_shape):
        """The same rules for ``dy`` after any forward, an empty batch's included."""
        check_floating(dy, "dy")
        if tuple(dy.shape) != tuple(expected_shape):
            raise ValueError(f"{type(self).__name__}.backward: dy has shape {tuple(dy.shape)}, "
                             f"expected the forward's output shape {tuple(expected_shape)}")

    def backward(self, dy):
        """``dx``; accumulates the parameters' gradients.  ``dy`` of another float dtype than
        the forward's input is cast to the input's dtype first, as PyTorch's autograd does."""
        if self._cache is None:
            return self._backward_of_empty_batch(dy)
        self._check_dy(dy, self._cache.x.shape)
        dx, dw, db = self._engine_in_use.backward(dy, self._cache, reduce=self._reduce_gradient_sums)
        if self.affine:
            self.weight.accumulate(dw)
            if self.bias is not None:
                self.bias.accumulate(db)
        return dx

    def _backward_of_empty_batch(self, dy):
        """An empty batch's ``dx`` (empty) and its zero contribution to the parameters' gradients."""
        if self._empty_shape is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        self._check_dy(dy, self._empty_shape)
        for p in (self.weight, self.bias) if self.affine else ():
            if p is not None:
                p.accumulate(get_array_module(p.data).zeros_like(p.data))
        return dy.copy()


class BatchNorm1d(_BatchNorm):
    """Batch norm over ``(N, C)`` or ``(N, C, L)`` input, per channel ``C``."""
    _ranks = (2, 3)
    _rank_words = "2D (N, C) or 3D (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm over ``(N, C, H, W)`` input, per channel ``C``."""
    _ranks = (4,)
    _rank_words = "4D (N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    """Batch norm over ``(N, C, D, H, W)`` input, per channel ``C``."""
    _ranks = (5,)
    _rank_words = "5D (N, C, D, H, W)"
