"""The conformance suite: the cases of every task, run against a student's minibn.

This module runs inside the grading subprocess (``child.py``), next to the
student's package; it imports the grader's own float64 ``reference`` and never
minibn's code as a reference.

Isolation.  Each task is graded with the *other* tasks' functions replaced by
reference implementations of the same API (:func:`install_references`), so a
mistake in one task costs the marks of that task only: a wrong forward does not
fail the backward, a missing running-statistics update does not fail the layer
forward, and SyncBatchNorm is graded on its two reductions alone.

A case is a function ``case(c)`` that raises ``AssertionError`` (or anything
else) on failure; ``c`` holds the student's modules (``c.mb``, ``c.F``, ``c.SN``,
``c.M``, ``c.nn``, ``c.dist``) and the grader's MPI communicator ``c.comm``.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Callable, Dict, List, Tuple

import numpy as np

if __package__:                 # imported as minibn.grading.conformance (to list the cases)
    from . import reference as R
else:                           # run in the grading subprocess, where this directory is on sys.path
    import reference as R

CASES: "OrderedDict[str, List[Tuple[str, Callable]]]" = OrderedDict()


def case(task: str, name: str):
    def register(fn):
        CASES.setdefault(task, []).append((name, fn))
        return fn
    return register


# =========================================================================== assertions

class Fail(AssertionError):
    pass


def _np(a):
    return np.asarray(a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a)


def close(what, got, want, tol, floor=1e-12, dtype=None, shape_free=False):
    """``max|got - want| <= tol * max(max|want|, floor)``, with shape (and dtype) checks."""
    if got is None:
        raise Fail(f"{what}: got None, expected an array of shape {np.shape(want)}")
    if dtype is not None and getattr(got, "dtype", None) != np.dtype(dtype):
        raise Fail(f"{what}: dtype {getattr(got, 'dtype', type(got).__name__)}, expected {np.dtype(dtype)}")
    g = np.asarray(_np(got), dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if shape_free and g.size == w.size:
        g = g.reshape(w.shape)
    if g.shape != w.shape:
        raise Fail(f"{what}: shape {g.shape}, expected {w.shape}")
    if g.size == 0:
        return
    if not np.all(np.isfinite(g)):
        raise Fail(f"{what}: contains NaN or inf (expected finite values like {w.reshape(-1)[:3]})")
    scale = max(float(np.max(np.abs(w))), floor)
    diff = np.abs(g - w)
    err = float(np.max(diff)) / scale
    if err > tol:
        i = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise Fail(f"{what}: relative error {err:.2e} > {tol:.0e}; worst at index {list(map(int, i))}: "
                   f"got {g[i]:.6g}, expected {w[i]:.6g}")


def expect(cond, message):
    if not cond:
        raise Fail(message)


def raises(exc_type, fn, what):
    try:
        fn()
    except exc_type:
        return
    except NotImplementedError:
        raise
    except Exception as exc:
        raise Fail(f"{what}: raised {type(exc).__name__}({exc}), expected {exc_type.__name__}")
    raise Fail(f"{what}: no {exc_type.__name__} raised")


def rng(seed):
    return np.random.default_rng(seed)


def data(shape, seed, dtype=np.float64, loc=0.0, scale=1.0):
    """Random data with a different mean and spread in every channel."""
    r = rng(seed)
    x = r.standard_normal(shape)
    if len(shape) >= 2:
        c = shape[1]
        ch = (1, c) + (1,) * (len(shape) - 2)
        x = x * r.uniform(0.5, 3.0, c).reshape(ch) + r.uniform(-2, 2, c).reshape(ch)
    return (loc + scale * x).astype(dtype)


def affine(c_count, seed, dtype=np.float64):
    r = rng(seed)
    return r.uniform(0.5, 2.0, c_count).astype(dtype), r.uniform(-1, 1, c_count).astype(dtype)


SHAPES = (("2d", (8, 5)), ("3d", (4, 3, 5)), ("4d", (3, 4, 2, 3)), ("5d", (2, 3, 2, 2, 2)))


# =========================================================================== reference API
# The public functions of minibn, re-implemented from the grader's reference with
# the same signatures and return types.  They stand in for the tasks not being graded.

def _cache(c, x, f, weight, eps, frozen=False):
    """A ``BNCache`` of the student's class, filled from a reference forward ``f``."""
    dt = np.promote_types(x.dtype, np.float32)
    return c.F.BNCache(x=x, x_hat=f["x_hat"].astype(dt), mean=f["mean"], var=f["var"],
                       inv_std=f["inv_std"], weight=weight, eps=eps, count=f["count"], frozen=frozen)


def reference_api(c) -> Dict[Tuple[str, str], Callable]:
    F = c.F

    def normalize(x, mean, var, weight, bias, eps):
        f = R.bn_forward(x, weight, bias, eps, stats=(0, mean, var))
        return (f["y"].astype(x.dtype), f["x_hat"].astype(np.promote_types(x.dtype, np.float32)),
                f["inv_std"])

    def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, stats=None):
        F.check_floating(x)
        if x.ndim < 2:
            raise ValueError(f"batch norm expects (N, C, *) input, got shape {x.shape}")
        f = R.bn_forward(x, weight, bias, eps, stats)
        if f["count"] <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got shape {x.shape}")
        return f["y"].astype(x.dtype), _cache(c, x, f, weight, eps)

    def batch_norm_backward(dy, cache, reduce=None):
        dx, dg, db = R.bn_backward(dy, cache.x_hat, cache.inv_std, cache.weight, cache.count, cache.frozen)
        if reduce is not None and not cache.frozen:
            s_dy, s_dyx = reduce(db, dg)
            dx = R.bn_backward(dy, cache.x_hat, cache.inv_std, cache.weight, cache.count,
                               sums=(s_dy, s_dyx))[0]
        dx = dx.astype(dy.dtype)
        if cache.weight is None:
            return dx, None, None
        return dx, dg.astype(cache.weight.dtype), db.astype(cache.weight.dtype)

    def update_running_stats(running_mean, running_var, mean, var, count, momentum):
        a = float(momentum)
        if running_mean is not None:
            running_mean[...] = R.ema(running_mean, mean, a)
        if running_var is not None:
            running_var[...] = R.ema(running_var, np.asarray(var, np.float64) * count / (count - 1), a)

    def merge_moments(counts, means, variances):
        counts = np.asarray(counts, dtype=np.float64)
        means, variances = np.asarray(means, np.float64), np.asarray(variances, np.float64)
        n = counts.sum()
        w = (counts / n).reshape((-1,) + (1,) * (means.ndim - 1))
        mu = (w * means).sum(axis=0)
        return int(round(n)), mu, (w * (variances + (means - mu) ** 2)).sum(axis=0)

    return {
        ("functional", "normalize"): normalize,
        ("functional", "batch_norm_forward"): batch_norm_forward,
        ("functional", "batch_norm_backward"): batch_norm_backward,
        ("functional", "update_running_stats"): update_running_stats,
        ("moments", "merge_moments"): merge_moments,
    }


