"""Momentum schedules for running statistics (the article's section 4).

A BatchNorm layer keeps its running statistics with the article's EMA::

    running <- (1 - alpha) * running + alpha * batch          (alpha = layer.momentum)

A *static* momentum keeps alpha fixed; a *dynamic* one changes it as training
goes on.  The classes here change it the way learning-rate schedulers change a
learning rate: construct one on a layer or a whole model, call :meth:`step`
once per batch, and save :meth:`state_dict` with your checkpoint.

When is the momentum set?  A schedule is a function ``momentum(t)`` of the
batch index ``t = 0, 1, 2, ...``, and *forward number t uses momentum(t)*:

* at construction, every driven layer gets ``momentum(0)``, the value for the
  first batch;
* each :meth:`step` (called after a batch's forward) advances ``last_step`` by
  one and sets ``momentum(last_step)``, the value for the *next* batch.

So the training loop is::

    sched = LinearDecay(model, start=0.9, end=0.1, total_steps=40)
    for batch in data:
        model(batch)        # uses sched.momentum == momentum(sched.last_step)
        sched.step()

This is exactly the article's loop, where ``max(0.9 - epoch / 50, 0.1)`` is
computed and assigned just before the forward of batch ``epoch``;
``LinearDecay(start=0.9, end=0.1, total_steps=40)`` is that same schedule.

Which layers?  Given a model, a schedule drives every batch-norm layer in it:
every module found by ``model.modules()`` that is an instance of
``minibn.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, and any subclass).
Given one layer, it drives that layer.  A model without batch-norm layers is a
``ValueError``.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List

from .batchnorm import _BatchNorm
from .checks import check_momentum, check_positive_int
from .module import Module

__all__ = ["MomentumSchedule", "Constant", "LinearDecay", "ExponentialDecay", "Cosine",
           "Cumulative", "batchnorm_layers"]


# --------------------------------------------------------------------------- which layers

def batchnorm_layers(model) -> List[object]:
    """The batch-norm layers a schedule drives: ``model`` itself, or those inside it.

    ``model`` is a minibn ``Module`` (a layer or a whole model) or a list of
    them.  Each layer appears once, in ``modules()`` order.
    """
    roots = [model] if isinstance(model, Module) else None
    if roots is None:
        try:
            roots = list(model)
        except TypeError:
            raise TypeError("a momentum schedule needs a minibn Module (a BatchNorm layer or a "
                            f"model containing some) or a list of them, got {type(model).__name__}") \
                from None
        for r in roots:
            if not isinstance(r, Module):
                raise TypeError("a momentum schedule needs minibn Modules, got a list containing "
                                f"{type(r).__name__}")
    layers, seen = [], set()
    for root in roots:
        for m in root.modules():
            if isinstance(m, _BatchNorm) and id(m) not in seen:
                seen.add(id(m))
                layers.append(m)
    if not layers:
        raise ValueError(f"no batch-norm layer found in the {type(model).__name__} given: a momentum "
                         "schedule drives BatchNorm1d/2d/3d or SyncBatchNorm layers")
    return layers


# --------------------------------------------------------------------------- argument checks

def _check_momentum(value, name: str) -> float:
    """A schedule's momentum: PyTorch's rule, a number in [0, 1] (``checks.check_momentum``);
    ``None`` is refused: a schedule computes numbers (``Cumulative`` is the running average)."""
    return check_momentum(value, allow_none=False, what=name)


def _check_steps(value, name: str = "total_steps") -> int:
    return check_positive_int(value, f"{name} (a number of batches)")


def _check_rate(value, name: str = "decay_rate") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (the factor applied per batch), got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- the base class

class MomentumSchedule:
    """Base class: holds the layers and the step counter; subclasses give ``momentum_at(t)``.

    Attributes and methods shared by every schedule:

    * ``last_step``: how many times :meth:`step` has been called (the index of
      the batch the next forward will process);
    * :meth:`get_momentum` / the ``momentum`` property: ``momentum_at(last_step)``,
      the value the layers hold now;
    * :meth:`step`: advance by one batch and set the layers' momentum;
    * :meth:`state_dict` / :meth:`load_state_dict`: plain Python numbers (and the
      schedule's class name), so a resumed run continues the schedule exactly;
    * :meth:`values`: ``[momentum_at(0), ..., momentum_at(n - 1)]``, for plots.
    """

    _hparams: tuple = ()          # names of the settings, in constructor order

    def __init__(self, model):
        self.layers = batchnorm_layers(model)
        self.last_step = 0
        self._apply()

    # -- subclasses ----------------------------------------------------------
    def momentum_at(self, step: int) -> float:  # pragma: no cover - abstract
        """The momentum used by forward number ``step`` (0-based)."""
        raise NotImplementedError

    def _validated(self, settings: Dict[str, object]) -> Dict[str, object]:  # pragma: no cover
        """Check and normalize the settings; raise ``ValueError`` when one is invalid."""
        raise NotImplementedError

    def _configure(self, **settings):
        for name, value in self._validated(settings).items():
            setattr(self, name, value)

    # -- the scheduler interface ----------------------------------------------
    def get_momentum(self) -> float:
        """The momentum the layers use for the next forward: ``momentum_at(last_step)``."""
        return self.momentum_at(self.last_step)

    @property
    def momentum(self) -> float:
        return self.get_momentum()

    def step(self):
        """Call once per batch, after its forward: the layers get the next batch's momentum."""
        self.last_step += 1
        self._apply()

    def _apply(self):
        value = self.get_momentum()
        for layer in self.layers:
            layer.momentum = value

    def values(self, n: int) -> List[float]:
        """The first ``n`` momenta of the schedule (does not touch the layers)."""
        return [self.momentum_at(t) for t in range(int(n))]

    # -- checkpointing -------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        """``{"schedule": class name, "last_step": int, <settings>...}``: plain numbers, JSON-ready."""
        state = {"schedule": type(self).__name__, "last_step": int(self.last_step)}
        for name in self._hparams:
            state[name] = getattr(self, name)
        return state

    def load_state_dict(self, state: Dict[str, object]):
        """Restore the step counter and settings, then set the layers' momentum accordingly.

        A state from another kind of schedule, a missing or unknown key, or an
        invalid value is a ``ValueError``, and then nothing is changed.
        """
        kind = state.get("schedule", type(self).__name__)
        if kind != type(self).__name__:
            raise ValueError(f"load_state_dict: this is a {type(self).__name__} schedule, "
                             f"the state is from a {kind} schedule")
        expected = {"schedule", "last_step", *self._hparams}
        missing = sorted(k for k in expected - {"schedule"} if k not in state)
        unknown = sorted(k for k in state if k not in expected)
        if missing or unknown:
            raise ValueError(f"load_state_dict for {type(self).__name__}: missing keys {missing}, "
                             f"unknown keys {unknown}")
        last = state["last_step"]
        if isinstance(last, bool) or not isinstance(last, numbers.Integral) or int(last) < 0:
            raise ValueError(f"load_state_dict: last_step must be an integer >= 0, got {last!r}")
        settings = self._validated({name: state[name] for name in self._hparams})
        for name, value in settings.items():
            setattr(self, name, value)
        self.last_step = int(last)
        self._apply()

    def __repr__(self):
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._hparams)
        return (f"{type(self).__name__}({args}; last_step={self.last_step}, "
                f"momentum={self.get_momentum():.6g}, layers={len(self.layers)})")


