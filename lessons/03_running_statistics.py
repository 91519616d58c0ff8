# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 3: running statistics
#
# Section 3 of the article.  During training each mini-batch is normalized with its own mean and
# variance; alongside, the layer keeps a moving average of those statistics, the *running
# statistics*, and uses them at inference.  The article's update (an exponential moving average):
#
#     mu_running  <- (1 - alpha) * mu_running  + alpha * mu_batch
#     var_running <- (1 - alpha) * var_running + alpha * var_batch
#
# minibn's `momentum` is this alpha: the weight of the **new** batch (PyTorch's meaning).
#
# This lesson: (1) the article's example step by step, (2) the momentum convention and how it
# differs from Keras's, (3) which batch variance goes into the running variance, and why PyTorch
# and minibn store the unbiased one, (4) inference with running statistics.

# %%
import numpy as np

import minibn as mb


def v(a, d=6):
    """A number with ``d`` decimals."""
    return f"{float(a):.{d}f}"


def batch_with_mean(mu):
    """Four activations with mean ``mu``: section 2's batch [2, 4, 6, 8] shifted by mu - 5."""
    return (np.array([-3.0, -1.0, 1.0, 3.0]) + mu).reshape(4, 1)


# %% [markdown]
# ## 1. The article's example
#
# Three mini-batches with means 5, 6 and 7, the running mean starting at 0, and alpha = 0.9.  We
# feed minibn real batches with those means (section 2's batch [2, 4, 6, 8], shifted) through a
# `BatchNorm1d(1, momentum=0.9)` layer and read its `running_mean` after each step.

# %%
alpha = 0.9
ARTICLE_STEPS = ["4.5", "5.85", "6.765"]
bn = mb.BatchNorm1d(1, momentum=alpha, dtype=np.float64)
print(f"running_mean_0 = {v(bn.running_mean[0])}    # minibn's (and PyTorch's) initial value")
prev = float(bn.running_mean[0])
batches = [batch_with_mean(mu) for mu in (5.0, 6.0, 7.0)]
for t, xb in enumerate(batches, start=1):
    mu_b = xb.mean()
    bn(xb)
    now = float(bn.running_mean[0])
    print(f"running_mean_{t} = (1 - {alpha}) * {prev:g} + {alpha} * {mu_b:g} = "
          f"{v((1 - alpha) * prev)} + {v(alpha * mu_b)} = {v(now)}    # article: {ARTICLE_STEPS[t - 1]}")
    prev = now

# %% [markdown]
# Steps 1 and 2 match the article.  **Step 3 does not**: the article's own expression
# `(1 - 0.9) * 5.85 + 0.9 * 7.0` is `0.585 + 6.3 = 6.885`, but the article prints 6.765, which is
# 0.12 too low.  The formula and the first two steps are right; the last addition is an
# arithmetic slip in the article.  minibn (and PyTorch, see `tests/test_batchnorm_torch.py`) give
# 6.885.

# %%
print(f"article_step3_error = 6.765 - 6.885 = {v(6.765 - prev)}")

# %% [markdown]
# ## 2. Which way round is the momentum?
#
# The article's alpha multiplies the **new** batch statistic.  PyTorch's `momentum` argument is
# this alpha (default 0.1), and so is minibn's.  Keras's `BatchNormalization(momentum=...)`
# multiplies the **old** running value instead (`moving = momentum * moving + (1 - momentum) *
# batch`, default 0.99), so Keras's momentum is `1 - alpha`.
#
# The article's "e.g. 0.9 or 0.99" are typical values in Keras's sense.  Used as alpha, 0.9 makes
# the running mean follow almost only the last batch (4.5, 5.85, 6.885 above).  The same number in
# Keras's convention -- equivalently PyTorch's momentum 0.1 -- averages over many batches:

# %%
keras_momentum = 0.9
r = 0.0
for t, mu_b in enumerate((5.0, 6.0, 7.0), start=1):
    new = keras_momentum * r + (1 - keras_momentum) * mu_b
    print(f"keras_running_mean_{t} = {keras_momentum} * {r:g} + (1 - {keras_momentum}) * {mu_b:g} = {v(new)}")
    r = new
bn01 = mb.BatchNorm1d(1, momentum=0.1, dtype=np.float64)   # PyTorch-style momentum = 1 - 0.9
for t, xb in enumerate(batches, start=1):
    bn01(xb)
    print(f"minibn_momentum_0.1_running_mean_{t} = {v(bn01.running_mean[0])}")

# %% [markdown]
# ## 3. The running variance: biased or unbiased batch variance?
#
# The article says the running variance is updated "using the same formula with the batch
# variance", without saying which one.  Normalization in training uses the *biased* batch
# variance (divide by m, section 2).  PyTorch -- and minibn -- put the *unbiased* one (divide by
# m - 1, i.e. the biased variance times m / (m - 1)) into the running variance.
#
# Our three batches each have biased variance 5 and unbiased variance 5 * 4/3 = 6.667 (m = 4).
# Starting from PyTorch's initial running variance 1 with alpha = 0.9:

