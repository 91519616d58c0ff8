# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 2: the core logic of batch normalization
#
# Section 2 of the article, step by step, with every number computed by minibn.  The article's
# example is one feature (one channel) and a mini-batch of four activations:
#
#     x = [2.0, 4.0, 6.0, 8.0],   gamma = 2.0,   beta = 1.0,   eps = 1e-5
#
# In minibn's layout that is an array of shape `(N, C) = (4, 1)`: statistics are taken per channel
# over the batch axis.  The training forward is four formulas:
#
#     mu    = (1/m) sum_i x_i                    the batch mean
#     var   = (1/m) sum_i (x_i - mu)^2           the batch variance (biased: divide by m)
#     x_hat = (x_i - mu) / sqrt(var + eps)       normalize
#     y_i   = gamma * x_hat_i + beta             scale and shift (learned gamma, beta)
#
# Every printed line reads `name = formula = value`, and `# article: ...` gives what the article
# prints for the same quantity.

# %%
import math

import numpy as np

import minibn as mb
from minibn import functional as F
from minibn.figures import s2_core_logic as s2, show
from minibn.gradcheck import check_function, rel_error

x = np.array([2.0, 4.0, 6.0, 8.0]).reshape(4, 1)     # N = 4 samples, C = 1 feature
gamma, beta, eps = np.array([2.0]), np.array([1.0]), 1e-5
ARTICLE = {"mu": "5.0", "var": "5.0",
           "x_hat": ["-1.34", "-0.45", "0.45", "1.34"], "y": ["-1.68", "0.1", "1.9", "3.68"]}

y, cache = F.batch_norm_forward(x, gamma, beta, eps)   # minibn's training forward
m = cache.count
xs = x[:, 0]


def v(a, d=7):
    """A number with ``d`` decimals."""
    return f"{float(a):.{d}f}"


def p(a, d=7):
    """A number to substitute into a formula: negative ones in parentheses."""
    s = v(a, d) if d is not None else f"{float(a):g}"
    return f"({s})" if float(a) < 0 else s


print(f"x = {xs.tolist()}")
print(f"m = {m}    # values per channel: N = 4 samples of 1 feature")

# %% [markdown]
# ## Step 1: mean and variance
#
# minibn accumulates the statistics in float64 with a shifted two-pass method (see
# `minibn/moments.py`); for these small integers every step is exact.

# %%
print(f"mu = ({' + '.join(f'{a:g}' for a in xs)}) / {m} = {v(cache.mean[0])}"
      f"    # article: {ARTICLE['mu']}")
for i, a in enumerate(xs, start=1):
    print(f"sq_dev_{i} = (x_{i} - mu)^2 = ({a:g} - {cache.mean[0]:g})^2 = {v((a - cache.mean[0]) ** 2)}")
sq = (xs - cache.mean[0]) ** 2
print(f"var = ({' + '.join(f'{s:g}' for s in sq)}) / {m} = {v(cache.var[0])}"
      f"    # article: {ARTICLE['var']}")
std = math.sqrt(float(cache.var[0]) + eps)
print(f"std = sqrt(var + eps) = sqrt({cache.var[0]:g} + {eps:g}) = {v(std, 9)}")
print(f"inv_std = 1 / std = {v(cache.inv_std[0], 9)}")

# %% [markdown]
# ## Step 2: normalize
#
# Each activation minus the mean, divided by the standard deviation.  The article prints two
# decimals; minibn's values are printed with seven.

# %%
for i, (a, xh) in enumerate(zip(xs, cache.x_hat[:, 0]), start=1):
    print(f"x_hat_{i} = (x_{i} - mu) / std = ({a:g} - {cache.mean[0]:g}) / {v(std)} = {v(xh)}"
          f"    # article: {ARTICLE['x_hat'][i - 1]}")
print(f"mean(x_hat) = {v(cache.x_hat.mean())}")
print(f"var(x_hat) = var / (var + eps) = {v(cache.x_hat.var(), 9)}")

# %% [markdown]
# ## Step 3: scale and shift

# %%
for i, (xh, yy) in enumerate(zip(cache.x_hat[:, 0], y[:, 0]), start=1):
    print(f"y_{i} = gamma * x_hat_{i} + beta = {gamma[0]:g} * {p(xh)} + {beta[0]:g} = {v(yy)}"
          f"    # article: {ARTICLE['y'][i - 1]}")

