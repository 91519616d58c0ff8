"""SyncBatchNorm on P ranks equals BatchNorm on the concatenated batch (run under mpiexec).

    mpiexec -n P python -m mpi4py -m pytest -q -p no:cacheprovider tests/mpi
"""
from __future__ import annotations

import numpy as np
import pytest

from syncbn_helpers import (agree, barrier_within, batch_sizes, check_close, identical_on_all_ranks,
                            my_slice, rank_size, rel_error, sum_over_ranks, world)

import minibn as mb

REFERENCE_BN = {2: mb.BatchNorm1d, 3: mb.BatchNorm1d, 4: mb.BatchNorm2d, 5: mb.BatchNorm3d}
SPATIAL = {2: (), 3: (3,), 4: (2, 3), 5: (2, 1, 2)}
TOL = {np.float64: 1e-11, np.float32: 2e-5}


def make_batch(sizes, ndim, dtype, C=3, seed=0, loc=3.0):
    rng = np.random.default_rng([seed, ndim, sum(sizes)])
    shape = (int(sum(sizes)), C) + SPATIAL[ndim]
    x = (loc + rng.standard_normal(C).reshape((1, C) + (1,) * (ndim - 2))
         + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, dy, gamma, beta


def pair(C, dtype, gamma=None, beta=None, ndim=2, comm=None, **kw):
    sync = mb.SyncBatchNorm(C, dtype=dtype, comm=comm, **kw)
    ref = REFERENCE_BN[ndim](C, dtype=dtype, **kw)
    for layer in (sync, ref):
        if gamma is not None and layer.affine:
            layer.weight.data[...] = gamma
            layer.bias.data[...] = beta
    return sync, ref


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["equal", "uneven", "empty", "one_holds_all"])
def test_equals_batchnorm_on_the_concatenated_batch(kind, ndim, dtype):
    rank, P = rank_size()
    sizes = batch_sizes(kind, P)
    if sizes is None:
        pytest.skip(f"split {kind!r} needs more than one rank")
    C, tol = 3, TOL[dtype]
    sync, ref = pair(C, dtype, ndim=ndim, momentum=0.1)
    failures = []
    for step, momentum in enumerate((0.1, 0.3)):          # a schedule sets layer.momentum
        x, dy, gamma, beta = make_batch(sizes, ndim, dtype, C, seed=step)
        if step == 0:
            for layer in (sync, ref):
                layer.weight.data[...] = gamma
                layer.bias.data[...] = beta
        sync.momentum = ref.momentum = momentum
        sync.zero_grad()
        ref.zero_grad()
        mine = my_slice(sizes)
        y = sync(x[mine])
        dx = sync.backward(dy[mine])
        y_ref = ref(x)
        dx_ref = ref.backward(dy)
        dw, db = sum_over_ranks(sync.weight.grad), sum_over_ranks(sync.bias.grad)
        if y.dtype != x.dtype or dx.dtype != x.dtype or y.shape != x[mine].shape:
            failures.append(f"step {step}: y/dx dtype or shape wrong: {y.dtype} {dx.dtype} {y.shape}")
        check_close(failures, f"step {step} y", y, y_ref[mine], tol)
        check_close(failures, f"step {step} dx", dx, dx_ref[mine], tol)
        check_close(failures, f"step {step} sum of weight.grad", dw, ref.weight.grad, tol)
        check_close(failures, f"step {step} sum of bias.grad", db, ref.bias.grad, tol)
        check_close(failures, f"step {step} running_mean", sync.running_mean, ref.running_mean, tol)
        check_close(failures, f"step {step} running_var", sync.running_var, ref.running_var, tol)
        if int(sync.num_batches_tracked) != int(ref.num_batches_tracked):
            failures.append(f"num_batches_tracked {int(sync.num_batches_tracked)} "
                            f"!= {int(ref.num_batches_tracked)}")
    for name in ("running_mean", "running_var"):
        if not identical_on_all_ranks(getattr(sync, name)):
            failures.append(f"{name} differs between ranks")
    # eval mode: the running statistics, no communication
    sync.eval()
    ref.eval()
    before = sync.comm.ledger.snapshot()
    x, dy, _, _ = make_batch(sizes, ndim, dtype, C, seed=7)
    check_close(failures, "eval y", sync(x[mine]), ref(x)[mine], tol)
    check_close(failures, "eval dx", sync.backward(dy[mine]), ref.backward(dy)[mine], tol)
    if sync.comm.ledger.since(before):
        failures.append(f"eval mode communicated: {sync.comm.ledger.since(before)}")
    agree(failures)


