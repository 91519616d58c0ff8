"""The fast engines held to independent references.

References: the float64 two-pass formulas of ``minibn.grading.reference``
(``Reference`` in conftest), the reference engine (``functional.py``), and
PyTorch when it is installed.  Every engine test runs once per fast engine,
each on its fast path for every input size: the numpy engine under several
tilings (the default one, and tiny tiles with several threads so that inputs
of a few hundred values are cut into many tiles: odd sizes, partial tiles,
both layouts, maps and broadcasting constants), and the numba engine when
numba is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import minibn as mb
import minibn.functional as F
from minibn import bench
from minibn.engines import (default_engine_name, engine_available, get_engine, no_output_recycling,
                            release_buffers, select_engine, set_num_threads, using_engine)
from minibn.engines import cupy_fused, numba_loops, numpy_tiled, tiling, workspace
from minibn.engines.coefficients import KernelCache

EPS = 1e-5

# the numpy engine's tilings: (TILE_BYTES, threads, SMALL_BYTES, MAP_MIN_N, COL_RUN)
TILINGS = {
    "tiny-tiles-3-threads": (1024, 3, 0, 1, None),
    "tiny-tiles-2-threads-broadcast": (2048, 2, 0, 10 ** 9, 3),
    "one-tile": (1 << 30, 1, 1 << 40, 4, None),
}
needs_numba = pytest.mark.skipif(not engine_available("numba"),
                                 reason="numba is not installed (pip install minibn[jit])")
FAST_ENGINES = ([pytest.param(("numpy", None), id="numpy")]
                + [pytest.param(("numpy", t), id=f"numpy-{t}") for t in TILINGS]
                + [pytest.param(("numba", None), id="numba", marks=needs_numba)])


@pytest.fixture(params=FAST_ENGINES)
def engine(request, monkeypatch):
    """A fast engine, on its fast path for every input size (no hand-off of small inputs)."""
    name, tiling_name = request.param
    monkeypatch.setattr(numpy_tiled, "REFERENCE_BELOW", 0)
    monkeypatch.setattr(tiling, "PARALLEL_MIN_BYTES", 0)
    if tiling_name is not None:
        tile, threads, small, map_min_n, col_run = TILINGS[tiling_name]
        monkeypatch.setattr(tiling, "TILE_BYTES", tile)
        monkeypatch.setattr(tiling, "SMALL_BYTES", small)
        monkeypatch.setattr(tiling, "MAP_MIN_N", map_min_n)
        if col_run is not None:
            monkeypatch.setattr(tiling, "COL_RUN", col_run)
        monkeypatch.setattr(workspace, "_threads", threads)
    tiling._cached_plan.cache_clear()
    yield get_engine(name)
    tiling._cached_plan.cache_clear()


SHAPES = [
    (2, 3), (7, 5), (300, 17), (1000, 3),            # (N, C)
    (5, 3, 7), (2, 5, 33), (3, 4, 300),              # (N, C, L): short rows, rows, long rows
    (2, 3, 5, 7), (4, 6, 16, 16), (3, 2, 33, 35),    # (N, C, H, W), odd sizes
    (2, 3, 4, 5, 6), (2, 2, 3, 7, 11),               # (N, C, D, H, W)
    (2, 2, 1021), (3, 2, 600),                       # rows longer than one dot-product run
]


def _data(shape, dtype, loc=0.0, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    return x, dy, w, b


def _tol(dtype):
    return 2e-6 if np.dtype(dtype) == np.float32 else 1e-13


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(b) else 0.0


def _check_training(engine, ref, shape, dtype, loc=0.0, scale=1.0, seed=0, affine=True):
    """Fast forward/backward against the float64 formulas and the reference engine."""
    x, dy, w, b = _data(shape, dtype, loc, scale, seed)
    if not affine:
        w = b = None
    y, cache = engine.forward_train(x, w, b, EPS)
    assert isinstance(cache, KernelCache)
    dx, dw, db = engine.backward(dy, cache)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == x.shape == dx.shape

    m, mu, var = ref.stats(x)
    y_ref, x_hat = ref.forward(x, w, b, EPS)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, w, EPS)
    tol = _tol(dtype)
    assert cache.count == m
    assert _max_err(cache.mean, mu) <= tol * (np.max(np.abs(mu)) + np.sqrt(np.max(var)) + 1e-30)
    assert _max_err(cache.var, var) <= tol * np.max(var) + 1e-300
    # The fast engines subtract the mean rounded to the dtype and correct for the rounding,
    # so their error does not grow with |mean| / std: plain relative tolerances -- beyond
    # the float64 mean itself, known to float64's last place of |mean| here as in the
    # reference, which moves x_hat by up to that over std (float64 data, |mean| >> std).
    g = np.abs(w).max() if affine else 1.0
    scale_y = g * np.abs(x_hat).max() + (np.abs(b).max() if affine else 0.0)
    istd = 1 / np.sqrt(var + EPS)
    mean_quant = np.finfo(np.float64).eps * np.max(np.abs(mu) * istd)
    assert _max_err(y, y_ref) <= tol * scale_y + 4 * g * mean_quant
    scale_dx = np.abs(dy).max() * g * istd.max()
    assert _max_err(dx, dx_ref) <= 4 * tol * scale_dx
    if affine:
        scale_g = np.sqrt(np.sum(dy.astype(np.float64) ** 2) * np.sum(x_hat ** 2) / x.shape[1])
        assert dw.dtype == w.dtype and db.dtype == w.dtype
        assert _max_err(dw, dw_ref) <= 4 * tol * scale_g
        assert _max_err(db, db_ref) <= tol * np.abs(dy.astype(np.float64)).sum(axis=ref.axes(x.ndim)).max()
    else:
        assert dw is None and db is None

    # The reference engine agrees, up to its own rounding: it subtracts the rounded mean
    # without correction, which costs |mean| / std units of x_hat's last place.
    quant = np.finfo(dtype).eps * np.max((np.abs(mu) + np.sqrt(var)) / np.sqrt(var + EPS))
    y_f, cache_f = F.batch_norm_forward(x, w, b, EPS)
    dx_f, _, _ = F.batch_norm_backward(dy, cache_f)
    assert _max_err(y, y_f) <= 2 * tol * scale_y + 2 * g * quant
    assert _max_err(dx, dx_f) <= 8 * tol * scale_dx + 4 * scale_dx * quant


# --------------------------------------------------------------------------- training mode

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_matches_references(engine, ref, shape, dtype):
    _check_training(engine, ref, shape, dtype, loc=0.5, scale=2.0)


@pytest.mark.parametrize("shape", [(300, 17), (3, 4, 300), (4, 6, 16, 16), (2, 2, 1021)],
                         ids=lambda s: "x".join(map(str, s)))
def test_without_affine(engine, ref, shape):
    _check_training(engine, ref, shape, np.float32, affine=False)


@pytest.mark.parametrize("shape", [(4096, 8), (64, 4, 256), (8, 8, 32, 32), (2, 3, 1021), (600, 7, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_variance_with_large_mean_is_as_accurate_as_the_reference(engine, ref, shape):
    """float32 data with mean 1e4 and std 1: the fast variance is float32-accurate,

    i.e. within a few units of float32's last place of the exact variance of the
    float32 data, like the readable shifted two-pass method."""
    x, dy, w, b = _data(shape, np.float32, loc=1e4, scale=1.0, seed=3)
    _, mu, var = ref.stats(x)
    count, mean, v = engine.statistics(x)
    _, mean_f, v_f = mb.moments.channel_moments(x, mb.moments.reduce_axes(x.ndim))
    rel = np.max(np.abs(v - var) / var)
    rel_f = np.max(np.abs(v_f - var) / var)
    assert rel < 1e-7, (rel, rel_f)                         # within one unit of float32's last place
    assert np.max(np.abs(mean - mu)) <= 1e-7 * 1e4
    # and the textbook E[x^2] - E[x]^2 in float32 would have been useless here
    x64 = x.astype(np.float32)
    naive = (x64 * x64).mean(axis=ref.axes(x.ndim)) - x64.mean(axis=ref.axes(x.ndim)) ** 2
    assert np.max(np.abs(naive - var) / var) > 1e-2
    _check_training(engine, ref, shape, np.float32, loc=1e4, scale=1.0, seed=3)


@pytest.mark.parametrize("shape", [(8192, 3), (512, 2, 64), (256, 3, 8, 8)], ids=lambda s: "x".join(map(str, s)))
def test_unrepresentative_first_samples_trigger_the_second_statistics_pass(engine, ref, shape, monkeypatch):
    """The provisional shift is the mean of the first samples.  Here they are outliers,
    hundreds of standard deviations from the batch mean: one pass would cancel digits
    away, so the numpy engine redoes the pass with the mean it found (the classic two-pass).
    (The numba engine sums in float64 and needs no second pass: only its accuracy is
    checked.)"""
    x, dy, w, b = _data(shape, np.float32, seed=5)
    k = numpy_tiled.shift_sample(tiling.plan_for(x))[0].stop   # how many samples the shift averages
    x[:k] += 1000.0
    if engine.name == "numba":
        _, mu, var = ref.stats(x)
        _, mean, v = engine.statistics(x)
        assert np.max(np.abs(v - var) / var) < 1e-7
        assert np.max(np.abs(mean - mu)) < 1e-7 * np.max(np.abs(mu))
        return
    calls = []
    original = numpy_tiled.NumpyEngine._shifted_sums
    monkeypatch.setattr(numpy_tiled.NumpyEngine, "_shifted_sums",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    _, mu, var = ref.stats(x)
    _, mean, v = engine.statistics(x)
    assert len(calls) == 2
    assert np.max(np.abs(v - var) / var) < 1e-7
    assert np.max(np.abs(mean - mu)) < 1e-7 * np.max(np.abs(mu))
    calls.clear()
    engine.statistics(_data(shape, np.float32, loc=1e4, seed=6)[0])   # representative: one pass
    assert len(calls) == 1


@pytest.mark.parametrize("shape", [(4096, 3), (64, 3, 256), (16, 4, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_gradient_with_large_mean_and_correlated_dy(engine, ref, shape):
    """dy that depends on x_hat makes sum(dy * x_hat) large, so the correction for the
    rounded mean inside the backward constants is visible in dx."""
    x, _, w, b = _data(shape, np.float32, loc=1e4, seed=8)
    _, x_hat = ref.forward(x)
    dy = (x_hat + x_hat ** 2).astype(np.float32)
    y, cache = engine.forward_train(x, w, b, EPS)
    dx, dw, db = engine.backward(dy, cache)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, w, EPS)
    assert _max_err(dx, dx_ref) <= 1e-5 * np.abs(dx_ref).max()
    assert _max_err(dw, dw_ref) <= 1e-6 * np.abs(dw_ref).max()


def test_constant_channel_has_zero_variance(engine, ref):
    x, dy, w, b = _data((64, 3, 40), np.float32, seed=2)
    x[:, 1] = 1234.5
    y, cache = engine.forward_train(x, w, b, EPS)
    assert cache.var[1] == 0.0 and cache.mean[1] == 1234.5
    np.testing.assert_array_equal(y[:, 1], b[1])
    dx, dw, db = engine.backward(dy, cache)
    assert np.all(np.isfinite(dx))
    _check_training(engine, ref, (64, 3, 40), np.float32, seed=2)


def test_nan_stays_in_its_channel(engine):
    x, dy, w, b = _data((40, 3, 50), np.float32, seed=4)
    x[7, 2, 9] = np.nan
    y, cache = engine.forward_train(x, w, b, EPS)
    assert np.isnan(cache.var[2]) and np.all(np.isnan(y[:, 2]))
    assert np.all(np.isfinite(y[:, :2]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_n_equal_two(engine, ref, dtype):
    """Two values per channel: x_hat is +-1 (up to eps) and dx is nearly zero."""
    _check_training(engine, ref, (2, 5), dtype)
    _check_training(engine, ref, (2, 4, 9, 9), dtype)


def test_one_value_per_channel_is_an_error(engine):
    x = np.ones((1, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        engine.forward_train(x)


def test_bad_input_errors_match_the_reference(engine):
    x, dy, w, b = _data((8, 3, 5), np.float32)
    with pytest.raises(TypeError):
        engine.forward_train(np.ones((4, 3), np.int64))
    with pytest.raises(ValueError, match="shape"):
        engine.forward_train(np.ones(5, np.float32))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        engine.forward_train(x, np.ones(4, np.float32), b)
    _, cache = engine.forward_train(x, w, b)
    with pytest.raises(ValueError, match="shape"):
        engine.backward(dy[:4], cache)
    with pytest.raises(TypeError):
        engine.backward(dy.astype(np.int32), cache)


def test_non_contiguous_input(engine, ref):
    base, dy, w, b = _data((6, 4, 10, 12), np.float32)
    x = base.transpose(0, 1, 3, 2)                     # a strided view
    y, cache = engine.forward_train(x, w, b)
    dx, dw, db = engine.backward(np.ascontiguousarray(dy.transpose(0, 1, 3, 2)), cache)
    y_ref, _ = ref.forward(x, w, b)
    assert _max_err(y, y_ref) < 1e-5 * np.abs(y_ref).max()


def test_float16_takes_the_reference_path(engine):
    x, dy, w, b = _data((40, 3, 50), np.float16)
    y, cache = engine.forward_train(x, w, b)
    assert not isinstance(cache, KernelCache) and y.dtype == np.float16
    y_f, _ = F.batch_norm_forward(x, w, b)
    np.testing.assert_array_equal(y, y_f)


def test_results_do_not_depend_on_the_thread_count(engine, monkeypatch):
    """Tiles and the order of their partial sums are fixed: any thread count gives the same bits."""
    x, dy, w, b = _data((64, 5, 40), np.float32, loc=3.0, seed=9)
    out = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(workspace, "_threads", threads)
        y, cache = engine.forward_train(x, w, b)
        dx, dw, db = engine.backward(dy, cache)
        out.append((y, dx, dw, db, cache.mean, cache.var))
    for other in out[1:]:
        for a, c in zip(out[0], other):
            np.testing.assert_array_equal(a, c)


def test_empty_batch_with_given_statistics(engine):
    """A SyncBN rank with no local samples: empty outputs, zero local sums."""
    x = np.zeros((0, 3, 4, 4), np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, cache = engine.forward_train(x, w, b, stats=(32, np.zeros(3), np.ones(3)))
    assert y.shape == x.shape
    dx, dw, db = engine.backward(np.zeros_like(x), cache, reduce=lambda s1, s2: (s1 + 1, s2 + 1))
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)
    count, mean, var = engine.statistics(x)
    assert count == 0 and mean.shape == (3,)


# --------------------------------------------------------------------------- given statistics, reduce hook

@pytest.mark.parametrize("loc", [0.0, 1e4])
@pytest.mark.parametrize("shape", [(300, 17), (4, 6, 16, 16), (3, 4, 300)], ids=lambda s: "x".join(map(str, s)))
def test_given_statistics_and_reduce_hook_match_the_reference(engine, ref, shape, loc):
    """SyncBatchNorm's path: global statistics in, local sums out through ``reduce``."""
    x, dy, w, b = _data(shape, np.float32, loc=loc, seed=11)
    C = shape[1]
    rng = np.random.default_rng(12)
    g_mean = loc + 0.1 * rng.standard_normal(C)        # "global" statistics of a larger batch
    g_var = 1.0 + 0.2 * rng.random(C)
    g_count = 4 * (x.size // C)
    seen = {}

    def reduce(sum_dy, sum_dy_xhat):                    # stands in for an Allreduce over 4 ranks
        seen["args"] = (sum_dy.copy(), sum_dy_xhat.copy())
        return 4 * sum_dy + 0.5, 4 * sum_dy_xhat - 0.25

    y, cache = engine.forward_train(x, w, b, EPS, stats=(g_count, g_mean, g_var))
    dx, dw, db = engine.backward(dy, cache, reduce=reduce)
    fast_args = seen.pop("args")
    y_f, cache_f = F.batch_norm_forward(x, w, b, EPS, stats=(g_count, g_mean, g_var))
    dx_f, dw_f, db_f = F.batch_norm_backward(dy, cache_f, reduce=reduce)

    # independent float64 versions of the local sums and of dx with the global numbers
    bs, ax = ref.bshape(x.ndim), ref.axes(x.ndim)
    istd = 1 / np.sqrt(g_var + EPS)
    x_hat = (x.astype(np.float64) - g_mean.reshape(bs)) * istd.reshape(bs)
    d64 = dy.astype(np.float64)
    local = (d64.sum(axis=ax), (d64 * x_hat).sum(axis=ax))
    s_dy, s_dyxh = 4 * local[0] + 0.5, 4 * local[1] - 0.25
    dx_true = (w.astype(np.float64) * istd).reshape(bs) * (
        d64 - (s_dy / g_count).reshape(bs) - x_hat * (s_dyxh / g_count).reshape(bs))
    y_true = w.reshape(bs) * x_hat + b.reshape(bs)

    scale = np.sqrt(np.sum(d64 ** 2) * np.sum(x_hat ** 2) / C)
    for got, want in zip(fast_args, local):
        assert _max_err(got, want) <= 1e-5 * scale
    assert _max_err(dw, local[1]) <= 1e-5 * scale and _max_err(db, local[0]) <= 1e-5 * scale
    quant = np.finfo(np.float32).eps * (abs(loc) + 4) * istd.max()
    assert _max_err(y, y_true) <= 4e-6 * np.abs(y_true).max() + 2 * np.abs(w).max() * quant
    assert _max_err(y_f, y_true) <= 4e-6 * np.abs(y_true).max() + 2 * np.abs(w).max() * quant
    scale_dx = np.abs(dx_true).max()
    assert _max_err(dx, dx_true) <= 1e-5 * scale_dx + 4 * quant * np.abs(w).max() * istd.max()
    assert _max_err(dx, dx_f) <= 2e-5 * scale_dx + 8 * quant * np.abs(w).max() * istd.max()


@pytest.mark.parametrize("shape", [(300, 17), (4, 6, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_eval_backward_does_not_touch_x(engine, ref, shape):
    """In eval mode dx = gamma / sqrt(var + eps) * dy: an infinite input value (its output
    is infinite) must not turn any gradient into NaN."""
    x, dy, w, b = _data(shape, np.float32, seed=13)
    x[1, 2] = np.inf
    mean, var = np.linspace(-1, 1, shape[1]), np.linspace(0.5, 2, shape[1])
    y, cache = engine.forward_eval(x, mean, var, w, b, EPS)
    dx, dw, db = engine.backward(dy, cache)
    assert np.isinf(y[1, 2]).all() and np.isfinite(dx).all()
    scale = (w.astype(np.float64) / np.sqrt(var + EPS)).reshape((1, -1) + (1,) * (x.ndim - 2))
    np.testing.assert_allclose(dx, dy * scale, rtol=1e-6)
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=ref.axes(x.ndim)), rtol=1e-5)


def test_reduce_hook_is_not_called_in_eval_mode(engine):
    x, dy, w, b = _data((50, 4, 40), np.float32)
    _, cache = engine.forward_eval(x, np.zeros(4, np.float32), np.ones(4, np.float32), w, b)

    def reduce(*_):
        raise AssertionError("eval mode must not communicate")
    engine.backward(dy, cache, reduce=reduce)


# --------------------------------------------------------------------------- eval mode

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loc", [0.3, 1e4])             # both forms: x * a + b, and subtract first
@pytest.mark.parametrize("shape", [(300, 17), (5, 3, 7), (4, 6, 16, 16), (2, 2, 3, 7, 11)],
                         ids=lambda s: "x".join(map(str, s)))
def test_eval_mode_matches_references(engine, ref, shape, loc, dtype):
    x, dy, w, b = _data(shape, dtype, loc=loc, seed=21)
    C = shape[1]
    rng = np.random.default_rng(22)
    rm = (loc + 0.1 * rng.standard_normal(C)).astype(dtype)
    rv = (0.5 + rng.random(C)).astype(dtype)
    y, cache = engine.forward_eval(x, rm, rv, w, b, EPS)
    dx, dw, db = engine.backward(dy, cache)
    y_true, x_hat = ref.forward(x, w, b, EPS, mean=rm, var=rv)
    bs, ax = ref.bshape(x.ndim), ref.axes(x.ndim)
    istd = 1 / np.sqrt(rv.astype(np.float64) + EPS)
    d64 = dy.astype(np.float64)
    tol = _tol(dtype)
    quant = np.finfo(dtype).eps * np.max((np.abs(rm) + 4) * istd)
    assert _max_err(y, y_true) <= tol * np.abs(y_true).max() + 2 * np.abs(w).max() * quant
    assert _max_err(dx, d64 * (w * istd).reshape(bs)) <= tol * np.abs(dx).max()
    scale = np.sqrt(np.sum(d64 ** 2) * np.sum(x_hat ** 2) / C)
    assert _max_err(dw, (d64 * x_hat).sum(axis=ax)) <= 4 * tol * scale + np.abs(d64).sum() * quant
    assert _max_err(db, d64.sum(axis=ax)) <= tol * np.abs(d64).sum(axis=ax).max()
    y_f, _ = F.batch_norm_eval_forward(x, rm, rv, w, b, EPS)
    assert _max_err(y, y_f) <= 2 * tol * np.abs(y_true).max() + 4 * np.abs(w).max() * quant


# --------------------------------------------------------------------------- property test

@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n=st.integers(2, 9), c=st.integers(1, 5),
       spatial=st.lists(st.integers(1, 40), min_size=0, max_size=2),
       loc=st.sampled_from([0.0, -3.0, 250.0]), log_scale=st.integers(-2, 2),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2 ** 16))
