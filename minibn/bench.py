"""``make bench`` / ``python -m minibn bench [options]``: how fast is minibn's batch norm?

Every number in the tables is measured in this run, on this machine:

* **minibn** (the ``numpy`` engine, through the ``BatchNorm*d`` layers),
  **minibn (numba)** (the optional ``numba`` engine, when numba is installed),
  the **reference** engine (the readable ``functional.py``, same layers), a
  **textbook** NumPy implementation kept below (private: timed, not used), and **PyTorch**
  (CPU, ``torch.nn.BatchNorm*d`` + autograd, default thread count) when it is
  installed.  Forward and backward are timed separately inside each step;
  each implementation runs its steps in a row after a warm-up, the round is
  done twice, and the tables show each implementation's best median.
* **Effective bandwidth**: the bytes a two-pass algorithm must move (forward:
  read ``x`` for the statistics, read ``x`` and write ``y``: ``3 |x|``;
  backward: read ``dy`` and ``x`` for the sums, read them again and write
  ``dx``: ``5 |x|``) divided by the time, next to a parallel ``memcpy`` of
  ``|x|`` bytes measured on the same machine (``% copy``).
* **Peak extra memory**: the most NumPy memory allocated during one forward +
  backward (``tracemalloc``), outputs included, as a multiple of ``|x|``;
  for minibn with its reusable work buffers dropped and output recycling off,
  so they are counted too.  Two outputs (``y`` and ``dx``) are the minimum.
* **SyncBatchNorm**: one training step (forward + backward) under
  ``mpiexec -n P`` for P = 1, 2, 4, and the bytes each rank hands to MPI.
* **GPU** (only with CuPy and a GPU): minibn's ``cupy`` engine (fused CuPy
  kernels), its ``cuda`` engine (numba CUDA kernels, with numba-cuda), the
  reference engine on CuPy, PyTorch CUDA; bandwidth as a fraction of the
  device's measured copy bandwidth.

Speed is reported, never asserted: the tests check numbers, not times.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .engines import (engine_available, get_engine, no_output_recycling, num_threads, release_buffers,
                      set_num_threads, using_engine)
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

DEFAULT_SHAPES = [(4096, 256), (256, 1024), (64, 64, 32, 32), (32, 128, 28, 28)]
SYNCBN_SHAPE = (32, 128, 28, 28)
SYNCBN_RANKS = (1, 2, 4)
SYNCBN_TIMEOUTS = ("0", "600")      # MINIBN_COLLECTIVE_TIMEOUT: off (blocking calls), on (polled)
FORWARD_PASSES, BACKWARD_PASSES = 3, 5        # |x|-sized reads/writes of a two-pass algorithm


# =========================================================================== the textbook version

def _textbook_forward(x, gamma, beta, eps=1e-5):
    """Batch norm as first written: one NumPy expression per formula line."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + eps)
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return y, (x_hat, var)


def _textbook_backward(dy, cache, gamma, eps=1e-5):
    x_hat, var = cache
    axes = (0,) + tuple(range(2, dy.ndim))
    shape = (1, -1) + (1,) * (dy.ndim - 2)
    m = dy.size // dy.shape[1]
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    dx = (gamma.reshape(shape) / np.sqrt(var + eps) / m
          * (m * dy - dbeta.reshape(shape) - x_hat * dgamma.reshape(shape)))
    return dx, dgamma, dbeta


# =========================================================================== machine facts

def blas_info() -> str:
    """Which BLAS NumPy calls and which kernel (core type) it picked."""
    try:
        from threadpoolctl import threadpool_info
        parts = [f"{d.get('internal_api')} {d.get('version')} core={d.get('architecture')} "
                 f"threads={d.get('num_threads')}"
                 for d in threadpool_info() if d.get("user_api") == "blas"]
        if parts:
            return "; ".join(parts) + " (threadpoolctl)"
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        name = f"{cfg.get('name')} {cfg.get('version')}"
    except Exception:
        name = "unknown BLAS"
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "")):
            try:
                core = getattr(lib, f"{prefix}get_corename{suffix}")
                threads = getattr(lib, f"{prefix}get_num_threads{suffix}")
            except AttributeError:
                continue
            core.restype = ctypes.c_char_p
            return f"{name}, core={core().decode()}, threads={threads()}"
    return name