# %% [markdown]
# ## Checking the article's numbers
#
# * `mu = 5.0` and `var = 5.0` are exact.
# * `x_hat` is the exact value rounded to two decimals: -1.3416394 -> -1.34, -0.4472131 -> -0.45.
# * `y` is where the article rounds *before* the last step: it computes `2 * (-1.34) + 1 = -1.68`,
#   `2 * (-0.45) + 1 = 0.1`, `2 * 0.45 + 1 = 1.9`, `2 * 1.34 + 1 = 3.68` from the rounded x_hat.
#   The exact outputs are -1.6832789, 0.1055737, 1.8944263, 3.6832789.  Rounded to the article's
#   own number of decimals every printed y is right (0.1 has one decimal, and 0.1055737 rounds to
#   0.1), but at two decimals the exact values are 0.11 and 1.89, not 0.10 and 1.90: gamma = 2
#   doubles the rounding error of x_hat (0.0028 becomes 0.0056).  None of the article's section 2
#   numbers is wrong; y is rounded from a rounded intermediate.
# * The article writes eps as `1e^{-5}`; it means 10^-5 (`1e-5`), not 1 * e^-5 = 0.0067.  Either
#   way x_hat rounds to the same two decimals, which is why the printed numbers cannot tell.
# * eps itself changes only the sixth decimal here: without it y_1 would be -1.6832816.

# %%
x_hat_rounded = np.round(cache.x_hat[:, 0], 2)
for i, (xr, yy) in enumerate(zip(x_hat_rounded, y[:, 0]), start=1):
    print(f"y_from_rounded_{i} = gamma * round(x_hat_{i}, 2) + beta = {gamma[0]:g} * {p(xr, 2)} + "
          f"{beta[0]:g} = {gamma[0] * xr + beta[0]:.2f}    # article: {ARTICLE['y'][i - 1]}")
for i, yy in enumerate(y[:, 0], start=1):
    print(f"y_exact_rounded_{i} = round(y_{i}, 2) = {round(float(yy), 2):.2f}")
print(f"y_1_without_eps = gamma * (2 - 5) / sqrt(5) + beta = {v(2 * -3 / math.sqrt(5) + 1)}")
print(f"x_hat_1_if_eps_were_e^-5 = (2 - 5) / sqrt(5 + e^-5) = {v(-3 / math.sqrt(5 + math.exp(-5)))}")

x_hat_exact = cache.x_hat[:, 0]
y_exact = y[:, 0]
y_from_rounded = gamma[0] * x_hat_rounded + beta[0]
rounding_error = float(np.max(np.abs(x_hat_rounded - x_hat_exact)))
y_eps_effect = abs(float(y_exact[0]) - (2 * -3 / math.sqrt(5) + 1))
print()
print(f"Finding: the article's x_hat [{', '.join(ARTICLE['x_hat'])}] are the exact values "
      f"[{', '.join(v(a) for a in x_hat_exact)}] rounded to two decimals.")
print(f"Finding: the article's y are computed from the rounded x_hat: gamma * round(x_hat, 2) + beta "
      f"gives [{', '.join(f'{a:.2f}' for a in y_from_rounded)}], while the exact y are "
      f"[{', '.join(v(a) for a in y_exact)}], at two decimals "
      f"[{', '.join(f'{a:.2f}' for a in y_exact)}]: gamma = {gamma[0]:g} doubles x_hat's rounding "
      f"error of {rounding_error:.4f} to {gamma[0] * rounding_error:.4f}.")
x_hat_1_e5 = -3 / math.sqrt(5 + math.exp(-5))
print(f"Finding: eps = {eps:g} moves y_1 by only {y_eps_effect:.1e}; read as e^-5 = {math.exp(-5):.4f}, "
      f"eps would give x_hat_1 = {x_hat_1_e5:.4f}, which also rounds to {x_hat_1_e5:.2f}: the printed "
      f"numbers cannot tell the two readings apart (10^-5 is meant).")
show("s2_example_activations")

