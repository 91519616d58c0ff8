"""Layers: state (parameters, buffers, train/eval mode) around the math in ``functional``.

A layer here is a small object with ``forward(x)`` and a hand-written
``backward(dy)``: ``backward`` returns the gradient with respect to the input
and *accumulates* the gradients of the layer's parameters in ``p.grad``.  There
is no autograd: ``Sequential.backward`` simply calls its layers in reverse.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Iterator, Optional, Tuple

import numpy as np

from . import functional as F
from . import kernels as K     # fast forward/backward; K.reference_kernels() selects F
from .backend import asnumpy, get_array_module, get_backend
from .checks import check_eps, check_state_array, single_value_error
from .moments import channel_moments, reduce_axes

__all__ = [
    "Parameter", "Module", "Sequential", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "Linear", "ReLU", "CrossEntropyLoss", "SGD",
]


# =========================================================================== core

class Parameter:
    """A learnable array and its accumulated gradient (``None`` until a backward)."""

    def __init__(self, data):
        dtype = getattr(data, "dtype", None)
        if dtype is None or not hasattr(data, "shape"):
            raise TypeError(f"Parameter needs a NumPy or CuPy array, got {type(data).__name__}")
        if not np.issubdtype(dtype, np.floating):
            raise TypeError(f"Parameter needs a floating-point array, got dtype {dtype}")
        self.data = data
        self.grad = None

    def accumulate(self, g):
        g = g.astype(self.data.dtype, copy=False).reshape(self.data.shape)
        if self.grad is None:
            self.grad = g.copy()
        else:
            self.grad += g

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self):
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


class Module:
    """Base class: holds parameters, buffers, sub-modules and the train/eval mode.

    Attributes that are :class:`Parameter` or :class:`Module` are registered
    automatically; arrays that belong in the state dict but are not learned are
    registered with :meth:`register_buffer`.  Names follow PyTorch, so state dicts
    have the same keys (``"0.weight"``, ``"bn.running_mean"``, ...).
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- attribute registry ------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call Module.__init__() before assigning attributes")
        if isinstance(value, Parameter):
            self._check_state_entry(name, value.data)
            self._modules.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._parameters.pop(name, None)
            self._modules[name] = value
        elif name in self._buffers:
            if value is not None:
                self._check_state_entry(name, value)
            self._buffers[name] = value
        elif name in self._parameters:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to parameter {name!r} "
                                "(wrap it in minibn.Parameter)")
            self._parameters[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        for key in ("_parameters", "_buffers", "_modules"):
            if key in d and name in d[key]:
                return d[key][name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __delattr__(self, name):
        for key in ("_parameters", "_buffers", "_modules"):
            if name in self.__dict__[key]:
                del self.__dict__[key][name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, value):
        """Register a non-learned array (or ``None``) that belongs in the state dict."""
        if value is not None:
            self._check_state_entry(name, value)
        self.__dict__.pop(name, None)
        self._buffers[name] = value

    def _state_shape(self, name: str):
        """The shape parameter or buffer ``name`` must have, or ``None`` if the layer fixes none."""
        return None

    def _check_state_entry(self, name: str, array):
        """Refuse, when it is assigned, a parameter or buffer of the wrong shape or kind: it
        would otherwise fail later, or broadcast silently into a wrong result."""
        shape = self._state_shape(name)
        if shape is not None:
            check_state_array(array, shape, f"{type(self).__name__}.{name}",
                              floating=name != "num_batches_tracked")

    # -- traversal ---------------------------------------------------------
    def named_children(self):
        return iter(self._modules.items())

    def children(self):
        return iter(self._modules.values())

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                if p is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def named_buffers(self, prefix: str = ""):
        for mod_name, mod in self.named_modules(prefix):
            for name, b in mod._buffers.items():
                if b is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), b

    # -- mode, gradients ---------------------------------------------------
    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        """Forget accumulated gradients (set them to ``None``, as PyTorch does by default)."""
        for p in self.parameters():
            p.grad = None

    # -- calling -----------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.backward")

    # -- state -------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """Copies of every parameter and buffer, under PyTorch's key names."""
        out = OrderedDict()
        for mod_name, mod in self.named_modules():
            pre = f"{mod_name}." if mod_name else ""
            for name, p in mod._parameters.items():
                if p is not None:
                    out[pre + name] = p.data.copy()
            for name, b in mod._buffers.items():
                if b is not None:
                    out[pre + name] = b.copy()
        return out

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy values in place into parameters and buffers, after validating them.

        Missing or unexpected keys raise ``KeyError`` (with ``strict=True``); a
        wrong shape raises ``ValueError``; a value of the wrong kind (integer where
        floats are expected, or the reverse) raises ``TypeError``.  Nothing is
        changed unless every entry is valid.
        """
        own = OrderedDict()
        for mod_name, mod in self.named_modules():
            pre = f"{mod_name}." if mod_name else ""
            for name, p in mod._parameters.items():
                if p is not None:
                    own[pre + name] = p.data
            for name, b in mod._buffers.items():
                if b is not None:
                    own[pre + name] = b
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict for {type(self).__name__}: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        staged = []
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = _state_value_as_array(state_dict[key], key)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"load_state_dict: {key!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(target.shape)}")
            want_float = np.issubdtype(target.dtype, np.floating)
            if np.issubdtype(value.dtype, np.floating) != want_float or value.dtype == np.bool_ \
                    or not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
                raise TypeError(f"load_state_dict: {key!r} has dtype {value.dtype}, expected "
                                f"{'a floating' if want_float else 'an integer'} dtype like {target.dtype}")
            staged.append((target, value))
        for target, value in staged:
            xp = get_array_module(target)
            target[...] = xp.asarray(asnumpy(value) if xp is np else value, dtype=target.dtype)
        return missing, unexpected

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        return lines[0] + (")" if len(lines) == 1 else "\n" + "\n".join(lines[1:]) + "\n)")


def _state_value_as_array(value, key):
    """A state-dict value as an array: NumPy and CuPy arrays as they are; anything
    array-like (lists, scalars, CPU tensors of other libraries) through ``np.asarray``."""
    if isinstance(getattr(value, "dtype", None), np.dtype) and hasattr(value, "shape"):
        return value
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"load_state_dict: {key!r} is a {type(value).__name__} that does not convert "
                        f"to an array ({err}); pass a NumPy array (a PyTorch tensor: "
                        f"tensor.detach().cpu().numpy())") from None


class Sequential(Module):
    """Layers applied in order; ``backward`` runs them in reverse."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: argument {i} is {type(layer).__name__}, not a Module")
            setattr(self, str(i), layer)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self._modules.values()):
            dy = layer.backward(dy)
        return dy