# which task each replaceable function belongs to
OWNER = {
    ("functional", "normalize"): "bn_forward",
    ("functional", "batch_norm_forward"): "bn_forward",
    ("functional", "batch_norm_backward"): "bn_backward",
    ("functional", "update_running_stats"): "running_stats",
    ("moments", "merge_moments"): "merge_moments",
}


def install_references(c, graded_task, tasks_present):
    """Replace the functions of every other present task by the reference, wherever minibn binds them."""
    api = reference_api(c)
    replaced = []
    for (mod_name, fn_name), impl in api.items():
        owner = OWNER[(mod_name, fn_name)]
        if owner == graded_task or owner not in tasks_present:
            continue
        module = sys.modules.get(f"minibn.{mod_name}")
        original = getattr(module, fn_name, None)
        if original is None:
            continue
        for name, mod in list(sys.modules.items()):
            if mod is None or not (name == "minibn" or name.startswith("minibn.")):
                continue
            _rebind(mod, original, impl)
            for cls in [v for v in vars(mod).values() if isinstance(v, type) and v.__module__ == name]:
                _rebind(cls, original, impl)
        replaced.append(f"{mod_name}.{fn_name}")
    return replaced


def _rebind(owner, original, impl):
    """Point every attribute of ``owner`` (a module or a class) bound to ``original`` at ``impl``,
    a class's ``staticmethod`` alias included (the reference engine's methods are
    ``functional``'s functions)."""
    for attr, value in list(vars(owner).items()):
        if value is original:
            setattr(owner, attr, impl)
        elif isinstance(value, staticmethod) and value.__func__ is original:
            setattr(owner, attr, staticmethod(impl))


# =========================================================================== bn_forward

def _check_forward(c, x, w, b, eps, tol, what=""):
    x_before = x.copy()
    y, cache = c.F.batch_norm_forward(x, w, b, eps)
    f = R.bn_forward(x, w, b, eps)
    close(f"{what}y", y, f["y"], tol, dtype=x.dtype)
    close(f"{what}cache.x_hat", cache.x_hat, f["x_hat"], tol)
    close(f"{what}cache.mean", cache.mean, f["mean"], tol, floor=1.0, shape_free=True)
    close(f"{what}cache.var (biased: divide by m)", cache.var, f["var"], tol, shape_free=True)
    close(f"{what}cache.inv_std = 1/sqrt(var + eps)", cache.inv_std, f["inv_std"], tol, shape_free=True)
    expect(int(cache.count) == f["count"], f"{what}cache.count is {cache.count}, expected m = {f['count']}")
    expect(cache.weight is w, f"{what}cache.weight is not the weight that was passed")
    expect(float(cache.eps) == eps, f"{what}cache.eps is {cache.eps}, expected {eps}")
    expect(not getattr(cache, "frozen", False), f"{what}training-mode cache has frozen=True")
    expect(np.array_equal(x, x_before), f"{what}the input x was modified in place")
    return y, cache


@case("bn_forward", "article_section2_example")
def _(c):
    x = np.array([[2.0], [4.0], [6.0], [8.0]])
    y, cache = c.F.batch_norm_forward(x, np.array([2.0]), np.array([1.0]), 1e-5)
    close("mean of [2, 4, 6, 8] (article: 5.0)", cache.mean, [5.0], 1e-12, shape_free=True)
    close("variance of [2, 4, 6, 8] (article: 5.0, biased)", cache.var, [5.0], 1e-12, shape_free=True)
    close("x_hat (article: [-1.34, -0.45, 0.45, 1.34])", cache.x_hat,
          [[-1.34], [-0.45], [0.45], [1.34]], 0.005 / 1.34)
    close("y = 2 x_hat + 1 (article: [-1.68, 0.1, 1.9, 3.68])", y, [[-1.68], [0.1], [1.9], [3.68]], 0.01 / 3.68)
    _check_forward(c, x, np.array([2.0]), np.array([1.0]), 1e-5, 1e-12)


for _name, _shape in SHAPES:
    def _make(shape):
        def run(c):
            w, b = affine(shape[1], 1)
            _check_forward(c, data(shape, 2), w, b, 1e-5, 1e-10)
        return run
    case("bn_forward", f"reference_{_name}_{'x'.join(map(str, _shape))}")(_make(_shape))


@case("bn_forward", "no_affine_and_y_is_not_x_hat")
def _(c):
    x = data((6, 3, 4), 3)
    y, cache = _check_forward(c, x, None, None, 1e-5, 1e-10)
    x_hat = np.array(cache.x_hat, copy=True)
    y[...] = 123.0
    expect(np.array_equal(cache.x_hat, x_hat), "writing into y changed cache.x_hat: y must be a new array")


@case("bn_forward", "eps_inside_sqrt")
def _(c):
    for eps in (0.5, 1e-300, 3.0):          # eps must be > 0; 1e-300 acts as 0 did
        x = data((5, 4), 4, scale=0.3)
        w, b = affine(4, 5)
        _check_forward(c, x, w, b, eps, 1e-10, what=f"eps={eps}: ")


@case("bn_forward", "constant_channel")
def _(c):
    x = data((6, 3, 2), 6)
    x[:, 1] = 7.25
    w, b = affine(3, 7)
    y, _ = _check_forward(c, x, w, b, 1e-3, 1e-10)
    close("constant channel: y = beta", y[:, 1], np.full((6, 2), b[1]), 1e-10)


@case("bn_forward", "smallest_batch_m2")
def _(c):
    _check_forward(c, data((2, 3), 8), *affine(3, 9), 1e-5, 1e-10)
    _check_forward(c, data((1, 2, 2), 10), *affine(2, 11), 1e-5, 1e-10)


@case("bn_forward", "m_equals_1_is_ValueError")
def _(c):
    for shape in ((1, 3), (1, 3, 1), (1, 2, 1, 1)):
        x = data(shape, 12)
        raises(ValueError, lambda: c.F.batch_norm_forward(x, None, None, 1e-5),
               f"batch_norm_forward on shape {shape} (one value per channel)")


