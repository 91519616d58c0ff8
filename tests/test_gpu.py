"""The same key cases on CuPy (a GPU); everything but the first test skips without CuPy and a GPU."""
import importlib.util

import numpy as np
import pytest

import minibn as mb
from minibn import backend, functional as F
from minibn.gradcheck import check_layer

HAVE_CUPY = importlib.util.find_spec("cupy") is not None


def test_set_backend_cupy_without_cupy_names_what_is_missing():
    if backend.cupy_available():
        pytest.skip("CuPy and a GPU are present")
    saved = backend._active
    try:
        with pytest.raises(RuntimeError) as info:
            mb.set_backend("cupy")
        msg = str(info.value)
        if not HAVE_CUPY:
            assert "needs CuPy, which is not installed" in msg and "cupy-cuda12x" in msg
        else:
            assert "no CUDA GPU" in msg
    finally:
        backend._active = saved


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:                       # no driver, no device
        pytest.skip(f"no usable CUDA device ({exc})")
    return cupy


@pytest.fixture
def on_gpu(cp):
    saved = backend._active
    mb.set_backend("cupy")
    yield cp
    backend._active = saved


def pair(cp, cls, C, dtype, seed=0, **kw):
    """The same layer on NumPy and on CuPy."""
    rng = np.random.default_rng(seed)
    w, b = rng.normal(1, 0.5, C).astype(dtype), rng.normal(size=C).astype(dtype)
    saved = backend._active
    mb.set_backend("numpy")
    cpu = cls(C, dtype=dtype, **kw)
    mb.set_backend("cupy")
    gpu = cls(C, dtype=dtype, **kw)
    backend._active = saved
    if cpu.affine:
        cpu.weight.data[...] = w
        cpu.bias.data[...] = b
        gpu.weight.data[...] = cp.asarray(w)
        gpu.bias.data[...] = cp.asarray(b)
    return cpu, gpu


CASES = [(mb.BatchNorm1d, (16, 4)), (mb.BatchNorm1d, (8, 4, 7)),
         (mb.BatchNorm2d, (4, 4, 5, 3)), (mb.BatchNorm3d, (2, 4, 3, 3, 2))]


