"""The GPU kernels of the cuda engine (``minibn/engines/cuda_kernels.py``), executed.

Without a GPU, numba's CUDA simulator runs every thread, block, shared-memory
access and ``syncthreads`` of the kernels on the CPU.  It must be chosen
before numba's CUDA target is imported, so in a plain test run one test,
``test_the_kernels_run_under_the_simulator``, runs this file again in a fresh
interpreter with ``NUMBA_ENABLE_CUDASIM=1``, where the other tests execute
the kernels; on a GPU (``make gpu-check``) they run on the device, on CuPy
arrays.  Shapes and launch sizes are tiny (the simulator runs Python per
thread) and chosen to reach the edges: C = 1, one value per channel per
block, partial last blocks, threads with nothing to do, a grid that strides,
(N, C) and (N, C, H, W), empty ranks, float32 and float64, a float32 mean of
1e6 with std 0.1, and SyncBatchNorm's reduction hook.  References:
``functional.py`` (the reference engine) and the float64 formulas of
``minibn.grading.reference`` (the ``ref`` fixture).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import minibn as mb
from minibn import backend, functional as F
from minibn.engines import engine_available, using_engine
from minibn.engines.coefficients import KernelCache

cuda_kernels = pytest.importorskip("minibn.engines.cuda_kernels")
from minibn.engines.cuda_kernels import CudaEngine, Launch, channel_sums, simulated  # noqa: E402

HERE = engine_available("cuda")                 # the simulator, or a GPU with numba-cuda and CuPy
ON_GPU = HERE and not simulated()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
kernels_here = pytest.mark.skipif(
    not HERE, reason="the kernels run in the simulator's run of this file "
                     "(test_the_kernels_run_under_the_simulator) or on a GPU")

EPS = 1e-5
LAUNCHES = {
    "one-value-per-block": Launch(threads=4, values_per_block=1, max_blocks=2),
    "partial-last-block": Launch(threads=4, values_per_block=5, max_blocks=3),
    "one-block-idle-threads": Launch(threads=16, values_per_block=4096, max_blocks=64),
}
# (shape, launch): C = 1 and (N, C) with one value per block; partial last blocks on
# (N, C, H, W) and (N, C, L); one block per channel, most of its threads idle
CASES = [((4, 1), "one-value-per-block"), ((5, 2), "one-value-per-block"),
         ((2, 3, 3, 5), "partial-last-block"), ((3, 1, 5), "partial-last-block"),
         ((2, 2, 2, 3), "one-block-idle-threads")]


def _id(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def xp():
    return CudaEngine().array_module()


def dev(*arrays):
    """The arrays on the engine's module (CuPy on a GPU, NumPy under the simulator)."""
    out = [None if a is None else xp().asarray(a) for a in arrays]
    return out if len(out) > 1 else out[0]


def host(a):
    return None if a is None else (a.get() if hasattr(a, "get") else np.asarray(a))