@case("bn_forward", "dtype_float32")
def _(c):
    x = data((4, 3, 3, 2), 13, dtype=np.float32)
    w, b = affine(3, 14, np.float32)
    y, cache = c.F.batch_norm_forward(x, w, b, 1e-5)
    f = R.bn_forward(x, w, b, 1e-5)
    close("float32 y", y, f["y"], 2e-6, dtype=np.float32)
    close("float32 cache.var", cache.var, f["var"], 1e-6, shape_free=True)


@case("bn_forward", "dtype_float16")
def _(c):
    x = data((16, 3), 15, dtype=np.float16)
    w, b = affine(3, 16, np.float16)
    y, _ = c.F.batch_norm_forward(x, w, b, 1e-5)
    f = R.bn_forward(x, w, b, 1e-5)
    close("float16 y", y, f["y"], 3e-3, dtype=np.float16)


@case("bn_forward", "large_mean_float32_no_cancellation")
def _(c):
    x = data((64, 3), 17, dtype=np.float32, loc=1000.0, scale=0.1)
    y, cache = c.F.batch_norm_forward(x, None, None, 1e-5)
    f = R.bn_forward(x, None, None, 1e-5)
    close("variance of float32 data with mean 1000, std ~0.1 (needs a stable method)",
          cache.var, f["var"], 1e-5, shape_free=True)
    close("y for float32 data with mean 1000, std ~0.1 (x - mean must not lose the digits of x)",
          y, f["y"], 1e-5, dtype=np.float32)


@case("bn_forward", "given_stats_are_used")
def _(c):
    x = data((4, 3, 2), 18)
    w, b = affine(3, 19)
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([0.25, 4.0, 1.5])
    y, cache = c.F.batch_norm_forward(x, w, b, 1e-5, stats=(40, mean, var))
    f = R.bn_forward(x, w, b, 1e-5, stats=(40, mean, var))
    close("y with stats=(40, mean, var) given", y, f["y"], 1e-10)
    expect(int(cache.count) == 40, f"cache.count is {cache.count}, expected the given count 40")


@case("bn_forward", "layer_train_mode_2d_and_4d")
def _(c):
    for cls, shape in ((c.nn.BatchNorm1d, (7, 4)), (c.nn.BatchNorm1d, (3, 4, 5)), (c.nn.BatchNorm2d, (3, 4, 3, 2))):
        layer = cls(4, eps=1e-4, dtype=np.float64)
        w, b = affine(4, 20)
        layer.weight.data[...] = w
        layer.bias.data[...] = b
        x = data(shape, 21)
        close(f"{cls.__name__} train forward on {shape}", layer(x), R.bn_forward(x, w, b, 1e-4)["y"], 1e-10)


@case("bn_forward", "eval_mode_uses_running_stats")
def _(c):
    layer = c.nn.BatchNorm2d(3, eps=1e-3, dtype=np.float64)
    w, b = affine(3, 22)
    layer.weight.data[...] = w
    layer.bias.data[...] = b
    rm, rv = np.array([0.3, -0.2, 1.0]), np.array([2.0, 0.5, 1.5])
    layer.running_mean[...] = rm
    layer.running_var[...] = rv
    layer.eval()
    x = data((2, 3, 2, 2), 23)
    close("eval-mode y = gamma (x - running_mean) / sqrt(running_var + eps) + beta", layer(x),
          R.bn_forward(x, w, b, 1e-3, stats=(0, rm, rv))["y"], 1e-10)
    x1 = data((1, 3, 1, 1), 24)           # one value per channel is fine in eval mode
    close("eval mode with a single value per channel", layer(x1),
          R.bn_forward(x1, w, b, 1e-3, stats=(0, rm, rv))["y"], 1e-10)
    y = c.F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3)
    close("functional.batch_norm(training=False)", y, R.bn_forward(x, w, b, 1e-3, stats=(0, rm, rv))["y"], 1e-10)
    free = c.nn.BatchNorm1d(3, track_running_stats=False, dtype=np.float64).eval()
    x2 = data((5, 3), 25)
    close("eval mode without running stats uses the batch", free(x2), R.bn_forward(x2)["y"], 1e-10)


# =========================================================================== backward (both tasks)

def _backward_inputs(c, shape, seed, dtype=np.float64, eps=1e-5, gamma=True, frozen=False):
    x = data(shape, seed, dtype)
    w = affine(shape[1], seed + 1, dtype)[0] if gamma else None
    if frozen:
        r = rng(seed + 2)
        stats = (0, r.standard_normal(shape[1]), r.uniform(0.5, 2.0, shape[1]))
        f = R.bn_forward(x, w, None, eps, stats)
        f["count"] = x.size // shape[1]
    else:
        f = R.bn_forward(x, w, None, eps)
    dy = rng(seed + 3).standard_normal(shape).astype(dtype)
    return x, w, dy, f, _cache(c, x, f, w, eps, frozen)


def _check_backward(c, fn, shape, seed, tol, dtype=np.float64, eps=1e-5, gamma=True, frozen=False,
                    out_dtype=True, what=""):
    x, w, dy, f, cache = _backward_inputs(c, shape, seed, dtype, eps, gamma, frozen)
    dy_before = dy.copy()
    dx, dw, db = fn(dy, cache)
    rdx, rdw, rdb = R.bn_backward(dy, f["x_hat"], f["inv_std"], w, f["count"], frozen)
    close(f"{what}dx", dx, rdx, tol, dtype=dtype if out_dtype else None)
    if gamma:
        close(f"{what}dgamma = sum(dy * x_hat)", dw, rdw, tol, dtype=dtype if out_dtype else None)
        close(f"{what}dbeta = sum(dy)", db, rdb, tol, dtype=dtype if out_dtype else None)
    else:
        expect(dw is None and db is None, f"{what}without weight, dgamma and dbeta must be None")
    expect(np.array_equal(dy, dy_before), f"{what}dy was modified in place")


def _finite_differences(c, fn, shape, seed, eps=1e-5):
    x = data(shape, seed)
    w, b = affine(shape[1], seed + 1)
    dy = rng(seed + 2).standard_normal(shape)

    def loss():
        return float((R.bn_forward(x, w, b, eps)["y"] * dy).sum())

    f = R.bn_forward(x, w, b, eps)
    dx, dw, db = fn(dy, _cache(c, x, f, w, eps))
    for name, got, arr in (("dx", dx, x), ("dgamma", dw, w), ("dbeta", db, b)):
        num = R.numerical_gradient(loss, arr)
        close(f"{name} against finite differences of sum(dy * y) on {shape}", got, num, 1e-6,
              floor=1e-3)


