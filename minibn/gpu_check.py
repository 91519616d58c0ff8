"""``make gpu-check`` / ``python -m minibn gpu-check``: what minibn does on a GPU, in one run.

A machine with a GPU is rare in this project's life (none in CI), so this is
one prepared script that uses a lent device once, in under five minutes:

1. ``install``  what is missing, bounded: the ``gpu`` extra (CuPy, numba-cuda),
                PyTorch with CUDA, mpi4py + MPICH, pytest (failures are reported, not fatal);
2. ``info``     the device, the versions, which engines run, whether MPI is CUDA-aware;
3. ``tests``    the GPU tests (``pytest -m gpu``) and the cuda engine's kernel tests on the device;
4. ``compare``  every engine against ``functional.py`` (float64 on the host) on the device;
5. ``bench``    the bench's GPU table for (64, 64, 32, 32) and (32, 128, 28, 28) float32;
6. ``syncbn``   SyncBatchNorm under ``mpiexec -n 2`` on CuPy buffers against one device on
                the whole batch, through CUDA-aware MPI or host staging (it says which).

Each step runs in its own process group under a time limit (``STEPS``), so a
hung step costs its limit, not the lease.  Without a GPU the command says so
and exits with status 3 before installing anything.  ``--step NAME`` runs one
step in this process (what the orchestrator does in each child).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GPU_STATUS = 3
BENCH_SHAPES = "64x64x32x32,32x128x28x28"
# (name, time limit in seconds): 280 s in all, under the five minutes of a lease's check
STEPS = [("install", 60), ("info", 20), ("tests", 75), ("compare", 30), ("bench", 50), ("syncbn", 45)]
COMPARE_SHAPES = [(256, 64), (8, 16, 12, 12), (3, 5, 1021)]
GPU_TEST_FILES = ["tests/test_engines_gpu.py", "tests/test_gpu.py", "tests/test_cuda_kernels.py"]


# =========================================================================== finding a GPU

def find_gpu():
    """``(True, description)`` when an NVIDIA GPU answers, else ``(False, why not)``; quick."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        if not os.path.exists("/dev/nvidiactl"):
            return False, "no nvidia-smi and no /dev/nvidiactl (no NVIDIA driver)"
    else:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            return False, "nvidia-smi -L did not answer within 20 s"
        gpus = [ln for ln in out.stdout.splitlines() if ln.startswith("GPU ")]
        if out.returncode != 0 or not gpus:
            return False, f"nvidia-smi -L lists no GPU ({(out.stderr or out.stdout).strip()[:200]})"
        return True, "; ".join(gpus)
    return True, "/dev/nvidiactl present (no nvidia-smi)"


# =========================================================================== running a step

def run_bounded(cmd, timeout, env=None, cwd=REPO):
    """Run ``cmd`` (its output goes to ours) in its own process group; kill the group after
    ``timeout`` seconds.  Returns ``(status, seconds)``, status ``"ok"``, ``"failed (exit N)"``
    or ``"timed out"``."""
    start = time.monotonic()
    sys.stdout.flush()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timed out", time.monotonic() - start
    return ("ok" if code == 0 else f"failed (exit {code})"), time.monotonic() - start


