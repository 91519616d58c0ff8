"""``python -m minibn check``: the public cases of the assignment, run on this copy's own code.

A student runs this in the folder of the copy (``python -m minibn assignment OUT``
writes it) to see, before handing in, whether the solution regions do what the
article says.  The cases are public: the article's worked examples and
finite-difference checks of the hand-written backward passes.  The grader runs
more cases (hidden, some randomized) in its own process; passing every case here
is necessary, not sufficient.

Nothing here computes batch norm: expected values are the article's printed
numbers, written as the article's own arithmetic (``(2 - 5) / sqrt(5 + 1e-5)``),
or finite differences (:mod:`minibn.gradcheck`) of the copy's own forward.
This module imports only minibn itself, so it checks whichever minibn was
imported: run it from the folder that holds your ``minibn/``.

A failing case prints the task, the case and what differs, with the numbers
in full (``repr``) and their difference, in the same form as the grader's
messages.  The exit status is 0 only when every case passes.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from typing import Callable, List, NamedTuple

import numpy as np

from . import functional as F
from . import moments as M
from . import sample_norms as S
from .gradcheck import numerical_gradient

__all__ = ["Mismatch", "Case", "CASES", "run_cases", "main"]

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
GRAD_TOL = 1e-6          # finite differences in float64 agree to ~1e-9 with a correct backward


class Mismatch(AssertionError):
    """A public case found a difference; the message says what differs."""


class Case(NamedTuple):
    task: str
    name: str
    run: Callable[[], None]


CASES: List[Case] = []


def case(task: str, name: str):
    def register(fn):
        CASES.append(Case(task, name, fn))
        return fn
    return register


# =========================================================================== comparisons

def close(what, got, want, tol=1e-12, floor=1e-12, dtype=None):
    """``max|got - want| <= tol * max(max|want|, floor)``; shape (and dtype) must match."""
    if got is None:
        raise Mismatch(f"{what}: got None, expected an array of shape {np.shape(want)}")
    if dtype is not None and getattr(got, "dtype", None) != np.dtype(dtype):
        raise Mismatch(f"{what}: dtype {getattr(got, 'dtype', type(got).__name__)}, expected {np.dtype(dtype)}")
    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        raise Mismatch(f"{what}: shape {g.shape}, expected {w.shape}")
    if g.size == 0:
        return
    if not np.all(np.isfinite(g)):
        raise Mismatch(f"{what}: contains NaN or inf (expected finite values like {w.reshape(-1)[:3]})")
    diff = np.abs(g - w)
    err = float(np.max(diff)) / max(float(np.max(np.abs(w))), floor)
    if err > tol:
        i = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise Mismatch(f"{what}: relative error {err:.2e} > {tol:.0e}; worst at index {list(map(int, i))}: "
                       f"got {float(g[i])!r}, expected {float(w[i])!r} (difference {float(g[i] - w[i]):.3g})")


def expect(cond, message):
    if not cond:
        raise Mismatch(message)


def must_raise(exc_type, fn, what):
    try:
        fn()
    except exc_type:
        return
    except NotImplementedError:
        raise
    except Exception as exc:
        raise Mismatch(f"{what}: raised {type(exc).__name__}: {exc}, expected {exc_type.__name__}") from None
    raise Mismatch(f"{what}: no {exc_type.__name__} raised")


def updated_in_place(what, buf, before, want, tol=1e-12):
    """A buffer the code must write into: unchanged while it should change means the name was rebound."""
    want = np.asarray(want, dtype=np.float64)
    if np.array_equal(buf, before) and not np.allclose(before, want, rtol=tol, atol=0):
        raise Mismatch(f"{what}: the array passed in was not updated in place (it still holds "
                       f"{float(np.asarray(before).reshape(-1)[0])!r}, expected {float(want.reshape(-1)[0])!r}); "
                       "write into it (buf *= ..., buf += ..., buf[...] = ...) instead of rebinding the name")
    close(what, buf, want, tol)


# =========================================================================== bn_forward: article section 2

# The article's example: one channel, a mini-batch of four, gamma 2, beta 1, eps 1e-5.
ARTICLE_X = [2.0, 4.0, 6.0, 8.0]
ARTICLE_EPS = 1e-5
ARTICLE_MEAN = 5.0                              # (2 + 4 + 6 + 8) / 4
ARTICLE_VAR = 5.0                               # (9 + 1 + 1 + 9) / 4, biased
ARTICLE_X_HAT = [(2.0 - 5.0) / math.sqrt(5.0 + 1e-5), (4.0 - 5.0) / math.sqrt(5.0 + 1e-5),
                 (6.0 - 5.0) / math.sqrt(5.0 + 1e-5), (8.0 - 5.0) / math.sqrt(5.0 + 1e-5)]
ARTICLE_Y = [2.0 * v + 1.0 for v in ARTICLE_X_HAT]


def _check_article_forward(what, y, cache, scale, want_hat):
    """Each channel c holds the article's batch times ``scale[c]``: mean 5 s, var 5 s^2, m = 4."""
    scale = np.asarray(scale, dtype=np.float64)
    expect(int(cache.count) == 4, f"{what}: cache.count is {cache.count}, expected m = 4 values per channel")
    close(f"{what}: mean", cache.mean, ARTICLE_MEAN * scale)
    close(f"{what}: var (biased: divide by m)", cache.var, ARTICLE_VAR * scale ** 2)
    close(f"{what}: x_hat", cache.x_hat, want_hat)
    close(f"{what}: y = 2 * x_hat + 1", y, 2.0 * np.asarray(want_hat) + 1.0, dtype=np.float64)