def test_matches_the_independent_float64_reference(ref):
    """Against the formulas written in tests/conftest.py, not against minibn's BatchNorm."""
    rank, P = rank_size()
    sizes = batch_sizes("uneven", P)
    x, dy, gamma, beta = make_batch(sizes, 3, np.float64, C=4, seed=11)
    sync, _ = pair(4, np.float64, gamma, beta, ndim=3)
    mine = my_slice(sizes)
    y, dx = sync(x[mine]), sync.backward(dy[mine])
    dw, db = sum_over_ranks(sync.weight.grad), sum_over_ranks(sync.bias.grad)
    y_ref, _ = ref.forward(x, gamma, beta)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, gamma)
    rm_ref, rv_ref = ref.running([x], 0.1)
    failures = []
    for name, got, want in (("y", y, y_ref[mine]), ("dx", dx, dx_ref[mine]), ("dweight", dw, dw_ref),
                            ("dbias", db, db_ref), ("running_mean", sync.running_mean, rm_ref),
                            ("running_var", sync.running_var, rv_ref)):
        check_close(failures, name, got, want, 1e-11)
    agree(failures)


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_running_statistics_follow_the_global_batches(momentum, ref):
    """Three batches; momentum=None is the cumulative average; unbiased variance with global m."""
    rank, P = rank_size()
    sizes = batch_sizes("uneven", P)
    sync, _ = pair(2, np.float64, momentum=momentum)
    batches = []
    for step in range(3):
        x, _, _, _ = make_batch(sizes, 2, np.float64, C=2, seed=20 + step, loc=5.0 * step)
        sync(x[my_slice(sizes)])
        batches.append(x)
    rm_ref, rv_ref = ref.running(batches, momentum)
    failures = []
    check_close(failures, "running_mean", sync.running_mean, rm_ref, 1e-12)
    check_close(failures, "running_var", sync.running_var, rv_ref, 1e-12)
    if not (identical_on_all_ranks(sync.running_mean) and identical_on_all_ranks(sync.running_var)):
        failures.append("running statistics differ between ranks")
    agree(failures)


def first_forward_check(P):
    """What a layer's first synchronized forward adds on P ranks: one Allgather of 2 int64."""
    return {"allgather_ints": (1, 2 * 8)} if P > 1 else {}


@pytest.mark.parametrize("timeout", [None, 0, 30], ids=["default", "no-timeout", "timeout-30s"])
def test_one_call_and_o_of_c_bytes_per_pass(timeout):
    """Forward: 1 call of 24 (C + 1) bytes, plus the 16-byte check on the first (P > 1);
    backward: 1 call of 16 C bytes; eval: nothing.  The same with the collective timeout
    on (a non-blocking call polled to its deadline) or off (the blocking call)."""
    rank, P = rank_size()
    C = 5
    sync = mb.SyncBatchNorm(C, dtype=np.float64,
                            comm=mb.distributed.Communicator(world(), timeout=timeout))
    ledger = sync.comm.ledger
    failures = []
    for step, per_rank in enumerate((3, 40, 7)):          # payload must not depend on the batch size
        x = np.random.default_rng(per_rank).standard_normal((per_rank, C, 2))
        before = ledger.snapshot()
        y = sync(x)
        fwd = ledger.since(before)
        before = ledger.snapshot()
        sync.backward(np.ones_like(y))
        bwd = ledger.since(before)
        want = {"allreduce_moments": (1, 3 * (C + 1) * 8), **(first_forward_check(P) if step == 0 else {})}
        if fwd != want:
            failures.append(f"forward {step} with {per_rank} per rank: {fwd}, expected {want}")
        if bwd != {"allreduce_sum": (1, 2 * C * 8)}:
            failures.append(f"backward with {per_rank} per rank: {bwd}")
    sync.eval()
    before = ledger.snapshot()
    sync.backward(np.ones_like(sync(x)))
    if ledger.since(before):
        failures.append(f"eval pass communicated: {ledger.since(before)}")
    agree(failures)