def blas_env() -> str:
    keys = sorted(k for k in os.environ if k.startswith(("OPENBLAS", "OMP_", "MKL_", "GOTOBLAS")))
    return ", ".join(f"{k}={os.environ[k]}" for k in keys) or "none set"


def copy_bandwidth(nbytes: int, threads: int, repeats: int = 9) -> float:
    """``memcpy`` bandwidth in bytes/s (read + write counted) for ``nbytes`` with ``threads``."""
    n = max(1, nbytes // 4)
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    pieces = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        if pool is None:
            np.copyto(dst, src)
        else:
            list(pool.map(lambda p: np.copyto(*p), pieces))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if pool is not None:
        pool.shutdown()
    return 2 * src.nbytes / float(np.median(times))


def thread_speedup(threads: int) -> float:
    """How much faster ``threads`` threads run independent in-cache NumPy work than one."""
    if threads < 2:
        return 1.0
    arrays = [np.ones(1 << 15, dtype=np.float32) for _ in range(threads)]

    def work(a, n):
        for _ in range(n):
            np.multiply(a, 1.0000001, out=a)

    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        best = []
        for n_threads in (1, threads):
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                list(pool.map(lambda a: work(a, 400 * threads // n_threads), arrays[:n_threads]))
                runs.append(time.perf_counter() - t0)
            best.append(min(runs))
    finally:
        pool.shutdown()
    return best[0] / best[1]


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# =========================================================================== timing

def _layer_class(ndim):
    return {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}[ndim]


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[1]
    gamma = (1.0 + 0.1 * rng.standard_normal(C)).astype(dtype)
    beta = (0.1 * rng.standard_normal(C)).astype(dtype)
    return x, dy, gamma, beta


NUMBA_ROW = "minibn (numba)"


def _numba_version() -> str:
    if not engine_available("numba"):
        return "not installed (pip install minibn[jit])"
    import numba
    return f"{numba.__version__}, {min(num_threads(), numba.config.NUMBA_NUM_THREADS)} thread(s)"


def cpu_implementations(shape, dtype, torch=None):
    """``{name: (forward() -> state, backward(state))}`` for one shape and dtype."""
    x, dy, gamma, beta = _data(shape, dtype)
    impls = {}

    def layer(engine):
        bn = _layer_class(len(shape))(shape[1], dtype=dtype)
        bn.weight.data[...] = gamma
        bn.bias.data[...] = beta

        def fwd():
            with using_engine(engine):
                return bn(x)

        def bwd(_):
            bn.zero_grad()
            with using_engine(engine):
                return bn.backward(dy)
        return fwd, bwd

    impls["minibn"] = layer("numpy")
    if engine_available("numba"):
        impls[NUMBA_ROW] = layer("numba")
    impls["reference"] = layer("reference")
    impls["textbook"] = (lambda: _textbook_forward(x, gamma, beta),
                         lambda s: _textbook_backward(dy, s[1], gamma))
    if torch is not None:
        tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]
        mod = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
               5: torch.nn.BatchNorm3d}[len(shape)](shape[1]).to(tdt)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(gamma))
            mod.bias.copy_(torch.from_numpy(beta))
        xt = torch.from_numpy(x).requires_grad_(True)
        dyt = torch.from_numpy(dy)
        inputs = [xt, mod.weight, mod.bias]
        impls["PyTorch"] = (lambda: mod(xt), lambda y: torch.autograd.grad(y, inputs, dyt))
    return impls


def time_blocks(impls, repeats, warmup, cycles=2):
    """Median forward / backward / forward+backward seconds of each implementation.

    Each implementation runs ``warmup`` untimed and then ``repeats`` timed
    steps in a row (so that thread pools and caches are in their steady
    state), one implementation after the other; the whole round is done
    ``cycles`` times and each implementation keeps its best round (the one
    with the lowest median step), which filters out phases when the machine
    was busy with something else.
    """
    best = {}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(cycles):
            for name, (fwd, bwd) in impls.items():
                f, b, fb = [], [], []
                for r in range(warmup + repeats):
                    t0 = time.perf_counter()
                    state = fwd()
                    t1 = time.perf_counter()
                    bwd(state)
                    t2 = time.perf_counter()
                    del state
                    if r >= warmup:
                        f.append(t1 - t0)
                        b.append(t2 - t1)
                        fb.append(t2 - t0)
                medians = tuple(float(np.median(v)) for v in (f, b, fb))
                if name not in best or medians[2] < best[name][2]:
                    best[name] = medians
    finally:
        if enabled:
            gc.enable()
    return best


def peak_memory(fwd, bwd, fresh_memory=False) -> int:
    """Peak bytes NumPy allocates during one forward + backward, outputs included.

    With ``fresh_memory`` (minibn) the engines' reusable work buffers are
    dropped first and output recycling is off, so that everything the step
    needs is allocated -- and counted -- during the measurement.
    """
    fwd_state = fwd()                 # plans and thread pools exist before the measurement
    bwd(fwd_state)
    del fwd_state
    if fresh_memory:
        release_buffers()
    gc.collect()
    with no_output_recycling() if fresh_memory else contextlib.nullcontext():
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            state = fwd()
            out = bwd(state)
            peak = tracemalloc.get_traced_memory()[1] - base
            del state, out
        finally:
            tracemalloc.stop()
    return peak


# =========================================================================== the CPU table

def bench_cpu(shapes, dtypes, repeats, warmup, use_torch=True, log=print):
    torch = _torch() if use_torch else None
    threads = num_threads()
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            impls = cpu_implementations(shape, dtype, torch)
            t = time_blocks(impls, repeats, warmup)
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            copy_bw = copy_bandwidth(nbytes, threads)
            for name, (fwd, bwd) in impls.items():
                mem = (peak_memory(fwd, bwd, fresh_memory=name.startswith("minibn"))
                       if name != "PyTorch" else None)
                rows.append(dict(dtype=np.dtype(dtype).name, shape=list(shape), impl=name,
                                 fwd=t[name][0], bwd=t[name][1], fb=t[name][2], nbytes=nbytes,
                                 copy_bw=copy_bw, peak_mem=mem))
            log(f"  measured {np.dtype(dtype).name} {'x'.join(map(str, shape))}", flush=True)
    return rows


def _shape_label(shape):
    kind = {2: "BN1d", 3: "BN1d", 4: "BN2d", 5: "BN3d"}[len(shape)]
    return f"{kind} ({', '.join(map(str, shape))})"


def _ratio(a, b):
    return f"{a / b:.2f}" if b else "—"


def _groups_by_shape(rows, dtype):
    """``(shape, {impl: row})`` for the rows of one dtype, shapes in first-seen order."""
    shapes = []
    for r in rows:
        if r["dtype"] == dtype and r["shape"] not in shapes:
            shapes.append(r["shape"])
    return [(shape, {r["impl"]: r for r in rows if r["dtype"] == dtype and r["shape"] == shape})
            for shape in shapes]


def format_cpu_table(rows, dtype):
    lines = [f"#### {dtype}", "",
             "| input | path | fwd ms | bwd ms | fwd+bwd ms | × PyTorch fwd / bwd / f+b | "
             "× textbook f+b | GB/s f+b | % copy | peak extra mem |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, group in _groups_by_shape(rows, dtype):
        pt, tb = group.get("PyTorch"), group.get("textbook")
        for name, r in group.items():
            moved = (FORWARD_PASSES + BACKWARD_PASSES) * r["nbytes"]
            bw = moved / r["fb"]
            vs_pt = (f"{_ratio(r['fwd'], pt['fwd'])} / {_ratio(r['bwd'], pt['bwd'])} / "
                     f"**{_ratio(r['fb'], pt['fb'])}**" if pt else "—")
            vs_tb = _ratio(r["fb"], tb["fb"]) if tb else "—"
            mem = f"{r['peak_mem'] / r['nbytes']:.1f} × \\|x\\|" if r["peak_mem"] is not None else "—"
            lines.append(f"| {_shape_label(shape)} | {name} | {r['fwd'] * 1e3:.3f} | {r['bwd'] * 1e3:.3f} | "
                         f"{r['fb'] * 1e3:.3f} | {vs_pt} | {vs_tb} | {bw / 1e9:.1f} | "
                         f"{100 * bw / r['copy_bw']:.0f}% | {mem} |")
    return "\n".join(lines)


def geometric_mean_ratio(rows, dtype, impl="minibn", against="PyTorch"):
    ratios = []
    for r in rows:
        if r["dtype"] == dtype and r["impl"] == impl:
            o = [q for q in rows if q["dtype"] == dtype and q["shape"] == r["shape"] and q["impl"] == against]
            if o:
                ratios.append(r["fb"] / o[0]["fb"])
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None


# =========================================================================== SyncBatchNorm under MPI

def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def syncbn_worker(shape, dtype, repeats, warmup):
    """One rank of the SyncBN benchmark (run under mpiexec); rank 0 prints a result line."""
    from mpi4py import MPI
    from .distributed import SyncBatchNorm
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    N = shape[0]
    lo, hi = rank * N // size, (rank + 1) * N // size       # this rank's part of the global batch
    rng = np.random.default_rng(1234)
    x_all = rng.standard_normal(shape).astype(dtype)
    dy_all = rng.standard_normal(shape).astype(dtype)
    x, dy = np.ascontiguousarray(x_all[lo:hi]), np.ascontiguousarray(dy_all[lo:hi])
    del x_all, dy_all
    bn = SyncBatchNorm(shape[1], dtype=dtype)
    ledger = bn.comm.ledger
    steps, comm_bytes, calls = [], [], []
    for r in range(warmup + repeats):
        world.Barrier()
        snap = ledger.snapshot()
        t0 = time.perf_counter()
        bn(x)
        bn.backward(dy)
        bn.zero_grad()
        elapsed = time.perf_counter() - t0
        used = ledger.since(snap)
        slowest = world.allreduce(elapsed, op=MPI.MAX)
        if r >= warmup:
            steps.append(slowest)
            comm_bytes.append(sum(b for _, b in used.values()))
            calls.append(sum(c for c, _ in used.values()))
    if rank == 0:
        print("SYNCBN_RESULT " + json.dumps(dict(
            ranks=size, shape=list(shape), local_batch=hi - lo, dtype=np.dtype(dtype).name,
            step=float(np.median(steps)), bytes_per_rank=int(np.median(comm_bytes)),
            calls=int(np.median(calls)), threads=num_threads(),
            timeout=bn.comm.timeout)), flush=True)


def bench_syncbn(shape, dtype, ranks, repeats, warmup, log=print, timeouts=("0",)):
    """Launch ``mpiexec -n P python -m minibn.bench --syncbn-worker`` for each P and each
    ``MINIBN_COLLECTIVE_TIMEOUT`` in ``timeouts`` (P = 1: the first only); collect rows."""
    try:
        import importlib.util
        if importlib.util.find_spec("minibn.distributed") is None:
            return [], "minibn.distributed is not available"
        import mpi4py  # noqa: F401
        from .distributed import SyncBatchNorm  # noqa: F401
    except ImportError as exc:
        return [], f"SyncBatchNorm unavailable ({exc})"
    mpiexec = _mpiexec()
    if mpiexec is None:
        return [], "mpiexec not found"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rows = []
    runs = [(p, t) for p in ranks for t in (timeouts[:1] if p == 1 else timeouts)]
    for p, timeout in runs:
        env = dict(os.environ, MINIBN_NUM_THREADS=str(max(1, cpus // p)),
                   MINIBN_COLLECTIVE_TIMEOUT=timeout)
        cmd = [mpiexec, "-n", str(p), sys.executable, "-m", "minibn.bench", "--syncbn-worker",
               "--shapes", "x".join(map(str, shape)), "--dtypes", np.dtype(dtype).name,
               "--repeats", str(repeats), "--warmup", str(warmup)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        except subprocess.TimeoutExpired:
            log(f"  SyncBN P={p}, timeout {timeout}: timed out")
            continue
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("SYNCBN_RESULT ")]
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            log(f"  SyncBN P={p}, timeout {timeout}: failed (exit {proc.returncode}): {' | '.join(tail)}")
            continue
        rows.append(json.loads(found[-1].split(" ", 1)[1]))
        log(f"  measured SyncBN P={p}, timeout {timeout}", flush=True)
    return rows, None


def format_syncbn_table(rows):
    lines = ["| ranks P | local batch | step ms (slowest rank) | speed-up vs P=1 | "
             "collectives per step | bytes per rank per step | kernel threads per rank | "
             "collective timeout |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    base = next((r["step"] for r in rows if r["ranks"] == 1), None)
    for r in rows:
        local = (r["local_batch"],) + tuple(r["shape"][1:])
        timeout = "off" if r.get("timeout") is None else f"{r['timeout']:g} s"
        lines.append(f"| {r['ranks']} | ({', '.join(map(str, local))}) | {r['step'] * 1e3:.2f} | "
                     f"{_ratio(base, r['step']) if base else '—'} | {r['calls']} | "
                     f"{r['bytes_per_rank']} | {r['threads']} | {timeout} |")
    return "\n".join(lines)


# =========================================================================== GPU

def device_copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    import cupy
    a = cupy.ones(nbytes // 4, dtype=np.float32)
    b = cupy.empty_like(a)
    cupy.copyto(b, a)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        cupy.copyto(b, a)
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * a.nbytes / float(np.median(times))


def bench_gpu(shapes, dtypes, repeats, warmup, log=print):
    """Rows for the GPU table, or ``([], reason)`` without CuPy/GPU."""
    if not engine_available("cupy"):
        return [], "no CuPy or no GPU: GPU rows not measured"
    import cupy
    torch = _torch()
    use_torch_cuda = torch is not None and torch.cuda.is_available()
    device_bw = device_copy_bandwidth()
    engines = {"minibn (fused CuPy)": get_engine("cupy")}
    if engine_available("cuda") and get_engine("cuda").array_module() is cupy:    # not the simulator
        engines["minibn (numba CUDA)"] = get_engine("cuda")
    engines["reference (generic CuPy)"] = get_engine("reference")
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            x, dy, gamma, beta = (cupy.asarray(a) for a in _data(shape, dtype))
            impls = {name: (lambda e=engine: e.forward_train(x, gamma, beta)[1],
                            lambda c, e=engine: e.backward(dy, c))
                     for name, engine in engines.items()}
            if use_torch_cuda:
                tdt = torch.float32 if np.dtype(dtype) == np.float32 else torch.float64
                mod = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                       5: torch.nn.BatchNorm3d}[len(shape)](shape[1]).to("cuda", tdt)
                xt = torch.as_tensor(x, device="cuda").requires_grad_(True)
                dyt = torch.as_tensor(dy, device="cuda")
                inputs = [xt, mod.weight, mod.bias]
                impls["PyTorch CUDA"] = (lambda: mod(xt), lambda y: torch.autograd.grad(y, inputs, dyt))
            times = {name: ([], [], []) for name in impls}
            for name, (fwd, bwd) in impls.items():
                for r in range(warmup + repeats):
                    cupy.cuda.Device().synchronize()
                    if use_torch_cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    state = fwd()
                    cupy.cuda.Device().synchronize()
                    if use_torch_cuda:
                        torch.cuda.synchronize()
                    t1 = time.perf_counter()
                    bwd(state)
                    cupy.cuda.Device().synchronize()
                    if use_torch_cuda:
                        torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    if r >= warmup:
                        for lst, v in zip(times[name], (t1 - t0, t2 - t1, t2 - t0)):
                            lst.append(v)
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            for name, vals in times.items():
                f, b, fb = (float(np.median(v)) for v in vals)
                rows.append(dict(dtype=np.dtype(dtype).name, shape=list(shape), impl=name, fwd=f, bwd=b,
                                 fb=fb, nbytes=nbytes, copy_bw=device_bw, peak_mem=None))
            log(f"  measured GPU {np.dtype(dtype).name} {'x'.join(map(str, shape))}", flush=True)
    return rows, None


def format_gpu_table(rows, dtype):
    lines = [f"#### GPU {dtype}", "",
             "| input | path | fwd ms | bwd ms | fwd+bwd ms | × PyTorch CUDA f+b | GB/s f+b | % device copy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for shape, group in _groups_by_shape(rows, dtype):
        pt = group.get("PyTorch CUDA")
        for name, r in group.items():
            bw = (FORWARD_PASSES + BACKWARD_PASSES) * r["nbytes"] / r["fb"]
            lines.append(f"| {_shape_label(shape)} | {name} | {r['fwd'] * 1e3:.3f} | {r['bwd'] * 1e3:.3f} | "
                         f"{r['fb'] * 1e3:.3f} | {_ratio(r['fb'], pt['fb']) if pt else '—'} | "
                         f"{bw / 1e9:.0f} | {100 * bw / r['copy_bw']:.0f}% |")
    return "\n".join(lines)


# =========================================================================== entry point

def _parse_shapes(text):
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m minibn bench",
                                description="batch-norm benchmark: minibn vs reference, textbook NumPy, "
                                            "PyTorch; SyncBatchNorm under mpiexec; GPU when present")
    p.add_argument("--quick", action="store_true", help="few repeats, float32 only, ranks 1 and 2")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per implementation (default 15)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    p.add_argument("--shapes", default=None, help="e.g. 4096x256,64x64x32x32")
    p.add_argument("--dtypes", default=None, help="float32,float64")
    p.add_argument("--threads", type=int, default=None, help="minibn kernel threads (MINIBN_NUM_THREADS)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU table")
    p.add_argument("--no-syncbn", action="store_true", help="skip the SyncBatchNorm rows")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU rows")
    p.add_argument("--ranks", default=None, help="SyncBN process counts, e.g. 1,2,4")
    p.add_argument("--json", default=None, help="also write every measured number to this file")
    p.add_argument("--syncbn-worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        set_num_threads(args.threads)
    quick = args.quick
    repeats = args.repeats if args.repeats is not None else (5 if quick else 15)
    warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    shapes = _parse_shapes(args.shapes) if args.shapes else DEFAULT_SHAPES
    dtypes = [np.dtype(d.strip()).type for d in args.dtypes.split(",")] if args.dtypes \
        else ([np.float32] if quick else [np.float32, np.float64])
    if args.syncbn_worker:
        syncbn_worker(shapes[0], dtypes[0], repeats, warmup)
        return 0
    ranks = tuple(int(v) for v in args.ranks.split(",")) if args.ranks \
        else ((1, 2) if quick else SYNCBN_RANKS)

    def log(*a, **k):
        print(*a, file=sys.stderr, **{kk: vv for kk, vv in k.items() if kk != "file"})

    torch = None if args.no_torch else _torch()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    results = {"machine": {}, "cpu": [], "syncbn": [], "gpu": []}
    dram_bw = copy_bandwidth(1 << 26, num_threads())
    m = results["machine"] = dict(
        python=platform.python_version(), numpy=np.__version__, cpus=cpus, machine=platform.machine(),
        processor=platform.processor() or "", blas=blas_info(), blas_env=blas_env(),
        minibn_threads=num_threads(), copy_bw_64MiB=dram_bw,
        thread_speedup=thread_speedup(num_threads()),
        torch=(f"{torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}"
               if torch is not None else "not installed"),
        numba=_numba_version(), repeats=repeats, warmup=warmup)
    print("## minibn benchmark\n")
    print(f"- machine: {m['cpus']} CPU(s), {m['machine']}, Python {m['python']}, NumPy {m['numpy']}")
    print(f"- BLAS: {m['blas']}; environment: {m['blas_env']}")
    print(f"- PyTorch: {m['torch']}")
    print(f"- numba (optional kernels, row '{NUMBA_ROW}'): {m['numba']}")
    print(f"- minibn kernel threads: {m['minibn_threads']}; copy bandwidth (64 MiB, same threads): "
          f"{dram_bw / 1e9:.1f} GB/s")
    print(f"- each implementation: {warmup} warm-up steps, then the median of {repeats} steps in a "
          f"row; two rounds, the better one kept")
    print(f"- parallel capacity now: {m['thread_speedup']:.2f}x from {m['minibn_threads']} threads on "
          "an in-cache NumPy loop (the second vCPU of a shared machine is not always there)")
    print("- GB/s: (3 + 5) |x| bytes (two-pass forward + backward) / time; % copy: of a memcpy of "
          "|x| bytes with the same threads\n", flush=True)

    if not args.no_cpu:
        log("CPU table ...")
        rows = bench_cpu(shapes, dtypes, repeats, warmup, use_torch=not args.no_torch, log=log)
        results["cpu"] = rows
        print("### CPU: training-mode forward and backward\n")
        for dt in dtypes:
            name = np.dtype(dt).name
            print(format_cpu_table(rows, name) + "\n")
            g = geometric_mean_ratio(rows, name)
            if g is not None:
                print(f"Geometric mean of the fwd+bwd ratios minibn / PyTorch ({name}): **{g:.2f}**")
            g_ref = geometric_mean_ratio(rows, name, "reference")
            g_tb = geometric_mean_ratio(rows, name, "textbook")
            if g is not None and g_ref is not None and g_tb is not None:
                print(f"(reference path: {g_ref:.2f}, textbook NumPy: {g_tb:.2f})")
            g_nb = geometric_mean_ratio(rows, name, NUMBA_ROW)
            if g_nb is not None:
                print(f"\nWith the optional numba kernels (`MINIBN_KERNELS=numba`), {NUMBA_ROW} / "
                      f"PyTorch ({name}): **{g_nb:.2f}**")
            print(flush=True)

    if not args.no_syncbn:
        log("SyncBatchNorm ...")
        sdt = dtypes[0]
        srows, why = bench_syncbn(SYNCBN_SHAPE, sdt, ranks, max(3, repeats // 2), warmup, log=log,
                                  timeouts=SYNCBN_TIMEOUTS)
        results["syncbn"] = srows
        print(f"### SyncBatchNorm: one training step on a global batch {SYNCBN_SHAPE} "
              f"{np.dtype(sdt).name}, split over P ranks\n")
        print(format_syncbn_table(srows) if srows else f"(skipped: {why})")
        if srows:
            print(f"\n{cpus} CPU(s): with P > {cpus} the ranks share cores, so the step time measures "
                  "oversubscription as much as communication.")
        print(flush=True)

    if not args.no_gpu:
        try:
            grows, why = bench_gpu(shapes, dtypes, repeats, warmup, log=log)
        except Exception as exc:                  # pragma: no cover - depends on the machine
            grows, why = [], f"GPU benchmark failed: {exc}"
        results["gpu"] = grows
        print("### GPU\n")
        if grows:
            for dt in dtypes:
                print(format_gpu_table(grows, np.dtype(dt).name) + "\n")
        else:
            print(f"({why})\n")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