@case("bn_forward", "article_section2_example")
def _():
    x = np.array(ARTICLE_X).reshape(4, 1)
    y, cache = F.batch_norm_forward(x, np.array([2.0]), np.array([1.0]), eps=ARTICLE_EPS)
    close("mean", cache.mean, [ARTICLE_MEAN])
    close("var (biased: divide by m)", cache.var, [ARTICLE_VAR])
    close("x_hat = (x - 5) / sqrt(5 + 1e-5)", cache.x_hat, np.reshape(ARTICLE_X_HAT, (4, 1)))
    close("y = 2 * x_hat + 1", y, np.reshape(ARTICLE_Y, (4, 1)), dtype=np.float64)
    expect(int(cache.count) == 4, f"cache.count is {cache.count}, expected m = 4")


@case("bn_forward", "article_example_per_channel")
def _():
    # two channels: the article's batch, and the same batch times 10 (mean 50, var 500)
    x = np.array(ARTICLE_X)[:, None] * np.array([1.0, 10.0])
    y, cache = F.batch_norm_forward(x, np.array([2.0, 2.0]), np.array([1.0, 1.0]), eps=ARTICLE_EPS)
    # x_hat of the second channel: (10 x - 50) / sqrt(500 + 1e-5)
    want_hat = np.stack([ARTICLE_X_HAT, [(10.0 * v - 50.0) / math.sqrt(500.0 + 1e-5) for v in ARTICLE_X]], axis=1)
    _check_article_forward("(4, 2) input", y, cache, [1.0, 10.0], want_hat)


@case("bn_forward", "article_example_spatial")
def _():
    # (N, C, H, W) = (2, 1, 2, 1): statistics over N and the spatial axes, m = 4
    x = np.array(ARTICLE_X).reshape(2, 1, 2, 1)
    y, cache = F.batch_norm_forward(x, np.array([2.0]), np.array([1.0]), eps=ARTICLE_EPS)
    _check_article_forward("(2, 1, 2, 1) input", y, cache, [1.0], np.reshape(ARTICLE_X_HAT, x.shape))


@case("bn_forward", "article_example_float32")
def _():
    x = np.array(ARTICLE_X, dtype=np.float32).reshape(4, 1)
    y, cache = F.batch_norm_forward(x, np.array([2.0], np.float32), np.array([1.0], np.float32),
                                    eps=ARTICLE_EPS)
    close("y (float32 in, float32 out)", y, np.reshape(ARTICLE_Y, (4, 1)), 1e-6, dtype=np.float32)


@case("bn_forward", "eval_forward_with_running_statistics")
def _():
    # eval mode normalizes with given statistics: the article's mean 5 and variance 5 give the same y
    x = np.array(ARTICLE_X).reshape(4, 1)
    y, _ = F.batch_norm_eval_forward(x, np.array([5.0]), np.array([5.0]), np.array([2.0]), np.array([1.0]),
                                     eps=ARTICLE_EPS)
    close("eval y with mean 5, var 5", y, np.reshape(ARTICLE_Y, (4, 1)))


@case("bn_forward", "one_value_per_channel_is_an_error")
def _():
    must_raise(ValueError, lambda: F.batch_norm_forward(np.ones((1, 3))),
               "training forward of a (1, 3) batch (m = 1: no variance)")


# =========================================================================== backward: finite differences

