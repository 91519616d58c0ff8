"""The GPU engines held to the same references as the CPU engines: ``cupy`` (fused CuPy
kernels) and ``cuda`` (numba CUDA kernels; its kernel tests are tests/test_cuda_kernels.py).

Skipped without CuPy or without a CUDA device.  Each test computes on the GPU,
copies the results back, and compares with float64 formulas (``Reference`` in
conftest), with the reference engine (``functional.py`` on CuPy arrays) and
with the numpy engine on the same data.
"""
from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

import minibn as mb                                         # noqa: E402
import minibn.functional as F                               # noqa: E402
from minibn import bench                                    # noqa: E402
from minibn.engines import engine_available, get_engine, select_engine, using_engine  # noqa: E402
from minibn.engines.coefficients import KernelCache          # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not engine_available("cupy"), reason="CuPy is installed but no CUDA device is usable"),
]

EPS = 1e-5
SHAPES = [(300, 17), (5, 3, 7), (2, 5, 33), (4, 6, 16, 16), (3, 2, 33, 35), (2, 3, 4, 5, 6), (2, 2, 1021)]


def _on_cupy(name):
    """True when the engine ``name`` runs here on CuPy arrays (not the cuda engine's simulator)."""
    return engine_available(name) and get_engine(name).array_module() is cupy


@pytest.fixture(params=["cupy", "cuda"])
def gpu(request):
    """Each GPU engine on CuPy arrays (the cuda engine needs numba-cuda, and no simulator)."""
    if not _on_cupy(request.param):
        pytest.skip(f"the {request.param} engine does not run on CuPy arrays here")
    return get_engine(request.param)


def _data(shape, dtype, loc=0.0, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    return x, dy, w, b


def _gpu(*arrays):
    return [cupy.asarray(a) if a is not None else None for a in arrays]


def _host(a):
    return cupy.asnumpy(a) if a is not None else None


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _tol(dtype):
    return 2e-6 if np.dtype(dtype) == np.float32 else 1e-13


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_forward_backward_match_references(gpu, ref, shape, dtype):
    x, dy, w, b = _data(shape, dtype, loc=0.5, scale=2.0)
    xg, dyg, wg, bg = _gpu(x, dy, w, b)
    assert select_engine(xg) is get_engine("cupy")       # the default for CuPy arrays
    y, cache = gpu.forward_train(xg, wg, bg, EPS)
    assert isinstance(cache, KernelCache) and isinstance(y, cupy.ndarray)
    dx, dw, db = gpu.backward(dyg, cache)
    assert y.dtype == dx.dtype == dtype

    m, mu, var = ref.stats(x)
    y_ref, x_hat = ref.forward(x, w, b, EPS)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, w, EPS)
    tol = _tol(dtype)
    assert cache.count == m
    assert _err(_host(cache.var), var) <= tol * var.max()
    assert _err(_host(cache.mean), mu) <= tol * (np.abs(mu).max() + np.sqrt(var.max()))
    assert _err(_host(y), y_ref) <= tol * np.abs(y_ref).max()
    scale_dx = np.abs(dy).max() * np.abs(w).max() / np.sqrt(var.min() + EPS)
    assert _err(_host(dx), dx_ref) <= 4 * tol * scale_dx
    scale_g = np.sqrt(np.sum(dy.astype(np.float64) ** 2) * np.sum(x_hat ** 2) / shape[1])
    assert _err(_host(dw), dw_ref) <= 4 * tol * scale_g
    assert _err(_host(db), db_ref) <= tol * np.abs(dy.astype(np.float64)).sum(axis=ref.axes(x.ndim)).max()

    # the reference engine on the GPU and the default engine of NumPy arrays agree
    y_g, cache_g = F.batch_norm_forward(xg, wg, bg, EPS)
    dx_g, _, _ = F.batch_norm_backward(dyg, cache_g)
    quant = np.finfo(dtype).eps * np.max((np.abs(mu) + np.sqrt(var)) / np.sqrt(var + EPS))
    assert _err(_host(y), _host(y_g)) <= 2 * tol * np.abs(y_ref).max() + 2 * np.abs(w).max() * quant
    assert _err(_host(dx), _host(dx_g)) <= 8 * tol * scale_dx + 4 * scale_dx * quant
    y_np, cache_np = select_engine(x).forward_train(x, w, b, EPS)
    assert _err(_host(y), y_np) <= 2 * tol * np.abs(y_ref).max()


@pytest.mark.parametrize("shape", [(4096, 8), (8, 8, 32, 32), (2, 3, 1021)], ids=lambda s: "x".join(map(str, s)))
def test_large_mean_variance(gpu, ref, shape):
    x, dy, w, b = _data(shape, np.float32, loc=1e4, seed=3)
    _, mu, var = ref.stats(x)
    count, mean, v = gpu.statistics(cupy.asarray(x))
    assert np.max(np.abs(_host(v) - var) / var) < 1e-7
    assert np.max(np.abs(_host(mean) - mu)) <= 1e-7 * 1e4