def test_property_any_shape(engine, n, c, spatial, loc, log_scale, dtype, seed):
    from conftest import Reference
    _check_training(engine, Reference, (n, c) + tuple(spatial), dtype, loc=loc, scale=10.0 ** log_scale, seed=seed)


# --------------------------------------------------------------------------- caches, selection, layers

def test_kernel_cache_works_with_the_reference_backward(engine, ref):
    x, dy, w, b = _data((30, 4, 20), np.float64, seed=7)
    _, cache = engine.forward_train(x, w, b)
    dx_k, dw_k, db_k = engine.backward(dy, cache)
    dx_f, dw_f, db_f = F.batch_norm_backward(dy, cache)      # computes cache.x_hat on demand
    np.testing.assert_allclose(dx_k, dx_f, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw_k, dw_f, rtol=1e-10)
    _, x_hat = ref.forward(x)
    np.testing.assert_allclose(cache.x_hat, x_hat, rtol=1e-12, atol=1e-12)


def test_reference_engine_is_functional():
    reference = get_engine("reference")
    assert reference.statistics is F.batch_norm_statistics
    assert reference.forward_train is F.batch_norm_forward
    assert reference.forward_eval is F.batch_norm_eval_forward
    assert reference.backward is F.batch_norm_backward


def test_using_engine_selects_functional():
    x, dy, w, b = _data((1000, 17), np.float32)                 # above the numpy engine's hand-off size
    with using_engine("reference"):
        engine = select_engine(x)
        assert engine.name == "reference"
        _, cache = engine.forward_train(x, w, b)
        assert type(cache) is F.BNCache
        with using_engine("numpy"):                             # the innermost block wins
            assert select_engine(x).name == "numpy"
        assert select_engine(x).name == "reference"
        assert select_engine(x, "numpy").name == "numpy"       # a layer's own choice wins over the block
    engine = select_engine(x)
    assert engine.name == default_engine_name()
    if engine.name != "reference":                              # MINIBN_KERNELS=reference in this process
        assert isinstance(engine.forward_train(x, w, b)[1], KernelCache)


