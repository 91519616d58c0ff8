"""SyncBatchNorm and friends in one process, plus the fault tests that launch mpiexec.

The multi-rank equivalence tests live in tests/mpi (run under mpiexec); here:
the merge of moment records against the article's formula, the buffer
packing, one-process SyncBatchNorm against BatchNorm (bit for bit),
convert_sync_batchnorm, allreduce_gradients, the staging logic, import
without mpi4py, and jobs with a failing rank or disagreeing ranks, which
must end (non-zero) instead of hanging.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import minibn as mb
from minibn import distributed as D
from minibn.comm import merge_moment_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpiexec():
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return path if os.path.exists(path) else shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")


def records_of(parts):
    return [D.pack_moments(*D.local_moments(p)) for p in parts]


# =========================================================================== the merge

def test_pairwise_merge_equals_the_article_formula_and_a_two_pass_reference(rng):
    sizes = [5, 0, 17, 1, 9]
    parts = [rng.normal(3.0 + i, 1.0 + i, (n, 4)) for i, n in enumerate(sizes)]
    recs = records_of(parts)
    acc = recs[0]
    for r in recs[1:]:                          # fold, as a chain of ranks would
        acc = merge_moment_records(r, acc)
    total, mean, var = D.unpack_moments(acc, 4)
    whole = np.concatenate(parts)
    N, mu_ref, var_ref = D.simulate_sync_moments(parts)          # the article's P-way formula
    two_pass_mu = whole.sum(axis=0) / len(whole)
    two_pass_var = ((whole - two_pass_mu) ** 2).sum(axis=0) / len(whole)
    assert total == N == len(whole)
    np.testing.assert_allclose(mean, two_pass_mu, rtol=1e-14)
    np.testing.assert_allclose(var, two_pass_var, rtol=1e-13)
    np.testing.assert_allclose(mu_ref, two_pass_mu, rtol=1e-14)
    np.testing.assert_allclose(var_ref, two_pass_var, rtol=1e-13)


def test_merge_is_symmetric_bit_for_bit(rng):
    a = D.pack_moments(7, rng.normal(1e6, 1, 5), rng.uniform(0.1, 2, 5))
    b = D.pack_moments(3, rng.normal(1e6, 1, 5), rng.uniform(0.1, 2, 5))
    assert np.array_equal(merge_moment_records(a, b), merge_moment_records(b, a))


def test_empty_parts_contribute_nothing_and_headers_merge_min_max(rng):
    a = D.pack_moments(6, rng.normal(size=3), rng.uniform(size=3))
    empty = D.pack_moments(0, np.zeros(3), np.zeros(3))
    assert np.array_equal(merge_moment_records(empty, a), a)
    assert np.array_equal(merge_moment_records(empty, empty), empty)
    other = a.copy()
    other[0] = (-1, 5, 5)                        # a rank that believes C = 5
    merged = merge_moment_records(other, a)
    assert tuple(merged[0]) == (-1, 3, 5)
    with pytest.raises(ValueError, match="disagree on the number of channels"):
        D.unpack_moments(merged, 3)


def test_merge_is_stable_when_means_are_huge(rng):
    """Parts with mean 1e8 and std 1: the merged variance keeps ~9 digits."""
    parts = [1e8 + rng.standard_normal((n, 2)) for n in (3, 11, 6)]
    recs = records_of(parts)
    acc = merge_moment_records(recs[0], merge_moment_records(recs[1], recs[2]))
    _, _, var = D.unpack_moments(acc, 2)
    whole = np.concatenate(parts)
    ref = ((whole - whole.mean(axis=0)) ** 2).mean(axis=0)
    np.testing.assert_allclose(var, ref, rtol=1e-7)
    naive = (whole ** 2).mean(axis=0) - whole.mean(axis=0) ** 2   # what a plain SUM would give
    assert np.max(np.abs(naive - ref) / ref) > 1e-3


def test_pack_layout():
    recs = D.pack_moments(8, np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    assert recs.dtype == np.float64 and recs.shape == (3, 3)
    assert recs.tolist() == [[-1, 2, 2], [8, 1, 3], [8, 2, 4]]


# =========================================================================== one process

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 4), (4, 3, 2, 3), (3, 3, 2, 2, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_process_is_batchnorm_bit_for_bit(shape, dtype, momentum, rng):
    bn_cls = {2: mb.BatchNorm1d, 3: mb.BatchNorm1d, 4: mb.BatchNorm2d, 5: mb.BatchNorm3d}[len(shape)]
    sync = mb.SyncBatchNorm(3, momentum=momentum, dtype=dtype)
    bn = bn_cls(3, momentum=momentum, dtype=dtype)
    gamma = rng.normal(size=3).astype(dtype)
    for layer in (sync, bn):
        layer.weight.data[...] = gamma
    for step in range(3):
        x = rng.normal(2.0, 3.0, shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        assert np.array_equal(sync(x), bn(x))
        assert np.array_equal(sync.backward(dy), bn.backward(dy))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert np.array_equal(getattr(sync, name), getattr(bn, name)), name
    assert np.array_equal(sync.weight.grad, bn.weight.grad)
    assert np.array_equal(sync.bias.grad, bn.bias.grad)
    sync.eval()
    bn.eval()
    x = rng.normal(size=shape).astype(dtype)
    assert np.array_equal(sync(x), bn(x))


def test_ledger_counts_one_call_per_pass_and_o_of_c_bytes(rng):
    C = 7
    sync = mb.SyncBatchNorm(C, comm=D.Communicator(None))
    ledger = sync.comm.ledger
    for n in (2, 50):
        x = rng.normal(size=(n, C, 3)).astype(np.float32)
        before = ledger.snapshot()
        y = sync(x)
        assert ledger.since(before) == {"allreduce_moments": (1, 3 * (C + 1) * 8)}
        before = ledger.snapshot()
        sync.backward(np.ones_like(y))
        assert ledger.since(before) == {"allreduce_sum": (1, 2 * C * 8)}
    assert ledger.calls() == 4 and "allreduce_moments" in ledger.summary()
    sync.eval()
    before = ledger.snapshot()
    sync.backward(sync(x))
    assert ledger.since(before) == {}


class PretendRanks(D.Communicator):
    """A one-process Communicator that pretends to be rank 0 of ``len(table)`` ranks whose
    layers report the rows of ``table`` to the agreement check (no other collective works)."""

    def __init__(self, table):
        super().__init__(None)
        self.table = np.asarray(table, dtype=np.int64)
        self.size = len(self.table)
        self.checks = 0

    def allgather_ints(self, values, tag=""):
        self.checks += 1
        assert tuple(values) == tuple(self.table[0]), "rank 0's row is this layer's own"
        return self.table.copy()


def test_disagreement_message_groups_the_ranks_by_value():
    table = [(3, 1)] * 70
    table[3] = table[40] = table[41] = (4, 1)
    table[69] = (3, 0)
    comm = PretendRanks(table)
    layer = mb.SyncBatchNorm(3, comm=comm)
    with pytest.raises(ValueError) as info:
        layer(np.ones((2, 3), np.float32))
    message = str(info.value)
    assert ("the 70 ranks disagree on num_features (3 on ranks 0-2, 4-39, 42-69; 4 on ranks 3, 40-41)"
            " and on track_running_stats (False on rank 69; True on ranks 0-68)") in message
    assert "rank 0 has SyncBatchNorm(3, eps=1e-05" in message
    with pytest.raises(ValueError):                   # a caller that tries again asks again
        layer(np.ones((2, 3), np.float32))
    assert comm.checks == 2


def test_agreement_is_checked_once_per_layer_and_communicator():
    comm = PretendRanks([(5, 1)] * 3)
    layer = mb.SyncBatchNorm(5, comm=comm)
    assert layer._check_ranks_agree() is None and layer._check_ranks_agree() is None
    assert comm.checks == 1
    layer.comm = other = PretendRanks([(5, 1), (5, 0)])
    with pytest.raises(ValueError, match=r"track_running_stats \(False on rank 1; True on rank 0\)"):
        layer._check_ranks_agree()
    assert other.checks == 1


def test_input_checks():
    sync = mb.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2-dimensional"):
        sync(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="expected 3 channels"):
        sync(np.ones((4, 2), np.float32))
    with pytest.raises(TypeError):
        sync(np.ones((4, 3), np.int64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync(np.ones((1, 3), np.float32))
    y = sync(np.ones((2, 3, 1, 1, 1, 1), np.float32))        # any rank >= 2
    assert y.shape == (2, 3, 1, 1, 1, 1)
    with pytest.raises(TypeError, match="intra-communicator"):
        mb.SyncBatchNorm(3, comm="world")


def test_empty_batch_in_one_process():
    sync = mb.SyncBatchNorm(2, dtype=np.float64)
    y = sync(np.zeros((0, 2)))
    assert y.shape == (0, 2)
    assert sync.backward(np.zeros((0, 2))).shape == (0, 2)
    assert int(sync.num_batches_tracked) == 0


# =========================================================================== conversion

def test_convert_sync_batchnorm_keeps_everything(rng):
    inner = mb.Sequential(mb.Linear(4, 5, seed=0), mb.BatchNorm1d(5, eps=1e-3, momentum=None))
    model = mb.Sequential(inner, mb.ReLU(), mb.BatchNorm1d(5, affine=False, track_running_stats=False),
                          mb.Linear(5, 2, seed=1))
    bn = inner[1]
    bn.running_mean[...] = rng.normal(size=5)
    bn.eval()
    before = model.state_dict()
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y_before = model(x)
    old_weight, old_mean = bn.weight, bn.running_mean
    converted = mb.convert_sync_batchnorm(model)
    assert converted is model
    new = inner[1]
    assert isinstance(new, mb.SyncBatchNorm) and isinstance(model[2], mb.SyncBatchNorm)
    assert isinstance(model[0][0], mb.Linear) and isinstance(model[3], mb.Linear)
    assert new.weight is old_weight and new.running_mean is old_mean
    assert (new.eps, new.momentum, new.affine, new.track_running_stats, new.training) == \
        (1e-3, None, True, True, False)
    assert (model[2].affine, model[2].track_running_stats, model[2].training) == (False, False, True)
    assert list(model.state_dict()) == list(before)
    assert all(np.array_equal(model.state_dict()[k], v) for k, v in before.items())
    assert np.array_equal(model(x), y_before)
    assert new.comm is model[2].comm                  # one communicator, one ledger


def test_convert_a_bare_batchnorm_returns_the_new_layer():
    bn = mb.BatchNorm2d(3, dtype=np.float64)
    sync = mb.convert_sync_batchnorm(bn)
    assert isinstance(sync, mb.SyncBatchNorm) and sync.weight is bn.weight
    assert sync.running_var.dtype == np.float64
    assert mb.convert_sync_batchnorm(sync) is sync


def test_allreduce_gradients_in_one_process(rng):
    model = mb.Sequential(mb.Linear(3, 2, seed=0), mb.BatchNorm1d(2))
    model(rng.normal(size=(4, 3)).astype(np.float32))
    model.backward(np.ones((4, 2), np.float32))
    grads = [p.grad.copy() for p in model.parameters()]
    comm = D.Communicator(None)
    D.allreduce_gradients(model, comm=comm)
    assert all(np.array_equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert comm.ledger.calls() == 1
    model.zero_grad()
    D.allreduce_gradients(model, comm=comm, average=False)
    assert all(p.grad is None for p in model.parameters())


# =========================================================================== buffers

def test_forced_host_staging_with_numpy_arrays(monkeypatch, rng):
    comm = D.Communicator(None)
    buf = rng.normal(size=10)
    monkeypatch.delenv("MINIBN_MPI_HOST_STAGING", raising=False)
    assert comm.buffer_path(buf) == "host"
    direct = comm.allreduce_sum(buf)
    monkeypatch.setenv("MINIBN_MPI_HOST_STAGING", "1")
    assert D.host_staging_forced() and not D.cuda_aware()
    assert comm.buffer_path(buf) == "staged"
    staged = comm.allreduce_sum(buf)
    assert staged is not buf and np.array_equal(staged, direct) and np.array_equal(staged, buf)
    assert [e.path for e in comm.ledger.log] == ["host", "staged"]


def test_cuda_support_query_answers_a_bool():
    assert isinstance(D.library_cuda_support(), bool)
    assert isinstance(D.cuda_aware(), bool)


@pytest.mark.gpu
def test_cupy_arrays_give_the_numpy_result():
    cupy = pytest.importorskip("cupy")
    if not mb.backend.cupy_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, (8, 4, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    host = mb.SyncBatchNorm(4)
    y_host, dx_host = host(x), host.backward(dy)
    mb.set_backend("cupy")
    try:
        dev = mb.SyncBatchNorm(4)
        y_dev = dev(cupy.asarray(x))
        dx_dev = dev.backward(cupy.asarray(dy))
    finally:
        mb.set_backend("numpy")
    np.testing.assert_allclose(cupy.asnumpy(y_dev), y_host, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(dx_dev), dx_host, rtol=1e-5, atol=1e-5)
    paths = [e.path for e in dev.comm.ledger.log][-2:]
    assert paths[0] == "staged" and paths[1] == ("device" if D.cuda_aware() else "staged")


# =========================================================================== without mpi4py

def test_import_works_without_mpi4py_and_syncbn_says_what_to_install():
    code = textwrap.dedent("""
        import sys
        sys.modules["mpi4py"] = None          # as if it were not installed
        import minibn
        bn = minibn.BatchNorm1d(3)            # everything else works
        try:
            minibn.SyncBatchNorm(3)
        except ImportError as exc:
            print("ImportError:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "ImportError:" in out.stdout and "pip install 'minibn[mpi]'" in out.stdout


# =========================================================================== faults

def run_job(tmp_path, nprocs, script, timeout=60):
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([mpiexec(), "-n", str(nprocs), sys.executable, "-m", "mpi4py", str(path)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@needs_mpi
def test_a_failing_rank_ends_the_job_instead_of_hanging(tmp_path):
    out = run_job(tmp_path, 2, """
        import numpy as np
        import minibn as mb
        from mpi4py import MPI
        sync = mb.SyncBatchNorm(3)
        if MPI.COMM_WORLD.Get_rank() == 1:
            raise RuntimeError("deliberate failure on rank 1")
        sync(np.ones((4, 3), np.float32))     # rank 0 waits here for rank 1
        print("rank 0 finished", flush=True)
    """)
    assert out.returncode != 0
    assert "deliberate failure on rank 1" in out.stderr
    assert "rank 0 finished" not in out.stdout


@needs_mpi
@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_ranks_that_disagree_on_channels_all_raise_and_carry_on(tmp_path, nprocs):
    """Rank 0 builds SyncBatchNorm(4), the others SyncBatchNorm(3).  Every rank catches the
    same ValueError, then all run further collectives; the job ends normally (a hang would
    end in the subprocess timeout, a truncated message in MPI's abort)."""
    out = run_job(tmp_path, nprocs, """
        import os
        import numpy as np
        import minibn as mb
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        rank = world.Get_rank()
        report = open(os.path.join(os.path.dirname(__file__), f"rank{rank}.txt"), "w")
        C = 3 + (rank == 0)                   # rank 0 was built with one channel more
        layer = mb.SyncBatchNorm(C)
        try:
            layer(np.ones((4, C), np.float32))
            print("got a result", file=report, flush=True)
        except ValueError as exc:
            print(f"raised: {exc}", file=report, flush=True)
        good = mb.SyncBatchNorm(3)            # the job goes on: a layer the ranks agree on
        y = good(np.full((2, 3), float(rank), np.float32))
        print(f"carried on: {world.allreduce(1)} ranks, y[0, 0] = {y[0, 0]:.6f}", file=report)
        report.close()
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    others = "rank 1" if nprocs == 2 else f"ranks 1-{nprocs - 1}"
    expected = f"raised: SyncBatchNorm: the {nprocs} ranks disagree on num_features (3 on {others}; 4 on rank 0)"
    for rank in range(nprocs):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 2 and lines[0].startswith(expected), lines
        assert f"rank {rank} has SyncBatchNorm({4 if rank == 0 else 3}," in lines[0]
        # rank r of P holds r in both rows: the global mean is (P - 1) / 2 and y = (r - mean) / std
        want = (rank - (nprocs - 1) / 2) / np.sqrt(np.var(np.arange(nprocs)) + 1e-5)
        assert lines[1] == f"carried on: {nprocs} ranks, y[0, 0] = {want:.6f}"


# =========================================================================== the collective timeout

from minibn import comm as C       # noqa: E402  (the timeout's pieces, tested without MPI)


@pytest.mark.parametrize("text, seconds", [("", C.DEFAULT_TIMEOUT), ("5", 5.0), (" 0.25 ", 0.25),
                                           ("0", None), ("off", None), ("OFF", None),
                                           ("inf", None)])
def test_timeout_from_the_environment(monkeypatch, text, seconds):
    monkeypatch.setenv(C.TIMEOUT_ENV, text)
    assert C.collective_timeout(None) == seconds


@pytest.mark.parametrize("text", ["five", "-1", "nan", "5s"])
def test_a_bad_timeout_in_the_environment_names_the_variable(monkeypatch, text):
    monkeypatch.setenv(C.TIMEOUT_ENV, text)
    with pytest.raises(ValueError, match=f"MINIBN_COLLECTIVE_TIMEOUT={text!r}"):
        C.collective_timeout(None)


def test_the_timeout_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(C.TIMEOUT_ENV, "7")
    assert C.collective_timeout(2) == 2.0
    assert C.collective_timeout(0) is None and C.collective_timeout(float("inf")) is None
    with pytest.raises(ValueError, match=r"timeout=-3.*>= 0 seconds"):
        C.collective_timeout(-3)
    with pytest.raises(ValueError, match="timeout=nan"):
        C.collective_timeout(float("nan"))
    for bad in ("5", True, [5]):
        with pytest.raises(TypeError, match="timeout must be a number of seconds"):
            C.collective_timeout(bad)


def test_syncbatchnorm_takes_the_timeout_of_its_communicator(monkeypatch):
    monkeypatch.setenv(C.TIMEOUT_ENV, "off")
    world = D.Communicator(None)
    assert world.timeout is None and "timeout=none" in repr(world)
    sync = mb.SyncBatchNorm(3, comm=D.Communicator(None, timeout=5))
    assert sync.comm.timeout == 5.0 and "timeout=5 s" in repr(sync.comm)
    x = np.random.default_rng(0).standard_normal((4, 3))
    y = sync(x)                                          # one rank: the polled path completes
    np.testing.assert_array_equal(y, mb.BatchNorm1d(3, dtype=np.float64)(x))
    assert sync.comm.ledger.calls("allreduce_moments") == 1


def test_the_timeout_message_says_what_where_and_why():
    line = C.collective_timeout_message("allreduce_moments", "SyncBatchNorm.forward", 1, 4,
                                        5.0312, 5.0)
    assert "\n" not in line
    for words in ("collective timeout", "allreduce_moments", "SyncBatchNorm.forward",
                  "rank 1 of 4", "within 5 s", "waited 5.0 s", "a rank in eval mode",
                  "a rank that died or raised", "ranks that disagree", "MPI_Abort",
                  "MINIBN_COLLECTIVE_TIMEOUT"):
        assert words in line, words


class FakeClock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


class Request:
    def __init__(self, done_after):
        self.tests, self.done_after = 0, done_after

    def Test(self):
        self.tests += 1
        return self.tests > self.done_after


def test_polling_backs_off_and_stops_at_the_deadline():
    clock = FakeClock()
    never = Request(done_after=10 ** 9)
    completed, waited = C.wait_until_complete(never, 2.0, clock=clock, sleep=clock.sleep)
    assert not completed and waited == pytest.approx(2.0)
    assert clock.sleeps[:2] == [C.FIRST_SLEEP, 2 * C.FIRST_SLEEP]   # after the spin: sleeps, growing
    assert max(clock.sleeps) == C.LONGEST_SLEEP                  # capped: a peer is never kept waiting long
    assert never.tests == C.SPIN_POLLS + len(clock.sleeps) + 1     # a last poll at the deadline
    assert never.tests < 2.0 / C.LONGEST_SLEEP + C.SPIN_POLLS + 50   # ~1 poll per ms: an idle wait


def test_polling_returns_as_soon_as_the_request_completes():
    clock = FakeClock()
    soon = Request(done_after=3)                      # within the spin: no sleep at all
    assert C.wait_until_complete(soon, 2.0, clock=clock, sleep=clock.sleep) == (True, 0.0)
    assert soon.tests == 4 and clock.sleeps == []
    later = Request(done_after=C.SPIN_POLLS + 5)        # five sleeps after the spin
    completed, waited = C.wait_until_complete(later, 2.0, clock=clock, sleep=clock.sleep)
    assert completed and len(clock.sleeps) == 5 and waited == pytest.approx(sum(clock.sleeps))


@pytest.mark.slow
@needs_mpi
def test_a_rank_in_eval_while_the_other_trains_ends_with_the_timeout_message(tmp_path):
    """The issue's case: rank 0 switched to eval, rank 1 still trains and waits in its forward's
    collective.  With MINIBN_COLLECTIVE_TIMEOUT=5 the job ends (well within the hard 30 s
    limit of this test) with the timeout's line, naming the collective and the layer."""
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent("""
        import numpy as np
        import minibn as mb
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
        sync = mb.SyncBatchNorm(3)
        x = np.ones((4, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None]
        sync.backward(np.ones_like(sync(x)))         # one step together
        if rank == 0:
            sync.eval()                               # ... then rank 0 alone switches to eval
        sync(x)
        print(f"rank {rank} returned from its forward", flush=True)
    """))
    env = dict(os.environ, **{C.TIMEOUT_ENV: "5"})
    out = subprocess.run([mpiexec(), "-n", "2", sys.executable, str(path)], capture_output=True,
                         text=True, timeout=30, cwd=REPO, env=env)
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if "minibn: collective timeout:" in ln]
    assert len(lines) == 1, out.stderr[-3000:]
    assert ("allreduce_moments for SyncBatchNorm.forward on rank 1 of 2 did not complete "
            "within 5 s") in lines[0]
    assert "rank 1 returned" not in out.stdout