def step_env():
    """The environment of the steps: minibn from this tree, the GPU (never the simulator)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NUMBA_ENABLE_CUDASIM="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def orchestrate(steps, log=print):
    """Each named step in a child process under its limit; a summary table; exit status."""
    results = []
    for name, limit in steps:
        log(f"\n=== gpu-check: {name} (limit {limit} s)", flush=True)
        status, seconds = run_bounded([sys.executable, "-m", "minibn.gpu_check", "--step", name], limit,
                                      env=step_env())
        results.append((name, status, seconds))
    log("\n=== gpu-check summary\n\n| step | result | seconds |\n|---|---|---:|")
    for name, status, seconds in results:
        log(f"| {name} | {status} | {seconds:.1f} |")
    log(f"\ntotal {sum(r[2] for r in results):.1f} s", flush=True)
    return 0 if all(r[1] == "ok" for r in results) else 1


# =========================================================================== the steps

def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _torch_has_cuda():
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _pip(args, timeout):
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--retries", "0",
           "--timeout", "5"] + args
    print("$ " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=REPO, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        print(f"  (gave up after {timeout} s)")
        return False


def step_install():
    """Install what is missing; a failed install is reported (the later steps say what it costs)."""
    constraints = ["-c", os.path.join(REPO, "constraints.txt")]
    wanted = []
    if not _importable("cupy") or not _importable("numba_cuda"):
        wanted.append(("the gpu extra (CuPy, numba-cuda)", constraints + ["-e", f"{REPO}[gpu]"], 25))
    if not _importable("pytest"):
        wanted.append(("pytest", constraints + ["pytest"], 10))
    if not _importable("mpi4py") or _mpiexec() is None:
        wanted.append(("mpi4py and MPICH", constraints + ["mpi4py", "mpich"], 10))
    if not _torch_has_cuda():
        wanted.append(("PyTorch with CUDA (the PyPI wheel for Linux)", ["torch==2.13.0"], 15))
    if not wanted:
        print("everything is installed: CuPy, numba-cuda, pytest, mpi4py + mpiexec, PyTorch with CUDA")
    failed = [what for what, args, limit in wanted if not _pip(args, limit)]
    for what in failed:
        print(f"could not install {what}; the steps that need it will say so")
    return 0


def step_info():
    from .engines import engine_available
    from .info import info_lines
    print("\n".join(info_lines()))
    for name in ("cupy", "numba_cuda", "torch"):
        if _importable(name):
            mod = __import__(name)
            print(f"{name:12s} {getattr(mod, '__version__', '?')}")
    for name in ("cupy", "cuda", "reference"):
        print(f"engine {name:9s} available: {engine_available(name)}")
    try:
        from .distributed import cuda_aware
        print(f"CUDA-aware MPI: {cuda_aware()}")
    except Exception as exc:
        print(f"CUDA-aware MPI: unknown ({exc})")
    return 0


def step_tests():
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    files = [f for f in GPU_TEST_FILES if os.path.exists(os.path.join(REPO, f))]
    code = subprocess.run(base + ["-m", "gpu"] + files[:2], cwd=REPO).returncode
    code2 = subprocess.run(base + files[2:], cwd=REPO).returncode     # the kernels, on the device
    return 0 if code in (0, 5) and code2 == 0 else 1


def compare_engines(xp, names, shapes=COMPARE_SHAPES, dtypes=(np.float32, np.float64), log=print):
    """Every engine in ``names`` on ``xp`` arrays against ``functional.py`` in float64 on the host:
    max relative error of the statistics, y, dx, dgamma, dbeta (train) and y, dx (eval).
    Returns the worst error per engine and dtype, ``{(name, dtype): err}``."""
    from . import functional as F
    from .engines import get_engine
    to_host = (lambda a: a.get()) if xp is not np else np.asarray
    worst = {}
    log("| engine | dtype | shape | stats | y | dx | dgamma | dbeta | eval y | eval dx |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in dtypes:
        for shape in shapes:
            rng = np.random.default_rng(0)
            C = shape[1]
            x = (1.5 + 2 * rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            w, b = (1 + 0.2 * rng.standard_normal(C)).astype(dtype), rng.standard_normal(C).astype(dtype)
            rm, rv = np.linspace(1, 2, C).astype(dtype), np.linspace(2, 5, C).astype(dtype)
            x64, dy64, w64, b64 = (a.astype(np.float64) for a in (x, dy, w, b))
            y_r, cache_r = F.batch_norm_forward(x64, w64, b64)
            truth = [cache_r.var, y_r, *F.batch_norm_backward(dy64, cache_r)]
            ye_r, cache_e = F.batch_norm_eval_forward(x64, rm.astype(np.float64), rv.astype(np.float64), w64, b64)
            truth += [ye_r, F.batch_norm_backward(dy64, cache_e)[0]]
            for name in names:
                engine = get_engine(name)
                xd, dyd, wd, bd, rmd, rvd = (xp.asarray(a) for a in (x, dy, w, b, rm, rv))
                _, _, var = engine.statistics(xd)
                y, cache = engine.forward_train(xd, wd, bd)
                dx, dw, db = engine.backward(dyd, cache)
                ye, cache_ev = engine.forward_eval(xd, rmd, rvd, wd, bd)
                dxe = engine.backward(dyd, cache_ev)[0]
                errs = [float(np.max(np.abs(to_host(g).astype(np.float64) - t)) / max(np.max(np.abs(t)), 1e-30))
                        for g, t in zip((var, y, dx, dw, db, ye, dxe), truth)]
                key = (name, np.dtype(dtype).name)
                worst[key] = max(worst.get(key, 0.0), max(errs))
                log(f"| {name} | {np.dtype(dtype).name} | {shape} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
    return worst


COMPARE_LIMITS = {"float32": 1e-4, "float64": 1e-10}


def step_compare():
    import cupy  # noqa: F401  (the step needs it; ImportError says so)
    from .engines import engine_available
    names = [n for n in ("reference", "cupy", "cuda") if engine_available(n)]
    print(f"engines on the device: {', '.join(names)}\n")
    worst = compare_engines(cupy, names)
    bad = {k: v for k, v in worst.items() if v > COMPARE_LIMITS[k[1]]}
    print(f"\nworst relative error per engine and dtype: "
          + ", ".join(f"{n}/{d} {v:.1e}" for (n, d), v in worst.items()))
    if bad:
        print(f"OVER THE LIMITS {COMPARE_LIMITS}: {bad}")
    return 1 if bad or "cuda" not in names else 0


def step_bench():
    from .bench import main as bench_main
    return bench_main(["--no-cpu", "--no-syncbn", "--shapes", BENCH_SHAPES, "--dtypes", "float32",
                       "--repeats", "20", "--warmup", "5"])


def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def step_syncbn():
    mpiexec = _mpiexec()
    if mpiexec is None or not _importable("mpi4py"):
        print("SyncBN: skipped: mpiexec or mpi4py missing (the install step could not add them)")
        return 1
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "minibn.gpu_check", "--step", "syncbn-worker"]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, env=step_env()).returncode


def syncbn_check(xp, engine=None, shape=(16, 32, 14, 14), dtype=np.float32, log=print):
    """On each of 2+ ranks: SyncBatchNorm on this rank's part of one batch, on ``xp`` arrays,
    on ``engine`` (None: the default for the arrays), against BatchNorm on the whole batch.  Rank 0 prints the buffer path
    (``device``: CUDA-aware MPI; ``staged``: host staging; ``host``: NumPy), the calls and
    bytes per step, and the errors.  Returns the worst relative error (every rank)."""
    from mpi4py import MPI

    from . import backend
    from .distributed import SyncBatchNorm
    from .engines import using_engine
    from .nn import BatchNorm2d
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(1)
    x = (0.5 + 2 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    lo, hi = rank * shape[0] // size, (rank + 1) * shape[0] // size
    saved = backend._active
    if xp is not np:
        backend.set_backend("cupy")
    try:
        sync, whole = SyncBatchNorm(shape[1], engine=engine), BatchNorm2d(shape[1])
    finally:
        backend._active = saved
    with using_engine("reference"):
        for _ in range(2):                                          # two passes, as below
            y_all = whole(xp.asarray(x))
        dx_all = whole.backward(xp.asarray(dy))
    y = sync(xp.asarray(x[lo:hi]))                                  # the first pass checks agreement
    before = sync.comm.ledger.snapshot()
    y = sync(xp.asarray(x[lo:hi]))
    dx = sync.backward(xp.asarray(dy[lo:hi]))
    used = sync.comm.ledger.since(before)
    to_host = (lambda a: a.get()) if xp is not np else np.asarray

    def rel(a, b):
        b = to_host(b).astype(np.float64)
        return float(np.max(np.abs(to_host(a).astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))
    errs = [rel(y, y_all[lo:hi]), rel(dx, dx_all[lo:hi]), rel(sync.running_var, whole.running_var)]
    worst = comm.allreduce(max(errs), op=MPI.MAX)
    if rank == 0:
        path = sync.comm.buffer_path(xp.zeros(1))
        how = {"device": "CUDA-aware MPI (device buffers)", "staged": "host staging (MPI not CUDA-aware)",
               "host": "host (NumPy buffers)"}.get(path, path)
        log(f"SyncBN on {size} ranks, engine {engine or 'default'}, {np.dtype(dtype).name} {shape}, "
            f"arrays {xp.__name__}: path {how}")
        log(f"  one forward + backward: {sum(c for c, _ in used.values())} collectives, "
            f"{sum(b for _, b in used.values())} bytes per rank ({used})")
        log(f"  vs one process on the whole batch: y {errs[0]:.1e}, dx {errs[1]:.1e}, "
            f"running_var {errs[2]:.1e} (worst over ranks {worst:.1e})", flush=True)
    return worst


def step_syncbn_worker():
    import cupy
    from mpi4py import MPI

    from .engines import engine_available
    ok = True
    for engine in [None] + (["cuda"] if engine_available("cuda") else []):
        worst = syncbn_check(cupy, engine)
        ok = ok and worst < 1e-4
    if MPI.COMM_WORLD.Get_rank() == 0:
        print("SyncBN: " + ("equal to one device on the whole batch" if ok else "DIFFERS from one device"))
    return 0 if ok else 1


STEP_FUNCTIONS = {"install": step_install, "info": step_info, "tests": step_tests, "compare": step_compare,
                  "bench": step_bench, "syncbn": step_syncbn, "syncbn-worker": step_syncbn_worker}


# =========================================================================== entry point

def build_parser():
    p = argparse.ArgumentParser(prog="python -m minibn gpu-check",
                                description="on a machine with a GPU: install, test, compare and bench "
                                            "minibn's GPU engines, then SyncBN under mpiexec -n 2 "
                                            "(under 5 minutes; status 3 without a GPU)")
    p.add_argument("--no-install", action="store_true", help="skip the install step")
    p.add_argument("--only", default=None, help="comma-separated steps: " + ",".join(n for n, _ in STEPS))
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.step:
        try:
            return STEP_FUNCTIONS[args.step]() or 0
        except ImportError as exc:
            print(f"gpu-check {args.step}: missing {exc.name or exc}: {exc}", flush=True)
            return 1
    found, what = find_gpu()
    if not found:
        print(f"gpu-check: no GPU on this machine ({what}); nothing was run.  Run `make gpu-check` on "
              f"a machine with an NVIDIA GPU; here, `make test` runs the GPU kernels under numba's "
              f"CUDA simulator.", file=sys.stderr, flush=True)
        return NO_GPU_STATUS
    print(f"gpu-check: {what}\nminibn from {REPO}, Python {sys.executable}", flush=True)
    steps = [(n, t) for n, t in STEPS if not (args.no_install and n == "install")]
    if args.only:
        only = [s.strip() for s in args.only.split(",")]
        unknown = set(only) - {n for n, _ in STEPS}
        if unknown:
            print(f"gpu-check: unknown step(s) {sorted(unknown)}", file=sys.stderr)
            return 2
        steps = [(n, t) for n, t in steps if n in only]
    return orchestrate(steps)


if __name__ == "__main__":
    sys.exit(main())