def test_eval_without_running_statistics_is_synchronized():
    rank, P = rank_size()
    sizes = batch_sizes("uneven", P)
    x, dy, gamma, beta = make_batch(sizes, 2, np.float64, C=3, seed=3)
    sync, ref = pair(3, np.float64, gamma, beta, track_running_stats=False)
    sync.eval()
    ref.eval()
    mine = my_slice(sizes)
    before = sync.comm.ledger.snapshot()
    y = sync(x[mine])
    dx = sync.backward(dy[mine])
    used = sync.comm.ledger.since(before)
    failures = []
    check_close(failures, "y", y, ref(x)[mine], 1e-11)
    check_close(failures, "dx", dx, ref.backward(dy)[mine], 1e-11)
    want = {"allreduce_moments": (1, 3 * 4 * 8), "allreduce_sum": (1, 2 * 3 * 8), **first_forward_check(P)}
    if used != want:
        failures.append(f"expected one forward and one backward call (and the first check), got {used}")
    agree(failures)


def test_one_value_per_channel_is_decided_on_the_global_count():
    rank, P = rank_size()
    C = 2
    failures = []
    # one value in total (on the last rank): every rank raises, none waits
    sync = mb.SyncBatchNorm(C)
    x = np.ones((1 if rank == P - 1 else 0, C), dtype=np.float32)
    try:
        sync(x)
        failures.append("no ValueError with one value per channel in total")
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            failures.append(f"unclear message: {exc}")
    # one value on every rank: fine as soon as there are two ranks
    sync = mb.SyncBatchNorm(C)
    x = np.full((1, C), float(rank), dtype=np.float32)
    try:
        y = sync(x)
        if P == 1:
            failures.append("one rank with one value did not raise")
        else:
            want = (rank - (P - 1) / 2) / np.sqrt(np.var(np.arange(P)) + 1e-5)
            check_close(failures, "y", y, np.full((1, C), want), 1e-5)
    except ValueError:
        if P > 1:
            failures.append(f"raised with one value per rank on {P} ranks (global count {P})")
    agree(failures)


def test_all_ranks_empty():
    rank, P = rank_size()
    sync = mb.SyncBatchNorm(3, dtype=np.float64)
    x = np.zeros((0, 3, 4))
    before = sync.comm.ledger.snapshot()
    y = sync(x)
    dx = sync.backward(np.zeros_like(y))
    failures = []
    if y.shape != x.shape or dx.shape != x.shape:
        failures.append(f"shapes {y.shape} {dx.shape}")
    if int(sync.num_batches_tracked) != 0 or not np.all(sync.running_var == 1):
        failures.append("an all-empty batch changed the running statistics")
    used = sync.comm.ledger.since(before)
    if used != {"allreduce_moments": (1, 3 * 4 * 8), **first_forward_check(P)}:
        failures.append(f"expected the forward call (and the first check) only, got {used}")
    agree(failures)


