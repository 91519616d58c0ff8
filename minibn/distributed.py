"""Synchronized BatchNorm over MPI: sections 5 and 6 of the article.

Each rank holds part of the global batch.  SyncBatchNorm normalizes every part
with the statistics of the *whole* batch, so that P ranks together compute
exactly what one process would compute on the concatenated batch.  Only two
things cross between processes, each once per pass and each O(C) numbers
(plus, once per layer, a check that the ranks agree on those sizes; below):

Forward (training): the moments of the global batch
---------------------------------------------------
Every rank computes its local, stable moments ``(n_g, mu_g, var_g)`` per
channel (``moments.channel_moments``: float64, shifted two-pass).  One
``Allreduce`` of one packed buffer of ``C + 1`` records ``(n, mean, var)``
(``3 (C + 1)`` float64 numbers: a header record and one record per channel)
merges them with the article's section 6 formulas::

    mu  = sum_g n_g mu_g / N
    var = sum_g n_g (var_g + (mu_g - mu)^2) / N          N = sum_g n_g

**Why a user-defined reduction and not a plain sum.**  The textbook way is to
all-reduce ``[n, sum x, sum x^2]`` with ``MPI.SUM`` and form
``E[x^2] - E[x]^2``.  That cancels catastrophically when ``|mean| >> std``
(float64 data with mean 1e8 and std 1: ``E[x^2]`` is 1e16, its rounding error
is about 1, the size of the answer).  Shifting the sums by a reference ``K``
close to the mean fixes that, but ``K`` must be the *same* on every rank
without communicating, and nothing is (the running mean starts at 0 and is
absent with ``track_running_stats=False``).  So the merge itself is the
reduction operation: a commutative ``MPI.Op`` that combines two records with
the formulas above (``comm.merge_moment_records``).  It forms no difference
of large numbers, costs one Allreduce of O(C) numbers, and is symmetric bit
for bit, so every rank ends with identical statistics (and identical running
statistics).  The price: MPI runs a Python operation on host memory, so with
CuPy the ``3 (C + 1)`` numbers of the forward are copied to the host and back
(a few kilobytes); the backward's plain sum goes to a CUDA-aware MPI directly.

The header record ``(-1, C, C)`` merges with min/max, so a merged buffer says
whether the ranks that filled it agreed on ``C`` (:func:`unpack_moments`
checks it).  It cannot *prevent* a disagreement: an Allreduce whose ranks
pass different lengths is erroneous MPI (MPICH ends the job with "message
truncated"; a rank that catches an error leaves the others waiting).  The
check below does.

Backward: the global gradient sums
----------------------------------
The closed-form backward needs ``sum dy`` and ``sum dy * x_hat`` over the
whole batch (``functional.batch_norm_backward``).  One ``Allreduce`` (``SUM``)
of one packed float64 buffer of ``2 C`` numbers.  ``weight.grad`` and
``bias.grad`` keep each rank's *local* share, as in PyTorch;
:func:`allreduce_gradients` completes a data-parallel step.

Once per layer: do all ranks exchange messages of the same size?
-----------------------------------------------------------------
Both messages' lengths follow from ``num_features`` (``3 (C + 1)`` and
``2 C`` float64), and ``track_running_stats`` decides whether eval passes
send them at all.  Before its first exchange, each layer gathers every rank's
``(num_features, track_running_stats)`` with one ``Allgather`` of 2 int64 per
rank (:meth:`Communicator.allgather_ints`).  That message has the same length
on every rank whatever the layers look like, so it can neither truncate nor
leave a rank waiting, and every rank receives the same table, so either all
ranks go on or all raise the same ``ValueError`` (naming each rank's value and
the layer) before anything else is sent.  Agreement is remembered on the layer
(the two values are fixed at construction), so later passes pay nothing.  The
ledger, with P > 1 ranks: the layer's first synchronized forward makes 2 calls
(``allgather_ints`` 16 bytes, ``allreduce_moments`` ``24 (C + 1)`` bytes),
every later one 1 call (``24 (C + 1)`` bytes), every backward 1 call
(``allreduce_sum`` ``16 C`` bytes).  With one process there is nobody to
disagree with, and no check.  The input's dtype and device do not enter the
messages (they are float64 on every path).

Not checked: the *mode*.  A rank in eval (with running statistics) sends
nothing, so ranks still training wait for it in their forward's Allreduce, as
in PyTorch; seeing that would take a collective in every eval pass.  Such a job
ends by the communicator's collective timeout (``MINIBN_COLLECTIVE_TIMEOUT``,
see :mod:`minibn.comm`): a line on stderr, then ``MPI_Abort``.  Call
``train()``/``eval()`` on every rank together.

Also: eval mode communicates nothing (unless ``track_running_stats=False``,
when batch statistics are synchronized in eval too); a rank with an empty local
batch still joins every collective and returns an empty result; the
"more than one value per channel" check uses the *global* count, so all ranks
raise together; running statistics are updated with the global statistics
(unbiased variance with the global count).
"""
from __future__ import annotations