def _backward_cases(task, fn_name, out_dtype):
    def fn(c):
        return getattr(c.F, fn_name)

    for name, shape in SHAPES:
        def run(c, shape=shape):
            _check_backward(c, fn(c), shape, 30, 1e-9, out_dtype=out_dtype)
        case(task, f"reference_{name}_{'x'.join(map(str, shape))}")(run)

    @case(task, "finite_differences_2d_and_4d")
    def _(c):
        _finite_differences(c, fn(c), (4, 3), 31)
        _finite_differences(c, fn(c), (2, 3, 2, 2), 32, eps=0.1)

    @case(task, "no_affine")
    def _(c):
        _check_backward(c, fn(c), (5, 3, 2), 33, 1e-9, gamma=False, out_dtype=out_dtype)

    @case(task, "eps_comes_from_the_cache")
    def _(c):
        _check_backward(c, fn(c), (4, 3), 34, 1e-9, eps=0.7, out_dtype=out_dtype)
        _check_backward(c, fn(c), (3, 2, 2), 35, 1e-9, eps=0.0, out_dtype=out_dtype)

    @case(task, "smallest_batch_m2")
    def _(c):
        _check_backward(c, fn(c), (2, 4), 36, 1e-9, out_dtype=out_dtype)


_backward_cases("bn_backward", "batch_norm_backward", out_dtype=True)
_backward_cases("bn_backward_graph", "batch_norm_backward_graph", out_dtype=False)


@case("bn_backward", "dtype_float32")
def _(c):
    _check_backward(c, c.F.batch_norm_backward, (4, 3, 2, 3), 37, 1e-5, dtype=np.float32)


@case("bn_backward", "eval_mode_frozen_statistics")
def _(c):
    _check_backward(c, c.F.batch_norm_backward, (4, 3, 2), 38, 1e-9, frozen=True)
    _check_backward(c, c.F.batch_norm_backward, (1, 3), 39, 1e-9, frozen=True, what="one sample: ")


@case("bn_backward", "reduce_hook_gives_global_sums")
def _(c):
    # a batch split in two parts, as two processes hold it: each part's dx must
    # equal its rows of the whole batch's dx once the sums are made global
    x = data((7, 3, 2), 40)
    w = affine(3, 41)[0]
    dy = rng(42).standard_normal(x.shape)
    f = R.bn_forward(x, w, None, 1e-5)
    rdx = R.bn_backward(dy, f["x_hat"], f["inv_std"], w, f["count"])[0]
    parts = (slice(0, 4), slice(4, 7))
    for k, part in enumerate(parts):
        other = parts[1 - k]
        fp = dict(f, x_hat=f["x_hat"][part])
        cache = _cache(c, x[part], fp, w, 1e-5)          # count is the whole batch's m
        o_dy, o_xh = dy[other], f["x_hat"][other]
        calls = []

        def reduce(s_dy, s_dyx):
            calls.append(1)
            return (np.asarray(s_dy) + o_dy.sum(axis=(0, 2)), np.asarray(s_dyx) + (o_dy * o_xh).sum(axis=(0, 2)))

        dx, dw, db = c.F.batch_norm_backward(dy[part], cache, reduce=reduce)
        expect(len(calls) == 1, f"reduce was called {len(calls)} times, expected once")
        close(f"part {k}: dx with global sums from reduce", dx, rdx[part], 1e-9)
        close(f"part {k}: dgamma is this part's own sum", dw, (dy[part] * f["x_hat"][part]).sum(axis=(0, 2)), 1e-9)
        close(f"part {k}: dbeta is this part's own sum", db, dy[part].sum(axis=(0, 2)), 1e-9)


@case("bn_backward", "layer_backward_accumulates")
def _(c):
    layer = c.nn.BatchNorm2d(3, dtype=np.float64)
    w, b = affine(3, 43)
    layer.weight.data[...] = w
    layer.bias.data[...] = b
    x = data((2, 3, 3, 2), 44)
    dy = rng(45).standard_normal(x.shape)
    layer(x)
    dx = layer.backward(dy)
    f = R.bn_forward(x, w, b, 1e-5)
    rdx, rdw, rdb = R.bn_backward(dy, f["x_hat"], f["inv_std"], w, f["count"])
    close("BatchNorm2d.backward dx", dx, rdx, 1e-9)
    close("weight.grad", layer.weight.grad, rdw, 1e-9)
    close("bias.grad", layer.bias.grad, rdb, 1e-9)
    layer(x)
    layer.backward(dy)
    close("weight.grad after two backward passes (accumulated)", layer.weight.grad, 2 * rdw, 1e-9)


@case("bn_backward_graph", "float32_input_float64_math")
def _(c):
    x, w, dy, f, cache = _backward_inputs(c, (5, 3, 2), 46, dtype=np.float32)
    dx, dw, db = c.F.batch_norm_backward_graph(dy, cache)
    rdx, rdw, rdb = R.bn_backward(dy, f["x_hat"], f["inv_std"], w, f["count"])
    close("dx from float32 inputs", dx, rdx, 1e-5)
    close("dgamma from float32 inputs", dw, rdw, 1e-5)


@case("bn_backward_graph", "eval_cache_is_ValueError")
def _(c):
    _check_backward(c, c.F.batch_norm_backward_graph, (4, 3), 47, 1e-9, out_dtype=False)
    _, _, dy, _, cache = _backward_inputs(c, (4, 3), 47, frozen=True)
    raises(ValueError, lambda: c.F.batch_norm_backward_graph(dy, cache),
           "batch_norm_backward_graph on a frozen (eval-mode) cache")


# =========================================================================== running_stats

@case("running_stats", "article_section3_example")
def _(c):
    rm, rv = np.zeros(1), np.ones(1)
    rm_id = id(rm)
    # The article prints 6.765 for step 3; its own formula gives
    # (1 - 0.9) * 5.85 + 0.9 * 7.0 = 0.585 + 6.3 = 6.885, which is what is checked.
    for batch_mean, expected in ((5.0, 4.5), (6.0, 5.85), (7.0, 6.885)):
        c.F.update_running_stats(rm, rv, np.array([batch_mean]), np.array([1.0]), 10, 0.9)
        close(f"running mean after the batch with mean {batch_mean} (momentum 0.9: {expected})", rm,
              [expected], 1e-12)
    expect(id(rm) == rm_id, "running_mean must be updated in place")