@pytest.mark.parametrize("dtype, loc", [(np.float32, 1e4), (np.float64, 1e8)])
def test_variance_is_stable_when_the_mean_is_huge(dtype, loc):
    """var accurate to 1e-6 relative where E[x^2] - E[x]^2 has no correct digit left."""
    rank, P = rank_size()
    sizes = [(5 * r + 3) % 11 + 2 for r in range(P)]
    rng = np.random.default_rng(99)
    C = 3
    x = (loc + rng.standard_normal((sum(sizes), C, 4))).astype(dtype)
    sync = mb.SyncBatchNorm(C, momentum=1.0, dtype=np.float64)
    sync(x[my_slice(sizes)])
    N, mean, var = sync.last_moments
    # the float64 two-pass reference on the concatenated batch
    x64 = x.astype(np.float64)
    m = x64.shape[0] * x64.shape[2]
    mu = x64.sum(axis=(0, 2)) / m
    ref_var = ((x64 - mu[None, :, None]) ** 2).sum(axis=(0, 2)) / m
    failures = []
    if N != m:
        failures.append(f"global count {N} != {m}")
    check_close(failures, "var", var, ref_var, 1e-6)
    check_close(failures, "running_var (unbiased)", sync.running_var, ref_var * m / (m - 1), 1e-6)
    check_close(failures, "mean", mean, mu, 1e-12)
    if dtype == np.float64:       # the test can fail: the textbook formula is far off here
        naive = (x64 ** 2).sum(axis=(0, 2)) / m - mu ** 2
        if np.max(np.abs(naive - ref_var) / ref_var) < 1e-3:
            failures.append("E[x^2] - E[x]^2 was accurate: the data does not test stability")
    agree(failures)


def test_forced_host_staging_gives_the_same_bits(monkeypatch):
    rank, P = rank_size()
    sizes = batch_sizes("uneven", P)
    x, dy, gamma, beta = make_batch(sizes, 4, np.float32, C=3, seed=5)
    mine = my_slice(sizes)
    results = []
    for staged in ("0", "1"):
        monkeypatch.setenv("MINIBN_MPI_HOST_STAGING", staged)
        sync, _ = pair(3, np.float32, gamma, beta, ndim=4,
                       comm=mb.distributed.Communicator(world()))    # a fresh ledger
        y = sync(x[mine])
        dx = sync.backward(dy[mine])
        results.append((y, dx, [e.path for e in sync.comm.ledger.log if e.kind == "allreduce_sum"]))
    failures = []
    if results[0][2] != ["host"] or results[1][2] != ["staged"]:
        failures.append(f"buffer paths {results[0][2]} and {results[1][2]}")
    if not (np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])):
        failures.append("staging changed the result")
    agree(failures)


def test_allreduce_gradients_packs_everything_in_one_call():
    rank, P = rank_size()
    rng = np.random.default_rng([rank, 4])
    model = mb.Sequential(mb.Linear(3, 4, seed=1, dtype=np.float64), mb.BatchNorm1d(4, dtype=np.float64),
                          mb.ReLU(), mb.Linear(4, 2, seed=2, dtype=np.float64))
    params = list(model.parameters())
    for p in params:
        p.grad = rng.standard_normal(p.shape)
    params[-1].grad = None                       # no rank has a gradient for the last bias
    if rank == 0 and P > 1:
        params[0].grad = None                    # rank 0 has none for the first weight: zero
    local = [None if p.grad is None else p.grad.copy() for p in params]
    comm = mb.distributed.Communicator.wrap(None)
    before = comm.ledger.snapshot()
    mb.distributed.allreduce_gradients(model, average=True)
    used = comm.ledger.since(before)
    failures = []
    n = sum(p.data.size for p in params) + len(params)
    if used != {"allreduce_sum": (1, 8 * n)}:
        failures.append(f"expected one call of {8 * n} bytes, got {used}")
    for i, (p, g) in enumerate(zip(params, local)):
        total = sum_over_ranks(np.zeros(p.shape) if g is None else g) / P
        if i == len(params) - 1:
            if p.grad is not None:
                failures.append("a parameter without gradients got one")
            continue
        check_close(failures, f"param {i}", p.grad, total, 1e-14)
        if not identical_on_all_ranks(p.grad):
            failures.append(f"param {i} gradient differs between ranks")
    agree(failures)