def test_unrepresentative_first_samples(gpu, ref):
    """The GPU statistics are float64 sums: a shift far from the mean costs nothing."""
    x, _, _, _ = _data((512, 3, 8, 8), np.float32, seed=5)
    x[:2] += 1000.0
    _, mu, var = ref.stats(x)
    _, mean, v = gpu.statistics(cupy.asarray(x))
    assert np.max(np.abs(_host(v) - var) / var) < 1e-7


@pytest.mark.parametrize("loc", [0.0, 1e4])
def test_given_statistics_and_reduce_hook(gpu, ref, loc):
    x, dy, w, b = _data((4, 6, 16, 16), np.float32, loc=loc, seed=11)
    rng = np.random.default_rng(12)
    g_mean = loc + 0.1 * rng.standard_normal(6)
    g_var = 1.0 + 0.2 * rng.random(6)
    g_count = 4 * (x.size // 6)

    def reduce(s1, s2):
        return 4 * s1 + 0.5, 4 * s2 - 0.25

    xg, dyg, wg, bg = _gpu(x, dy, w, b)
    y, cache = gpu.forward_train(xg, wg, bg, EPS, stats=(g_count, cupy.asarray(g_mean), cupy.asarray(g_var)))
    dx, dw, db = gpu.backward(dyg, cache, reduce=reduce)
    cpu = select_engine(x)
    y_c, cache_c = cpu.forward_train(x, w, b, EPS, stats=(g_count, g_mean, g_var))
    dx_c, dw_c, db_c = cpu.backward(dy, cache_c, reduce=reduce)
    assert _err(_host(y), y_c) <= 1e-5 * np.abs(y_c).max()
    assert _err(_host(dx), dx_c) <= 1e-5 * np.abs(dx_c).max()
    assert _err(_host(dw), dw_c) <= 1e-5 * np.abs(dw_c).max() + 1e-6
    assert _err(_host(db), db_c) <= 1e-5 * np.abs(db_c).max() + 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_mode(gpu, ref, dtype):
    x, dy, w, b = _data((4, 6, 16, 16), dtype, loc=0.3, seed=21)
    rm = (0.3 + 0.1 * np.random.default_rng(1).standard_normal(6)).astype(dtype)
    rv = (0.5 + np.random.default_rng(2).random(6)).astype(dtype)
    xg, dyg, wg, bg, rmg, rvg = _gpu(x, dy, w, b, rm, rv)
    y, cache = gpu.forward_eval(xg, rmg, rvg, wg, bg, EPS)
    dx, dw, db = gpu.backward(dyg, cache, reduce=lambda *a: pytest.fail("eval mode reduced"))
    y_true, _ = ref.forward(x, w, b, EPS, mean=rm, var=rv)
    assert _err(_host(y), y_true) <= _tol(dtype) * np.abs(y_true).max() * 4
    istd = 1 / np.sqrt(rv.astype(np.float64) + EPS)
    assert _err(_host(dx), dy * (w * istd).reshape(1, -1, 1, 1)) <= _tol(dtype) * np.abs(dy).max() * 4


def test_empty_batch_with_given_statistics(gpu):
    x = cupy.zeros((0, 3, 4, 4), cupy.float32)
    w, b = cupy.ones(3, cupy.float32), cupy.zeros(3, cupy.float32)
    y, cache = gpu.forward_train(x, w, b, stats=(32, cupy.zeros(3), cupy.ones(3)))
    dx, dw, db = gpu.backward(cupy.zeros_like(x), cache, reduce=lambda s1, s2: (s1, s2))
    assert y.shape == dx.shape == x.shape
    assert float(cupy.abs(dw).max()) == 0.0 and float(cupy.abs(db).max()) == 0.0


def test_layer_on_the_gpu_fast_and_reference_paths_agree():
    mb.set_backend("cupy")
    try:
        x, dy, w, b = _data((8, 6, 12, 12), np.float32, loc=2.0, seed=13)
        xg, dyg = _gpu(x, dy)
        out = []
        for engine in [e for e in ("cupy", "cuda") if _on_cupy(e)] + ["reference"]:
            bn = mb.BatchNorm2d(6)
            bn.weight.data[...] = cupy.asarray(w)
            bn.bias.data[...] = cupy.asarray(b)
            with using_engine(engine):
                out.append([bn(xg), bn.backward(dyg), bn.weight.grad, bn.bias.grad, bn.running_var])
        for fast in out[:-1]:
            for a, c in zip(fast, out[-1]):
                c = _host(c)
                assert _err(_host(a), c) <= 3e-5 * max(np.abs(c).max(), 1.0)
    finally:
        mb.set_backend("numpy")


def test_device_copy_bandwidth_is_positive():
    assert bench.device_copy_bandwidth(1 << 24, repeats=3) > 0