# --------------------------------------------------------------------------- the schedules

class Constant(MomentumSchedule):
    """Static momentum: ``momentum(t) = momentum`` for every batch."""

    _hparams = ("value",)

    def __init__(self, model, momentum: float):
        self._configure(value=momentum)
        super().__init__(model)

    def _validated(self, s):
        return {"value": _check_momentum(s["value"], "momentum")}

    def momentum_at(self, step):
        return self.value


class _StartEndSchedule(MomentumSchedule):
    """A schedule that goes from ``start`` to ``end`` in ``total_steps`` batches, then stays at ``end``."""

    _hparams = ("start", "end", "total_steps")

    def __init__(self, model, start: float, end: float, total_steps: int):
        self._configure(start=start, end=end, total_steps=total_steps)
        super().__init__(model)

    def _validated(self, s):
        return {"start": _check_momentum(s["start"], "start"), "end": _check_momentum(s["end"], "end"),
                "total_steps": _check_steps(s["total_steps"])}


class LinearDecay(_StartEndSchedule):
    """The article's linear decay, held at ``end`` once ``total_steps`` batches are done::

        momentum(t) = start - (t / total_steps) * (start - end)     for t <= total_steps
        momentum(t) = end                                            for t >  total_steps

    The article's ``max(0.9 - epoch / 50, 0.1)`` is ``LinearDecay(start=0.9,
    end=0.1, total_steps=40)`` (the two agree to within one float64 rounding, 1e-16).
    ``end > start`` makes a linear *increase*, which is allowed.
    """

    def momentum_at(self, step):
        if step >= self.total_steps:
            return self.end
        return self.start - (step / self.total_steps) * (self.start - self.end)