# =========================================================================== batch norm

def _check_dtype_arg(dtype):
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return dtype


class _Validated:
    """A layer attribute checked on every assignment, the constructor's included.

    ``eps = _Validated(check_eps)`` in a class body makes ``layer.eps = 0`` raise
    the same error as ``Layer(..., eps=0)``; the value is stored as ``check`` returns it.
    """

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.name, self.slot = name, "_" + name

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        try:
            return layer.__dict__[self.slot]
        except KeyError:
            raise AttributeError(f"{type(layer).__name__} has no attribute {self.name!r} yet") from None

    def __set__(self, layer, value):
        layer.__dict__[self.slot] = self.check(value)


class _RunningStats:
    """The running-statistics buffers that BatchNorm and InstanceNorm share (PyTorch's names).

    ``running_mean`` starts at 0, ``running_var`` at 1, ``num_batches_tracked``
    at 0; without ``track_running_stats`` all three are ``None``.  Parameters and
    buffers are per channel: assigning one of another shape raises at once.
    """

    eps = _Validated(check_eps)

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


class _BatchNorm(_RunningStats, Module):
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
    state dict.  ``eps`` must be a finite number > 0, in the constructor and in
    any later ``layer.eps = ...``.
    """

    _ranks: Optional[Tuple[int, ...]] = ()     # accepted input ranks; None: any rank >= 2
    _rank_words = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype=None, *,
                 bias: bool = True):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        self.num_features = int(num_features)
        self.eps = eps                    # validated by _RunningStats.eps
        self.momentum = momentum          # validated by the property below
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        xp, dtype = get_backend(), _check_dtype_arg(dtype)
        C = self.num_features
        if self.affine:
            self.weight = Parameter(xp.ones(C, dtype=dtype))
            if bias:
                self.bias = Parameter(xp.zeros(C, dtype=dtype))
            else:
                self._parameters["bias"] = None
        else:
            self._parameters["weight"] = None
            self._parameters["bias"] = None
        self._init_running_stats(dtype)
        object.__setattr__(self, "_cache", None)

    # momentum is the article's alpha: a number in [0, 1], or None (cumulative average)
    @property
    def momentum(self):
        return self.__dict__["_momentum"]

    @momentum.setter
    def momentum(self, value):
        if value is not None:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
                    or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"momentum must be a number in [0, 1] or None, got {value!r}")
            value = float(value)
        self.__dict__["_momentum"] = value

    def __setattr__(self, name, value):
        if name == "momentum":
            type(self).momentum.fset(self, value)
        else:
            super().__setattr__(name, value)

    # -- input checks --------------------------------------------------------
    def _check_input(self, x):
        F.check_floating(x, f"{type(self).__name__} input")
        if (x.ndim < 2) if self._ranks is None else (x.ndim not in self._ranks):
            raise ValueError(f"{type(self).__name__}: expected {self._rank_words} input, "
                             f"got {x.ndim}-D input of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels "
                             f"(input.shape[1]), got input of shape {tuple(x.shape)}")

    # -- hooks that SyncBatchNorm overrides ----------------------------------
    def _batch_statistics(self, x):
        """``(count, mean, var)`` of the batch: here this process's, in SyncBN the global ones."""
        return K.channel_moments(x)

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
        object.__setattr__(self, "_empty_shape", None)
        w, b = self._params()
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            y, cache = K.batch_norm_eval_forward(x, self.running_mean, self.running_var, w, b, self.eps)
            object.__setattr__(self, "_cache", cache)
            return y
        count, mean, var = self._batch_statistics(x)
        if count == 1:
            raise single_value_error(x.shape, detail="1 value(s) per channel")
        if count == 0:               # an empty batch carries no statistics: nothing to update
            object.__setattr__(self, "_cache", None)
            object.__setattr__(self, "_empty_shape", tuple(x.shape))
            return x.copy()
        y, cache = K.batch_norm_forward(x, w, b, self.eps, stats=(count, mean, var))
        if self.training and self.track_running_stats:
            # counted after the update, which raises before writing anything when a value overflows
            factor = (1.0 / float(self.num_batches_tracked + 1)) if self.momentum is None else self.momentum
            F.update_running_stats(self.running_mean, self.running_var, mean, var, count, factor)
            self.num_batches_tracked += 1
        object.__setattr__(self, "_cache", cache)
        return y

    def _check_dy(self, dy, expected_shape):
        """The same rules for ``dy`` after any forward, an empty batch's included."""
        F.check_floating(dy, "dy")
        if tuple(dy.shape) != tuple(expected_shape):
            raise ValueError(f"{type(self).__name__}.backward: dy has shape {tuple(dy.shape)}, "
                             f"expected the forward's output shape {tuple(expected_shape)}")

    def backward(self, dy):
        """``dx``; accumulates the parameters' gradients.  ``dy`` of another float dtype than
        the forward's input is cast to the input's dtype first, as PyTorch's autograd does."""
        cache = self._cache
        if cache is None:
            empty_shape = self.__dict__.get("_empty_shape")
            if empty_shape is None:
                raise RuntimeError(f"{type(self).__name__}.backward called before forward")
            self._check_dy(dy, empty_shape)
            for p in (self.weight, self.bias) if self.affine else ():
                if p is not None:             # an empty batch contributes a zero gradient
                    p.accumulate(get_array_module(p.data).zeros_like(p.data))
            return dy.copy()
        self._check_dy(dy, cache.x.shape)
        dx, dw, db = K.batch_norm_backward(dy, cache, reduce=self._reduce_gradient_sums)
        if self.affine:
            self.weight.accumulate(dw)
            if self.bias is not None:
                self.bias.accumulate(db)
        return dx


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