@case("running_stats", "unbiased_running_var_several_steps")
def _(c):
    r = rng(50)
    rm, rv = r.standard_normal(4), r.uniform(0.5, 2, 4)
    em, ev = rm.copy(), rv.copy()
    for step, (alpha, m) in enumerate(((0.1, 4), (0.5, 2), (0.25, 7), (1.0, 3), (0.0, 5), (0.9, 12))):
        mean, var = r.standard_normal(4), r.uniform(0.1, 3, 4)
        c.F.update_running_stats(rm, rv, mean, var, m, alpha)
        em, ev = R.ema(em, mean, alpha), R.ema(ev, var * m / (m - 1), alpha)
        close(f"step {step} (momentum {alpha}, m={m}): running_mean", rm, em, 1e-12)
        close(f"step {step} (momentum {alpha}, m={m}): running_var (unbiased batch var m/(m-1))", rv, ev, 1e-12)


@case("running_stats", "float32_buffers_stay_float32_in_place")
def _(c):
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ids = id(rm), id(rv)
    mean, var = np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 2.0])
    c.F.update_running_stats(rm, rv, mean, var, 8, 0.3)
    expect((id(rm), id(rv)) == ids, "the running buffers must be updated in place")
    close("float32 running_mean", rm, R.ema(np.zeros(3), mean, 0.3), 1e-6, dtype=np.float32)
    close("float32 running_var", rv, R.ema(np.ones(3), var * 8 / 7, 0.3), 1e-6, dtype=np.float32)


def _layer_steps(c, layer, shapes, momentum, seed):
    C = shapes[0][1]
    em, ev = np.zeros(C), np.ones(C)
    for k, shape in enumerate(shapes):
        x = data(shape, seed + k)
        layer(x)
        m, mean, var = R.bn_stats(x)
        alpha = 1.0 / (k + 1) if momentum is None else momentum
        em, ev = R.ema(em, mean, alpha), R.ema(ev, var * m / (m - 1), alpha)
        close(f"{type(layer).__name__}(momentum={momentum}) step {k + 1} on {shape}: running_mean",
              layer.running_mean, em, 1e-10)
        close(f"{type(layer).__name__}(momentum={momentum}) step {k + 1} on {shape}: running_var",
              layer.running_var, ev, 1e-10)
    expect(int(layer.num_batches_tracked) == len(shapes),
           f"num_batches_tracked is {int(layer.num_batches_tracked)}, expected {len(shapes)}")


@case("running_stats", "layer_default_momentum_uneven_batches")
def _(c):
    _layer_steps(c, c.nn.BatchNorm1d(3, dtype=np.float64), [(5, 3), (2, 3), (9, 3), (4, 3)], 0.1, 51)
    _layer_steps(c, c.nn.BatchNorm2d(2, momentum=0.35, dtype=np.float64),
                 [(2, 2, 3, 2), (1, 2, 2, 2), (3, 2, 1, 2)], 0.35, 52)


@case("running_stats", "layer_momentum_none_cumulative_average")
def _(c):
    _layer_steps(c, c.nn.BatchNorm1d(4, momentum=None, dtype=np.float64),
                 [(6, 4), (3, 4), (2, 4, 3), (5, 4)], None, 53)


@case("running_stats", "functional_batch_norm_updates_only_in_training")
def _(c):
    x = data((6, 3, 2), 54)
    rm, rv = np.array([0.5, 0.0, -0.5]), np.array([1.0, 2.0, 0.5])
    em, ev = rm.copy(), rv.copy()
    c.F.batch_norm(x, rm, rv, None, None, True, 0.2, 1e-5)
    m, mean, var = R.bn_stats(x)
    close("functional.batch_norm(training=True, momentum=0.2): running_mean", rm, R.ema(em, mean, 0.2), 1e-10)
    close("functional.batch_norm(training=True, momentum=0.2): running_var", rv,
          R.ema(ev, var * m / (m - 1), 0.2), 1e-10)
    before = rm.copy(), rv.copy()
    c.F.batch_norm(x, rm, rv, None, None, False, 0.2, 1e-5)
    expect(np.array_equal(rm, before[0]) and np.array_equal(rv, before[1]),
           "eval mode (training=False) changed the running statistics")


@case("running_stats", "float32_layer")
def _(c):
    layer = c.nn.BatchNorm1d(3, momentum=0.6)
    x = data((10, 3), 55, dtype=np.float32)
    layer(x)
    m, mean, var = R.bn_stats(x)
    close("float32 layer running_mean", layer.running_mean, R.ema(np.zeros(3), mean, 0.6), 1e-6, dtype=np.float32)
    close("float32 layer running_var", layer.running_var, R.ema(np.ones(3), var * m / (m - 1), 0.6), 1e-6,
          dtype=np.float32)


# =========================================================================== merge_moments

def _parts(sizes, C, seed, loc=0.0, scale=1.0):
    r = rng(seed)
    return [loc + scale * (r.standard_normal((n, C)) * r.uniform(0.5, 2.0) + r.uniform(-3, 3)) for n in sizes]


def _check_merge(c, parts, tol=1e-12, what=""):
    counts = [p.shape[0] for p in parts]
    C = parts[0].shape[1]
    means = np.stack([p.mean(axis=0) if len(p) else np.zeros(C) for p in parts])
    variances = np.stack([p.var(axis=0) if len(p) else np.zeros(C) for p in parts])
    n, mu, var = c.M.merge_moments(np.array(counts), means, variances)
    whole = np.concatenate(parts)
    expect(int(n) == whole.shape[0], f"{what}total count is {n}, expected {whole.shape[0]}")
    m, rmean, rvar = R.two_pass(whole, (0,))
    close(f"{what}global mean", mu, rmean.reshape(-1), tol, floor=1.0)
    close(f"{what}global variance", var, rvar.reshape(-1), tol)


@case("merge_moments", "article_3_gpus_of_32")
def _(c):
    _check_merge(c, _parts((32, 32, 32), 4, 60), what="3 parts of 32: ")
    n = c.M.merge_moments(np.array([32, 32, 32]), np.zeros((3, 2)), np.ones((3, 2)))[0]
    expect(isinstance(n, (int, np.integer)), f"the total count must be an integer, got {type(n).__name__}")


@case("merge_moments", "uneven_parts")
def _(c):
    _check_merge(c, _parts((5, 1, 17, 3), 3, 61), what="parts of 5, 1, 17, 3: ")
    _check_merge(c, _parts((2, 40), 2, 62), what="parts of 2 and 40: ")


