"""Shared test set-up: a bounded hypothesis profile, seeded data, and the float64 reference.

The reference is ``minibn.grading.reference``, the grader's: written from the
formulas of the article's section 2 (two passes in float64: the mean first,
then the mean of squared deviations), not from minibn's code, so tests that
compare against it can fail.  ``Reference`` below calls it the way the tests do.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from minibn.grading import reference as R

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
    """Batch norm in float64 NumPy, straight from the formulas (``minibn.grading.reference``)."""

    axes = staticmethod(R.channel_axes)
    bshape = staticmethod(R.channel_shape)
    stats = staticmethod(R.bn_stats)          # (m, mean, biased var) per channel
    running = staticmethod(R.bn_running)      # running (mean, var) after training steps

    @staticmethod
    def forward(x, gamma=None, beta=None, eps=1e-5, mean=None, var=None):
        """``y``, ``x_hat`` with batch statistics (or the given ``mean``/``var``)."""
        f = R.bn_forward(x, gamma, beta, eps, stats=None if mean is None else (0, mean, var))
        return f["y"], f["x_hat"]

    @staticmethod
    def backward(dy, x, gamma=None, eps=1e-5):
        """Training-mode ``(dx, dgamma, dbeta)`` of ``L = sum(dy * y)``."""
        f = R.bn_forward(x, gamma, None, eps)
        return R.bn_backward(dy, f["x_hat"], f["inv_std"], gamma, f["count"])


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
