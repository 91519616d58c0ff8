"""Lessons 5 and 6: run alone and under mpiexec, their printed numbers checked.

Numbers are recomputed here with plain NumPy (the forward pass of the
lesson-5 network, the article's section-6 statistics), and the runs under
mpiexec are compared with the one-process runs.
"""
from __future__ import annotations

import contextlib
import io
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lesson_utils import REPO, lesson_path, matches_printed, parse_pairs, parse_values, run_lesson


def mpiexec():
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return path if os.path.exists(path) else shutil.which("mpiexec")


def run_lesson_mpi(number, nprocs, timeout=240):
    if mpiexec() is None:
        pytest.skip("no mpiexec")
    proc = subprocess.run([mpiexec(), "-n", str(nprocs), sys.executable, "-m", "mpi4py",
                           lesson_path(number)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def lesson_globals(number):
    """Run a lesson in this process (one rank) and return its variables."""
    with contextlib.redirect_stdout(io.StringIO()):
        return runpy.run_path(lesson_path(number), run_name="__main__")


def loss_table(text):
    """``{step: (global, sync or None, per_rank)}`` from lesson 5's table."""
    rows = {}
    for line in text.splitlines():
        tok = line.split()
        if len(tok) >= 4 and tok[0].isdigit() and all(c in "0123456789.-" for c in tok[1]):
            sync = float(tok[2]) if len(tok) == 4 else None
            rows[int(tok[0])] = (float(tok[1]), sync, float(tok[-1]))
    return rows


def softmax_ce(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


def forward_loss(model, x, y):
    """The lesson's network in plain NumPy, with training-mode batch norm on ``x``'s own statistics."""
    lin1, bn, _, lin2 = list(model)
    h = x @ lin1.weight.data.T + lin1.bias.data
    mu = h.mean(axis=0)
    var = ((h - mu) ** 2).mean(axis=0)
    h = bn.weight.data * (h - mu) / np.sqrt(var + bn.eps) + bn.bias.data
    return softmax_ce(np.maximum(h, 0) @ lin2.weight.data.T + lin2.bias.data, y)


# =========================================================================== lesson 5

@pytest.fixture(scope="module")
def lesson5_plain():
    return run_lesson(5)


def test_lesson5_alone_prints_the_right_numbers(lesson5_plain):
    g = lesson_globals(5)
    X, Y, model = g["X"], g["Y"], g["make_model"]()
    values = parse_values(lesson5_plain)
    lin1 = model[0]
    h0 = X[0] @ lin1.weight.data.T + lin1.bias.data
    printed = values["global mean of the BN input (channels 0-3)"]
    assert all(matches_printed(v, f"{p:.4f}") for v, p in zip(h0.mean(axis=0)[:4], printed))
    for r in range(4):
        part = h0[12 * r:12 * (r + 1)]
        assert np.allclose(values[f"rank {r} local mean (channels 0-3)"], part.mean(axis=0)[:4], atol=5e-5)
        assert np.allclose(values[f"rank {r} local var (channels 0-3)"], part.var(axis=0)[:4], atol=5e-5)
    table = loss_table(lesson5_plain)
    assert sorted(table) == list(range(6))
    assert table[0][0] == pytest.approx(forward_loss(model, X[0], Y[0]), abs=1e-14)
    per_rank0 = np.mean([forward_loss(model, X[0][12 * r:12 * (r + 1)], Y[0][12 * r:12 * (r + 1)])
                         for r in range(4)])
    assert table[0][2] == pytest.approx(per_rank0, abs=1e-14)
    assert values["max |SyncBN params on 1 rank - global-batch params|"] == 0.0
    assert values["max |per-rank BN params - global-batch params|"] > 1e-3
    assert values["max |merged var - global var|"] < 1e-12
    C = 8
    assert f"= {3 * (C + 1) * 8} bytes" in lesson5_plain and f"= {2 * C * 8} bytes" in lesson5_plain


@pytest.mark.slow
def test_lesson5_under_mpiexec_4_matches_the_global_batch(lesson5_plain):
    out = run_lesson_mpi(5, 4)
    values = parse_values(out)
    assert values["ranks"] == 4.0
    assert values["max |SyncBN params - global-batch params|"] < 1e-12
    assert values["max |per-rank BN params - global-batch params|"] > 1e-3
    assert values["max |simulated per-rank params - real per-rank params|"] < 1e-12
    alone, ranked = loss_table(lesson5_plain), loss_table(out)
    for step in range(6):
        g1, _, per_rank_sim = alone[step]
        g4, sync4, per_rank_real = ranked[step]
        assert g4 == g1                                   # the reference run, printed the same
        assert abs(sync4 - g1) < 1e-12                    # SyncBN on 4 ranks = the global batch
        assert abs(per_rank_real - per_rank_sim) < 1e-12  # real per-rank BN = simulated replicas
        assert abs(per_rank_real - g1) > 1e-5 or step == 0
    # ledger: 6 steps, 1 forward call (216 bytes) + 1 backward (128) + 1 gradient call (840) each
    assert "allreduce_moments       6 call(s)       1296 bytes" in out
    assert "allreduce_sum          12 call(s)       5808 bytes" in out


# =========================================================================== lesson 6

@pytest.fixture(scope="module")
def lesson6_plain():
    return run_lesson(6)


def test_lesson6_alone_prints_the_articles_statistics(lesson6_plain):
    shards = lesson_globals(6)["shards"]
    values = parse_values(lesson6_plain)
    x = np.concatenate(shards)
    n = len(x)
    assert n == 96 and values["total batch"] == 96.0

    def printed(name, want, decimals=8):
        """The printed vector is ``want`` rounded to ``decimals`` places."""
        got = np.asarray(values[name], dtype=np.float64)
        want = np.ravel(want)
        assert got.shape == want.shape, name
        assert np.all(np.abs(got - want) <= 0.5 * 10.0 ** -decimals * (1 + 1e-6)), (name, got, want)

    for g, s in enumerate(shards):
        mu_g = s.mean(axis=0)
        printed(f"rank {g}: mu_local", mu_g)
        printed(f"rank {g}: var_local", ((s - mu_g) ** 2).mean(axis=0))
    mu = x.mean(axis=0)
    var = ((x - mu) ** 2).mean(axis=0)
    for name in ("mu_global", "merged by the Allreduce: mu_global"):
        printed(name, mu)
    for name in ("var_global", "merged by the Allreduce: var_global"):
        printed(name, var)
    within = np.mean([((s - s.mean(axis=0)) ** 2).mean(axis=0) for s in shards], axis=0)
    between = np.mean([(s.mean(axis=0) - mu) ** 2 for s in shards], axis=0)
    printed("naive variance", within)
    printed("between-rank term", between)
    printed("naive + between-rank term", var)
    printed("literal prose", within * 3 / 96)
    assert np.all(within < var)                     # the naive average is too small here
    printed("running_mean", 0.1 * mu)
    printed("running_var", 0.9 + 0.1 * var * 96 / 95)
    printed("SyncBatchNorm.running_var", 0.9 + 0.1 * var * 96 / 95)
    assert values["ledger: allreduce_moments bytes"] == 72.0


@pytest.mark.slow
def test_lesson6_prints_the_same_numbers_under_mpiexec_3(lesson6_plain):
    out = run_lesson_mpi(6, 3)
    alone, ranked = dict(parse_pairs(lesson6_plain)), dict(parse_pairs(out))
    assert ranked["mode"] == "3 real ranks (mpiexec)"
    assert ranked["running statistics identical on all 3 ranks"] == "True"
    assert ranked["ledger: allreduce_moments calls"] == 1.0
    compared = 0
    for name, value in alone.items():
        if name == "mode" or name not in ranked:
            continue
        other = ranked[name]
        if isinstance(value, list):
            assert np.allclose(value, other, rtol=0, atol=2e-8), name
        elif isinstance(value, float):
            assert abs(value - other) <= 2e-8 + 1e-12 * abs(value), name
        else:
            assert value == other, name
        compared += 1
    assert compared >= 25
    sends = [line for line in lesson6_plain.splitlines() if " sends " in line]
    assert sends and sends == [line for line in out.splitlines() if " sends " in line]


def test_lesson6_refuses_other_rank_counts():
    if mpiexec() is None:
        pytest.skip("no mpiexec")
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", lesson_path(6)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "mpiexec -n 3" in proc.stdout + proc.stderr