@case("merge_moments", "empty_part_adds_nothing")
def _(c):
    _check_merge(c, _parts((6, 0, 4), 3, 63), what="parts of 6, 0, 4: ")
    means = np.array([[1.0, 2.0], [55.0, -9.0]])
    variances = np.array([[0.5, 0.25], [3.0, 7.0]])
    n, mu, var = c.M.merge_moments(np.array([3, 0]), means, variances)
    close("an empty part's (arbitrary) moments are ignored: mean", mu, means[0], 1e-12)
    close("an empty part's (arbitrary) moments are ignored: var", var, variances[0], 1e-12)


@case("merge_moments", "single_part")
def _(c):
    _check_merge(c, _parts((9,), 4, 64), what="one part: ")


@case("merge_moments", "shapes_P_and_P_C_H")
def _(c):
    r = rng(65)
    counts = np.array([3, 5, 2])
    means, variances = r.standard_normal(3), r.uniform(0.1, 2, 3)
    n, mu, var = c.M.merge_moments(counts, means, variances)
    w = counts / counts.sum()
    rmu = (w * means).sum()
    close("scalar statistics (shape (P,)): mean", mu, rmu, 1e-12, shape_free=True)
    close("scalar statistics (shape (P,)): var", var, (w * (variances + (means - rmu) ** 2)).sum(), 1e-12,
          shape_free=True)
    means, variances = r.standard_normal((3, 2, 4)), r.uniform(0.1, 2, (3, 2, 4))
    n, mu, var = c.M.merge_moments(counts, means, variances)
    w3 = w.reshape(3, 1, 1)
    rmu = (w3 * means).sum(axis=0)
    close("statistics of shape (P, 2, 4): mean", mu, rmu, 1e-12)
    close("statistics of shape (P, 2, 4): var", var, (w3 * (variances + (means - rmu) ** 2)).sum(axis=0), 1e-12)


@case("merge_moments", "large_mean_no_cancellation")
def _(c):
    _check_merge(c, _parts((7, 11, 5), 3, 66, loc=1e8, scale=1.0), tol=1e-6, what="data with mean 1e8, std ~1: ")


@case("merge_moments", "float32_statistics_and_list_counts")
def _(c):
    parts = _parts((4, 6), 3, 67)
    means = np.stack([p.mean(axis=0) for p in parts]).astype(np.float32)
    variances = np.stack([p.var(axis=0) for p in parts]).astype(np.float32)
    n, mu, var = c.M.merge_moments([4, 6], means, variances)
    w = np.array([0.4, 0.6]).reshape(2, 1)
    m64, v64 = means.astype(np.float64), variances.astype(np.float64)
    rmu = (w * m64).sum(axis=0)
    expect(int(n) == 10, f"total count is {n}, expected 10")
    close("mean from float32 statistics", mu, rmu, 1e-7, floor=1.0)
    close("var from float32 statistics", var, (w * (v64 + (m64 - rmu) ** 2)).sum(axis=0), 1e-7)


# =========================================================================== ln_gn_backward
# LayerNorm and GroupNorm share one backward (sample_norms.row_norm_backward): the
# caches come from minibn's own forward functions, the expected values from the
# grader's reference.

def _compare_grads(what, got, want, affine_on, tol, dtype):
    """dx always; dgamma and dbeta with affine parameters, else both must be None."""
    (dx, dw, db), (rdx, rdw, rdb) = got, want
    close(what + "dx", dx, rdx, tol, dtype=dtype)
    if affine_on:
        close(what + "dgamma", dw, rdw, tol, dtype=dtype)
        close(what + "dbeta", db, rdb, tol, dtype=dtype)
    else:
        expect(dw is None and db is None, what + "without weight and bias, dgamma and dbeta must be None")


def _ln_case(c, shape, k, seed, affine_on=True, eps=1e-5, dtype=np.float64, tol=1e-9):
    x = data(shape, seed, dtype)
    pshape = shape[len(shape) - k:]
    r = rng(seed + 1)
    w = r.uniform(0.5, 2.0, pshape).astype(dtype) if affine_on else None
    b = r.uniform(-1, 1, pshape).astype(dtype) if affine_on else None
    dy = r.standard_normal(shape).astype(dtype)
    _, cache = c.SN.layer_norm_forward(x, pshape, w, b, eps)
    dy_before = dy.copy()
    dx, dw, db = c.SN.layer_norm_backward(dy, cache)
    f = R.ln_forward(x, k, w, b, eps)
    rdx, rdw, rdb = R.ln_backward(dy, f["x_hat"], f["inv_std"], k, w)
    what = f"LayerNorm{list(pshape)} on {shape}: "
    _compare_grads(what, (dx, dw, db), (rdx, rdw, rdb), affine_on, tol, dtype)
    expect(np.array_equal(dy, dy_before), what + "dy was modified in place")


def _gn_case(c, shape, groups, seed, affine_on=True, eps=1e-5, dtype=np.float64, tol=1e-9):
    x = data(shape, seed, dtype)
    w, b = affine(shape[1], seed + 1, dtype) if affine_on else (None, None)
    dy = rng(seed + 2).standard_normal(shape).astype(dtype)
    _, cache = c.SN.group_norm_forward(x, groups, w, b, eps)
    dx, dw, db = c.SN.group_norm_backward(dy, cache)
    f = R.gn_forward(x, groups, w, b, eps)
    rdx, rdw, rdb = R.gn_backward(dy, f["x_hat"], f["inv_std"], groups, w)
    what = f"GroupNorm({groups} groups) on {shape}: "
    _compare_grads(what, (dx, dw, db), (rdx, rdw, rdb), affine_on, tol, dtype)


@case("ln_gn_backward", "layernorm_shapes")
def _(c):
    _ln_case(c, (4, 5), 1, 70)
    _ln_case(c, (2, 3, 4), 2, 71)
    _ln_case(c, (3, 2, 2, 3), 1, 72)
    _ln_case(c, (2, 3, 2, 2), 3, 73)


@case("ln_gn_backward", "groupnorm_shapes")
def _(c):
    _gn_case(c, (4, 6), 3, 74)
    _gn_case(c, (2, 6, 3), 2, 75)
    _gn_case(c, (2, 4, 2, 3), 4, 76)
    _gn_case(c, (3, 4, 3, 2), 1, 77)


@case("ln_gn_backward", "no_affine")
def _(c):
    _ln_case(c, (3, 4, 5), 1, 78, affine_on=False)
    _gn_case(c, (2, 6, 2, 2), 3, 79, affine_on=False)


