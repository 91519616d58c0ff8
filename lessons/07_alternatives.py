# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 7 (supplement to section 6.3): LayerNorm, GroupNorm, InstanceNorm
#
# Section 6.3 of the article lists three alternatives for when SyncBN is impractical:
#
# * **Group Normalization (GN)** divides channels into groups and normalizes within each group;
# * **Instance Normalization (IN)** normalizes each sample (and channel) independently;
# * **Layer Normalization (LN)** normalizes across the features of each input.
#
# All four normalizations compute the same three formulas, `mu = mean(x)`,
# `var = mean((x - mu)^2)`, `x_hat = (x - mu) / sqrt(var + eps)`, followed by
# `y = gamma * x_hat + beta`.  They differ only in **which values share one mean and one
# variance**.  For an input of shape `(N, C, L)` (N samples, C channels, L positions):
#
#     BatchNorm      one group per channel c:             the N * L values x[:, c, :]
#     LayerNorm      one group per sample n:              the C * L values x[n, :, :]
#     GroupNorm(G)   one group per sample n and group g:  the (C/G) * L values x[n, g*C/G:(g+1)*C/G, :]
#     InstanceNorm   one group per sample n and channel:  the L values x[n, c, :]
#
# Only BatchNorm's groups cross samples.  That is the whole story of this lesson: the other three
# give every sample the same output whatever else is in its batch, so they need no
# synchronization across GPUs, and they work with a batch of one.  minibn computes all three as
# batch norm on a reshaped view (`minibn/sample_norms.py`): put each group in a row, and batch
# norm's per-channel code does the rest, forward and backward.

# %%
import numpy as np

import minibn as mb
from minibn.figures import s6_alternatives as s6
from minibn.figures import show as show_figure

EPS = 1e-5
x = np.array([[[2., 4., 6.], [8., 1., 3.], [5., 9., 0.], [2., 2., 4.]],
              [[1., 3., 8.], [4., 6., 2.], [7., 1., 5.], [3., 9., 6.]]])   # (N, C, L) = (2, 4, 3)
N, C, L = x.shape
print(f"x.shape = (N, C, L) = {x.shape}")
for n in range(N):
    print(f"x[{n}] = {x[n].tolist()}")


def fmt(a, d=4):
    return "[" + " ".join(f"{v:.{d}f}" for v in np.ravel(a)) + "]"


def show_group(label, values):
    """Print one group's statistics and normalized values, formula beside each number."""
    m = values.size
    mu = values.sum() / m
    var = ((values - mu) ** 2).sum() / m
    x_hat = (values - mu) / np.sqrt(var + EPS)
    print(f"{label}: values = {fmt(values, 0)}")
    print(f"{label}: mu = sum / {m} = {mu:.6f}")
    print(f"{label}: var = sum((x - mu)^2) / {m} = {var:.6f}")
    print(f"{label}: x_hat = (x - mu) / sqrt(var + eps) = {fmt(x_hat)}")
    return x_hat


# %% [markdown]
# ## The article's example, read two ways
#
# Section 2's example `x = [2, 4, 6, 8]` is four samples of one feature: batch norm.  Read the
# same four numbers as four features of *one* sample and it is layer norm, with the same numbers
# (mu = 5, var = 5, x_hat = [-1.34, -0.45, 0.45, 1.34]).  The formulas are identical; the axis is
# not.

# %%
a = np.array([2.0, 4.0, 6.0, 8.0])
y_bn = mb.BatchNorm1d(1, affine=False, track_running_stats=False, dtype=np.float64)(a.reshape(4, 1))
y_ln = mb.LayerNorm(4, elementwise_affine=False, dtype=np.float64)(a.reshape(1, 4))
print(f"article_bn_x_hat = BatchNorm1d on shape (4, 1) = {fmt(y_bn)}")
print(f"article_ln_x_hat = LayerNorm on shape (1, 4) = {fmt(y_ln)}")

# %% [markdown]
# ## Which values share statistics: every group of the example, by hand
#
# The groups of the `(2, 4, 3)` example above, each with its mean, variance and normalized values
# (gamma = 1, beta = 0).  Then minibn's layers on the whole tensor, compared with the
# hand-computed groups.

# %%
print("BatchNorm1d(4): per channel, over samples and positions (N * L = 6 values)")
bn_hand = np.zeros_like(x)
for c in range(C):
    xh = show_group(f"BN channel {c}", x[:, c, :])
    bn_hand[:, c, :] = xh.reshape(N, L)