@pytest.mark.gpu
@pytest.mark.parametrize("cls,shape", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_gpu_matches_cpu(cp, cls, shape, dtype, momentum):
    cpu, gpu = pair(cp, cls, shape[1], dtype, momentum=momentum)
    assert backend.is_cupy_array(gpu.running_mean)
    rng = np.random.default_rng(1)
    tol = 1e-5 if dtype == np.float32 else 1e-11
    for loc, scale in ((1.0, 1.0), (4.0, 2.0), (-3.0, 0.5)):
        x = rng.normal(loc, scale, shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        cpu.zero_grad()
        gpu.zero_grad()
        y_c, y_g = cpu(x), gpu(cp.asarray(x))
        dx_c, dx_g = cpu.backward(dy), gpu.backward(cp.asarray(dy))
        assert backend.is_cupy_array(y_g) and backend.is_cupy_array(dx_g)
        assert y_g.dtype == dtype and dx_g.dtype == dtype
        np.testing.assert_allclose(cp.asnumpy(y_g), y_c, rtol=tol, atol=tol)
        np.testing.assert_allclose(cp.asnumpy(dx_g), dx_c, rtol=10 * tol, atol=10 * tol)
        np.testing.assert_allclose(cp.asnumpy(gpu.weight.grad), cpu.weight.grad, rtol=tol, atol=tol)
        np.testing.assert_allclose(cp.asnumpy(gpu.bias.grad), cpu.bias.grad, rtol=tol, atol=tol)
        np.testing.assert_allclose(cp.asnumpy(gpu.running_mean), cpu.running_mean, rtol=tol, atol=tol)
        np.testing.assert_allclose(cp.asnumpy(gpu.running_var), cpu.running_var, rtol=tol, atol=tol)
        assert int(gpu.num_batches_tracked) == int(cpu.num_batches_tracked)
    cpu.eval()
    gpu.eval()
    x = rng.normal(size=shape).astype(dtype)
    np.testing.assert_allclose(cp.asnumpy(gpu(cp.asarray(x))), cpu(x), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_large_mean_float32(cp):
    rng = np.random.default_rng(2)
    for loc, scale in ((1e4, 1.0), (1e6, 1e2)):
        x = (loc + scale * rng.normal(size=(4096, 3))).astype(np.float32)
        _, mean, var = mb.moments.channel_moments(cp.asarray(x), (0,))
        x64 = x.astype(np.float64)
        ref_var = ((x64 - x64.mean(0)) ** 2).mean(0)
        np.testing.assert_allclose(cp.asnumpy(mean), x64.mean(0), rtol=1e-13)
        np.testing.assert_allclose(cp.asnumpy(var), ref_var, rtol=1e-6)
        # eps must be > 0; 1e-300 acts as 0 next to these variances
        y = cp.asnumpy(F.batch_norm_forward(cp.asarray(x), eps=1e-300)[0]).astype(np.float64)
        np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False])
def test_gpu_gradcheck(on_gpu, training):
    cp = on_gpu
    bn = mb.BatchNorm2d(2, dtype=np.float64)
    bn.weight.data[...] = cp.asarray([0.7, -1.3])
    bn.running_var[...] = cp.asarray([0.5, 2.0])
    bn.train(training)
    x = cp.asarray(np.random.default_rng(3).normal(size=(2, 2, 2, 3)))
    errors = check_layer(bn, x)
    assert max(errors.values()) < 1e-7, errors


@pytest.mark.gpu
def test_gpu_backward_derivations_agree(cp):
    x = cp.asarray(np.random.default_rng(4).normal(3.0, 2.0, (6, 3, 4)))
    g = cp.asarray([1.0, 2.0, -0.5])
    y, cache = F.batch_norm_forward(x, g, cp.zeros(3))
    dy = cp.asarray(np.random.default_rng(5).normal(size=(6, 3, 4)))
    for a, b in zip(F.batch_norm_backward(dy, cache), F.batch_norm_backward_graph(dy, cache)):
        np.testing.assert_allclose(cp.asnumpy(a), cp.asnumpy(b), rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_gpu_state_dict_save_load(on_gpu, tmp_path):
    cp = on_gpu
    bn = mb.BatchNorm1d(3)
    bn(cp.asarray(np.random.default_rng(6).normal(2.0, 1.0, (8, 3)).astype(np.float32)))
    path = mb.save(tmp_path / "gpu.npz", bn.state_dict())
    back = mb.load(path)
    assert all(isinstance(v, np.ndarray) for v in back.values())
    fresh = mb.BatchNorm1d(3)
    held = fresh.running_mean
    fresh.load_state_dict(back)
    assert fresh.running_mean is held and backend.is_cupy_array(held)
    np.testing.assert_array_equal(cp.asnumpy(held), cp.asnumpy(bn.running_mean))


@pytest.mark.gpu
def test_gpu_errors(cp):
    bn = mb.BatchNorm1d(3)          # NumPy parameters
    with pytest.raises(TypeError, match="both NumPy and CuPy"):
        mb.get_array_module(np.ones(3), cp.ones(3))
    with pytest.raises(TypeError, match="both NumPy and CuPy"):
        bn(cp.ones((4, 3), dtype=cp.float32))              # data on the GPU, parameters on the CPU
    with pytest.raises(TypeError, match="both NumPy and CuPy"):
        mb.BatchNorm1d(3, affine=False)(cp.ones((4, 3), dtype=cp.float32))   # running stats on the CPU
    with pytest.raises(TypeError, match="floating-point"):
        F.batch_norm_forward(cp.ones((4, 3), dtype=cp.int32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm_forward(cp.ones((1, 3), dtype=cp.float32))
