# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 5: batch normalization on several GPUs (SyncBatchNorm)
#
# Section 5 of the article.  In data-parallel training each GPU (each *rank*, one process per GPU)
# holds a slice of the global batch.  Plain BatchNorm then normalizes every slice with the
# statistics of that slice only: the ranks use *different* statistics for the same layer, and
# each estimate comes from a small batch.  SyncBatchNorm computes the statistics of the whole
# global batch instead, so that P ranks together compute exactly what one process would compute
# on the concatenated batch.
#
# This lesson trains one small network three ways on the same data and compares them:
#
# 1. **one process, global batch**: the reference;
# 2. **P ranks with SyncBatchNorm** (`convert_sync_batchnorm`) and gradient averaging
#    (`allreduce_gradients`): it must agree with 1 to float64 round-off;
# 3. **P ranks with plain per-rank BatchNorm**: what you get without synchronization.
#
# Run it two ways:
#
#     python lessons/05_sync_batchnorm.py                          # one process
#     mpiexec -n 4 python -m mpi4py lessons/05_sync_batchnorm.py   # four real ranks
#
# Alone, it runs 1, simulates 3 with four model replicas in one process, and shows with a
# simulated merge what 2 would compute.  Under `mpiexec` it runs all three for real (rank 0
# prints).  `python -m mpi4py` makes an uncaught exception on any rank end the whole job instead
# of leaving the other ranks waiting forever in a collective.

# %%
import numpy as np

import minibn as mb
from minibn import distributed as D
from minibn.figures import show as show_figure

try:
    from mpi4py import MPI
    WORLD = MPI.COMM_WORLD
except ImportError:                       # the lesson still runs its one-process parts
    WORLD = None
RANK = WORLD.Get_rank() if WORLD is not None else 0
SIZE = WORLD.Get_size() if WORLD is not None else 1
SIMULATED_RANKS = 4                       # replicas simulated in one process when running alone


def say(*args):
    """Print on rank 0 only (every rank computes the same thing)."""
    if RANK == 0:
        print(*args, flush=True)


def fmt(v, d=6):
    return "[" + ", ".join(f"{float(a):.{d}f}" for a in np.ravel(v)) + "]"


say(f"ranks = {SIZE}" + ("   (one process: the ranks are simulated below)" if SIZE == 1 else ""))

# %% [markdown]
# ## 1. Data and model
#
# A synthetic 3-class problem with 6 features whose scales and offsets differ (so normalization
# matters).  Every step uses a fresh global batch of 48 samples; with P ranks, rank r takes the
# r-th contiguous slice of 48 / P samples.  The model is `Linear(6, 8) -> BatchNorm1d(8) -> ReLU
# -> Linear(8, 3)` in float64, so that "agree to round-off" means about 1e-15.

# %%
FEATURES, HIDDEN, CLASSES = 6, 8, 3
GLOBAL_BATCH, STEPS, LR = 48, 6, 0.2

data_rng = np.random.default_rng(5)
centers = data_rng.normal(0.0, 2.0, (CLASSES, FEATURES))
offsets = data_rng.uniform(-5.0, 5.0, FEATURES)
scales = data_rng.uniform(0.5, 3.0, FEATURES)
Y = data_rng.integers(0, CLASSES, (STEPS, GLOBAL_BATCH))
X = offsets + scales * (centers[Y] + data_rng.standard_normal((STEPS, GLOBAL_BATCH, FEATURES)))


def make_model():
    """The same initial weights every time (fixed seeds)."""
    return mb.Sequential(mb.Linear(FEATURES, HIDDEN, seed=1, dtype=np.float64),
                         mb.BatchNorm1d(HIDDEN, dtype=np.float64),
                         mb.ReLU(),
                         mb.Linear(HIDDEN, CLASSES, seed=2, dtype=np.float64))


def shard(a, rank, size):
    """Rank ``rank``'s contiguous slice of a global batch."""
    if GLOBAL_BATCH % size:
        raise SystemExit(f"this lesson splits {GLOBAL_BATCH} samples evenly; use a rank count "
                         f"that divides it (got {size})")
    n = GLOBAL_BATCH // size
    return a[rank * n:(rank + 1) * n]