def _inputs(shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    return (rng.normal(1.0, 2.0, shape), rng.normal(1.0, 0.5, c), rng.normal(0.0, 0.5, c),
            rng.normal(0.0, 1.0, shape))


def _gradcheck(what, forward, backward, x, params, dy):
    """``backward(dy)`` against central differences of ``sum(forward() * dy)`` for x and each parameter.

    ``forward`` reads ``x`` and the arrays in ``params`` (perturbed in place);
    ``backward(dy)`` returns ``(dx, dweight, dbias)`` of the forward run last.
    """
    forward()
    grads = backward(dy)
    expect(isinstance(grads, tuple) and len(grads) == 3,
           f"{what}: backward returned {type(grads).__name__}, expected a tuple (dx, dweight, dbias)")
    loss = lambda: float(np.sum(forward() * dy))
    close(f"{what}: dx vs finite differences", grads[0], numerical_gradient(loss, x), GRAD_TOL)
    for (name, p), g in zip(params, grads[1:]):
        if p is None:
            expect(g is None, f"{what}: {name} is {type(g).__name__}, expected None without that parameter")
        else:
            close(f"{what}: {name} vs finite differences", g, numerical_gradient(loss, p), GRAD_TOL)


def _bn_training_gradcheck(backward, shape, seed, affine=True):
    x, gamma, beta, dy = _inputs(shape, seed)
    gamma, beta = (gamma, beta) if affine else (None, None)
    state = {}

    def forward():
        y, state["cache"] = F.batch_norm_forward(x, gamma, beta, eps=1e-5)
        return y

    _gradcheck(f"{shape} input{'' if affine else ', no gamma/beta'}", forward,
               lambda d: backward(d, state["cache"]), x, [("dweight", gamma), ("dbias", beta)], dy)


@case("bn_backward", "finite_differences_2d")
def _():
    _bn_training_gradcheck(F.batch_norm_backward, (6, 3), 1)


@case("bn_backward", "finite_differences_4d")
def _():
    _bn_training_gradcheck(F.batch_norm_backward, (2, 3, 2, 2), 2)


@case("bn_backward", "finite_differences_no_affine")
def _():
    _bn_training_gradcheck(F.batch_norm_backward, (5, 2), 3, affine=False)


@case("bn_backward", "finite_differences_eval_mode")
def _():
    x, gamma, beta, dy = _inputs((5, 3), 4)
    mean, var = np.array([0.5, 1.0, -1.0]), np.array([2.0, 0.5, 3.0])
    state = {}

    def forward():
        y, state["cache"] = F.batch_norm_eval_forward(x, mean, var, gamma, beta, eps=1e-5)
        return y

    _gradcheck("eval mode (statistics are constants)", forward, lambda d: F.batch_norm_backward(d, state["cache"]),
               x, [("dweight", gamma), ("dbias", beta)], dy)


@case("bn_backward_graph", "finite_differences_2d")
def _():
    _bn_training_gradcheck(F.batch_norm_backward_graph, (6, 3), 5)


@case("bn_backward_graph", "finite_differences_4d")
def _():
    _bn_training_gradcheck(F.batch_norm_backward_graph, (2, 3, 2, 2), 6)


@case("ln_gn_backward", "layer_norm_finite_differences")
def _():
    rng = np.random.default_rng(7)
    x, dy = rng.normal(1.0, 2.0, (3, 2, 4)), rng.normal(0.0, 1.0, (3, 2, 4))
    gamma, beta = rng.normal(1.0, 0.5, (2, 4)), rng.normal(0.0, 0.5, (2, 4))
    state = {}

    def forward():
        y, state["cache"] = S.layer_norm_forward(x, (2, 4), gamma, beta, eps=1e-5)
        return y

    _gradcheck("LayerNorm((2, 4)) of (3, 2, 4) input", forward, lambda d: S.layer_norm_backward(d, state["cache"]),
               x, [("dweight", gamma), ("dbias", beta)], dy)


@case("ln_gn_backward", "group_norm_finite_differences")
def _():
    rng = np.random.default_rng(8)
    x, dy = rng.normal(1.0, 2.0, (2, 4, 3)), rng.normal(0.0, 1.0, (2, 4, 3))
    gamma, beta = rng.normal(1.0, 0.5, 4), rng.normal(0.0, 0.5, 4)
    state = {}

    def forward():
        y, state["cache"] = S.group_norm_forward(x, 2, gamma, beta, eps=1e-5)
        return y

    _gradcheck("GroupNorm(2 groups) of (2, 4, 3) input", forward, lambda d: S.group_norm_backward(d, state["cache"]),
               x, [("dweight", gamma), ("dbias", beta)], dy)


# =========================================================================== running_stats: article section 3

@case("running_stats", "article_section3_example")
def _():
    # alpha = momentum = 0.9 (the weight of the new batch), running mean from 0; batch means 5, 6, 7.
    # The article prints 6.765 for step 3; its formula gives 0.1 * 5.85 + 0.9 * 7 = 6.885.
    running_mean, running_var = np.zeros(1), np.ones(1)
    for batch_mean, article in ((5.0, 4.5), (6.0, 5.85), (7.0, 6.885)):
        before = running_mean.copy()
        F.update_running_stats(running_mean, running_var, np.array([batch_mean]), np.array([1.0]), 10, 0.9)
        updated_in_place(f"running mean after the batch with mean {batch_mean} (momentum 0.9: {article})",
                         running_mean, before, [article])


@case("running_stats", "unbiased_running_variance")
def _():
    # the article's batch: biased var 5 over m = 4, so the unbiased one is 5 * 4 / 3;
    # from running_var = 1 with momentum 0.9: 0.1 * 1 + 0.9 * 20 / 3 = 6.1
    running_mean, running_var = np.zeros(1), np.ones(1)
    before = running_var.copy()
    F.update_running_stats(running_mean, running_var, np.array([5.0]), np.array([5.0]), 4, 0.9)
    updated_in_place("running var (unbiased batch variance var * m / (m - 1)): 0.1 * 1 + 0.9 * 20 / 3",
                     running_var, before, [6.1])


@case("running_stats", "float32_buffers_stay_float32")
def _():
    running_mean, running_var = np.zeros(2, np.float32), np.ones(2, np.float32)
    F.update_running_stats(running_mean, running_var, np.array([5.0, 6.0]), np.array([5.0, 5.0]), 4, 0.9)
    close("float32 running mean", running_mean, [4.5, 5.4], 1e-6, dtype=np.float32)
    close("float32 running var", running_var, [6.1, 6.1], 1e-6, dtype=np.float32)


# =========================================================================== merge_moments: article section 6

@case("merge_moments", "article_section6_formula_even_split")
def _():
    # [2, 4] (n 2, mean 3, var 1) and [6, 8] (n 2, mean 7, var 1) merge to the article's whole batch
    n, mean, var = M.merge_moments(np.array([2, 2]), np.array([[3.0], [7.0]]), np.array([[1.0], [1.0]]))
    expect(int(n) == 4, f"total count is {n}, expected 4")
    close("merged mean (2 * 3 + 2 * 7) / 4", mean, [5.0])
    close("merged var (2 * (1 + 4) + 2 * (1 + 4)) / 4 (with the between-part term)", var, [5.0])


@case("merge_moments", "article_section6_formula_uneven_split")
def _():
    # [2] (n 1, mean 2, var 0) and [4, 6, 8] (n 3, mean 6, var 8/3): weights are the counts
    n, mean, var = M.merge_moments(np.array([1, 3]), np.array([[2.0], [6.0]]), np.array([[0.0], [8.0 / 3.0]]))
    expect(int(n) == 4, f"total count is {n}, expected 4")
    close("merged mean (1 * 2 + 3 * 6) / 4", mean, [5.0])
    close("merged var (1 * (0 + 9) + 3 * (8/3 + 1)) / 4", var, [5.0])


# =========================================================================== running the cases

def _where(exc) -> str:
    """The innermost frame of the traceback in this package's code, outside this file: 'file.py line N'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename.startswith(PACKAGE_DIR) and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {os.path.relpath(f.filename, os.path.dirname(PACKAGE_DIR))} line {f.lineno})"


def run_case(c: Case):
    """``None`` when the case passes, else the message."""
    with np.errstate(all="ignore"):
        try:
            c.run()
        except Mismatch as exc:
            return str(exc)
        except NotImplementedError as exc:
            return f"not implemented yet: NotImplementedError: {exc}{_where(exc)}"
        except Exception as exc:
            return f"raised {type(exc).__name__}: {exc}{_where(exc)}"
    return None


def run_cases(tasks=None):
    """Run the public cases (of ``tasks``, or all); a list of ``(case, message or None)``."""
    return [(c, run_case(c)) for c in CASES if tasks is None or c.task in tasks]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minibn check",
                                description="run the assignment's public cases on this minibn's own code")
    p.add_argument("tasks", nargs="*", help="only these tasks (default: all)")
    args = p.parse_args(argv)
    known = sorted({c.task for c in CASES})
    unknown = [t for t in args.tasks if t not in known]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; the tasks with public cases are: {', '.join(known)}")
    print(f"checking the minibn in {PACKAGE_DIR}: public cases only (the grader also runs hidden ones)",
          flush=True)
    results = run_cases(set(args.tasks) or None)
    width = max(len(f"{c.task} / {c.name}") for c, _ in results)
    for c, message in results:
        label = f"{c.task} / {c.name}".ljust(width)
        line = f"ok    {c.task} / {c.name}" if message is None else f"FAIL  {label}  {message}"
        print(line, flush=True)
    failed = sum(message is not None for _, message in results)
    print(f"\n{len(results) - failed} of {len(results)} public cases pass"
          + ("" if args.tasks else "; syncbn has no public case here (the grader runs it under mpiexec -n 2)"))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