# =========================================================================== the few other layers

def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


class Linear(Module):
    """``y = x W^T + b`` with ``W`` of shape ``(out_features, in_features)`` (PyTorch's layout).

    Initialized like PyTorch: uniform in ``[-1/sqrt(in), 1/sqrt(in)]``; ``seed``
    (an int or a NumPy Generator) makes it reproducible.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, seed=None, dtype=None):
        super().__init__()
        for n, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Linear: {n} must be a positive integer, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        xp, dtype, rng = get_backend(), _check_dtype_arg(dtype), _rng(seed)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(xp.asarray(rng.uniform(-bound, bound, (out_features, in_features)), dtype=dtype))
        if bias:
            self.bias = Parameter(xp.asarray(rng.uniform(-bound, bound, out_features), dtype=dtype))
        else:
            self._parameters["bias"] = None
        object.__setattr__(self, "_x", None)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x):
        F.check_floating(x, "Linear input")
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear: expected input of shape (N, {self.in_features}), got {tuple(x.shape)}")
        object.__setattr__(self, "_x", x.copy())    # own copy: later edits of x must not change dW
        y = x @ self.weight.data.T.astype(x.dtype, copy=False)
        if self.bias is not None:
            y = y + self.bias.data.astype(x.dtype, copy=False)
        return y

    def backward(self, dy):
        x = self._x
        if x is None:
            raise RuntimeError("Linear.backward called before forward")
        self.weight.accumulate(dy.T @ x)                   # dL/dW = dy^T x
        if self.bias is not None:
            self.bias.accumulate(dy.sum(axis=0))           # dL/db = sum over the batch
        return dy @ self.weight.data.astype(dy.dtype, copy=False)   # dL/dx = dy W


class ReLU(Module):
    """``max(x, 0)``; the gradient passes where ``x > 0``."""

    def forward(self, x):
        xp = get_array_module(x)
        object.__setattr__(self, "_mask", x > 0)
        return xp.where(self._mask, x, xp.zeros((), dtype=x.dtype))

    def backward(self, dy):
        xp = get_array_module(dy)
        return xp.where(self.__dict__["_mask"], dy, xp.zeros((), dtype=dy.dtype))


class CrossEntropyLoss(Module):
    """Softmax cross-entropy averaged over the batch: ``loss = mean(-log softmax(z)[target])``.

    ``forward(logits, targets)`` returns a Python float; ``backward()`` returns
    ``dL/dlogits = (softmax(z) - onehot(target)) / N``.  ``reduction='sum'``
    drops the ``1/N`` (used when each process holds part of a global batch).
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits, targets):
        F.check_floating(logits, "logits")
        xp = get_array_module(logits)
        targets = xp.asarray(targets)
        if logits.ndim != 2:
            raise ValueError(f"CrossEntropyLoss: logits must be (N, classes), got shape {tuple(logits.shape)}")
        if targets.shape != logits.shape[:1] or not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"CrossEntropyLoss: targets must be integers of shape ({logits.shape[0]},), "
                             f"got {targets.dtype} of shape {tuple(targets.shape)}")
        if targets.size and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
            raise ValueError(f"CrossEntropyLoss: targets must lie in [0, {logits.shape[1] - 1}]")
        z = logits - logits.max(axis=1, keepdims=True)      # shift: softmax is unchanged, exp cannot overflow
        log_p = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        n = logits.shape[0]
        picked = log_p[xp.arange(n), targets]
        total = -float(picked.sum())
        object.__setattr__(self, "_saved", (log_p, targets.copy()))
        return total / n if self.reduction == "mean" and n else total

    def backward(self, dy=1.0):
        log_p, targets = self.__dict__["_saved"]
        xp = get_array_module(log_p)
        g = xp.exp(log_p)
        g[xp.arange(g.shape[0]), targets] -= 1.0
        if self.reduction == "mean" and g.shape[0]:
            g /= g.shape[0]
        return g * dy