import numpy as np

from .backend import asnumpy, get_array_module
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from .comm import (HEADER_MARK, INSTALL_HINT, RECORD_WIDTH, Communicator, Ledger, cuda_aware,
                   host_staging_forced, library_cuda_support, merge_moment_records)
from .checks import single_value_error
from .module import Module, Parameter
from .moments import channel_moments, merge_moments, reduce_axes

__all__ = [
    "SyncBatchNorm", "convert_sync_batchnorm", "allreduce_gradients", "merge_moments",
    "pack_moments", "unpack_moments", "merge_moment_records", "Communicator", "Ledger",
    "cuda_aware", "library_cuda_support", "host_staging_forced", "INSTALL_HINT",
    "local_moments", "simulate_sync_moments",
]


# =========================================================================== packing

def pack_moments(count: int, mean, var):
    """The forward's send buffer: a header record and one ``(n, mean, var)`` record per channel.

    Returns a host float64 array of shape ``(C + 1, 3)``: row 0 is
    ``(-1, C, C)``, row ``1 + c`` is ``(count, mean[c], var[c])``.
    """
    mean = np.asarray(asnumpy(mean), dtype=np.float64).reshape(-1)
    var = np.asarray(asnumpy(var), dtype=np.float64).reshape(-1)
    C = mean.shape[0]
    records = np.empty((C + 1, RECORD_WIDTH), dtype=np.float64)
    records[0] = (HEADER_MARK, C, C)
    records[1:, 0] = count
    records[1:, 1] = mean
    records[1:, 2] = var
    return records


def unpack_moments(records, num_channels: int):
    """``(N, mean, var)`` from a merged buffer, after checking that all ranks agreed on C."""
    records = np.asarray(records, dtype=np.float64).reshape(-1, RECORD_WIDTH)
    mark, c_min, c_max = records[0]
    if mark != HEADER_MARK or c_min != c_max or c_min != num_channels \
            or records.shape[0] != num_channels + 1:
        raise ValueError(f"SyncBatchNorm: the ranks disagree on the number of channels (smallest "
                         f"{c_min:g}, largest {c_max:g}; this rank has {num_channels}); every rank "
                         f"must build the layer with the same num_features")
    counts = records[1:, 0]
    total = int(counts[0]) if counts.size else 0
    if counts.size and (counts != counts[0]).any():
        raise ValueError("SyncBatchNorm: per-channel counts differ after the merge (corrupted buffer)")
    return total, records[1:, 1].copy(), records[1:, 2].copy()


def local_moments(x):
    """One rank's ``(n, mean, var)`` per channel of an ``(N, C, *)`` batch (float64, stable)."""
    return channel_moments(x, reduce_axes(x.ndim))


def simulate_sync_moments(parts):
    """What SyncBatchNorm's forward Allreduce computes, with the ranks simulated in one process.

    ``parts`` is a list of per-rank batches ``(n_g, C, *)``.  Each part's local
    moments are merged with the article's section 6 formulas
    (``moments.merge_moments``).  Returns ``(N, mean, var)`` with float64 host
    arrays; all-empty parts give ``(0, zeros, zeros)``.
    """
    stats = [local_moments(p) for p in parts]
    counts = np.array([n for n, _, _ in stats], dtype=np.float64)
    means = np.stack([np.asarray(asnumpy(m), dtype=np.float64) for _, m, _ in stats])
    variances = np.stack([np.asarray(asnumpy(v), dtype=np.float64) for _, _, v in stats])
    if counts.sum() == 0:
        return 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    return merge_moments(counts, means, variances)