say(f"global batch = {GLOBAL_BATCH}, steps = {STEPS}, lr = {LR}")
say(f"per-rank batch = {GLOBAL_BATCH} / {SIZE if SIZE > 1 else SIMULATED_RANKS} = "
    f"{GLOBAL_BATCH // (SIZE if SIZE > 1 else SIMULATED_RANKS)}")

# %% [markdown]
# ## 2. The problem: every rank sees different statistics
#
# The BatchNorm layer's input at step 0 is `h = Linear1(x)`.  Its per-channel mean over the global
# batch is what the layer *should* use; each rank, left alone, uses the mean of its own slice.

# %%
P_SHOW = SIZE if SIZE > 1 else SIMULATED_RANKS
h0 = make_model()[0](X[0])
n0, global_mean, global_var = D.local_moments(h0)
say(f"global mean of the BN input (channels 0-3) = {fmt(global_mean[:4], 4)}")
for r in range(P_SHOW):
    _, m_r, v_r = D.local_moments(shard(h0, r, P_SHOW))
    say(f"rank {r} local mean (channels 0-3) = {fmt(m_r[:4], 4)}")
    say(f"rank {r} local var (channels 0-3) = {fmt(v_r[:4], 4)}")
say(f"global var of the BN input (channels 0-3) = {fmt(global_var[:4], 4)}")

# %% [markdown]
# SyncBatchNorm's forward pass reduces every rank's `(n, mean, var)` per channel with **one**
# Allreduce, merging them with section 6's formulas.  Merging the slices above by those formulas
# (`D.simulate_sync_moments`, the ranks simulated in one process) gives back the global
# statistics exactly, up to round-off:

# %%
_, sim_mean, sim_var = D.simulate_sync_moments([shard(h0, r, P_SHOW) for r in range(P_SHOW)])
say(f"max |merged mean - global mean| = {np.max(np.abs(sim_mean - global_mean)):.3g}")
say(f"max |merged var - global var| = {np.max(np.abs(sim_var - global_var)):.3g}")

# %% [markdown]
# ## 3. Three ways to train
#
# **Reference**: one process, the global batch, `CrossEntropyLoss()` (mean over the batch), SGD.
#
# **Data parallel**: every rank starts from the same weights, runs forward and backward on its
# slice with a *mean* loss over its slice, then `allreduce_gradients(model, average=True)` averages
# the gradients over the P ranks and every rank takes the same SGD step.  With equal slices of
# n = 48 / P samples,
#
#     (1/P) sum_r (1/n) sum_{i in slice r} grad loss_i  =  (1/48) sum_i grad loss_i,
#
# the gradient of the global mean loss.  (With unequal slices, use `CrossEntropyLoss("sum")`,
# divide by the global batch size yourself and call `allreduce_gradients(..., average=False)`.)
# SyncBatchNorm's backward is linear in `dy`, so the same averaging makes its input gradient and
# its `weight.grad`/`bias.grad` (each rank holds its local share) come out right too.

# %%
def train_global():
    model = make_model()
    opt = mb.SGD(model.parameters(), lr=LR)
    loss_fn = mb.CrossEntropyLoss()
    losses = []
    for t in range(STEPS):
        model.zero_grad()
        loss = loss_fn(model(X[t]), Y[t])
        model.backward(loss_fn.backward())
        opt.step()
        losses.append(loss)
    return model, losses


def train_data_parallel(comm, sync=True):
    """One rank's part of data-parallel training (every rank calls this)."""
    grads_comm = D.Communicator(comm)           # counts SyncBatchNorm and gradient traffic
    loss_comm = D.Communicator(comm)            # the loss printout, counted apart
    model = make_model()
    if sync:
        model = mb.convert_sync_batchnorm(model, grads_comm)
    opt = mb.SGD(model.parameters(), lr=LR)
    loss_fn = mb.CrossEntropyLoss()
    losses = []
    rank, size = grads_comm.rank, grads_comm.size
    for t in range(STEPS):
        model.zero_grad()
        local_loss = loss_fn(model(shard(X[t], rank, size)), shard(Y[t], rank, size))
        model.backward(loss_fn.backward())
        D.allreduce_gradients(model, grads_comm, average=True)
        opt.step()
        losses.append(float(loss_comm.allreduce_sum(np.array([local_loss]))[0]) / size)
    return model, losses, grads_comm


