# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 6: running statistics on several GPUs
#
# Section 6 of the article, with its example: **3 GPUs x 32 samples = 96**.  Each rank computes
# the statistics of its own 32 samples; one all-reduce turns them into the statistics of all 96;
# the running statistics are updated with those global statistics, identically on every rank.
#
# Run it two ways; it prints the same numbers both times:
#
#     python lessons/06_multi_gpu_running_stats.py                          # ranks simulated
#     mpiexec -n 3 python -m mpi4py lessons/06_multi_gpu_running_stats.py   # three real ranks
#
# Alone, the three ranks are simulated in one process: their local statistics are merged with the
# same merge MPI runs (and with the article's formulas).  Under `mpiexec`, each rank runs a real
# `SyncBatchNorm` on its own 32 samples, and rank 0 prints (the local statistics of the other
# ranks are gathered to rank 0 for printing only; SyncBatchNorm itself never gathers).

# %%
import numpy as np

import minibn as mb
from minibn import distributed as D
from minibn.comm import merge_moment_records
from minibn.figures import show as show_figure

try:
    from mpi4py import MPI
    WORLD = MPI.COMM_WORLD
except ImportError:
    WORLD = None
SIZE = WORLD.Get_size() if WORLD is not None else 1
RANK = WORLD.Get_rank() if WORLD is not None else 0
RANKS, PER_RANK, C, MOMENTUM = 3, 32, 2, 0.1
if SIZE not in (1, RANKS):
    raise SystemExit(f"lesson 6 is the article's 3-GPU example: run it with python (ranks simulated) "
                     f"or under mpiexec -n {RANKS}, not with {SIZE} ranks")
REAL = SIZE == RANKS


def say(*args):
    if RANK == 0:
        print(*args, flush=True)


def fmt(v, d=8):
    return "[" + ", ".join(f"{float(a):.{d}f}" for a in np.ravel(v)) + "]"


say(f"mode = {'3 real ranks (mpiexec)' if REAL else '3 ranks simulated in one process'}")

# %% [markdown]
# ## The data
#
# Two channels.  To make the example telling, the three GPUs do not see identically distributed
# data: each rank's samples come from a source with its own mean (this happens whenever data are
# not shuffled across GPUs, e.g. one shard per source).  Every rank can rebuild every shard from
# the seed; rank g uses shard g only.

# %%
rng = np.random.default_rng(6)
source_means = np.array([[1.0, -2.0], [2.5, 0.0], [4.0, 1.5]])
source_stds = np.array([[1.0, 0.5], [1.5, 0.5], [0.8, 1.0]])
shards = [source_means[g] + source_stds[g] * rng.standard_normal((PER_RANK, C)) for g in range(RANKS)]
everything = np.concatenate(shards)
say(f"total batch = {RANKS} x {PER_RANK} = {everything.shape[0]}")

# %% [markdown]
# ## Step 1: local statistics
#
# Each GPU computes, per channel, the mean and the (biased) variance of its own 32 samples:
#
#     mu_local,g  = (1/32) sum_i x_i          var_local,g = (1/32) sum_i (x_i - mu_local,g)^2

# %%
if REAL:
    mine = D.local_moments(shards[RANK])
    local = WORLD.gather(mine, root=0)          # for printing only
    local = WORLD.bcast(local, root=0)
else:
    local = [D.local_moments(s) for s in shards]
for g, (n_g, mu_g, var_g) in enumerate(local):
    say(f"rank {g}: n_g = {n_g}")
    say(f"rank {g}: mu_local = {fmt(mu_g)}")
    say(f"rank {g}: var_local = {fmt(var_g)}")

# %% [markdown]
# ## Step 2: the all-reduce
#
# SyncBatchNorm packs what each rank contributes into one buffer of `C + 1` records
# `(n, mean, var)`: a header `(-1, C, C)` (so ranks that disagree on C are caught) and one record
# per channel.  One Allreduce combines the buffers with a merge operation that applies the
# article's formulas to two parts at a time; every rank receives the merged buffer.

# %%
packed = [D.pack_moments(*s) for s in local]
for g, rec in enumerate(packed):
    say(f"rank {g} sends {rec.tolist()}")
say(f"payload per rank = 3 * (C + 1) float64 = 3 * {C + 1} * 8 = {packed[0].nbytes} bytes")

if REAL:
    layer = mb.SyncBatchNorm(C, momentum=MOMENTUM, dtype=np.float64)
    layer(shards[RANK])
    N, g_mean, g_var = layer.last_moments
    calls, nbytes = layer.comm.ledger.totals["allreduce_moments"]
    say(f"ledger: allreduce_moments calls = {calls}")
    say(f"ledger: allreduce_moments bytes = {nbytes}")
    blobs = WORLD.allgather(layer.running_mean.tobytes() + layer.running_var.tobytes())
    same = all(b == blobs[0] for b in blobs)
else:
    merged = packed[0]
    for rec in packed[1:]:                    # what the Allreduce computes, done in one process
        merged = merge_moment_records(rec, merged)
    N, g_mean, g_var = D.unpack_moments(merged, C)
    say("ledger: allreduce_moments calls = 1")
    say(f"ledger: allreduce_moments bytes = {packed[0].nbytes}")

# %% [markdown]
# ## Step 3: the global mean and variance, by the article's formulas
#
#     mu_global  = sum_g mu_local,g * batch_size_g / total_batch_size
#     var_global = sum_g (var_local,g + (mu_local,g - mu_global)^2) * batch_size_g / total_batch_size