def torch_reference_on_rank0(x, dy, gamma, beta, momentum):
    """PyTorch's BatchNorm2d on the whole batch, computed on rank 0 only (one slow import, not P)
    and broadcast; ``None`` on every rank when PyTorch is not installed."""
    result = None
    if world().Get_rank() == 0:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            tbn = torch.nn.BatchNorm2d(x.shape[1], momentum=momentum).double()
            with torch.no_grad():
                tbn.weight.copy_(torch.from_numpy(gamma))
                tbn.bias.copy_(torch.from_numpy(beta))
            tx = torch.from_numpy(x).requires_grad_(True)
            ty = tbn(tx)
            ty.backward(torch.from_numpy(dy))
            result = {"y": ty.detach().numpy(), "dx": tx.grad.numpy(), "dweight": tbn.weight.grad.numpy(),
                      "dbias": tbn.bias.grad.numpy(), "running_mean": tbn.running_mean.numpy(),
                      "running_var": tbn.running_var.numpy()}
    return world().bcast(result, root=0)


def test_torch_batchnorm_on_the_whole_batch_is_the_oracle():
    rank, P = rank_size()
    sizes = batch_sizes("uneven", P)
    x, dy, gamma, beta = make_batch(sizes, 4, np.float64, C=3, seed=8)
    oracle = torch_reference_on_rank0(x, dy, gamma, beta, 0.2)
    if oracle is None:
        pytest.skip("PyTorch is not installed")
    sync, _ = pair(3, np.float64, gamma, beta, ndim=4, momentum=0.2)
    mine = my_slice(sizes)
    y = sync(x[mine])
    dx = sync.backward(dy[mine])
    dw, db = sum_over_ranks(sync.weight.grad), sum_over_ranks(sync.bias.grad)
    failures = []
    for name, got, want in (("y", y, oracle["y"][mine]), ("dx", dx, oracle["dx"][mine]),
                            ("dweight", dw, oracle["dweight"]), ("dbias", db, oracle["dbias"]),
                            ("running_mean", sync.running_mean, oracle["running_mean"]),
                            ("running_var", sync.running_var, oracle["running_var"])):
        check_close(failures, name, got, want, 1e-10)
    agree(failures)


def disagreement_outcomes(build, x_for, attempts=2):
    """Run ``attempts`` forwards of a layer that ``build(rank)`` makes differently on some ranks.

    Returns this rank's error messages and what its ledger recorded; a forward
    that returns instead of raising is reported as ``None``.
    """
    rank, _ = rank_size()
    sync = build(rank)
    messages = []
    for _ in range(attempts):               # a caller that catches the error and tries again
        try:
            sync(x_for(sync))
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    return messages, sync.comm.ledger.snapshot()


def test_ranks_that_disagree_on_num_features_all_raise_and_nobody_waits():
    """Rank 0 builds SyncBatchNorm(3), the others SyncBatchNorm(4): every rank raises the same
    ValueError, nothing but the fixed-size check is sent, and every rank goes on to the next
    collective (a barrier with a deadline, then a well-built layer's forward and backward)."""
    rank, P = rank_size()
    if P < 2:
        pytest.skip("needs two ranks")
    messages, used = disagreement_outcomes(
        lambda r: mb.SyncBatchNorm(3 if r == 0 else 4, dtype=np.float64,
                                   comm=mb.distributed.Communicator(world())),       # a fresh ledger
        lambda layer: np.ones((2, layer.num_features)))
    failures = []
    others = "rank 1" if P == 2 else f"ranks 1-{P - 1}"
    expected = f"the {P} ranks disagree on num_features (3 on rank 0; 4 on {others})"
    for attempt, message in enumerate(messages):
        if message is None or expected not in message:
            failures.append(f"attempt {attempt}: expected a ValueError saying {expected!r}, got {message!r}")
        elif f"rank {rank} has SyncBatchNorm({3 if rank == 0 else 4}," not in message:
            failures.append(f"attempt {attempt}: the message does not name this rank's layer: {message}")
    if used != {"allgather_ints": (2, 2 * 2 * 8)}:
        failures.append(f"expected only the two 16-byte checks to cross, got {used}")
    barrier_within(20)
    x, dy, gamma, beta = make_batch(batch_sizes("uneven", P), 2, np.float64, C=3, seed=11)
    sync, ref = pair(3, np.float64, gamma, beta, comm=mb.distributed.Communicator(world()))
    mine = my_slice(batch_sizes("uneven", P))
    check_close(failures, "y after the error", sync(x[mine]), ref(x)[mine], 1e-11)
    check_close(failures, "dx after the error", sync.backward(dy[mine]), ref.backward(dy)[mine], 1e-11)
    agree(failures)