def train_per_rank_simulated(P):
    """Plain per-rank BatchNorm on P ranks, simulated by P model replicas in one process."""
    replicas = [make_model() for _ in range(P)]
    opts = [mb.SGD(m.parameters(), lr=LR) for m in replicas]
    loss_fn = mb.CrossEntropyLoss()
    losses = []
    for t in range(STEPS):
        step_losses = []
        for r, model in enumerate(replicas):
            model.zero_grad()
            step_losses.append(loss_fn(model(shard(X[t], r, P)), shard(Y[t], r, P)))
            model.backward(loss_fn.backward())
        for ps in zip(*(m.parameters() for m in replicas)):        # what Allreduce would do
            mean_grad = sum(p.grad for p in ps) / P
            for p in ps:
                p.grad = mean_grad.copy()
        for opt in opts:
            opt.step()
        losses.append(sum(step_losses) / P)
    return replicas, losses


def flat_params(model):
    return np.concatenate([p.data.ravel() for p in model.parameters()])


ref_model, ref_losses = train_global()
results = {"global": {"losses": ref_losses, "params": flat_params(ref_model),
                      "running_mean": ref_model[1].running_mean.copy()}}

# %%
if SIZE > 1:
    sync_model, sync_losses, ledger_comm = train_data_parallel(WORLD, sync=True)
    plain_model, plain_losses, _ = train_data_parallel(WORLD, sync=False)
    sim_replicas, sim_losses = train_per_rank_simulated(SIZE)
    results["sync"] = {"losses": sync_losses, "params": flat_params(sync_model),
                       "running_mean": sync_model[1].running_mean.copy()}
    results["per_rank"] = {"losses": plain_losses, "params": flat_params(plain_model),
                           "running_mean": plain_model[1].running_mean.copy()}
    # the simulated per-rank run must equal the real one (a check of the simulation itself)
    results["per_rank_simulated_vs_real"] = float(np.max(np.abs(
        flat_params(sim_replicas[0]) - flat_params(plain_model))))
    per_rank_label = f"per-rank BN ({SIZE} ranks)"
else:
    one_model, one_losses, ledger_comm = train_data_parallel(WORLD, sync=True) if WORLD is not None \
        else (None, None, None)
    sim_replicas, plain_losses = train_per_rank_simulated(SIMULATED_RANKS)
    plain_model = sim_replicas[0]
    results["per_rank"] = {"losses": plain_losses, "params": flat_params(plain_model),
                           "running_mean": plain_model[1].running_mean.copy()}
    if one_model is not None:
        results["sync_one_rank"] = {"losses": one_losses, "params": flat_params(one_model)}
    per_rank_label = f"per-rank BN ({SIMULATED_RANKS} simulated)"

# %% [markdown]
# ## 4. The losses and the parameters
#
# Column by column: the reference, SyncBatchNorm on P ranks, plain BatchNorm on P ranks.

# %%
sync_label = f"SyncBN ({SIZE} ranks)" if SIZE > 1 else "SyncBN"
say(f"{'step':>4}  {'global batch (1 process)':>26}  {sync_label:>26}  {per_rank_label:>26}")
for t in range(STEPS):
    sync_col = f"{results['sync']['losses'][t]:26.15f}" if "sync" in results else f"{'(run under mpiexec)':>26}"
    say(f"{t:4d}  {ref_losses[t]:26.15f}  {sync_col}  {results['per_rank']['losses'][t]:26.15f}")

if "sync" in results:
    d_sync = float(np.max(np.abs(results["sync"]["params"] - results["global"]["params"])))
    d_loss = float(np.max(np.abs(np.subtract(results["sync"]["losses"], ref_losses))))
    say(f"max |SyncBN params - global-batch params| = {d_sync:.3g}")
    say(f"max |SyncBN loss - global-batch loss| = {d_loss:.3g}")
    say(f"max |SyncBN running_mean - global running_mean| = "
        f"{np.max(np.abs(results['sync']['running_mean'] - results['global']['running_mean'])):.3g}")
    say(f"max |simulated per-rank params - real per-rank params| = {results['per_rank_simulated_vs_real']:.3g}")
elif "sync_one_rank" in results:
    d_one = float(np.max(np.abs(results["sync_one_rank"]["params"] - results["global"]["params"])))
    say(f"max |SyncBN params on 1 rank - global-batch params| = {d_one:.3g}   "
        "# one rank: SyncBatchNorm is BatchNorm")
