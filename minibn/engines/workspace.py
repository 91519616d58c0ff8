"""Threads and memory of the NumPy engine: the thread pool, per-thread work buffers, and
recycled outputs.

* **Threads.**  NumPy releases the GIL inside its loops, so for large inputs
  the tiles are shared out to :func:`num_threads` threads
  (``MINIBN_NUM_THREADS``, default: the CPUs this process may use).  The
  numba engine runs on the same count.
* **No fresh memory.**  Maps, scratch tiles and run sums live in per-thread
  buffers reused from call to call (:func:`work_buffer`), and large outputs
  are recycled once their user has dropped them (:func:`new_output`): on a
  virtual machine, the page faults of a fresh large array cost as much as the
  arithmetic of a pass.  ``with no_output_recycling(): ...`` hands out fresh
  outputs only (the benchmark measures a cold call with it).
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from ..checks import check_positive_int

__all__ = ["num_threads", "set_num_threads", "executor", "work_buffer", "new_output", "release_buffers",
           "no_output_recycling"]

RECYCLE_MIN_BYTES = 1 << 20   # outputs at least this big are recycled once their user drops them
RECYCLE_KEEP = 5              # ... keeping at most this many per shape and dtype (y, dx, the cache's x)
RECYCLE_SHAPES = 8            # ... for at most this many shapes


# --------------------------------------------------------------------------- threads

_threads = None
_pool = None
_pool_lock = threading.Lock()


def num_threads() -> int:
    """Threads the NumPy engine uses: ``MINIBN_NUM_THREADS`` or the CPUs this process may use."""
    global _threads
    if _threads is None:
        env = os.environ.get("MINIBN_NUM_THREADS", "").strip()
        try:
            _threads = max(1, int(env)) if env else max(1, len(os.sched_getaffinity(0)))
        except (ValueError, AttributeError):
            _threads = max(1, os.cpu_count() or 1)
    return _threads


def set_num_threads(n: int):
    """Set the number of threads of the NumPy engine (1 turns threading off)."""
    global _threads
    _threads = check_positive_int(n, "set_num_threads: the number of threads")


def executor(workers: int) -> ThreadPoolExecutor:
    """The process's thread pool, grown to at least ``workers`` threads."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minibn-kernel")
        return _pool


def _forget_pool():                       # a forked child must not use the parent's threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


# --------------------------------------------------------------------------- work buffers

_local = threading.local()
_outputs = {}                     # (shape, dtype) -> arrays handed out before
_outputs_lock = threading.Lock()
_all_buffers = []                 # every thread's work-buffer dict


def work_buffer(name, n, dtype):
    """A work array of ``n`` elements, kept per thread and reused from call to call.

    The next request under the same name (in the same thread) returns the same
    memory: a caller uses a buffer only until its next call.
    """
    buffers = _local.__dict__.get("buffers")
    if buffers is None:
        buffers = _local.buffers = {}
        with _outputs_lock:
            _all_buffers.append(buffers)
    key = (name, np.dtype(dtype).char)
    buffer = buffers.get(key)
    if buffer is None or buffer.size < n:
        buffer = buffers[key] = np.empty(max(n, 1), dtype=dtype)
    return buffer[:n]


# --------------------------------------------------------------------------- recycled outputs

_recycling = ContextVar("minibn_output_recycling", default=True)


@contextmanager
def no_output_recycling():
    """``with no_output_recycling(): ...``: every output of the block is a fresh array."""
    token = _recycling.set(False)
    try:
        yield
    finally:
        _recycling.reset(token)


def new_output(like):
    """An uninitialized array shaped like ``like``, for ``y`` or ``dx``.

    Writing a fresh large array costs a page fault per 4 KiB page on first
    touch (on this kind of machine as much as the arithmetic of the whole
    pass).  So large outputs are recycled: an array handed out earlier is
    handed out again once nothing else refers to it -- its reference count
    (which every view, memoryview or wrapping array adds to) shows that only
    this cache holds it, and it still has its shape, dtype and flags.
    """
    if like.nbytes < RECYCLE_MIN_BYTES or not _recycling.get() or not hasattr(sys, "getrefcount"):
        return np.empty_like(like)
    key = (like.shape, like.dtype.str)
    with _outputs_lock:
        kept = _outputs.pop(key, [])
        _outputs[key] = kept                      # most recently used shape last
        for buffer in kept:
            # references: the list, ``buffer`` and getrefcount's argument -> 3 when unused
            if sys.getrefcount(buffer) == 3 and buffer.shape == like.shape and buffer.dtype == like.dtype \
                    and buffer.flags.c_contiguous and buffer.flags.writeable and buffer.base is None:
                return buffer
        buffer = np.empty(like.shape, dtype=like.dtype)
        if len(kept) < RECYCLE_KEEP:
            kept.append(buffer)
        while len(_outputs) > RECYCLE_SHAPES:
            del _outputs[next(iter(_outputs))]
        return buffer


def release_buffers():
    """Forget the recycled outputs and every thread's work buffers (their memory is
    freed once nothing else refers to them).  Call it between kernel calls."""
    with _outputs_lock:
        _outputs.clear()
        for buffers in _all_buffers:
            buffers.clear()