def test_numpy_engine_hands_small_empty_and_float16_inputs_to_the_reference():
    numpy_engine = get_engine("numpy")
    for x in (np.ones((64, 8), np.float32), np.zeros((0, 3, 4, 4), np.float32),
              np.ones((100, 3, 64), np.float16)):
        y, cache = numpy_engine.forward_eval(x, np.zeros(x.shape[1]), np.ones(x.shape[1]))
        assert type(cache) is F.BNCache and y.shape == x.shape


@pytest.mark.slow
def test_environment_variable_selects_the_reference_path():
    code = ("import numpy as np, minibn.engines as E;"
            "x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32);"
            "engine = E.select_engine(x);"
            "print(E.default_engine_name(), engine.name, type(engine.forward_train(x)[1]).__name__)")
    cases = [("reference", "reference reference BNCache"), ("fast", "numpy numpy KernelCache"),
             ("NumPy", "numpy numpy KernelCache"), ("", "numpy numpy KernelCache")]
    if engine_available("numba"):
        cases.append(("numba", "numba numba KernelCache"))
    for value, expected in cases:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "MINIBN_KERNELS": value}).stdout
        assert out.strip() == expected
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MINIBN_KERNELS": "numpyy"})
    assert bad.returncode != 0 and "MINIBN_KERNELS: expected one of numpy, numba, reference" in bad.stderr