print("\nLayerNorm((4, 3)): per sample, over channels and positions (C * L = 12 values)")
ln_hand = np.zeros_like(x)
for n in range(N):
    ln_hand[n] = show_group(f"LN sample {n}", x[n]).reshape(C, L)

G = 2
print(f"\nGroupNorm({G}, 4): per sample and group of {C // G} channels ({C // G} * L = 6 values)")
gn_hand = np.zeros_like(x)
for n in range(N):
    for g in range(G):
        ch = slice(g * C // G, (g + 1) * C // G)
        gn_hand[n, ch] = show_group(f"GN sample {n} group {g}", x[n, ch]).reshape(C // G, L)

print("\nInstanceNorm1d(4): per sample and channel, over positions (L = 3 values)")
in_hand = np.zeros_like(x)
for n in range(N):
    for c in range(C):
        in_hand[n, c] = show_group(f"IN sample {n} channel {c}", x[n, c])

# %%
layers = {"BN": (mb.BatchNorm1d(C, affine=False, track_running_stats=False, dtype=np.float64), bn_hand),
          "LN": (mb.LayerNorm((C, L), elementwise_affine=False, dtype=np.float64), ln_hand),
          "GN": (mb.GroupNorm(G, C, affine=False, dtype=np.float64), gn_hand),
          "IN": (mb.InstanceNorm1d(C, dtype=np.float64), in_hand)}
for name, (layer, hand) in layers.items():
    print(f"max_abs_diff {name} = max|minibn - by hand| = {np.max(np.abs(layer(x) - hand)):.2e}")

# %% [markdown]
# ## A sample's output does not depend on its batch mates (except with BN)
#
# Normalize the first sample alone, then inside the whole batch: LN, GN and IN give the same
# output, BN does not.  The same property means data-parallel training needs no
# synchronization for them: split the batch between two "GPUs", normalize each part on its own,
# and the result equals the whole-batch result.  For BN that equality is exactly what SyncBN
# restores, at the cost of an all-reduce per layer.

# %%
for name, (layer, _) in layers.items():
    alone = layer(x[:1])[0]
    in_batch = layer(x)[0]
    print(f"sample0_alone_vs_in_batch {name} = max|difference| = {np.max(np.abs(alone - in_batch)):.4f}")
for name, (layer, _) in layers.items():
    split = np.concatenate([layer(x[:1]), layer(x[1:])])
    print(f"two_gpus_vs_one {name} = max|split - whole| = {np.max(np.abs(split - layer(x))):.4f}")

# %% [markdown]
# ## Batch size 1
#
# BatchNorm on `(N, C)` input with N = 1 has one value per channel: its variance is 0 and
# x - mu is 0.  PyTorch refuses to train on that and so does minibn.  On `(N, C, H, W)` input a
# single sample still has H * W values per channel, and BN with a batch of one *is* instance
# norm.  Instance norm itself needs more than one spatial position; LN and GN do not.

# %%
try:
    mb.BatchNorm1d(4)(np.ones((1, 4)))
except ValueError as exc:
    print(f"BatchNorm1d on shape (1, 4): ValueError: {exc}")
try:
    mb.InstanceNorm1d(4)(np.ones((2, 4, 1)))
except ValueError as exc:
    print(f"InstanceNorm1d on shape (2, 4, 1): ValueError: {exc}")
img = np.random.default_rng(0).standard_normal((1, 3, 4, 4))
bn1 = mb.BatchNorm2d(3, affine=False, track_running_stats=False, dtype=np.float64)(img)
in1 = mb.InstanceNorm2d(3, dtype=np.float64)(img)
print(f"bn_batch1_vs_instance_norm = max|BatchNorm2d - InstanceNorm2d| on shape (1, 3, 4, 4) "
      f"= {np.max(np.abs(bn1 - in1)):.2e}")

# %% [markdown]
# ## How much one sample's output moves with its batch, measured
#
# Samples of shape `(C, H, W) = (8, 4, 4)`, channel c drawn from `N(mu_c, s_c^2)` (fixed random
# mu_c in [-2, 2], s_c in [0.5, 3]).  One fixed sample x0 is normalized inside a batch of B:
# itself plus B - 1 random batch mates, 16 times.  We print the RMS difference between its
# training-mode output and its inference output.  For BN the inference output uses the
# population statistics (mu_c, s_c^2), which is what perfect running statistics give; LN, GN and
# IN use the same per-sample statistics in training and at inference.

# %%
dep = s6.output_dependence_data()
print(f"batch_sizes = {fmt(dep['batch_sizes'], 0)}")
for name, row in dep["rms_mean"].items():
    print(f"rms_mean {name} = {fmt(row)}")
bn_row = dep["rms_mean"]["BatchNorm2d"]
bs = dep["batch_sizes"]
print()
print(f"What this shows: BN's output for the same sample differs from its inference output by "
      f"{bn_row[bs.index(2)]:.3f} (RMS) in batches of 2, {bn_row[bs.index(16)]:.3f} in batches of "
      f"16 and {bn_row[bs.index(256)]:.3f} in batches of 256: the batch statistics are estimates "
      f"whose error shrinks like 1/sqrt(B).  The gap between training and inference is what hurts "
      f"BN at small batches.  LN, GN and IN: "
      f"{max(max(dep['rms_mean'][k]) for k in ('LayerNorm', 'GroupNorm(4)', 'InstanceNorm2d')):.1e} "
      f"at every batch size.")

# %% [markdown]
# ## What it does to training: test accuracy against batch size
#
# An MLP `Linear(16, 32) -> norm -> ReLU -> Linear(32, 32) -> norm -> ReLU -> Linear(32, 4)`
# on the synthetic 4-class task (1024 training, 2048 test samples), trained for 5 epochs with
# SGD (momentum 0.9) and a learning rate proportional to the batch size (0.1 at 32), for BN,
# GN(4 groups of 8 features) and LN.  Test accuracy in eval mode (BN: running statistics).
# One seed: differences of a point or two are noise.  This trains 24 small models (about 15
# seconds).

# %%
acc = s6.accuracy_vs_batch_data()
print(f"train_batch_sizes = {fmt(acc['batch_sizes'], 0)}")
print(f"learning_rates = {fmt(acc['lr'], 5)}")
for name, row in acc["test_acc"].items():
    print(f"test_acc {name} = {fmt(row)}")
for name, row in acc["train_loss"].items():
    print(f"final_train_loss {name} = {fmt(row)}")
print(f"bn_batch_1 = ValueError: {acc['bn_batch_1_error']}")
ta = acc["test_acc"]
bsz = acc["batch_sizes"]
small = [i for i, b in enumerate(bsz) if b <= 4]
large = [i for i, b in enumerate(bsz) if b >= 32]
bn_ok_from = next(b for i, b in enumerate(bsz)
                  if all(ta["BatchNorm"][j] >= max(ta["GroupNorm(4)"][j], ta["LayerNorm"][j]) - 0.03
                         for j in range(i, len(bsz))))
print(f"bn_within_0.03_of_gn_ln_from_batch = {bn_ok_from}")
print()
from_bn_ok = [i for i, b in enumerate(bsz) if b >= bn_ok_from]
spread_from = (max(ta[k][i] for k in ta for i in from_bn_ok) - min(ta[k][i] for k in ta for i in from_bn_ok))
print(f"spread_of_test_acc_from_batch_{bn_ok_from} = {spread_from:.4f}")
print()
print(f"Finding: at batch sizes {', '.join(str(bsz[i]) for i in small)} BN reaches test accuracy "
      f"{fmt([ta['BatchNorm'][i] for i in small], 3)} against GN's "
      f"{fmt([ta['GroupNorm(4)'][i] for i in small], 3)} and LN's "
      f"{fmt([ta['LayerNorm'][i] for i in small], 3)}.")
print(f"Finding: at batch {bsz[0]} BN's training loss stays at {acc['train_loss']['BatchNorm'][0]:.3f} "
      f"(chance is ln 4 = {np.log(4):.3f}): with {bsz[0]} samples per batch each normalized feature is "
      f"about +-1, and little more than which sample is larger survives.")
print(f"Finding: from batch {bn_ok_from} on BN stays within 0.03 of GN and LN, and the three are "
      f"within {spread_from:.3f} of each other, which one seed cannot tell apart: LN and GN lose "
      f"nothing at small batches and need no synchronization; BN needs batches of {bn_ok_from} or "
      f"more (or SyncBN's larger global batch).")
show_figure("s6_batch_size_dependence", s6.plot_batch_size_dependence({"output": dep, "accuracy": acc}),
            {"output": dep, "accuracy": acc})
