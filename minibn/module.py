"""The module system: Parameter, Module, Sequential.

A layer here is a small object with ``forward(x)`` and a hand-written
``backward(dy)``: ``backward`` returns the gradient with respect to the input
and *accumulates* the gradients of the layer's parameters in ``p.grad``.  There
is no autograd: ``Sequential.backward`` simply calls its layers in reverse.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Tuple

import numpy as np

from .backend import asnumpy, get_array_module
from .checks import check_state_array

__all__ = ["Parameter", "Module", "Sequential", "Validated"]


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
        self.__dict__.update(_parameters=OrderedDict(), _buffers=OrderedDict(), _modules=OrderedDict())
        self.training = True

    # -- attribute registry ------------------------------------------------
    def __setattr__(self, name, value):
        """Parameters, sub-modules and registered buffers go to their registry; any other
        value (transient state such as a forward's cache) is a plain attribute."""
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
            super().__setattr__(name, value)

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
        super().__delattr__(name)

    def register_parameter(self, name: str, param):
        """Register a :class:`Parameter`, or ``None`` for a parameter the layer does not have
        (``bias`` of a layer built with ``bias=False``): it is then left out of the state dict."""
        if param is None:
            self.__dict__.pop(name, None)
            self._parameters[name] = None
        else:
            setattr(self, name, param)

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
            m.training = bool(mode)
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


class Validated:
    """A layer attribute checked on every assignment, the constructor's included.

    ``eps = Validated(check_eps)`` in a class body makes ``layer.eps = 0`` raise
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