# %% [markdown]
# ## Backward: gradients of the example
#
# Training needs `dL/dx`, `dL/dgamma`, `dL/dbeta` from an upstream gradient `dy = dL/dy`.  With
# the per-channel sums
#
#     dbeta  = sum_i dy_i
#     dgamma = sum_i dy_i * x_hat_i
#
# the closed form is
#
#     dx_i = gamma / sqrt(var + eps) * (dy_i - dbeta / m - x_hat_i * dgamma / m).
#
# The two subtracted terms are the paths through mu and var: moving one x_i moves the statistics,
# and with them every x_hat.  minibn has this closed form (`batch_norm_backward`) and a node-by-node
# chain rule through the graph mu -> xc -> var -> std -> 1/std -> x_hat -> y
# (`batch_norm_backward_graph`); both must agree with each other and with finite differences.

# %%
dy = np.array([0.5, -1.0, 2.0, 0.25]).reshape(4, 1)     # some upstream gradient
dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
dx_g, dgamma_g, dbeta_g = F.batch_norm_backward_graph(dy, cache)
dys, xh = dy[:, 0], cache.x_hat[:, 0]
print(f"dy = {dys.tolist()}")
print(f"dbeta = sum(dy) = {' + '.join(p(a, None) for a in dys)} = {v(dbeta[0])}")
print(f"dgamma = sum(dy * x_hat) = {' + '.join(f'{p(a, None)} * {p(b)}' for a, b in zip(dys, xh))}"
      f" = {v(dgamma[0])}")
for i in range(m):
    print(f"dx_{i + 1} = gamma / std * (dy_{i + 1} - dbeta/m - x_hat_{i + 1} * dgamma/m) = "
          f"{gamma[0]:g} / {v(std)} * ({p(dys[i], None)} - {p(dbeta[0] / m)} - {p(xh[i])} * {p(dgamma[0] / m)})"
          f" = {v(dx[i, 0])}")
print(f"dx_graph = [{', '.join(v(a) for a in dx_g[:, 0])}]")
print(f"max_abs_diff_closed_vs_graph = {np.max(np.abs(dx - dx_g)):.3e}")
print(f"dgamma_graph = {v(dgamma_g[0])}")
print(f"dbeta_graph = {v(dbeta_g[0])}")
fd_error = check_function(lambda inp: F.batch_norm_forward(inp, gamma, beta, eps)[0],
                          lambda d: F.batch_norm_backward(d, F.batch_norm_forward(x, gamma, beta, eps)[1])[0],
                          x.copy(), dy)
print(f"rel_error_vs_finite_differences = {fd_error:.3e}")
print(f"sum(dx) = {dx.sum():.3e}    # 0: shifting every x_i equally does not change y")

# %% [markdown]
# ## The same with a layer, then eval mode (section 2.2)
#
# `mb.BatchNorm1d(1)` holds gamma and beta as parameters and keeps running statistics.  In eval
# mode it normalizes with those instead of the batch's own statistics.  With `momentum=1.0` one
# training step makes the running statistics equal to this batch's: the mean 5, and the
# *unbiased* variance 20/3 (lesson 3 explains why PyTorch and minibn store that one).  So even on
# the same four values, eval mode gives slightly smaller outputs than training mode.

# %%
bn = mb.BatchNorm1d(1, momentum=1.0, dtype=np.float64)
bn.weight.data[...] = gamma
bn.bias.data[...] = beta
y_train = bn(x)
print(f"layer_y_train = [{', '.join(v(a) for a in y_train[:, 0])}]")
print(f"running_mean = {v(bn.running_mean[0])}")
print(f"running_var = var * m / (m - 1) = 5 * 4 / 3 = {v(bn.running_var[0])}")
bn.eval()
y_eval = bn(x)
for i, (a, yy) in enumerate(zip(xs, y_eval[:, 0]), start=1):
    print(f"y_eval_{i} = gamma * (x_{i} - running_mean) / sqrt(running_var + eps) + beta = "
          f"{gamma[0]:g} * ({a:g} - {bn.running_mean[0]:g}) / sqrt({v(bn.running_var[0])} + {eps:g})"
          f" + {beta[0]:g} = {v(yy)}")
one = bn(np.array([[8.0]]))        # eval mode: a single sample is fine, and independent of others
print(f"y_eval_single_sample_8 = {v(one[0, 0])}")