def test_engine_choice_is_validated(monkeypatch):
    x = np.zeros((4, 3), np.float32)
    before = select_engine(x)                                   # numpy, or numba under test-numba
    with pytest.raises(ValueError, match="get_engine: expected one of numpy, numba, reference, cupy, cuda"):
        get_engine("tpu")
    with pytest.raises(ValueError, match="expected one of"):
        with using_engine("tpu"):
            pass
    assert select_engine(x) is before                           # the failed choices changed nothing
    with using_engine("reference"):
        assert select_engine(x).name == "reference"
        monkeypatch.setattr(numba_loops, "numba", None)         # as if numba were not installed
        with pytest.raises(RuntimeError, match=r"pip install minibn\[jit\]"):
            get_engine("numba")
        with pytest.raises(RuntimeError, match=r"pip install minibn\[jit\]"):
            with using_engine("numba"):
                pass
        with pytest.raises(RuntimeError, match=r"pip install minibn\[jit\]"):
            mb.BatchNorm1d(3, engine="numba")
        assert select_engine(x).name == "reference"             # the failed choices changed nothing
        monkeypatch.undo()
    assert select_engine(x) is before


@pytest.mark.parametrize("cls, shape", [(mb.BatchNorm1d, (300, 17)), (mb.BatchNorm1d, (8, 6, 50)),
                                        (mb.BatchNorm2d, (4, 6, 16, 16)), (mb.BatchNorm3d, (2, 3, 4, 5, 6))])
