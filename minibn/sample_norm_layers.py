"""LayerNorm, GroupNorm and InstanceNorm layers (article, section 6.3).

Normalizations whose statistics never mix samples: the output for one sample
is the same whatever else is in the batch, so they need no synchronization
across processes.  The math is in ``sample_norms.py``; these classes hold
parameters (and InstanceNorm's optional running statistics).
"""
from __future__ import annotations

from . import sample_norms as SN
from .batchnorm import RunningStatistics, init_affine
from .checks import check_dtype_arg, check_eps, check_floating, check_momentum, check_positive_int
from .module import Module, Validated

__all__ = ["LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _SampleNorm(Module):
    """Shared by LayerNorm, GroupNorm and InstanceNorm*: affine parameters and backward.

    ``eps`` must be a finite number > 0, in the constructor and in any later
    ``layer.eps = ...``; a parameter assigned later must have the shape of the one
    it replaces.
    """

    eps = Validated(check_eps)

    def _param_shape(self):
        """The shape of ``weight`` and ``bias``."""
        raise NotImplementedError

    def _state_shape(self, name):
        return self._param_shape() if name in ("weight", "bias") else None

    def _init_affine(self, shape, affine: bool, bias: bool, dtype):
        init_affine(self, shape, affine, bias, check_dtype_arg(dtype))
        self._cache = None               # the last forward's cache, for backward

    def _params(self):
        w, b = self._parameters.get("weight"), self._parameters.get("bias")
        return (None if w is None else w.data), (None if b is None else b.data)

    def _backward(self, dy, cache):
        return SN.row_norm_backward(dy, cache)

    def backward(self, dy):
        cache = self._cache
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
        self.normalized_shape = SN.normalized_shape_tuple(normalized_shape)
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
        y, self._cache = SN.layer_norm_forward(x, self.normalized_shape, w, b, self.eps)
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
        self.num_groups = check_positive_int(num_groups, "num_groups")
        self.num_channels = check_positive_int(num_channels, "num_channels")
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
        check_floating(x, "GroupNorm input")
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm: expected input of shape (N, {self.num_channels}, *), "
                             f"got {tuple(x.shape)}")
        w, b = self._params()
        y, self._cache = SN.group_norm_forward(x, self.num_groups, w, b, self.eps)
        return y


def _check_instance_momentum(momentum) -> float:
    """InstanceNorm's momentum: a number in [0, 1]; ``None`` is refused, as this layer does
    not count batches (``checks.check_momentum``)."""
    return check_momentum(momentum, allow_none=False)


class _InstanceNorm(RunningStatistics, _SampleNorm):
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

    momentum = Validated(_check_instance_momentum)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = False, track_running_stats: bool = False, *, bias: bool = True,
                 dtype=None):
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self._init_affine((self.num_features,), self.affine, bias, dtype)
        self._init_running_stats(check_dtype_arg(dtype))

    def _param_shape(self):
        return (self.num_features,)

    def forward(self, x):
        check_floating(x, f"{type(self).__name__} input")
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
        # running statistics, when tracked, are updated in training and used in eval
        y, cache = SN.instance_norm_with_cache(xb, self.running_mean, self.running_var, w, b,
                                               use_input_stats, self.momentum, self.eps)
        self._cache = (cache, unbatched)
        return y[0] if unbatched else y

    def _backward(self, dy, cache):
        cache, unbatched = cache
        if unbatched:
            check_floating(dy, "dy")
            dx, dw, db = SN.instance_norm_backward(dy[None], cache)
            return dx[0], dw, db
        return SN.instance_norm_backward(dy, cache)


class InstanceNorm1d(_InstanceNorm):
    """Instance norm over ``(N, C, L)`` input (or ``(C, L)``, one sample)."""
    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    """Instance norm over ``(N, C, H, W)`` input (or ``(C, H, W)``, one sample)."""
    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):
    """Instance norm over ``(N, C, D, H, W)`` input (or ``(C, D, H, W)``, one sample)."""
    _spatial_dims = 3
