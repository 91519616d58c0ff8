"""The one door between processes: a small wrapper around an mpi4py communicator.

Every collective minibn performs goes through :class:`Communicator`, which
does three things besides calling MPI:

* it keeps a **ledger**: how many calls of each kind and how many bytes this
  process contributed, so a lesson can print exactly what crossed between the
  ranks and a test can assert "one call per pass, O(C) bytes";
* it moves **GPU buffers** correctly: a CuPy array goes to MPI as a device
  buffer when the MPI library is CUDA-aware (after synchronizing the current
  stream, since MPI does not know about CUDA streams); otherwise it is staged
  through host memory (copied to a NumPy array, reduced, copied back);
* it owns the **user-defined reduction** that merges per-rank moments
  ``(n, mean, var)`` with the article's section 6 formulas (see
  :func:`merge_moment_records`).

Three collectives exist, because SyncBatchNorm needs only these:

``allreduce_sum(buf)``
    element-wise sum (``MPI.SUM``) of one packed buffer; used by the backward
    pass (per-channel sums of ``dy`` and ``dy * x_hat``) and by
    ``allreduce_gradients``.
``allreduce_moments(records)``
    merge of moment records, one per channel, with :func:`merge_moment_records`
    as a commutative user-defined ``MPI.Op``; used by the forward pass.
``allgather_ints(values)``
    every rank's short, fixed-length row of integers; used once per layer, before
    its first exchange, to check that all ranks' layers send messages of the same
    size (a message whose length does not depend on the layer cannot truncate).

**No collective waits forever.**  A Communicator can bound every collective
it makes: ``Communicator(comm, timeout=seconds)``, or the environment variable
``MINIBN_COLLECTIVE_TIMEOUT`` (seconds; ``0`` or ``off`` for none) when no
``timeout`` is given; by default :data:`DEFAULT_TIMEOUT` (10 minutes).  With a
timeout, each collective is started non-blocking (``Iallreduce``,
``Iallgather``) and polled with ``Test`` until it completes or its deadline
passes: a spin of about 2 ms, then sleeps that grow to :data:`LONGEST_SLEEP`, so a
rank that waits does not keep a core busy.  On expiry the rank writes one line
to stderr (:func:`collective_timeout_message`: which collective, which layer,
rank, size, seconds waited, the likely causes) and calls ``MPI_Abort`` on its
communicator, which ends every rank of the job.  Still one collective per call:
the timeout changes how a rank waits, not what crosses.

mpi4py is imported lazily, so ``import minibn`` works without it; creating a
communicator without it raises one ``ImportError`` saying what to install.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .backend import asnumpy, get_array_module

__all__ = [
    "INSTALL_HINT", "import_mpi", "Communicator", "Ledger", "LedgerEntry", "cuda_aware",
    "library_cuda_support", "host_staging_forced", "merge_moment_records", "HEADER_MARK",
    "RECORD_WIDTH", "STAGING_ENV", "TIMEOUT_ENV", "DEFAULT_TIMEOUT", "collective_timeout",
    "collective_timeout_message", "wait_until_complete",
]

INSTALL_HINT = "pip install 'minibn[mpi]'  (mpi4py >= 4 and an MPI library such as MPICH)"
STAGING_ENV = "MINIBN_MPI_HOST_STAGING"
RECORD_WIDTH = 3        # one moment record: (n, mean, var)
HEADER_MARK = -1.0      # n < 0 marks a header record: (-1, smallest C, largest C)
TIMEOUT_ENV = "MINIBN_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 600.0     # seconds: far above any step's wait, far below "forever"
FIRST_SLEEP = 20e-6         # the polling loop's first sleep, after a short spin ...
LONGEST_SLEEP = 1e-3        # ... doubling up to this, so a waiting rank stays nearly idle
SPIN_POLLS = 4000           # polls without sleeping first, about 2 ms (a peer that is almost there)
TIMEOUT_EXIT_CODE = 14      # MPI_Abort's error code after a collective timed out


def import_mpi():
    """``mpi4py.MPI``, or an ``ImportError`` that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"minibn.distributed needs mpi4py and an MPI library, which are not "
                          f"installed ({exc}); install them with: {INSTALL_HINT}") from exc
    return MPI