class SGD:
    """Plain stochastic gradient descent, optionally with (heavy-ball) momentum and weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = [p for p in params]
        if not lr > 0:
            raise ValueError(f"SGD: lr must be > 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum!r}")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self._velocity = [None] * len(self.params)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            if self.momentum:
                v = self._velocity[i]
                self._velocity[i] = v = g.copy() if v is None else v * self.momentum + g
                g = v
            p.data -= self.lr * g


# =========================================================================== LayerNorm, GroupNorm, InstanceNorm
#
# Normalizations whose statistics never mix samples (article, section 6.3): the
# output for one sample is the same whatever else is in the batch, so they need
# no synchronization across processes.  The math is in ``functional.py``; these
# classes hold parameters (and InstanceNorm's optional running statistics).

def _check_positive_int(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return int(v)


class _SampleNorm(Module):
    """Shared by LayerNorm, GroupNorm and InstanceNorm*: affine parameters and backward.

    ``eps`` must be a finite number > 0, in the constructor and in any later
    ``layer.eps = ...``; a parameter assigned later must have the shape of the one
    it replaces.
    """

    eps = _Validated(check_eps)

    def _param_shape(self):
        """The shape of ``weight`` and ``bias``."""
        raise NotImplementedError

    def _state_shape(self, name):
        return self._param_shape() if name in ("weight", "bias") else None

    def _init_affine(self, shape, affine: bool, bias: bool, dtype):
        xp, dtype = get_backend(), _check_dtype_arg(dtype)
        if affine:
            self.weight = Parameter(xp.ones(shape, dtype=dtype))
            if bias:
                self.bias = Parameter(xp.zeros(shape, dtype=dtype))
            else:
                self._parameters["bias"] = None
        else:
            self._parameters["weight"] = None
            self._parameters["bias"] = None
        object.__setattr__(self, "_cache", None)

    def _params(self):
        w, b = self._parameters.get("weight"), self._parameters.get("bias")
        return (None if w is None else w.data), (None if b is None else b.data)

    def _backward(self, dy, cache):
        return F.row_norm_backward(dy, cache)

    def backward(self, dy):
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        dx, dw, db = self._backward(dy, cache)
        if dw is not None:
            self.weight.accumulate(dw)
        if db is not None:
            self.bias.accumulate(db)
        return dx


class LayerNorm(_SampleNorm):
    """Layer norm: each sample normalized over its trailing ``normalized_shape`` axes.

    ``LayerNorm((C, H, W))`` on ``(N, C, H, W)`` input takes one mean and one
    variance per sample; ``weight``/``bias`` have shape ``normalized_shape``
    (an element-wise gamma and beta), as in PyTorch.  Input: ``(*, *normalized_shape)``.

    Deliberate difference from PyTorch: a ``normalized_shape`` of one element is
    a ``ValueError`` (each row would be its own mean, and the output the bias
    whatever the input); PyTorch returns that output.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, dtype=None):
        super().__init__()
        self.normalized_shape = F._normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = bool(elementwise_affine)
        self._init_affine(self.normalized_shape, self.elementwise_affine, bias, dtype)

    def _param_shape(self):
        return self.normalized_shape

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")

    def forward(self, x):
        w, b = self._params()
        y, cache = F.layer_norm_forward(x, self.normalized_shape, w, b, self.eps)
        object.__setattr__(self, "_cache", cache)
        return y