@case("ln_gn_backward", "eps")
def _(c):
    _ln_case(c, (3, 6), 1, 80, eps=0.5)
    _gn_case(c, (2, 4, 3), 2, 81, eps=0.5)


@case("ln_gn_backward", "finite_differences")
def _(c):
    for kind in ("ln", "gn"):
        shape = (3, 4) if kind == "ln" else (2, 4, 3)
        x = data(shape, 82)
        r = rng(83)
        pshape = (4,) if kind == "ln" else (4,)
        w, b = r.uniform(0.5, 2.0, pshape), r.uniform(-1, 1, pshape)
        dy = r.standard_normal(shape)

        def forward():
            return R.ln_forward(x, 1, w, b, 1e-3)["y"] if kind == "ln" else R.gn_forward(x, 2, w, b, 1e-3)["y"]

        def loss():
            return float((forward() * dy).sum())

        if kind == "ln":
            _, cache = c.SN.layer_norm_forward(x, (4,), w, b, 1e-3)
            dx, dw, db = c.SN.layer_norm_backward(dy, cache)
        else:
            _, cache = c.SN.group_norm_forward(x, 2, w, b, 1e-3)
            dx, dw, db = c.SN.group_norm_backward(dy, cache)
        name = "LayerNorm" if kind == "ln" else "GroupNorm"
        for what, got, arr in (("dx", dx, x), ("dgamma", dw, w), ("dbeta", db, b)):
            close(f"{name} {what} against finite differences", got, R.numerical_gradient(loss, arr), 1e-6,
                  floor=1e-3)


@case("ln_gn_backward", "dtype_float32")
def _(c):
    _ln_case(c, (4, 3, 5), 1, 84, dtype=np.float32, tol=2e-5)
    _gn_case(c, (3, 4, 2, 2), 2, 85, dtype=np.float32, tol=2e-5)


@case("ln_gn_backward", "layers_accumulate")
def _(c):
    ln = c.nn.LayerNorm((3, 2), dtype=np.float64) if _accepts_dtype(c.nn.LayerNorm) else c.nn.LayerNorm((3, 2))
    gn = c.nn.GroupNorm(2, 4, dtype=np.float64) if _accepts_dtype(c.nn.GroupNorm) else c.nn.GroupNorm(2, 4)
    for layer, shape, ref in ((ln, (4, 3, 2), "ln"), (gn, (2, 4, 3), "gn")):
        r = rng(86)
        layer.weight.data = r.uniform(0.5, 2, layer.weight.data.shape)
        layer.bias.data = r.uniform(-1, 1, layer.bias.data.shape)
        x = data(shape, 87)
        dy = r.standard_normal(shape)
        layer(x)
        dx = layer.backward(dy)
        layer(x)
        layer.backward(dy)
        if ref == "ln":
            f = R.ln_forward(x, 2, layer.weight.data, layer.bias.data)
            rdx, rdw, rdb = R.ln_backward(dy, f["x_hat"], f["inv_std"], 2, layer.weight.data)
        else:
            f = R.gn_forward(x, 2, layer.weight.data, layer.bias.data)
            rdx, rdw, rdb = R.gn_backward(dy, f["x_hat"], f["inv_std"], 2, layer.weight.data)
        name = type(layer).__name__
        close(f"{name}.backward dx", dx, rdx, 1e-9)
        close(f"{name} weight.grad after two backward passes", layer.weight.grad, 2 * rdw, 1e-9)
        close(f"{name} bias.grad after two backward passes", layer.bias.grad, 2 * rdb, 1e-9)


@case("ln_gn_backward", "instance_norm_is_groupnorm_with_G_equal_C")
def _(c):
    x = data((2, 3, 4), 88)
    w, b = affine(3, 89)
    dy = rng(90).standard_normal(x.shape)
    _, cache = c.SN.instance_norm_forward(x, w, b, 1e-5)
    dx, dw, db = c.SN.instance_norm_backward(dy, cache)
    f = R.gn_forward(x, 3, w, b)
    rdx, rdw, rdb = R.gn_backward(dy, f["x_hat"], f["inv_std"], 3, w)
    close("InstanceNorm dx", dx, rdx, 1e-9)
    close("InstanceNorm dgamma", dw, rdw, 1e-9)
    close("InstanceNorm dbeta", db, rdb, 1e-9)


def _accepts_dtype(cls):
    import inspect
    try:
        return "dtype" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


# =========================================================================== syncbn (under mpiexec)
# Every rank runs the case on its own slice of one global batch; the result must
# equal single-process batch norm (the grader's reference) on the whole batch.

def _split(c, n, sizes):
    """This rank's row slice of a batch of ``n`` rows cut into ``sizes`` (one entry per rank)."""
    sizes = list(sizes)[:c.comm.Get_size()]
    sizes[-1] += n - sum(sizes)
    start = sum(sizes[:c.comm.Get_rank()])
    return slice(start, start + sizes[c.comm.Get_rank()])


def _sync_layer(c, C, seed, dtype=np.float64, **kw):
    layer = c.dist.SyncBatchNorm(C, dtype=dtype, **kw)
    if layer.affine:
        w, b = affine(C, seed, dtype)
        layer.weight.data[...] = w
        layer.bias.data[...] = b
    return layer


def _ledger(layer):
    comm = getattr(layer, "comm", None)
    return getattr(comm, "ledger", None)


def _sync_step(c, layer, x_global, part, dy_global, tol, what=""):
    """One forward and backward on this rank's part; checks y, dx, the gradients' local share."""
    x, dy = x_global[part], dy_global[part]
    w = None if not layer.affine else np.array(layer.weight.data, dtype=np.float64)
    b = None if not layer.affine else np.array(layer.bias.data, dtype=np.float64)
    if layer.affine:
        layer.weight.grad = layer.bias.grad = None
    y = layer(x)
    dx = layer.backward(dy)
    f = R.bn_forward(x_global, w, b, layer.eps)
    rdx, _, _ = R.bn_backward(dy_global, f["x_hat"], f["inv_std"], w, f["count"])
    close(f"{what}y (this rank's rows of the whole batch's output)", y, f["y"][part], tol, dtype=x.dtype)
    close(f"{what}dx (this rank's rows)", dx, rdx[part], tol, dtype=x.dtype)
    if layer.affine and x.shape[0]:
        axes = tuple(a for a in range(x.ndim) if a != 1)
        close(f"{what}weight.grad (this rank's share: its rows of dy * x_hat)", layer.weight.grad,
              (np.asarray(dy, np.float64) * f["x_hat"][part]).sum(axis=axes), tol)
        close(f"{what}bias.grad (this rank's share)", layer.bias.grad,
              np.asarray(dy, np.float64).sum(axis=axes), tol)
    return f


