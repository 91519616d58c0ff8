"""The graded tasks: what each one asks for, the article's formula, and its points.

Every task owns one or more solution regions (``# >>> solution: TASK[.PART]``,
see ``regions.py``) in minibn's source.  The hint of a region is what the
student sees in its ``NotImplementedError``; it is the formula of the article
(section numbers refer to ``batch-normalization-guide``) plus the conventions
of DESIGN.md that the grader checks.

A task is graded when the grader's own source tree has at least one region
for it, so a task whose code does not exist yet is simply not part of the
assignment.  This module is plain data (standard library only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

__all__ = ["Task", "TASKS", "TASK_IDS", "hint_for"]


@dataclass(frozen=True)
class Task:
    id: str
    title: str
    points: int
    hint: str
    part_hints: Dict[str, str] = field(default_factory=dict)
    mpi: bool = False


TASKS: Tuple[Task, ...] = (
    Task("bn_forward", "BatchNorm training forward", 15,
         "article 2.1: mu = mean of x and var = mean((x - mu)^2) per channel over every axis but 1 "
         "(biased, divide by m); x_hat = (x - mu) / sqrt(var + eps); y = gamma * x_hat + beta",
         {"normalize": "article 2.1: inv_std = 1 / sqrt(var + eps) (float64); x_hat = (x - mean) * inv_std; "
                       "y = gamma * x_hat + beta, gamma/beta skipped when None; return (y in x's dtype, "
                       "x_hat, inv_std); y must not be the x_hat array; float32 x with |mean| >> std "
                       "must stay accurate (see the docstring)",
          "stats": "article 2.1: (count m, mean, biased var) per channel over every axis but 1, "
                   "or the given `stats`; m <= 1 is a ValueError; y, x_hat, inv_std = normalize(...); "
                   "return y, BNCache(x, x_hat, mean, var, inv_std, weight, eps, m)"}),
    Task("bn_backward", "BatchNorm backward, closed form", 15,
         "dbeta = sum(dy), dgamma = sum(dy * x_hat) over every axis but 1 (float64); pass them through "
         "`reduce` (if given, training mode) to get the global sums; "
         "dx = gamma * inv_std * (dy - sum_dy / m - x_hat * sum_dy_xhat / m) in training mode, "
         "dx = gamma * inv_std * dy for frozen (eval) statistics; return (dx in dy's dtype, "
         "local dgamma, local dbeta in the weight's dtype), or (dx, None, None) without weight"),
    Task("bn_backward_graph", "BatchNorm backward through the computational graph", 10,
         "chain rule node by node, in reverse: dbeta = sum(dy), dgamma = sum(dy * x_hat); "
         "dx_hat = gamma * dy; dxc = dx_hat * istd; distd = sum(dx_hat * xc); dstd = -distd / std^2; "
         "dvar = dstd / (2 std); dxc += dvar * 2 xc / m; dmu = -sum(dxc); dx = dxc + dmu / m (float64)"),
    Task("running_stats", "running statistics (EMA)", 10,
         "article 3.2, in place (a = float(momentum) is checked above): "
         "running_mean <- (1 - a) * running_mean + a * mean, "
         "running_var <- (1 - a) * running_var + a * var * m / (m - 1) (unbiased), "
         "a = momentum = weight of the NEW batch (PyTorch's convention); keep the buffers' dtype"),
    Task("merge_moments", "merging per-part moments", 10,
         "article 6: N = sum_g n_g (`total`, checked above); mu = sum_g n_g * mu_g / N; "
         "var = sum_g n_g * (var_g + (mu_g - mu)^2) / N, in float64; return (N as an int, mu, var)"),
    Task("ln_gn_backward", "LayerNorm and GroupNorm backward (row_norm_backward)", 15,
         "article 6.3: LayerNorm/GroupNorm are batch norm on a row view (R rows of m values); "
         "dgamma = sum(dy * x_hat), dbeta = sum(dy) over cache.param_axes, in the parameters' shape "
         "and dtype; g = dy * gamma (gamma shaped as cache.param_shape); dx = the batch-norm backward "
         "of g on the row view: per row, inv_std * (g - mean(g) - x_hat * mean(g * x_hat)); dx in dy's dtype"),
    Task("syncbn", "SyncBatchNorm reductions (mpiexec -n 2)", 25,
         "article 6: the global batch statistics and the global gradient sums, each with ONE "
         "collective call of an O(C) packed buffer through self.comm",
         {"forward": "article 6: local (n, mean, var) per channel (channel_moments); ONE "
                     "self.comm.allreduce_moments(pack_moments(n, mean, var)) merges them with "
                     "mu = sum n_g mu_g / N, var = sum n_g (var_g + (mu_g - mu)^2) / N; unpack_moments "
                     "gives the GLOBAL (N, mean, var); N == 1 is a ValueError on every rank; return them "
                     "as arrays of x's array module",
          "backward": "pack [sum_dy, sum_dy_xhat] (float64) into one buffer, ONE self.comm.allreduce_sum, "
                      "and return the two global halves (sum over all ranks)"},
         mpi=True),
)

TASK_IDS = tuple(t.id for t in TASKS)
_BY_ID = {t.id: t for t in TASKS}


def hint_for(region_id: str) -> str:
    """The hint of a region id ``TASK`` or ``TASK.PART`` (the part's own hint, else the task's)."""
    task_id, _, part = region_id.partition(".")
    task = _BY_ID.get(task_id)
    if task is None:
        raise KeyError(f"solution region {region_id!r} names no known task; known tasks: {', '.join(TASK_IDS)}")
    return task.part_hints.get(part, task.hint)