# %%
counts = np.array([s[0] for s in local], dtype=np.float64)
means = np.stack([s[1] for s in local])
variances = np.stack([s[2] for s in local])
total = int(counts.sum())
mu = (means * counts[:, None]).sum(axis=0) / total
say(f"total_batch_size = {' + '.join(str(int(c)) for c in counts)} = {total}")
say(f"mu_global = (32 * mu_0 + 32 * mu_1 + 32 * mu_2) / 96 = {fmt(mu)}")
for g in range(RANKS):
    term = (variances[g] + (means[g] - mu) ** 2) * counts[g]
    say(f"rank {g}: (var_local + (mu_local - mu_global)^2) * 32 = {fmt(term)}")
var = ((variances + (means - mu) ** 2) * counts[:, None]).sum(axis=0) / total
say(f"var_global = sum of the three terms / 96 = {fmt(var)}")
say(f"merged by the Allreduce: mu_global = {fmt(g_mean)}")
say(f"merged by the Allreduce: var_global = {fmt(g_var)}")
two_pass_mu = everything.mean(axis=0)
two_pass_var = ((everything - two_pass_mu) ** 2).mean(axis=0)
say(f"two passes over all 96 samples: mean = {fmt(two_pass_mu)}")
say(f"two passes over all 96 samples: var = {fmt(two_pass_var)}")
say(f"max |Allreduce var - article formula var| = {np.max(np.abs(g_var - var)):.2e}")

# %% [markdown]
# ## Averaging the local variances is not enough
#
# The article's prose says the all-reduce works by "summing the local means and variances" and
# "dividing by the total number of samples".  Its *formula* is right and the prose is not: the
# local variances must be weighted by the batch sizes **and** each rank adds its between-rank term
# `(mu_local,g - mu_global)^2`, the spread of its mean around the global mean.  Without that term
# the variance is too small whenever the ranks' means differ:

# %%
naive = (variances * counts[:, None]).sum(axis=0) / total
between = (((means - mu) ** 2) * counts[:, None]).sum(axis=0) / total
say(f"naive variance = sum_g var_local,g * 32 / 96 = {fmt(naive)}")
say(f"between-rank term = sum_g (mu_local,g - mu_global)^2 * 32 / 96 = {fmt(between)}")
say(f"naive + between-rank term = {fmt(naive + between)}")
say(f"relative error of the naive variance = {fmt((naive - var) / var, 4)}")
say(f"literal prose = sum_g var_local,g / 96 = {fmt(variances.sum(axis=0) / total)}")
naive_error = (naive - var) / var
say()
say(f"Finding: the article's formula is right and its prose is not: without the between-rank term "
    f"the variance comes out {fmt(naive)} instead of {fmt(var)} ({fmt(-naive_error * 100, 1)} percent "
    f"too small), and the literal prose (local variances summed, then divided by {total}) gives "
    f"{fmt(variances.sum(axis=0) / total)}.")
if RANK == 0:
    from minibn.figures import s6_multi_gpu
    spread = s6_multi_gpu.naive_variance_data()
    i3 = spread["spreads"].index(3.0)
    print(f"Finding: over {spread['trials']} draws per spread, the formula's variance is exact "
          f"(worst relative error {max(spread['max_merge_error']):.1e}), while the naive average "
          f"falls to {spread['naive_ratio'][i3]:.3f} of the true variance when the ranks' means are 3 "
          f"within-rank std apart (theory: {spread['theory_naive_ratio'][i3]:.3f}).")
    show_figure("s6_naive_variance", s6_multi_gpu.naive_variance_figure()[0], spread)

# %% [markdown]
# ## Step 4: the running statistics
#
# Every rank updates its running statistics with the *global* statistics (momentum alpha = 0.1,
# the weight of the new batch; the running statistics start at mean 0 and variance 1).  Like
# PyTorch, minibn uses the unbiased global variance, `var_global * 96 / 95`, in the update:
#
#     running_mean = (1 - alpha) * 0 + alpha * mu_global
#     running_var  = (1 - alpha) * 1 + alpha * var_global * 96 / 95

# %%
rm = (1 - MOMENTUM) * 0.0 + MOMENTUM * mu
rv = (1 - MOMENTUM) * 1.0 + MOMENTUM * var * total / (total - 1)
say(f"running_mean = 0.9 * 0 + 0.1 * mu_global = {fmt(rm)}")
say(f"running_var = 0.9 * 1 + 0.1 * var_global * 96 / 95 = {fmt(rv)}")
say(f"(with the biased variance, as the article writes it: running_var = "
    f"{fmt((1 - MOMENTUM) + MOMENTUM * var)})")
if REAL:
    say(f"SyncBatchNorm.running_mean = {fmt(layer.running_mean)}")
    say(f"SyncBatchNorm.running_var = {fmt(layer.running_var)}")
    say(f"running statistics identical on all 3 ranks = {same}")
else:
    bn = mb.BatchNorm1d(C, momentum=MOMENTUM, dtype=np.float64)     # one process, all 96 samples
    bn(everything)
    say(f"SyncBatchNorm.running_mean = {fmt(bn.running_mean)}")
    say(f"SyncBatchNorm.running_var = {fmt(bn.running_var)}")
    say("(simulated: a BatchNorm1d on all 96 samples, which SyncBatchNorm on 3 ranks equals)")