# =========================================================================== GPU buffers

def host_staging_forced() -> bool:
    """True when the environment variable ``MINIBN_MPI_HOST_STAGING`` asks for staging."""
    return os.environ.get(STAGING_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_cuda_support_cache = []


def _loaded_libmpi_paths():
    """Paths of the MPI shared libraries this process has loaded (Linux), else a guess."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                base = os.path.basename(path)
                if base.startswith("libmpi") and ".so" in base and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    guess = ctypes.util.find_library("mpi")
    if guess and guess not in paths:
        paths.append(guess)
    return paths


def library_cuda_support() -> bool:
    """Whether the MPI library accepts CUDA device buffers (asked once, then cached).

    mpi4py has no portable query for this, so the library is asked directly:
    ``MPI.Query_cuda_support()`` where a future mpi4py offers it, otherwise the
    extension function ``MPIX_Query_cuda_support()`` that both Open MPI and MPICH
    (>= 4) export.  Any failure means "no": staging through host memory is always
    correct, only slower.
    """
    if _cuda_support_cache:
        return _cuda_support_cache[0]
    answer = False
    try:
        MPI = import_mpi()
        query = getattr(MPI, "Query_cuda_support", None)
        if query is not None:
            answer = bool(query())
        else:
            for path in _loaded_libmpi_paths():
                try:
                    fn = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support")
                except (OSError, AttributeError):
                    continue
                fn.restype, fn.argtypes = ctypes.c_int, []
                answer = bool(fn())
                break
    except Exception:           # no MPI, no symbol, no library: not CUDA-aware
        answer = False
    _cuda_support_cache.append(answer)
    return answer


def cuda_aware() -> bool:
    """True when CuPy arrays are handed to MPI as device buffers.

    That needs a CUDA-aware MPI library (:func:`library_cuda_support`) and no
    ``MINIBN_MPI_HOST_STAGING=1`` in the environment; otherwise GPU buffers are
    staged through host memory.
    """
    return (not host_staging_forced()) and library_cuda_support()


def _synchronize_current_stream(xp):
    """Wait until the GPU has finished writing the buffer MPI is about to read."""
    xp.cuda.get_current_stream().synchronize()


# =========================================================================== the ledger

@dataclass(frozen=True)
class LedgerEntry:
    """One collective call: its kind, who asked (``tag``), payload bytes and buffer path."""
    kind: str
    tag: str
    nbytes: int
    path: str           # "host" (NumPy), "device" (CUDA-aware), or "staged" (through the host)


class Ledger:
    """Counts of collective calls and payload bytes, per kind of collective.

    ``nbytes`` is the size of the buffer this process hands to MPI (what it
    contributes to the reduction; it receives a buffer of the same size back).
    The totals never forget; ``log`` keeps the most recent entries for printing.
    """

    def __init__(self, keep: int = 256):
        self.totals: "OrderedDict[str, list]" = OrderedDict()
        self.log = deque(maxlen=keep)

    def record(self, kind: str, tag: str, nbytes: int, path: str):
        entry = LedgerEntry(kind, tag, int(nbytes), path)
        calls_bytes = self.totals.setdefault(kind, [0, 0])
        calls_bytes[0] += 1
        calls_bytes[1] += entry.nbytes
        self.log.append(entry)
        return entry

    def calls(self, kind: Optional[str] = None) -> int:
        return sum(c for k, (c, _) in self.totals.items() if kind is None or k == kind)

    def bytes(self, kind: Optional[str] = None) -> int:
        return sum(b for k, (_, b) in self.totals.items() if kind is None or k == kind)

    def snapshot(self) -> Dict[str, Tuple[int, int]]:
        """The totals now, ``{kind: (calls, bytes)}``; pass it to :meth:`since`."""
        return {k: (c, b) for k, (c, b) in self.totals.items()}

    def since(self, snapshot) -> Dict[str, Tuple[int, int]]:
        """Calls and bytes per kind since ``snapshot`` (kinds with no new call left out)."""
        out = {}
        for k, (c, b) in self.totals.items():
            c0, b0 = snapshot.get(k, (0, 0))
            if c != c0:
                out[k] = (c - c0, b - b0)
        return out

    def reset(self):
        self.totals.clear()
        self.log.clear()

    def summary(self) -> str:
        if not self.totals:
            return "no collective calls"
        return "\n".join(f"{k:<18} {c:6d} call(s) {b:10d} bytes" for k, (c, b) in self.totals.items())


# =========================================================================== the moment merge

def merge_moment_records(a, b, out=None):
    """Merge two arrays of moment records, row by row, with the article's formulas.

    A record is ``(n, mean, var)``: a count, a mean and a *biased* variance.
    Two parts merge, as in section 6 of the article with two "GPUs", into::

        N    = n_a + n_b
        mean = (n_a / N) mean_a + (n_b / N) mean_b
        var  = (n_a / N) (var_a + (mean_a - mean)^2) + (n_b / N) (var_b + (mean_b - mean)^2)

    Applying this pairwise over any tree of ranks gives the same moments as
    the P-way formula (``moments.merge_moments``) up to round-off, and never
    forms ``E[x^2] - E[x]^2``: every term is a non-negative variance or a
    squared difference of two nearby means, so nothing cancels when
    ``|mean| >> std``.  The expression is symmetric in ``a`` and ``b`` *bit for
    bit* (floating-point ``+`` and ``*`` are commutative), so every rank of an
    Allreduce ends with identical bits whichever partner sent which half.

    An empty part (``n = 0``) contributes nothing; two empty parts give
    ``(0, 0, 0)``.  Header rows (``n < 0``) carry ``(-1, smallest C, largest
    C)`` and merge with min/max, so after the reduction every rank can see
    whether all ranks agreed on the number of channels.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, RECORD_WIDTH)
    b = np.asarray(b, dtype=np.float64).reshape(-1, RECORD_WIDTH)
    if out is None:
        out = np.empty_like(b)
    na, ma, va = a[:, 0], a[:, 1], a[:, 2]
    nb, mb, vb = b[:, 0], b[:, 1], b[:, 2]
    header = (na < 0) | (nb < 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        n = na + nb
        safe = np.where(n > 0, n, 1.0)
        wa, wb = na / safe, nb / safe
        mean = wa * ma + wb * mb
        var = wa * (va + (ma - mean) ** 2) + wb * (vb + (mb - mean) ** 2)
        lo, hi = np.minimum(ma, mb), np.maximum(va, vb)
    empty = n == 0
    out[:, 0] = np.where(header, HEADER_MARK, n)
    out[:, 1] = np.where(header, lo, np.where(empty, 0.0, mean))
    out[:, 2] = np.where(header, hi, np.where(empty, 0.0, var))
    return out


_mpi_objects = {}


def _moments_op_and_type():
    """The committed record datatype (3 doubles) and the commutative merge ``MPI.Op``.

    The record is one MPI element, so MPI never splits a record between two
    calls of the operation, whatever algorithm or chunking it uses.
    """
    if not _mpi_objects:
        MPI = import_mpi()

        def merge(inbuf, inoutbuf, datatype):
            a = np.frombuffer(inbuf, dtype=np.float64).reshape(-1, RECORD_WIDTH)
            b = np.frombuffer(inoutbuf, dtype=np.float64).reshape(-1, RECORD_WIDTH)
            merge_moment_records(a, b, out=b)

        _mpi_objects["type"] = MPI.DOUBLE.Create_contiguous(RECORD_WIDTH).Commit()
        _mpi_objects["op"] = MPI.Op.Create(merge, commute=True)
    return _mpi_objects["op"], _mpi_objects["type"]


# =========================================================================== the timeout

_OFF_WORDS = ("0", "off", "none", "no", "false", "inf", "infinity")


def collective_timeout(timeout=None) -> Optional[float]:
    """The deadline of each collective, in seconds, or ``None`` for none (wait forever).

    ``timeout`` is a number of seconds (``0`` or ``math.inf``: none), or
    ``None`` for the environment variable ``MINIBN_COLLECTIVE_TIMEOUT`` (a
    number, or ``off``), or :data:`DEFAULT_TIMEOUT` when that is unset or empty.
    Anything else (negative, NaN, a word that is not a number) is a ``ValueError``
    naming where it came from.
    """
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_TIMEOUT
        if text.lower() in _OFF_WORDS:
            return None
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds (use e.g. 60, "
                             f"or 0/off for no timeout)") from None
        return _checked_seconds(seconds, f"{TIMEOUT_ENV}={text!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
        raise TypeError(f"Communicator: timeout must be a number of seconds or None, "
                        f"got {type(timeout).__name__} {timeout!r}")
    return _checked_seconds(float(timeout), f"timeout={timeout!r}")


def _checked_seconds(seconds: float, source: str) -> Optional[float]:
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{source}: a collective timeout must be >= 0 seconds (0 for none)")
    return None if seconds == 0 or math.isinf(seconds) else seconds


def collective_timeout_message(kind: str, tag: str, rank: int, size: int, waited: float,
                               timeout: float) -> str:
    """The one line a rank writes to stderr before aborting the job on a timeout."""
    where = f" for {tag}" if tag else ""
    return (f"minibn: collective timeout: {kind}{where} on rank {rank} of {size} did not complete "
            f"within {timeout:g} s (waited {waited:.1f} s).  Likely causes: a rank in eval mode "
            f"while the others train, a rank that died or raised, ranks that disagree on the "
            f"layers or the order of their calls, or a lost network link.  Aborting the job "
            f"(MPI_Abort) so that no rank waits forever; {TIMEOUT_ENV} sets the timeout.")


def wait_until_complete(request, timeout: float, clock=time.monotonic, sleep=time.sleep):
    """Poll ``request.Test()`` until it returns True or ``timeout`` seconds have passed.

    Returns ``(completed, seconds waited)``.  Polls :data:`SPIN_POLLS` times
    without pause (about 2 ms: ranks that are in step finish within it, as fast as
    a blocking call), then sleeps between polls, starting at
    :data:`FIRST_SLEEP` and doubling up to :data:`LONGEST_SLEEP`.  (MPI makes
    progress inside ``Test``, so the polling is also what moves the collective
    along; the sleeps stay short for that reason.)
    """
    start = clock()
    deadline, pause, polls = start + timeout, FIRST_SLEEP, 0
    while True:
        if request.Test():
            return True, clock() - start
        now = clock()
        if now >= deadline:
            return False, now - start
        polls += 1
        if polls > SPIN_POLLS:
            sleep(min(pause, deadline - now))
            pause = min(2 * pause, LONGEST_SLEEP)


# =========================================================================== the communicator

class Communicator:
    """An mpi4py intra-communicator plus a ledger; the only place minibn calls MPI.

    ``Communicator.wrap(comm)`` accepts ``None`` (the shared wrapper of
    ``MPI.COMM_WORLD``), an mpi4py communicator (a new wrapper), or a
    ``Communicator`` (returned as is, so layers can share one ledger).

    ``timeout`` bounds every collective (seconds; see :func:`collective_timeout`
    for ``None``, the default, and ``0`` for none).  ``self.timeout`` is the
    resolved value, in seconds or ``None``.
    """

    _world = None

    def __init__(self, comm=None, timeout=None):
        self.timeout = collective_timeout(timeout)
        MPI = import_mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"Communicator needs an mpi4py intra-communicator (e.g. MPI.COMM_WORLD), "
                            f"got {type(comm).__name__}")
        self.mpi_comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.ledger = Ledger()

    @classmethod
    def wrap(cls, comm=None) -> "Communicator":
        if isinstance(comm, Communicator):
            return comm
        if comm is None:
            if cls._world is None:
                Communicator._world = Communicator(None)
            return Communicator._world
        return cls(comm)

    def __repr__(self):
        timeout = "none" if self.timeout is None else f"{self.timeout:g} s"
        return (f"Communicator(rank={self.rank}, size={self.size}, timeout={timeout}, "
                f"calls={self.ledger.calls()})")

    # -- waiting, with or without a deadline -------------------------------------
    def _complete(self, start, kind: str, tag: str):
        """Run one collective: ``start(blocking)`` either completes it (``blocking=True``, no
        timeout) or returns its request, which is polled until done or the deadline."""
        if self.timeout is None:
            start(True)
            return
        completed, waited = wait_until_complete(start(False), self.timeout)
        if not completed:
            self._abort_after_timeout(kind, tag, waited)

    def _abort_after_timeout(self, kind: str, tag: str, waited: float):
        line = collective_timeout_message(kind, tag, self.rank, self.size, waited, self.timeout)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.mpi_comm.Abort(TIMEOUT_EXIT_CODE)
        # MPICH's MPI_Abort asks the launcher to end the job and may return before it
        # does; this rank must not go on with a collective that never completed.
        os._exit(TIMEOUT_EXIT_CODE)

    # -- buffers ---------------------------------------------------------------
    def buffer_path(self, buf) -> str:
        """How ``buf`` reaches MPI: ``"host"``, ``"device"`` or ``"staged"``."""
        on_device = get_array_module(buf) is not np
        if host_staging_forced():
            return "staged"
        if on_device:
            return "device" if cuda_aware() else "staged"
        return "host"

    # -- the three collectives -------------------------------------------------
    def _allreduce(self, send, recv, op, kind: str, tag: str):
        """``Allreduce``, or ``Iallreduce`` polled against the deadline.  A user-defined
        ``MPI.Op`` is allowed in the non-blocking call too (MPI-3; mpi4py runs the Python
        function inside ``Test``, on this thread); the merge is symmetric bit for bit, so
        every rank ends with identical results either way."""
        comm = self.mpi_comm
        self._complete(lambda blocking: comm.Allreduce(send, recv, op=op) if blocking
                       else comm.Iallreduce(send, recv, op=op), kind, tag)

    def allreduce_sum(self, buf, tag: str = ""):
        """Element-wise sum of ``buf`` over all ranks, in one ``Allreduce``.

        Returns a new array of the same shape, dtype and array module as ``buf``.
        """
        MPI = import_mpi()
        xp = get_array_module(buf)
        path = self.buffer_path(buf)
        if path == "device":
            send = xp.ascontiguousarray(buf)
            recv = xp.empty_like(send)
            _synchronize_current_stream(xp)
            self._allreduce(send, recv, MPI.SUM, "allreduce_sum", tag)
            result = recv
        else:
            # "staged" copies into a fresh host buffer (for a NumPy array too, so
            # the staging logic runs, and is tested, without a GPU); "host" hands
            # the contiguous NumPy array to MPI directly.
            send = np.array(asnumpy(buf), order="C", copy=True) if path == "staged" \
                else np.ascontiguousarray(buf)
            recv = np.empty_like(send)
            self._allreduce(send, recv, MPI.SUM, "allreduce_sum", tag)
            result = recv if xp is np else xp.asarray(recv)
        self.ledger.record("allreduce_sum", tag, send.nbytes, path)
        return result

    def allgather_ints(self, values, tag: str = ""):
        """Every rank's ``values``, a short row of integers, in one ``Allgather``.

        Returns an int64 array of shape ``(size, len(values))`` whose row ``r``
        came from rank ``r``, the same table on every rank.  All ranks must pass
        rows of the same length; callers pass a length fixed by their code, never
        by their data, so the messages always match and the call cannot truncate.
        """
        send = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
        recv = np.empty((self.size, send.size), dtype=np.int64)
        comm = self.mpi_comm
        self._complete(lambda blocking: comm.Allgather(send, recv) if blocking
                       else comm.Iallgather(send, recv), "allgather_ints", tag)
        self.ledger.record("allgather_ints", tag, send.nbytes, "host")
        return recv

    def allreduce_moments(self, records, tag: str = "", path: str = "host"):
        """Merge ``(n, mean, var)`` records over all ranks, in one ``Allreduce``.

        ``records`` is a host float64 array of shape ``(k, 3)``.  The merge runs
        as a user-defined operation in Python, so it always works on host
        memory; SyncBatchNorm passes ``path="staged"`` when its statistics came
        from the GPU, so the ledger says so.
        """
        records = np.ascontiguousarray(records, dtype=np.float64)
        if records.ndim != 2 or records.shape[1] != RECORD_WIDTH:
            raise ValueError(f"allreduce_moments: records must have shape (k, {RECORD_WIDTH}), "
                             f"got {records.shape}")
        op, rectype = _moments_op_and_type()
        out = np.empty_like(records)
        k = records.shape[0]
        self._allreduce([records, k, rectype], [out, k, rectype], op, "allreduce_moments", tag)
        self.ledger.record("allreduce_moments", tag, records.nbytes, path)
        return out