def test_layer_fast_and_reference_paths_agree(engine, cls, shape):
    """Two layers, same data, one on each engine: outputs, gradients, running statistics."""
    x, dy, w, b = _data(shape, np.float32, loc=2.0, seed=13)
    layers = [cls(shape[1], engine=engine), cls(shape[1], engine="reference")]
    results = []
    for layer in layers:
        layer.weight.data[...] = w
        layer.bias.data[...] = b
        out = [layer(x), layer.backward(dy), layer(x + 1), layer.backward(dy)]
        layer.eval()
        out += [layer(x), layer.backward(dy)]
        results.append(out + [layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var,
                              layer.num_batches_tracked])
    for a, c in zip(*results):
        scale = max(float(np.max(np.abs(c))), 1.0)
        assert _max_err(a, c) <= 3e-5 * scale


def test_cupy_engine_imports_without_a_gpu():
    assert isinstance(engine_available("cupy"), bool)
    x = np.zeros((4, 3), np.float32)
    assert select_engine(x).name == default_engine_name()      # NumPy arrays never go to the GPU engine


def test_an_engine_refuses_arrays_of_another_module():
    elsewhere = types.ModuleType("elsewhere")
    engine_on_elsewhere = type("ElsewhereEngine", (numpy_tiled.NumpyEngine,),
                               {"array_module": lambda self: elsewhere})()
    with pytest.raises(TypeError, match="computes on elsewhere arrays, got numpy arrays"):
        engine_on_elsewhere.forward_train(np.zeros((4, 3), np.float32))