# =========================================================================== the layer

class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose batch is the union of every rank's batch.

    ``SyncBatchNorm(C, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, comm=None)`` accepts input of any rank >= 2,
    ``(N, C, *)``.  ``comm`` is an mpi4py intra-communicator, a
    :class:`~minibn.comm.Communicator`, or ``None`` for ``MPI.COMM_WORLD``.
    ``layer.comm.ledger`` counts what crossed between processes.

    Every rank must call ``forward`` and ``backward`` the same number of times
    in the same order (they are collective), in the same mode.  The first
    synchronized forward checks, once, that every rank built the layer with the
    same ``num_features`` and ``track_running_stats``; if not, every rank
    raises the same ``ValueError``.  With one process it computes exactly what
    ``BatchNorm1d/2d/3d`` computes.
    """

    _ranks = None
    _rank_words = "at least 2-dimensional (N, C, *)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, comm=None, dtype=None, *, bias: bool = True,
                 engine=None):
        communicator = Communicator.wrap(comm)      # fails first, and clearly, without mpi4py
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype=dtype,
                         bias=bias, engine=engine)
        self.comm = communicator
        self.last_moments = None     # (N, mean, var) of the last synchronized batch, host float64
        self._agreed_on = None       # the Communicator whose ranks agreed on this layer's messages

    def extra_repr(self):
        return super().extra_repr() + f", ranks={self.comm.size}"

    # -- once per layer: do the ranks agree on what crosses? ----------------------
    def _message_signature(self):
        """What fixes the size of this layer's messages, and whether eval passes send them."""
        return (self.num_features, int(self.track_running_stats))

    def _check_ranks_agree(self):
        """Raise the same ``ValueError`` on every rank if the ranks' layers would exchange
        messages of different sizes; one fixed-size Allgather, the first time only."""
        if self.comm.size == 1 or self._agreed_on is self.comm:
            return
        table = self.comm.allgather_ints(self._message_signature(), tag=f"{type(self).__name__}.check")
        disagreements = [_describe_disagreement(name, table[:, column])
                         for column, name in enumerate(SIGNATURE_FIELDS)
                         if (table[:, column] != table[0, column]).any()]
        if disagreements:
            raise ValueError(f"{type(self).__name__}: the {self.comm.size} ranks disagree on "
                             f"{' and on '.join(disagreements)}.  These decide which messages the "
                             f"layer exchanges and their sizes, so it exchanged nothing; build it "
                             f"with the same values on every rank (rank {self.comm.rank} has {self!r})")
        self._agreed_on = self.comm

    # -- the two reductions that cross processes ----------------------------------
    def _batch_statistics(self, x):
        """Global ``(N, mean, var)``: local stable moments, merged by one Allreduce."""
        self._check_ranks_agree()
        # >>> solution: syncbn.forward
        xp = get_array_module(x)
        count, mean, var = super()._batch_statistics(x)        # this rank's, as in BatchNorm
        merged = self.comm.allreduce_moments(pack_moments(count, mean, var),
                                             tag=f"{type(self).__name__}.forward",
                                             path="host" if xp is np else "staged")
        total, g_mean, g_var = unpack_moments(merged, self.num_features)
        self.last_moments = (total, g_mean, g_var)
        if total == 1:
            raise single_value_error(x.shape, detail=f"1 value(s) per channel over all "
                                     f"{self.comm.size} rank(s); the shape is this rank's part")
        return total, xp.asarray(g_mean), xp.asarray(g_var)
        # <<< solution: syncbn.forward

    def _reduce_gradient_sums(self, sum_dy, sum_dy_xhat):
        """Global per-channel ``(sum dy, sum dy * x_hat)``: one Allreduce of ``2 C`` numbers."""
        # >>> solution: syncbn.backward
        xp = get_array_module(sum_dy)
        C = sum_dy.shape[0]
        packed = xp.concatenate([sum_dy.astype(np.float64), sum_dy_xhat.astype(np.float64)])
        total = self.comm.allreduce_sum(packed, tag=f"{type(self).__name__}.backward")
        return total[:C], total[C:]
        # <<< solution: syncbn.backward


SIGNATURE_FIELDS = ("num_features", "track_running_stats")


