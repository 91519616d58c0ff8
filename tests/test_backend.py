"""The backend: array module from the inputs, where new arrays are created, clear errors."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import minibn as mb
from minibn import backend

HAVE_CUPY = importlib.util.find_spec("cupy") is not None


@pytest.fixture
def restore_backend():
    saved = backend._active
    yield
    backend._active = saved


def test_get_array_module_of_numpy_inputs():
    assert mb.get_array_module(np.ones(2)) is np
    assert mb.get_array_module(np.ones(2), None, 3.0, 1, True) is np
    assert mb.get_array_module() is np
    assert mb.get_array_module(np.float32(1.0)) is np


def test_is_cupy_array_does_not_import_cupy():
    assert not backend.is_cupy_array(np.ones(1))
    assert not backend.is_cupy_array([1.0])


def test_default_backend_is_numpy(restore_backend):
    assert mb.set_backend("numpy") is np
    assert mb.get_backend() is np and backend.backend_name() == "numpy"
    bn = mb.BatchNorm2d(2)
    for arr in (bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var, bn.num_batches_tracked):
        assert isinstance(arr, np.ndarray)
    assert bn.weight.dtype == np.float32 and bn.num_batches_tracked.dtype == np.int64


@pytest.mark.skipif(HAVE_CUPY and backend.cupy_available(), reason="CuPy and a GPU are present")
def test_cupy_backend_without_cupy_or_gpu_is_a_clear_error(restore_backend):
    mb.set_backend("numpy")
    with pytest.raises(RuntimeError, match="cupy" if HAVE_CUPY else
                       r"'cupy' backend needs CuPy, which is not installed.*cupy-cuda12x"):
        mb.set_backend("cupy")
    assert mb.get_backend() is np                     # unchanged after the refusal
    assert not backend.cupy_available()


@pytest.mark.skipif(HAVE_CUPY and backend.cupy_available(), reason="CuPy and a GPU are present")
def test_environment_variable_chooses_the_backend():
    code = "import minibn; print(minibn.get_backend().__name__)"
    env = dict(os.environ, MINIBN_BACKEND="cupy")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "RuntimeError" in proc.stderr and "CuPy" in proc.stderr
    env["MINIBN_BACKEND"] = " NumPy "
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "numpy"


def test_asnumpy_and_to_backend(restore_backend):
    mb.set_backend("numpy")
    a = np.arange(3.0)
    assert mb.asnumpy(a) is a
    b = mb.to_backend([1, 2, 3], dtype=np.float32)
    assert isinstance(b, np.ndarray) and b.dtype == np.float32
    np.testing.assert_array_equal(b, [1, 2, 3])


def test_kernels_follow_their_inputs_not_the_active_backend(restore_backend, monkeypatch):
    """A kernel asks its inputs for the module; the active backend only places new arrays.

    With the creation backend pointed at a stand-in module, the functional math on NumPy
    arrays still runs on NumPy (the stand-in would raise if anything asked it).
    """
    class Refuse:
        __name__ = "refuse"

        def __getattr__(self, name):
            raise AssertionError(f"a kernel used the active backend ({name}) instead of its inputs")

    x = np.random.default_rng(0).normal(size=(6, 3, 2))
    bn = mb.BatchNorm1d(3, dtype=np.float64)
    backend._active = Refuse()
    y = bn(x)
    dx = bn.backward(np.ones_like(x))
    bn.eval()
    bn(x)
    assert isinstance(y, np.ndarray) and isinstance(dx, np.ndarray)
    _, mean, var = mb.moments.channel_moments(x, (0, 2))
    assert isinstance(mean, np.ndarray)