def test_threads_setting_is_validated():
    with pytest.raises(ValueError):
        set_num_threads(0)


# --------------------------------------------------------------------------- torch (optional)

@pytest.mark.parametrize("shape", [(300, 17), (4, 6, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_agrees_with_pytorch(engine, shape):
    torch = pytest.importorskip("torch")
    x, dy, w, b = _data(shape, np.float32, loc=1.5, seed=17)
    y, cache = engine.forward_train(x, w, b, EPS)
    dx, dw, db = engine.backward(dy, cache)
    xt = torch.from_numpy(x).requires_grad_(True)
    wt, bt = torch.from_numpy(w).requires_grad_(True), torch.from_numpy(b).requires_grad_(True)
    yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=EPS)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4 * np.abs(dx).max())
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- the benchmark's pieces

def test_textbook_implementation_in_the_benchmark_is_right(ref):
    x, dy, w, b = _data((20, 3, 6, 6), np.float64, loc=1.0, seed=23)
    y, cache = bench._textbook_forward(x, w, b)
    dx, dw, db = bench._textbook_backward(dy, cache, w)
    y_ref, _ = ref.forward(x, w, b)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, w)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_bench_quick_run_prints_tables(capsys):
    rc = bench.main(["--shapes", "64x8,4x3x9x9", "--dtypes", "float32", "--repeats", "2", "--warmup", "1",
                     "--no-syncbn", "--no-gpu", "--no-torch"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| BN1d (64, 8) | minibn |" in out and "| BN2d (4, 3, 9, 9) | reference |" in out
    assert "| BN1d (64, 8) | textbook |" in out and "GPU" not in out
    assert ("| BN1d (64, 8) | minibn (numba) |" in out) == engine_available("numba")


@pytest.mark.slow
def test_bench_syncbn_rows_under_mpiexec():
    pytest.importorskip("mpi4py")
    rows, why = bench.bench_syncbn((8, 4, 5, 5), np.float32, (1, 2), repeats=2, warmup=1, log=lambda *a, **k: None)
    if why is not None:
        pytest.skip(why)
    assert [r["ranks"] for r in rows] == [1, 2]
    assert [r["local_batch"] for r in rows] == [8, 4]
    # one forward and one backward collective per step, the same O(C) payload for any P
    assert all(r["calls"] == 2 for r in rows)
    assert rows[0]["bytes_per_rank"] == rows[1]["bytes_per_rank"] > 0


# --------------------------------------------------------------------------- recycled outputs

def test_outputs_are_recycled_only_when_nobody_holds_them(monkeypatch):
    """A large output is handed out again once dropped -- never while anything refers to it."""
    monkeypatch.setattr(workspace, "RECYCLE_MIN_BYTES", 1024)
    release_buffers()
    engine = get_engine("numpy")
    x, dy, w, b = _data((64, 4, 100), np.float32, seed=31)
    x2 = x[::-1].copy()
    y1, _ = engine.forward_train(x, w, b)
    first = y1.copy()
    view = y1[:3]                                    # a view keeps the memory in use
    y2, _ = engine.forward_train(x2, w, b)
    assert y2 is not y1 and not np.shares_memory(y2, y1)
    np.testing.assert_array_equal(view, first[:3])
    mv = memoryview(y1)                              # so does a memoryview (or any wrapping array)
    del view
    y3, _ = engine.forward_train(x2, w, b)
    assert not np.shares_memory(y3, y1)
    del mv
    y1.shape = (64, 400)                             # reshaped in place by its user: not reused
    del y2, y3
    y4, _ = engine.forward_train(x, w, b)
    assert y4.shape == x.shape and not np.shares_memory(y4, y1)
    np.testing.assert_array_equal(y4, first)
    del y1
    y5, _ = engine.forward_train(x2, w, b)           # y1 (reshaped) is skipped, y2 or y3 reused
    y_ref, _ = F.batch_norm_forward(x2, w, b)
    np.testing.assert_allclose(y5, y_ref, rtol=1e-5, atol=1e-5)
    release_buffers()


def test_recycled_output_is_the_same_array_after_it_was_dropped(monkeypatch):
    monkeypatch.setattr(workspace, "RECYCLE_MIN_BYTES", 1024)
    release_buffers()
    engine = get_engine("numpy")
    x, dy, w, b = _data((64, 4, 100), np.float32, seed=32)
    y, cache = engine.forward_train(x, w, b)
    address = y.__array_interface__["data"][0]
    del y
    y_again, _ = engine.forward_train(x, w, b)
    assert y_again.__array_interface__["data"][0] == address
    dx, _, _ = engine.backward(dy, cache)
    assert not np.shares_memory(dx, y_again)
    del y_again
    with no_output_recycling():                      # switched off: a fresh array every time
        y_fresh, _ = engine.forward_train(x, w, b)
    assert y_fresh.__array_interface__["data"][0] != address
    release_buffers()


# --------------------------------------------------------------------------- the CuPy glue, on the CPU

class _FakeCupy:
    """Just enough of CuPy's array API, on NumPy, to run the cupy engine's host-side code."""
    zeros = staticmethod(np.zeros)
    empty_like = staticmethod(np.empty_like)
    maximum = staticmethod(np.maximum)
    multiply = staticmethod(np.multiply)
    asarray = staticmethod(np.asarray)
    sqrt = staticmethod(np.sqrt)


def _fake_kernel(name):
    """NumPy versions of the four CUDA kernels, written from their expressions."""
    def moments(x, shift, axis):
        d = x.astype(np.float64) - shift
        return d.sum(axis=axis), (d * d).sum(axis=axis)

    def grad_sums(dy, x, mean, axis):
        dy64 = dy.astype(np.float64)
        return dy64.sum(axis=axis), (dy64 * (x.astype(np.float64) - mean)).sum(axis=axis)

    def affine(x, shift, a, b, y, kept):
        kept[...] = x
        y[...] = (x - shift) * a + b

    def grad(dy, x, mean, k, c0, c3, dx):
        dx[...] = k * (dy - c0 - c3 * (x - mean))

    return {"moments": moments, "grad_sums": grad_sums, "affine": affine, "grad": grad}[name]


@pytest.mark.parametrize("loc", [0.0, 1e4])
@pytest.mark.parametrize("shape", [(300, 17), (4, 6, 16, 16), (2, 2, 1021)], ids=lambda s: "x".join(map(str, s)))
def test_cupy_host_code_with_numpy_standing_in(ref, monkeypatch, shape, loc):
    """The cupy engine's statistics, constants, reduce hook and eval path, with the GPU kernels
    replaced by NumPy versions of their expressions (the real ones run in test_engines_gpu.py)."""
    monkeypatch.setattr(cupy_fused, "cupy", _FakeCupy)
    monkeypatch.setattr(cupy_fused, "_get", _fake_kernel)
    gpu = cupy_fused.CupyEngine()
    x, dy, w, b = _data(shape, np.float32, loc=loc, seed=41)
    m, mu, var = ref.stats(x)
    count, mean, v, _ = gpu._moments(x)
    assert count == m
    assert np.max(np.abs(v - var) / var) < 1e-7
    y, cache = gpu._forward_train(x, w, b, EPS)
    dx, dw, db = gpu._backward(dy, cache)
    y_ref, x_hat = ref.forward(x, w, b, EPS)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, w, EPS)
    assert _max_err(y, y_ref) <= 2e-6 * np.abs(y_ref).max()
    assert _max_err(dx, dx_ref) <= 1e-5 * np.abs(dx_ref).max() + 1e-6
    assert _max_err(dw, dw_ref) <= 1e-5 * np.abs(dw_ref).max() + 1e-4
    assert _max_err(db, db_ref) <= 1e-5 * np.abs(db_ref).max() + 1e-4
    # given statistics and a reduce hook, as SyncBatchNorm uses them
    reduce = lambda s1, s2: (2 * s1, 2 * s2)                            # noqa: E731
    y2, inv_std, kept = gpu._normalize(x, mu, var, w, b, EPS)
    assert np.array_equal(kept, x) and kept is not x
    assert _max_err(y2, y_ref) <= 2e-6 * np.abs(y_ref).max()
    cache2 = KernelCache(x, mu, var, inv_std, w, EPS, 2 * m)
    dx2, dw2, db2 = gpu._backward(dy, cache2, reduce=reduce)
    dx2_f, dw2_f, db2_f = F.batch_norm_backward(dy, KernelCache(x, mu, var, inv_std, w, EPS, 2 * m),
                                                reduce=reduce)
    # (the reference engine rounds the mean to float32 before subtracting: allow for that)
    quant = np.finfo(np.float32).eps * (np.abs(mu).max() + 4) / np.sqrt(var.min() + EPS)
    scale = np.abs(dy).max() * np.abs(w).max() / np.sqrt(var.min() + EPS)
    assert _max_err(dx2, dx2_f) <= 1e-5 * np.abs(dx2_f).max() + 4 * quant * scale
    assert _max_err(dw2, dw2_f) <= 1e-5 * np.abs(dw2_f).max() + quant * np.abs(dy).sum()
    # eval mode: no reduction, dx = dy * gamma / sqrt(var + eps)
    frozen = KernelCache(x, mu, var, inv_std, w, EPS, m, frozen=True)
    dx3, _, _ = gpu._backward(dy, frozen, reduce=lambda *a: pytest.fail("eval mode reduced"))
    istd = 1 / np.sqrt(var + EPS)
    assert _max_err(dx3, dy * (w * istd).reshape(ref.bshape(x.ndim))) <= 1e-6 * np.abs(dx3).max()


def test_cupy_host_code_large_mean_correlated_dy(ref, monkeypatch):
    monkeypatch.setattr(cupy_fused, "cupy", _FakeCupy)
    monkeypatch.setattr(cupy_fused, "_get", _fake_kernel)
    gpu = cupy_fused.CupyEngine()
    x, _, w, b = _data((64, 3, 256), np.float32, loc=1e4, seed=8)
    _, x_hat = ref.forward(x)
    dy = (x_hat + x_hat ** 2).astype(np.float32)
    y, cache = gpu._forward_train(x, w, b, EPS)
    dx, dw, db = gpu._backward(dy, cache)
    dx_ref, dw_ref, _ = ref.backward(dy, x, w, EPS)
    assert _max_err(dx, dx_ref) <= 1e-5 * np.abs(dx_ref).max()
    assert _max_err(dw, dw_ref) <= 1e-6 * np.abs(dw_ref).max()