class ExponentialDecay(MomentumSchedule):
    """The article's exponential decay, optionally clipped from below::

        momentum(t) = start * decay_rate ** t                  (floor=None)
        momentum(t) = max(start * decay_rate ** t, floor)      (floor given)

    Without a floor the momentum tends to 0: the running statistics then stop
    moving at all (momentum 0 keeps ``running`` unchanged), which is rarely what
    is wanted in a long run.
    """

    _hparams = ("start", "decay_rate", "floor")

    def __init__(self, model, start: float, decay_rate: float, floor=None):
        self._configure(start=start, decay_rate=decay_rate, floor=floor)
        super().__init__(model)

    def _validated(self, s):
        start = _check_momentum(s["start"], "start")
        rate = _check_rate(s["decay_rate"])
        floor = s["floor"]
        if floor is not None:
            floor = _check_momentum(floor, "floor")
            if floor > start:
                raise ValueError(f"floor ({floor}) must not exceed start ({start}): the schedule "
                                 "would be the constant floor")
        return {"start": start, "decay_rate": rate, "floor": floor}

    def momentum_at(self, step):
        value = self.start * self.decay_rate ** step
        return value if self.floor is None else max(value, self.floor)


class Cosine(_StartEndSchedule):
    """Half a cosine from ``start`` to ``end`` over ``total_steps`` batches, then ``end``::

        momentum(t) = end + (start - end) * (1 + cos(pi * t / total_steps)) / 2    t <= total_steps

    It stays near ``start`` longer than the linear decay, then falls faster in
    the middle, and flattens out before reaching ``end``.
    """

    def momentum_at(self, step):
        if step >= self.total_steps:
            return self.end
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * step / self.total_steps))


class Cumulative(MomentumSchedule):
    """``momentum(t) = 1 / (t + 1)``: the running statistics are the exact average of the batches.

    By induction, if ``running`` is the average of the batch statistics
    ``s_0 .. s_{t-1}``, then ``(1 - 1/(t+1)) running + 1/(t+1) s_t`` is the
    average of ``s_0 .. s_t``; the first step (momentum 1) discards the initial
    values (0 and 1).  Every batch counts equally, however old: the estimate
    never forgets.

    Relation to ``BatchNorm(momentum=None)``: that layer uses the factor
    ``1 / num_batches_tracked`` (after counting the current batch), which for a
    fresh layer is the same number, so the running statistics come out bit for
    bit the same.  They differ when the counts differ: ``momentum=None`` counts
    every batch the layer has ever been trained on (and skips empty batches),
    this schedule counts the calls to :meth:`step` since it was created (or
    restored), the same count for every layer it drives.  Attached to a layer
    that has already seen batches, it starts a new average from the next batch.
    """

    _hparams = ()

    def __init__(self, model):
        super().__init__(model)

    def _validated(self, s):
        return {}

    def momentum_at(self, step):
        return 1.0 / (step + 1)