def _describe_disagreement(name, values):
    """``'num_features (3 on rank 0; 4 on ranks 1-3, 5)'``: each value with the ranks that hold it."""
    words = {"track_running_stats": lambda v: str(bool(v))}.get(name, str)
    groups = [f"{words(v)} on {_rank_list(np.flatnonzero(values == v))}" for v in np.unique(values)]
    return f"{name} ({'; '.join(groups)})"


def _rank_list(ranks):
    """``'rank 0'``, ``'ranks 1-3, 5'``: consecutive ranks as ranges."""
    ranks = [int(r) for r in ranks]
    ranges, start = [], ranks[0]
    for previous, current in zip(ranks, ranks[1:] + [None]):
        if current == previous + 1:
            continue                        # the range goes on
        ranges.append(str(start) if start == previous else f"{start}-{previous}")
        start = current
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(ranges)


# =========================================================================== conversion

_CONVERTIBLE = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


def convert_sync_batchnorm(module: Module, comm=None) -> Module:
    """Replace every BatchNorm1d/2d/3d in ``module`` (recursively) by a SyncBatchNorm.

    The new layers share the old ones' Parameter objects and buffer arrays,
    and keep ``eps``, ``momentum``, ``affine``, ``bias``, ``track_running_stats``,
    ``engine`` and the train/eval mode.  All converted layers share one
    :class:`~minibn.comm.Communicator` (one ledger).  Returns the module, or
    the new layer if ``module`` itself is a BatchNorm.
    """
    if not isinstance(module, Module):
        raise TypeError(f"convert_sync_batchnorm needs a minibn Module, got {type(module).__name__}")
    return _convert(module, Communicator.wrap(comm))


def _convert(module, communicator):
    if isinstance(module, _CONVERTIBLE) and not isinstance(module, SyncBatchNorm):
        arrays = [a for a in (module.weight.data if module.affine else None,
                              module.running_mean if module.track_running_stats else None)
                  if a is not None]
        has_bias = module._parameters.get("bias") is not None
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, comm=communicator,
                             dtype=arrays[0].dtype if arrays else None, bias=has_bias,
                             engine=module.engine)
        if module.affine:
            sync.weight = module.weight
            if has_bias:
                sync.bias = module.bias
        if module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                sync.register_buffer(name, module._buffers[name])
        sync.train(module.training)
        return sync
    for name, child in list(module._modules.items()):
        module._modules[name] = _convert(child, communicator)
    return module


# =========================================================================== data parallel

def allreduce_gradients(model, comm=None, average: bool = True):
    """Sum (or average) every parameter's gradient over all ranks, in one Allreduce.

    ``model`` is a Module or an iterable of Parameters, the same on every rank.
    All gradients are packed into one buffer, with one extra number per
    parameter that says whether any rank had a gradient for it: a parameter
    with no gradient anywhere keeps ``grad = None``; otherwise a missing
    gradient counts as zero.  With ``average=True`` the sum is divided by the
    number of ranks (what data-parallel SGD with per-rank mean losses needs).
    Returns the :class:`~minibn.comm.Communicator` used.
    """
    communicator = Communicator.wrap(comm)
    params = list(model.parameters()) if isinstance(model, Module) else list(model)
    for p in params:
        if not isinstance(p, Parameter):
            raise TypeError(f"allreduce_gradients: expected Parameters, got {type(p).__name__}")
    if not params:
        return communicator
    xp = get_array_module(*[p.data for p in params])
    dtype = np.result_type(np.float32, *[p.data.dtype for p in params])
    sizes = [int(p.data.size) for p in params]
    packed = xp.zeros(sum(sizes) + len(params), dtype=dtype)
    offset = 0
    for i, (p, n) in enumerate(zip(params, sizes)):
        if p.grad is not None:
            packed[offset:offset + n] = p.grad.reshape(-1)
            packed[sum(sizes) + i] = 1
        offset += n
    total = communicator.allreduce_sum(packed, tag="allreduce_gradients")
    if average:
        total = total / communicator.size
    offset = 0
    for i, (p, n) in enumerate(zip(params, sizes)):
        if float(total[sum(sizes) + i]) != 0:
            p.grad = total[offset:offset + n].reshape(p.data.shape).astype(p.data.dtype)
        offset += n
    return communicator