class GroupNorm(_SampleNorm):
    """Group norm: the channels of each sample split into ``num_groups`` groups of
    consecutive channels, one mean and variance per (sample, group).

    ``weight``/``bias`` have shape ``(num_channels,)``.  ``num_groups=1`` is a
    layer norm over ``(C, *)`` with per-channel gamma; ``num_groups=C`` is an
    instance norm.  Input: ``(N, C, *)``.

    One value per group (``num_groups == num_channels`` without spatial axes, or
    with one spatial element) is a ``ValueError``, as batch norm's one value per
    channel is: the output would be the bias whatever the input.  Deliberate
    difference from PyTorch, which raises only for a batch of one sample.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 *, bias: bool = True, dtype=None):
        super().__init__()
        self.num_groups = _check_positive_int(num_groups, "num_groups")
        self.num_channels = _check_positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.eps = eps
        self.affine = bool(affine)
        self._init_affine((self.num_channels,), self.affine, bias, dtype)

    def _param_shape(self):
        return (self.num_channels,)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")

    def forward(self, x):
        F.check_floating(x, "GroupNorm input")
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm: expected input of shape (N, {self.num_channels}, *), "
                             f"got {tuple(x.shape)}")
        w, b = self._params()
        y, cache = F.group_norm_forward(x, self.num_groups, w, b, self.eps)
        object.__setattr__(self, "_cache", cache)
        return y


def _check_instance_momentum(momentum):
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"InstanceNorm: momentum must be a number in [0, 1] (the weight of the new "
                         f"batch), got {momentum!r}")
    return float(momentum)


class _InstanceNorm(_RunningStats, _SampleNorm):
    """Instance norm: one mean and variance per (sample, channel), over the spatial axes.

    PyTorch's defaults and rules: ``affine=False``, ``track_running_stats=False``;
    with ``track_running_stats`` the training forward also updates
    ``running <- (1 - momentum) running + momentum * (average over the batch of
    the per-sample mean / unbiased variance)`` and eval mode normalizes with the
    running statistics.  Input without the batch axis (``(C, L)`` for 1d,
    ``(C, H, W)`` for 2d) is one sample.  Training with one spatial element is a
    ``ValueError``.  ``num_batches_tracked`` exists for state-dict compatibility
    and, as in PyTorch, is not incremented.

    Deliberate differences from PyTorch: a channel count that differs from
    ``num_features`` is always an error (PyTorch only warns when
    ``affine=False``), and ``momentum=None`` is refused (PyTorch then silently
    never updates the running statistics).
    """

    _spatial_dims = 1

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = False, track_running_stats: bool = False, *, bias: bool = True,
                 dtype=None):
        super().__init__()
        self.num_features = _check_positive_int(num_features, "num_features")
        self.eps = eps
        self.momentum = _check_instance_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self._init_affine((self.num_features,), self.affine, bias, dtype)
        self._init_running_stats(_check_dtype_arg(dtype))

    def _param_shape(self):
        return (self.num_features,)

    def forward(self, x):
        F.check_floating(x, f"{type(self).__name__} input")
        s = self._spatial_dims
        if x.ndim not in (s + 1, s + 2):
            raise ValueError(f"{type(self).__name__}: expected {s + 1}D (unbatched) or {s + 2}D "
                             f"(batched) input, got {x.ndim}D input of shape {tuple(x.shape)}")
        unbatched = x.ndim == s + 1
        xb = x[None] if unbatched else x
        if xb.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels at dim "
                             f"{0 if unbatched else 1}, got input of shape {tuple(x.shape)}")
        w, b = self._params()
        use_input_stats = self.training or not self.track_running_stats
        momentum = _check_instance_momentum(self.momentum) if self.track_running_stats else 0.0
        # running statistics, when tracked, are updated in training and used in eval
        y, cache = F.instance_norm_with_cache(xb, self.running_mean, self.running_var, w, b,
                                              use_input_stats, momentum, self.eps)
        object.__setattr__(self, "_cache", (cache, unbatched))
        return y[0] if unbatched else y

    def _backward(self, dy, cache):
        cache, unbatched = cache
        if unbatched:
            F.check_floating(dy, "dy")
            dx, dw, db = F.instance_norm_backward(dy[None], cache)
            return dx[0], dw, db
        return F.instance_norm_backward(dy, cache)


class InstanceNorm1d(_InstanceNorm):
    """Instance norm over ``(N, C, L)`` input (or ``(C, L)``, one sample)."""
    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    """Instance norm over ``(N, C, H, W)`` input (or ``(C, H, W)``, one sample)."""
    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):
    """Instance norm over ``(N, C, D, H, W)`` input (or ``(C, D, H, W)``, one sample)."""
    _spatial_dims = 3


__all__ += ["LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]