def data(shape, dtype, loc=0.5, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (1.0 + 0.3 * rng.standard_normal(C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    return x, dy, w, b


def err(a, b):
    return float(np.max(np.abs(np.asarray(host(a), np.float64) - np.asarray(host(b), np.float64)), initial=0.0))


def tol(dtype):
    return 3e-6 if np.dtype(dtype) == np.float32 else 1e-13


# =========================================================================== in a plain run

@pytest.mark.slow
def test_the_kernels_run_under_the_simulator():
    """This file again, in a fresh interpreter with the simulator chosen before numba.cuda."""
    if HERE:
        pytest.skip("the kernels run in this process (simulator or GPU)")
    if os.environ.get("MINIBN_KERNELS", "numpy") not in ("", "numpy"):
        pytest.skip("the cuda kernels do not depend on MINIBN_KERNELS: the default run executes them")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.abspath(__file__)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in out and "failed" not in out, out[-3000:]


# =========================================================================== each kernel

@kernels_here
@pytest.mark.parametrize("shape,launch", [((5, 1, 1), "one-value-per-block"), ((3, 2, 7), "partial-last-block"),
                                          ((1, 3, 13), "one-block-idle-threads")], ids=_id)
def test_reductions_equal_float64_sums_and_repeat_bit_for_bit(shape, launch):
    """channel_partials, gradient_partials, combine_partials against NumPy float64 sums."""
    launch = LAUNCHES[launch]
    rng = np.random.default_rng(1)
    x = rng.normal(3, 2, shape).astype(np.float32)
    dy = rng.normal(0, 1, shape).astype(np.float32)
    shift = rng.normal(3, 1, shape[1])
    mean = rng.normal(3, 1, shape[1])
    d = x.astype(np.float64) - shift.reshape(1, -1, 1)
    s1, s2 = channel_sums(xp(), launch, "channel_partials", dev(x), dev(shift))
    np.testing.assert_allclose(host(s1), d.sum(axis=(0, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(s2), (d * d).sum(axis=(0, 2)), rtol=1e-12)
    again = channel_sums(xp(), launch, "channel_partials", dev(x), dev(shift))
    assert np.array_equal(host(again[0]), host(s1)) and np.array_equal(host(again[1]), host(s2))
    g1, g2 = channel_sums(xp(), launch, "gradient_partials", dev(dy), dev(x), dev(mean))
    dy64 = dy.astype(np.float64)
    np.testing.assert_allclose(host(g1), dy64.sum(axis=(0, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(g2), (dy64 * (x - mean.reshape(1, -1, 1))).sum(axis=(0, 2)),
                               rtol=1e-12, atol=1e-12)


@kernels_here
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,launch", CASES, ids=_id)
def test_training_forward_and_backward_match_functional(ref, shape, launch, dtype):
    """normalize (training), the statistics and the backward kernels, via the engine."""
    engine = CudaEngine(LAUNCHES[launch])
    x, dy, w, b = data(shape, dtype)
    y, cache = engine.forward_train(*dev(x, w, b), EPS)
    assert isinstance(cache, KernelCache) and cache.count == x.size // shape[1]
    dx, dw, db = engine.backward(dev(dy), cache)
    assert host(y).dtype == host(dx).dtype == dtype
    np.testing.assert_array_equal(host(cache.x), x)            # the kept copy

    y_f, cache_f = F.batch_norm_forward(x, w, b, EPS)
    dx_f, dw_f, db_f = F.batch_norm_backward(dy, cache_f)
    _, mu, var = ref.stats(x)
    t = tol(dtype)
    assert err(cache.mean, mu) <= t * (np.abs(mu).max() + np.sqrt(var.max()))
    assert err(cache.var, var) <= t * var.max()
    assert err(y, y_f) <= 2 * t * np.abs(y_f).max()
    assert err(dx, dx_f) <= 4 * t * np.abs(dx_f).max()
    assert err(dw, dw_f) <= 4 * t * (np.abs(dw_f).max() + np.abs(dy).sum())
    assert err(db, db_f) <= 4 * t * np.abs(dy).sum()


@kernels_here
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 3), (2, 3, 3, 5)], ids=_id)
def test_eval_forward_and_backward_match_functional(shape, dtype):
    engine = CudaEngine(LAUNCHES["partial-last-block"])
    x, dy, w, b = data(shape, dtype, seed=3)
    rm = np.linspace(0.2, 0.8, shape[1]).astype(dtype)
    rv = np.linspace(0.5, 2.0, shape[1]).astype(dtype)
    y, cache = engine.forward_eval(*dev(x, rm, rv, w, b), EPS)
    assert cache.frozen
    dx, dw, db = engine.backward(dev(dy), cache, reduce=lambda *a: pytest.fail("eval mode reduced"))
    y_f, cache_f = F.batch_norm_eval_forward(x, rm, rv, w, b, EPS)
    dx_f, dw_f, db_f = F.batch_norm_backward(dy, cache_f)
    t = tol(dtype)
    assert err(y, y_f) <= 2 * t * np.abs(y_f).max()
    assert err(dx, dx_f) <= 2 * t * np.abs(dx_f).max()
    assert err(dw, dw_f) <= 4 * t * np.abs(dy).sum() and err(db, db_f) <= 4 * t * np.abs(dy).sum()


@kernels_here
def test_large_mean_float32(ref):
    """Mean 1e6, std 0.1 in float32: float64 sums around the shift keep the variance."""
    engine = CudaEngine(Launch(threads=8, values_per_block=32, max_blocks=4))
    x, dy, w, b = data((4, 2, 3, 5), np.float32, loc=1e6, scale=0.1, seed=5)
    _, mu, var = ref.stats(x)
    count, mean, v = engine.statistics(dev(x))
    assert np.max(np.abs(host(v) - var) / var) < 1e-9
    assert err(mean, mu) <= 1e-9 * 1e6
    y, cache = engine.forward_train(*dev(x, w, b), EPS)
    dx, dw, db = engine.backward(dev(dy), cache)
    y_ref, _ = ref.forward(x, w, b, EPS)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, w, EPS)
    # x - mean rounded to float32 is exact; what is left is float32 rounding of the outputs
    assert err(y, y_ref) <= 1e-5 * np.abs(y_ref).max()
    assert err(dx, dx_ref) <= 1e-4 * np.abs(dx_ref).max()
    assert err(dw, dw_ref) <= 1e-4 * np.abs(dw_ref).max() + 1e-4
    assert err(db, db_ref) <= 1e-5 * np.abs(db_ref).max() + 1e-5


# =========================================================================== SyncBatchNorm's hook

@kernels_here
@pytest.mark.parametrize("shape", [(5, 2, 3), (0, 2, 3)], ids=["rank-with-data", "empty-rank"])
def test_reduce_hook_gets_the_local_sums_and_its_result_is_used(shape):
    """With given (global) statistics, as SyncBatchNorm runs it: the hook is called once with
    this rank's float64 (sum dy, sum dy * x_hat) and the backward uses what it returns."""
    engine = CudaEngine(LAUNCHES["one-value-per-block"])
    x, dy, w, b = data(shape, np.float64, seed=7)
    C, count = shape[1], 40                                  # the global count over every rank
    g_mean, g_var = np.array([0.4, 0.6]), np.array([3.5, 4.5])
    other = (np.array([1.5, -2.0]), np.array([0.25, 3.0]))   # the other ranks' sums
    calls = []

    def reduce(s_dy, s_dy_xhat):
        calls.append((host(s_dy), host(s_dy_xhat)))
        return s_dy + dev(other[0]), s_dy_xhat + dev(other[1])

    y, cache = engine.forward_train(*dev(x, w, b), EPS, stats=(count, dev(g_mean), dev(g_var)))
    dx, dw, db = engine.backward(dev(dy), cache, reduce=reduce)
    assert host(y).shape == host(dx).shape == shape
    assert len(calls) == 1
    x_hat = (x - g_mean.reshape(1, C, 1)) / np.sqrt(g_var.reshape(1, C, 1) + EPS)
    np.testing.assert_allclose(calls[0][0], dy.sum(axis=(0, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(calls[0][1], (dy * x_hat).sum(axis=(0, 2)), rtol=1e-12, atol=1e-12)

    y_f, cache_f = F.batch_norm_forward(x, w, b, EPS, stats=(count, g_mean, g_var))
    dx_f, dw_f, db_f = F.batch_norm_backward(dy, cache_f, reduce=lambda s1, s2: (s1 + other[0], s2 + other[1]))
    assert err(y, y_f) <= 1e-13 * max(np.abs(y_f).max(initial=0), 1)
    assert err(dx, dx_f) <= 1e-13 * max(np.abs(dx_f).max(initial=0), 1)
    assert err(dw, dw_f) <= 1e-12 and err(db, db_f) <= 1e-12      # local sums, as functional.py


class TwinRanks:
    """Rank 0 of two ranks whose batches are equal: what crosses is this rank's own message
    merged with itself.  Enough of a Communicator for SyncBatchNorm, in one process."""

    def __new__(cls):
        from minibn.comm import Communicator, merge_moment_records

        class _Twin(Communicator):
            def __init__(self):
                super().__init__(None)
                self.size, self.rank, self.sums = 2, 0, 0

            def allgather_ints(self, values, tag=""):
                return np.array([values, values], dtype=np.int64)

            def allreduce_moments(self, records, tag="", path="host"):
                return merge_moment_records(records, records.copy())

            def allreduce_sum(self, buf, tag=""):
                self.sums += 1
                return buf + buf
        return _Twin()


@kernels_here
def test_syncbatchnorm_on_the_cuda_engine_equals_batchnorm_on_the_whole_batch():
    pytest.importorskip("mpi4py")
    x, dy, w, b = data((3, 2, 4, 3), np.float32, seed=9)
    comm = TwinRanks()
    saved = backend._active
    if ON_GPU:
        mb.set_backend("cupy")                               # parameters on the GPU
    try:
        sync = mb.SyncBatchNorm(2, comm=comm, engine=CudaEngine(LAUNCHES["partial-last-block"]))
        whole = mb.BatchNorm2d(2)
    finally:
        backend._active = saved
    for layer in (sync, whole):
        layer.weight.data[...] = dev(w)
        layer.bias.data[...] = dev(b)
    y = sync(dev(x))
    dx = sync.backward(dev(dy))
    with using_engine("reference"):
        y2 = whole(dev(np.concatenate([x, x])))
        dx2 = whole.backward(dev(np.concatenate([dy, dy])))
    assert comm.sums == 1                                   # the hook ran, and crossed "ranks"
    assert err(y, host(y2)[:3]) <= 1e-5 and err(dx, host(dx2)[:3]) <= 1e-5
    # parameter gradients are this rank's share (allreduce_gradients adds the ranks' shares)
    assert err(2 * host(sync.weight.grad), whole.weight.grad) <= 1e-4
    assert err(2 * host(sync.bias.grad), whole.bias.grad) <= 1e-4
    assert err(sync.running_var, whole.running_var) <= 1e-6


# =========================================================================== the launch sizes

def test_launch_threads_must_halve_to_one():
    with pytest.raises(ValueError, match="power of two"):
        Launch(threads=12)
    with pytest.raises(ValueError, match="positive"):
        Launch(values_per_block=0)


# =========================================================================== the device script's host code
# (make gpu-check runs on a GPU only; here its parts run on NumPy arrays, once, in the parent run)

parent_only = pytest.mark.skipif(HERE and simulated(), reason="run by the plain test run")


@parent_only
def test_gpu_check_without_a_gpu_says_so_and_exits_non_zero():
    from minibn import gpu_check
    if gpu_check.find_gpu()[0]:
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "minibn", "gpu-check"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == gpu_check.NO_GPU_STATUS == 3
    assert "gpu-check: no GPU on this machine" in proc.stderr and "nothing was run" in proc.stderr
    assert proc.stdout == ""                                 # nothing installed, nothing run


@pytest.mark.slow
@parent_only
def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    from minibn import gpu_check
    marker = tmp_path / "still-running"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(1.5)\nopen({str(marker)!r}, 'w').close()\n")
    step = tmp_path / "step.py"
    step.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(child)!r}])\n"
                    "time.sleep(60)\n")
    status, seconds = gpu_check.run_bounded([sys.executable, str(step)], timeout=1)
    assert status == "timed out"
    assert gpu_check.run_bounded([sys.executable, "-c", "raise SystemExit(4)"], timeout=30)[0] == "failed (exit 4)"
    assert gpu_check.run_bounded([sys.executable, "-c", "pass"], timeout=30)[0] == "ok"
    import time
    time.sleep(2)
    assert not marker.exists()                               # the step's child went with it


@parent_only
def test_gpu_check_steps_are_known_and_fit_five_minutes():
    from minibn import gpu_check
    assert sum(limit for _, limit in gpu_check.STEPS) < 300
    assert {name for name, _ in gpu_check.STEPS} <= set(gpu_check.STEP_FUNCTIONS)
    proc = subprocess.run([sys.executable, "-m", "minibn", "gpu-check", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--only" in proc.stdout


@pytest.mark.skipif(not (HERE and simulated()), reason="needs the cuda engine on NumPy arrays (simulator)")
def test_gpu_check_compares_every_engine_with_functional():
    """The compare step's code, on NumPy arrays: the CPU engines and the simulated kernels."""
    from minibn import gpu_check
    names = ["reference", "numpy", "cuda"] + (["numba"] if engine_available("numba") else [])
    lines = []
    worst = gpu_check.compare_engines(np, names, shapes=[(6, 3), (2, 3, 2, 5)], log=lines.append)
    assert set(worst) == {(n, d) for n in names for d in ("float32", "float64")}
    for (name, dtype), e in worst.items():
        assert e <= gpu_check.COMPARE_LIMITS[dtype], (name, dtype, e)
    assert len(lines) == 1 + len(names) * 2 * 2


@parent_only
def test_gpu_check_syncbn_step_under_mpiexec_with_numpy_buffers():
    """The SyncBN step's code under mpiexec -n 2 on NumPy arrays (host path)."""
    pytest.importorskip("mpi4py")
    from minibn.gpu_check import _mpiexec
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec")
    code = ("import sys, numpy as np; from minibn.gpu_check import syncbn_check; "
            "sys.exit(0 if syncbn_check(np, shape=(6, 3, 4, 4)) < 1e-5 else 1)")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "path host (NumPy buffers)" in proc.stdout
    assert "one forward + backward: 2 collectives" in proc.stdout         # one Allreduce per pass
