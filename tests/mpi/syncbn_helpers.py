"""Helpers for the multi-process tests: data every rank can rebuild, and agreed assertions.

Each test builds the *whole* global batch on every rank from one seed, gives
each rank its slice, and computes the single-process reference on the whole
batch locally.  Results are compared after all collectives; the list of
failures is then gathered so that every rank fails (or passes) together.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")


def world():
    return MPI.COMM_WORLD


def rank_size():
    comm = world()
    return comm.Get_rank(), comm.Get_size()


def batch_sizes(kind: str, P: int):
    """Per-rank batch sizes of a split kind; ``None`` when the kind needs more ranks."""
    if kind == "equal":
        return [4] * P
    if kind == "uneven":
        return [(3 * r + 1) % 7 + 1 for r in range(P)]           # 2, 5, 1, 4, ...
    if kind == "empty":                                            # rank 0 holds nothing
        return [0] + [r + 2 for r in range(1, P)] if P > 1 else None
    if kind == "one_holds_all":                                    # only the last rank has data
        return [0] * (P - 1) + [5] if P > 1 else None
    raise ValueError(kind)


def my_slice(sizes):
    rank = world().Get_rank()
    start = int(sum(sizes[:rank]))
    return slice(start, start + int(sizes[rank]))


def agree(failures):
    """Assert, on every rank at once, that no rank recorded a failure."""
    rank = world().Get_rank()
    everyone = world().allgather([f"rank {rank}: {f}" for f in failures])
    flat = [f for fs in everyone for f in fs]
    assert not flat, "\n".join(flat)


def rel_error(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return np.inf
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(b))), 1e-30)
    return float(np.max(np.abs(a - b))) / scale


def check_close(failures, name, got, want, tol):
    err = rel_error(got, want)
    if not err <= tol:
        failures.append(f"{name}: relative error {err:.3g} > {tol:g} "
                        f"(shapes {np.shape(got)} vs {np.shape(want)})")


def sum_over_ranks(a):
    """Float64 sum of an array over all ranks (raw mpi4py: test bookkeeping, not minibn)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    out = np.empty_like(a)
    world().Allreduce(a, out, op=MPI.SUM)
    return out


def identical_on_all_ranks(a) -> bool:
    """True when ``a`` has the same bytes on every rank."""
    blobs = world().allgather(np.ascontiguousarray(a).tobytes())
    return all(b == blobs[0] for b in blobs)


def barrier_within(seconds: float):
    """A barrier that fails (on this rank) instead of waiting more than ``seconds``.

    Proves that every rank got past whatever came before: a rank stuck in an
    earlier collective never arrives, and the ranks that did arrive fail here
    with a message rather than waiting for the watchdog.
    """
    request = world().Ibarrier()
    deadline = time.monotonic() + seconds
    while not request.Test():
        if time.monotonic() > deadline:
            raise AssertionError(f"rank {world().Get_rank()}: not every rank reached the barrier "
                                 f"within {seconds:g} s (some rank is stuck in an earlier collective)")
        time.sleep(0.001)
