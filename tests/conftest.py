"""Shared test set-up: a bounded hypothesis profile, seeded data, and an independent reference.

The reference below is written from the formulas of the article's section 2
(two passes in float64: the mean first, then the mean of squared deviations),
not from minibn's code, so tests that compare against it can fail.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    settings = None

if settings is not None:
    settings.register_profile("minibn", max_examples=25, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "minibn"))

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:       # lets test files `import lesson_utils`
    sys.path.insert(0, TESTS_DIR)


class Reference:
    """Batch norm in float64 NumPy, straight from the formulas (no minibn code)."""

    @staticmethod
    def axes(ndim):
        return (0,) + tuple(range(2, ndim))

    @staticmethod
    def bshape(ndim):
        return (1, -1) + (1,) * (ndim - 2)

    @classmethod
    def stats(cls, x):
        """``(m, mean, biased var)`` per channel, two passes in float64."""
        x = np.asarray(x, dtype=np.float64)
        ax = cls.axes(x.ndim)
        m = int(np.prod([x.shape[a] for a in ax]))
        mu = x.sum(axis=ax) / m
        dev = x - mu.reshape(cls.bshape(x.ndim))
        var = (dev * dev).sum(axis=ax) / m
        return m, mu, var

    @classmethod
    def forward(cls, x, gamma=None, beta=None, eps=1e-5, mean=None, var=None):
        """``y``, ``x_hat`` with batch statistics (or the given ``mean``/``var``)."""
        x = np.asarray(x, dtype=np.float64)
        if mean is None:
            _, mean, var = cls.stats(x)
        b = cls.bshape(x.ndim)
        x_hat = (x - np.asarray(mean, np.float64).reshape(b)) / np.sqrt(
            np.asarray(var, np.float64).reshape(b) + eps)
        y = x_hat
        if gamma is not None:
            y = y * np.asarray(gamma, np.float64).reshape(b)
        if beta is not None:
            y = y + np.asarray(beta, np.float64).reshape(b)
        return y, x_hat

    @classmethod
    def backward(cls, dy, x, gamma=None, eps=1e-5):
        """Training-mode ``(dx, dgamma, dbeta)``: the chain rule through mean and variance."""
        x = np.asarray(x, dtype=np.float64)
        dy = np.asarray(dy, dtype=np.float64)
        m, mu, var = cls.stats(x)
        b, ax = cls.bshape(x.ndim), cls.axes(x.ndim)
        istd = 1.0 / np.sqrt(var + eps)
        x_hat = (x - mu.reshape(b)) * istd.reshape(b)
        g = np.ones_like(mu) if gamma is None else np.asarray(gamma, np.float64)
        dxhat = dy * g.reshape(b)
        # d var / d x_i = 2 (x_i - mu) / m ; d mu / d x_i = 1 / m
        dvar = (dxhat * (x - mu.reshape(b))).sum(axis=ax) * -0.5 * istd ** 3
        dmu = -(dxhat * istd.reshape(b)).sum(axis=ax)   # the var path's mu term is 0: sum(x - mu) = 0
        dx = dxhat * istd.reshape(b) + dvar.reshape(b) * 2.0 * (x - mu.reshape(b)) / m \
            + dmu.reshape(b) / m
        return dx, (dy * x_hat).sum(axis=ax), dy.sum(axis=ax)

    @classmethod
    def running(cls, batches, momentum, mean0=None, var0=None):
        """Running mean/var after the batches: EMA with unbiased variance, or cumulative for None."""
        C = np.asarray(batches[0]).shape[1]
        rm = np.zeros(C) if mean0 is None else np.asarray(mean0, np.float64).copy()
        rv = np.ones(C) if var0 is None else np.asarray(var0, np.float64).copy()
        for t, x in enumerate(batches, start=1):
            m, mu, var = cls.stats(x)
            a = 1.0 / t if momentum is None else momentum
            rm = (1 - a) * rm + a * mu
            rv = (1 - a) * rv + a * var * m / (m - 1)
        return rm, rv


@pytest.fixture
def ref():
    return Reference


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


def rel_err(a, b):
    """max|a - b| / max|b| (with a tiny floor): one number per comparison."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


@pytest.fixture
def relerr():
    return rel_err
