"""Under mpiexec: lesson 5's data-parallel training, and the simulated ranks of the s5 figure.

* Lesson 5 run on P real ranks (SyncBatchNorm + allreduce_gradients) must
  reproduce a one-process training run on the global batch, written here
  independently, to float64 round-off; per-rank BatchNorm must not.
* The in-process simulation behind figure ``s5_small_batch_statistics`` must
  give the statistics that real ranks running SyncBatchNorm compute.
"""
from __future__ import annotations

import contextlib
import io
import os
import runpy

import numpy as np
import pytest

from syncbn_helpers import agree, check_close, rank_size

import minibn as mb

LESSON5 = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "lessons", "05_sync_batchnorm.py")


def reference_training(X, Y, lr):
    """One process, the global batch; the same architecture and initial weights as the lesson."""
    model = mb.Sequential(mb.Linear(X.shape[2], 8, seed=1, dtype=np.float64),
                          mb.BatchNorm1d(8, dtype=np.float64), mb.ReLU(),
                          mb.Linear(8, int(Y.max()) + 1, seed=2, dtype=np.float64))
    losses = []
    for t in range(X.shape[0]):
        logits = model(X[t])
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        n = len(Y[t])
        losses.append(float(-np.log(p[np.arange(n), Y[t]]).mean()))
        g = p.copy()
        g[np.arange(n), Y[t]] -= 1.0
        model.zero_grad()
        model.backward(g / n)
        for prm in model.parameters():
            prm.data -= lr * prm.grad
    return np.concatenate([p.data.ravel() for p in model.parameters()]), losses


def test_lesson5_data_parallel_training_equals_the_global_batch():
    rank, P = rank_size()
    if 48 % P:
        pytest.skip("lesson 5 splits a batch of 48 evenly")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        g = runpy.run_path(LESSON5, run_name="__main__")
    params, losses = reference_training(g["X"], g["Y"], g["LR"])
    res = g["results"]
    failures = []
    check_close(failures, "lesson's global-batch run", res["global"]["params"], params, 1e-13)
    if P == 1:
        check_close(failures, "SyncBN on one rank", res["sync_one_rank"]["params"], params, 1e-13)
    else:
        check_close(failures, "SyncBN params", res["sync"]["params"], params, 1e-12)
        check_close(failures, "SyncBN losses", res["sync"]["losses"], losses, 1e-12)
        gap = np.max(np.abs(res["per_rank"]["params"] - params))
        if not gap > 1e-4:
            failures.append(f"per-rank BN matched the global batch too well ({gap:.3g})")
        if rank == 0 and "max |SyncBN params - global-batch params|" not in out.getvalue():
            failures.append("rank 0 did not print the comparison")
    agree(failures)


@pytest.mark.parametrize("per_rank", [2, 5])
def test_simulated_ranks_of_the_small_batch_figure_equal_real_ranks(per_rank):
    from minibn.figures import s5_sync_batchnorm as s5
    rank, P = rank_size()
    mu, sd = s5.population()
    x = s5.draw_global_batch(np.random.default_rng([1, per_rank]), P, per_rank, mu, sd)
    local, (N, sim_mean, sim_var) = s5.split_statistics(x, P)
    mine = x[rank * per_rank:(rank + 1) * per_rank]
    sync = mb.SyncBatchNorm(len(mu), momentum=1.0, dtype=np.float64)
    sync(mine)
    plain = mb.BatchNorm1d(len(mu), momentum=1.0, dtype=np.float64)    # per-rank BN, no communication
    plain(mine)
    failures = []
    n_real, mean_real, var_real = sync.last_moments
    if n_real != N:
        failures.append(f"global count {n_real} != simulated {N}")
    check_close(failures, "global mean", mean_real, sim_mean, 1e-13)
    check_close(failures, "global var", var_real, sim_var, 1e-13)
    check_close(failures, "per-rank mean", plain.running_mean, local[rank][1], 1e-14)
    check_close(failures, "per-rank var (unbiased)", plain.running_var,
                local[rank][2] * per_rank / (per_rank - 1), 1e-14)
    agree(failures)