# %%
m = batches[0].size
var_b = float(batches[0].var())                   # biased: divide by m
var_u = var_b * m / (m - 1)                       # unbiased: divide by m - 1
print(f"batch_var_biased = sum((x - mu)^2) / m = 20 / {m} = {v(var_b)}")
print(f"batch_var_unbiased = sum((x - mu)^2) / (m - 1) = 20 / {m - 1} = {v(var_u)}")
rb = ru = 1.0
for t in range(1, 4):
    nb, nu = (1 - alpha) * rb + alpha * var_b, (1 - alpha) * ru + alpha * var_u
    print(f"running_var_biased_{t} = (1 - {alpha}) * {v(rb)} + {alpha} * {v(var_b)} = {v(nb)}")
    print(f"running_var_unbiased_{t} = (1 - {alpha}) * {v(ru)} + {alpha} * {v(var_u)} = {v(nu)}")
    rb, ru = nb, nu
print(f"minibn_running_var = {v(bn.running_var[0])}    # the unbiased column")

# %% [markdown]
# **Why unbiased?**  The running variance is meant to estimate the variance of the whole data
# distribution (the article: "approximate the global statistics of the entire dataset").  The
# biased variance of a batch of m samples underestimates it on average: its expectation is
# `(m - 1) / m * sigma^2`, because the deviations are measured from the batch's own mean, which
# sits closer to the samples than the true mean does.  Averaging many batch variances -- which is
# what a moving average does -- cannot remove a bias; multiplying by m / (m - 1) does (Bessel's
# correction).
#
# A numerical check: draw many batches of m values from a normal distribution with a known
# variance sigma^2 = 4 and average their batch variances.

# %%
rng = np.random.default_rng(0)
sigma2, n_batches = 4.0, 200_000
for m_small in (2, 4, 8, 32):
    data = rng.normal(3.0, np.sqrt(sigma2), size=(n_batches, m_small))
    biased = data.var(axis=1)                     # divide by m
    unbiased = data.var(axis=1, ddof=1)           # divide by m - 1
    print(f"mean_biased_var_m{m_small} = average of sum((x - mean)^2) / {m_small} = "
          f"{v(biased.mean(), 4)}    # expected (m-1)/m * sigma^2 = {v((m_small - 1) / m_small * sigma2, 4)}")
    print(f"mean_unbiased_var_m{m_small} = average of sum((x - mean)^2) / {m_small - 1} = "
          f"{v(unbiased.mean(), 4)}    # expected sigma^2 = {v(sigma2, 4)}")

# %% [markdown]
# The same effect inside a layer: train `BatchNorm1d` on many small batches (m = 4) from
# N(3, sigma^2 = 4).  To take the noise of a short moving average out of the picture we use
# `momentum=None`, the cumulative average of all batches (with momentum 0.1 the same happens on
# average, but a single EMA value wanders around it).  minibn's running variance converges to
# sigma^2; the average of the biased batch variances converges to 3/4 of it.  Used at inference,
# the biased estimate would make every normalized output sqrt(4/3) = 1.155 times too large.

# %%
layer = mb.BatchNorm1d(1, momentum=None, dtype=np.float64)
steps, sum_biased = 8_000, 0.0
for _ in range(steps):
    xb = rng.normal(3.0, 2.0, size=(4, 1))
    layer(xb)
    sum_biased += xb.var()
avg_biased = sum_biased / steps
print(f"layer_running_mean = {v(layer.running_mean[0], 4)}    # population mean 3")
print(f"layer_running_var = {v(layer.running_var[0], 4)}    # population variance 4")
print(f"average_of_biased_var = {v(avg_biased, 4)}    # (m-1)/m * 4 = 3")
layer.eval()
x_test = rng.normal(3.0, 2.0, size=(100_000, 1))
out_unbiased = layer(x_test)
out_biased = (x_test - layer.running_mean[0]) / np.sqrt(avg_biased + layer.eps)
print(f"eval_output_std_with_unbiased_running_var = {v(out_unbiased.std(), 4)}")
print(f"eval_output_std_with_biased_running_var = {v(out_biased.std(), 4)}    # sqrt(4/3) = 1.1547")

# %% [markdown]
# ## 4. Inference with the running statistics
#
# Once training is done the running statistics are fixed and eval mode uses them:
#
#     x_hat = (x - mu_running) / sqrt(var_running + eps)
#
# Take the layer of part 1 (alpha = 0.9, after the batches with means 5, 6, 7): its running mean
# is 6.885 and its running variance 6.661 (the unbiased column).  In eval mode it normalizes
# section 2's batch [2, 4, 6, 8] with those numbers -- not with the batch's own mean 5 and
# variance 5 -- and each sample's output no longer depends on the other samples in the batch.

# %%
bn.eval()
x = np.array([2.0, 4.0, 6.0, 8.0]).reshape(4, 1)
y = bn(x)
rm, rv = float(bn.running_mean[0]), float(bn.running_var[0])
for i, (a, b) in enumerate(zip(x[:, 0], y[:, 0]), start=1):
    print(f"eval_x_hat_{i} = (x_{i} - mu_running) / sqrt(var_running + eps) = "
          f"({a:g} - {v(rm)}) / sqrt({v(rv)} + {bn.eps:g}) = {v(b)}")
alone = bn(np.array([[6.0]]))
print(f"eval_x_hat_of_6_alone = {v(alone[0, 0])}    # the same as inside the batch")
print(f"eval_num_batches_tracked = {int(bn.num_batches_tracked)}    # eval mode updates nothing")