def test_ranks_that_disagree_on_track_running_stats_all_raise():
    """It decides whether eval passes communicate: a disagreement would hang the first eval pass."""
    rank, P = rank_size()
    if P < 2:
        pytest.skip("needs two ranks")
    messages, used = disagreement_outcomes(
        lambda r: mb.SyncBatchNorm(2, track_running_stats=(r != P - 1),
                                   comm=mb.distributed.Communicator(world())),
        lambda layer: np.ones((3, 2), np.float32), attempts=1)
    last = f"rank {P - 1}"
    rest = "rank 0" if P == 2 else f"ranks 0-{P - 2}"
    expected = f"disagree on track_running_stats (False on {last}; True on {rest})"
    failures = []
    if messages[0] is None or expected not in messages[0] or "num_features" in messages[0]:
        failures.append(f"expected a ValueError saying {expected!r} only, got {messages[0]!r}")
    if used != {"allgather_ints": (1, 2 * 8)}:
        failures.append(f"expected only the 16-byte check to cross, got {used}")
    barrier_within(20)
    agree(failures)


def test_layers_built_on_a_sub_communicator():
    """comm= takes any intra-communicator: two halves of the world normalize separately."""
    rank, P = rank_size()
    if P < 2:
        pytest.skip("needs two ranks")
    color = rank % 2
    sub = world().Split(color, rank)
    try:
        sync = mb.SyncBatchNorm(2, dtype=np.float64, comm=sub)
        x = np.full((2, 2), float(rank))
        sync(x)
        mates = [r for r in range(P) if r % 2 == color]
        failures = []
        check_close(failures, "mean over my half", sync.last_moments[1], np.full(2, np.mean(mates)), 1e-15)
        if sync.last_moments[0] != 2 * len(mates):
            failures.append(f"count {sync.last_moments[0]} != {2 * len(mates)}")
    finally:
        sub.Free()
    agree(failures)


def test_the_timeout_path_gives_every_rank_the_same_bits_as_the_blocking_path():
    """With a timeout the collectives are Iallreduce/Iallgather polled with Test (the merge a
    user-defined op run inside Test); the statistics, outputs and gradients must be identical
    on every rank and equal to the blocking calls' (bit for bit with 2 ranks, where both
    merge the same two records)."""
    rank, P = rank_size()
    sizes = batch_sizes("uneven", P)
    rng = np.random.default_rng(11)
    x_all = rng.normal(1e4, 2.0, size=(int(sum(sizes)), 6, 3))
    dy_all = rng.standard_normal(x_all.shape)
    part = my_slice(sizes)
    results = {}
    for timeout in (0, 30):
        sync = mb.SyncBatchNorm(6, dtype=np.float64,
                                comm=mb.distributed.Communicator(world(), timeout=timeout))
        y = sync(x_all[part])
        dx = sync.backward(dy_all[part])
        results[timeout] = (sync.last_moments[1], sync.last_moments[2], y, dx, sync.running_var)
    failures = []
    moments = world().allgather(results[30][:2])
    if any(not (np.array_equal(m[0], moments[0][0]) and np.array_equal(m[1], moments[0][1]))
           for m in moments):
        failures.append("ranks ended with different statistics on the timeout path")
    for name, a, b in zip(("mean", "var", "y", "dx", "running_var"), results[0], results[30]):
        same = np.array_equal(a, b) if P == 2 else rel_error(a, b) < 1e-12
        if not same:
            failures.append(f"{name}: the timeout path differs from the blocking path "
                            f"(relative error {rel_error(a, b):.2e})")
    agree(failures)