@case("syncbn", "uneven_2d_batch")
def _(c):
    x, dy = data((7, 4), 100), rng(101).standard_normal((7, 4))
    _sync_step(c, _sync_layer(c, 4, 102), x, _split(c, 7, [5, 2]), dy, 1e-9)


@case("syncbn", "uneven_4d_batch")
def _(c):
    x, dy = data((5, 3, 2, 2), 103), rng(104).standard_normal((5, 3, 2, 2))
    _sync_step(c, _sync_layer(c, 3, 105), x, _split(c, 5, [1, 4]), dy, 1e-9)


@case("syncbn", "one_value_per_rank_global_m2")
def _(c):
    # one row per rank: the local count is 1, the global count 2; only the global one matters
    x, dy = data((2, 3), 106), rng(107).standard_normal((2, 3))
    _sync_step(c, _sync_layer(c, 3, 108), x, _split(c, 2, [1, 1]), dy, 1e-9)


@case("syncbn", "empty_rank_takes_part")
def _(c):
    x, dy = data((6, 3, 2), 109), rng(110).standard_normal((6, 3, 2))
    _sync_step(c, _sync_layer(c, 3, 111), x, _split(c, 6, [0, 6]), dy, 1e-9)


@case("syncbn", "global_m1_is_ValueError_on_every_rank")
def _(c):
    layer = _sync_layer(c, 3, 112)
    x = data((1, 3), 113)
    part = _split(c, 1, [1, 0])
    raises(ValueError, lambda: layer(x[part]), "a global batch of one value per channel (ranks with 1 and 0 rows)")


@case("syncbn", "running_stats_global_over_steps")
def _(c):
    for momentum in (0.3, 0.75):
        layer = _sync_layer(c, 3, 114, momentum=momentum)
        em, ev = np.zeros(3), np.ones(3)
        for k, (n, sizes) in enumerate(((6, [4, 2]), (3, [1, 2]), (8, [3, 5]))):
            x = data((n, 3, 2), 115 + k)
            layer(x[_split(c, n, sizes)])
            m, mean, var = R.bn_stats(x)
            em, ev = R.ema(em, mean, momentum), R.ema(ev, var * m / (m - 1), momentum)
            what = f"momentum={momentum}, step {k + 1}: "
            close(what + "running_mean (global statistics)", layer.running_mean, em, 1e-10)
            close(what + "running_var (global unbiased variance, global m)", layer.running_var, ev, 1e-10)
        both = c.comm.allgather((np.array(layer.running_mean), np.array(layer.running_var)))
        expect(all(np.array_equal(both[0][0], o[0]) and np.array_equal(both[0][1], o[1]) for o in both),
               "the running statistics differ between ranks (they must be identical, bit for bit)")


@case("syncbn", "one_packed_allreduce_per_pass")
def _(c):
    layer = _sync_layer(c, 5, 119)
    ledger = _ledger(layer)
    expect(ledger is not None, "SyncBatchNorm has no comm.ledger to count its collectives")
    # a layer's first forward may also check, once, that the ranks built it alike (minibn's does):
    # one step first, not counted; then the counts of every later step
    layer(data((4, 5, 3), 119)[_split(c, 4, [2, 2])])
    layer.backward(rng(119).standard_normal((4, 5, 3))[_split(c, 4, [2, 2])])
    sent = []
    for n in (6, 30):
        x, dy = data((n, 5, 3), 120 + n), rng(121).standard_normal((n, 5, 3))
        part = _split(c, n, [n // 2, n - n // 2])
        before = ledger.snapshot()
        layer(x[part])
        fwd = ledger.since(before)
        mid = ledger.snapshot()
        layer.backward(dy[part])
        bwd = ledger.since(mid)
        calls_f, calls_b = sum(v[0] for v in fwd.values()), sum(v[0] for v in bwd.values())
        expect(calls_f == 1, f"training forward made {calls_f} collective calls ({fwd}), expected one")
        expect(calls_b == 1, f"backward made {calls_b} collective calls ({bwd}), expected one")
        sent.append((sum(v[1] for v in fwd.values()), sum(v[1] for v in bwd.values())))
    expect(sent[0] == sent[1], f"bytes sent depend on the batch size ({sent[0]} for 6 rows, {sent[1]} for 30): "
                               "the payload must be O(C), per-channel sums only")


@case("syncbn", "large_mean_no_cancellation")
def _(c):
    x = data((8, 3), 122, loc=1e8)
    dy = rng(123).standard_normal((8, 3))
    _sync_step(c, _sync_layer(c, 3, 124, affine=False), x, _split(c, 8, [3, 5]), dy, 1e-6,
               what="data with mean 1e8, std ~1: ")


@case("syncbn", "float32_and_no_affine")
def _(c):
    x = data((6, 4, 3), 125, dtype=np.float32)
    dy = rng(126).standard_normal((6, 4, 3)).astype(np.float32)
    _sync_step(c, _sync_layer(c, 4, 127, dtype=np.float32), x, _split(c, 6, [2, 4]), dy, 2e-5,
               what="float32: ")
    x64 = data((5, 2), 128)
    _sync_step(c, _sync_layer(c, 2, 129, affine=False), x64, _split(c, 5, [3, 2]),
               rng(130).standard_normal((5, 2)), 1e-9, what="affine=False: ")


@case("syncbn", "train_step_then_eval_mode")
def _(c):
    layer = _sync_layer(c, 3, 131, momentum=0.5)
    x = data((5, 3), 132)
    layer(x[_split(c, 5, [2, 3])])
    m, mean, var = R.bn_stats(x)
    rm, rv = R.ema(np.zeros(3), mean, 0.5), R.ema(np.ones(3), var * m / (m - 1), 0.5)
    layer.eval()
    ledger = _ledger(layer)
    before = ledger.snapshot() if ledger is not None else None
    x2 = data((3, 3), 133)
    y = layer(x2)
    close("eval-mode SyncBatchNorm output (running statistics of the global batch)", y,
          R.bn_forward(x2, layer.weight.data, layer.bias.data, layer.eps, stats=(0, rm, rv))["y"], 1e-10)
    if ledger is not None:
        expect(not ledger.since(before), f"eval mode communicated: {ledger.since(before)}")