d_plain = float(np.max(np.abs(results["per_rank"]["params"] - results["global"]["params"])))
say(f"max |per-rank BN params - global-batch params| = {d_plain:.3g}")
say(f"max |per-rank BN running_mean - global running_mean| = "
    f"{np.max(np.abs(results['per_rank']['running_mean'] - results['global']['running_mean'])):.3g}")
if "sync" in results:
    sync_gap, sync_how = d_sync, f"SyncBN on {SIZE} ranks"
else:
    sync_gap = float(max(np.max(np.abs(sim_mean - global_mean)), np.max(np.abs(sim_var - global_var))))
    sync_how = f"SyncBN's merge of {P_SHOW} simulated ranks (statistics of step 0)"
say()
say(f"Finding: {sync_how} matches the one-process global batch to {sync_gap:.1e}, float64 round-off; "
    f"per-rank BatchNorm ends {d_plain:.3g} away in the parameters after {STEPS} steps.")

# %% [markdown]
# SyncBatchNorm reproduces the one-process run to float64 round-off (about 1e-15: the ranks add
# the same numbers in a different order).  Per-rank BatchNorm does not: its forward pass
# normalizes with slice statistics, so its losses, gradients, weights and running statistics all
# drift away from the global-batch run (and each rank's running statistics differ from the
# others').  The smaller the slice, the larger the gap; the figure `s5_small_batch_statistics`
# measures it.
#
# ## 5. What crossed between the ranks
#
# Every collective goes through one `Communicator`, whose ledger counts calls and bytes.  Per
# training step, for the one BatchNorm layer with C = 8 channels and the 105-number gradient
# buffer (99 parameters plus one "has a gradient" flag per parameter tensor):

# %%
C = HIDDEN
n_params = sum(p.data.size for p in make_model().parameters())
n_tensors = len(list(make_model().parameters()))
say(f"forward:   1 Allreduce of 3 * (C + 1) float64 = 3 * {C + 1} * 8 = {3 * (C + 1) * 8} bytes")
say(f"backward:  1 Allreduce of 2 * C float64 = 2 * {C} * 8 = {2 * C * 8} bytes")
say(f"gradients: 1 Allreduce of ({n_params} + {n_tensors}) float64 = {(n_params + n_tensors) * 8} bytes")
if ledger_comm is not None:
    say(f"ledger of rank 0 after {STEPS} steps (SyncBN run" + (")" if SIZE > 1 else ", one rank)") + ":")
    for line in ledger_comm.ledger.summary().splitlines():
        say("    " + line)
    per_step = {}
    for e in list(ledger_comm.ledger.log)[-3:]:
        per_step[e.tag] = e.nbytes
    for tag, nbytes in per_step.items():
        say(f"last step: {tag} = {nbytes} bytes")
say("payload per step does not depend on the batch size: O(C) for BN, O(parameters) for gradients")
stats_numbers = 3 * (C + 1) + 2 * C
activation_numbers = GLOBAL_BATCH * C
say()
say(f"Finding: the article says SyncBN \"gathers activations from all GPUs\"; it gathers statistics: "
    f"per step this BN layer's ranks exchange {stats_numbers} numbers ({stats_numbers * 8} bytes), "
    f"per-channel moments for the forward and sums for the backward, whatever the batch size, while gathering "
    f"the layer's activations would move {activation_numbers} numbers ({activation_numbers * 8} bytes) "
    f"for this global batch of {GLOBAL_BATCH}, growing with it.")

# %% [markdown]
# ## 6. How much the small per-rank batch costs
#
# The figure `s5_small_batch_statistics` measures the error of per-rank and synchronized batch
# statistics for 8 ranks and per-rank batches of 2 to 64 samples.

# %%
if RANK == 0:
    from minibn.figures import s5_sync_batchnorm as s5
    small = s5.small_batch_data()
    i2 = small["per_rank"].index(2)
    print(f"Finding: with {small['ranks']} ranks of 2 samples each, the per-rank mean is off by "
          f"{small['local_mean_rms'][i2]:.3f} population std (RMS) and SyncBN's by "
          f"{small['sync_mean_rms'][i2]:.3f}; the per-rank biased variance is "
          f"{-small['local_var_bias'][i2]:.1%} too small on average, SyncBN's "
          f"{-small['sync_var_bias'][i2]:.1%}.")
    show_figure("s5_small_batch_statistics", s5.small_batch_figure()[0], small)
