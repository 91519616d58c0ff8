"""The reference engine: ``functional.py`` itself.

Its methods are the readable functions (no wrapper in between), so a layer on
this engine calls the math a student reads: ``BatchNorm1d.forward`` ->
``functional.batch_norm_forward``.  It runs on any array module and dtype.
"""
from __future__ import annotations

from .. import functional as F
from .interface import Engine

__all__ = ["ReferenceEngine"]


class ReferenceEngine(Engine):
    """``functional.py``'s batch-norm functions, as an engine."""

    name = "reference"
    statistics = staticmethod(F.batch_norm_statistics)
    forward_train = staticmethod(F.batch_norm_forward)
    forward_eval = staticmethod(F.batch_norm_eval_forward)
    backward = staticmethod(F.batch_norm_backward)
