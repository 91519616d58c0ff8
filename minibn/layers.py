"""The few layers around batch norm in the examples: Linear, ReLU, CrossEntropyLoss."""
from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module, get_backend
from .checks import check_dtype_arg, check_floating, check_positive_int
from .module import Module, Parameter

__all__ = ["Linear", "ReLU", "CrossEntropyLoss"]


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


class Linear(Module):
    """``y = x W^T + b`` with ``W`` of shape ``(out_features, in_features)`` (PyTorch's layout).

    Initialized like PyTorch: uniform in ``[-1/sqrt(in), 1/sqrt(in)]``; ``seed``
    (an int or a NumPy Generator) makes it reproducible.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, seed=None, dtype=None):
        super().__init__()
        self.in_features = check_positive_int(in_features, "Linear: in_features")
        self.out_features = check_positive_int(out_features, "Linear: out_features")
        xp, dtype, rng = get_backend(), check_dtype_arg(dtype), _rng(seed)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(xp.asarray(rng.uniform(-bound, bound, (out_features, in_features)), dtype=dtype))
        self.register_parameter("bias", Parameter(xp.asarray(rng.uniform(-bound, bound, out_features),
                                                             dtype=dtype)) if bias else None)
        self._x = None                   # the last forward's input, for backward

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x):
        check_floating(x, "Linear input")
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear: expected input of shape (N, {self.in_features}), got {tuple(x.shape)}")
        self._x = x.copy()               # own copy: later edits of x must not change dW
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

    def __init__(self):
        super().__init__()
        self._mask = None                # where the last forward's input was > 0

    def forward(self, x):
        xp = get_array_module(x)
        self._mask = x > 0
        return xp.where(self._mask, x, xp.zeros((), dtype=x.dtype))

    def backward(self, dy):
        if self._mask is None:
            raise RuntimeError("ReLU.backward called before forward")
        xp = get_array_module(dy)
        return xp.where(self._mask, dy, xp.zeros((), dtype=dy.dtype))


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
        self._saved = None               # the last forward's log-probabilities and targets

    def forward(self, logits, targets):
        check_floating(logits, "logits")
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
        self._saved = (log_p, targets.copy())
        return total / n if self.reduction == "mean" and n else total

    def backward(self, dy=1.0):
        if self._saved is None:
            raise RuntimeError("CrossEntropyLoss.backward called before forward")
        log_p, targets = self._saved
        xp = get_array_module(log_p)
        g = xp.exp(log_p)
        g[xp.arange(g.shape[0]), targets] -= 1.0
        if self.reduction == "mean" and g.shape[0]:
            g /= g.shape[0]
        return g * dy
