"""The conformance suite: the cases of every task, run in the GRADING process.

A case is a function ``case(c)`` that raises on failure.  ``c`` is a
:class:`remote.Student`: ``c.F.batch_norm_forward(x, w, b, eps)`` runs the
student's function in a child process (``server.py``) that sees only the
assembled submission, and gives back raw outputs (arrays, numbers, handles of
objects whose attributes are fetched on access).  Every expected value is
computed here, from the grader's own copies of the inputs, by the grader's
float64 ``reference``; the child never sees a tolerance or a verdict.

Inputs reach the child read-only; an input the function is meant to update
in place (a running buffer) is passed as :class:`remote.Mut` and comes back
with what the function left in it.  ``c.seed`` is the grading run's random
seed: the ``random_*`` cases draw their inputs from it, so hard-coded answers
earn nothing beyond the article's fixed examples.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, Tuple

import numpy as np

import minibn.grading.reference as R
from .remote import Callback, Mut, RemoteError, typename

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
                   f"got {float(g[i])!r}, expected {float(w[i])!r} (difference {float(g[i] - w[i]):.3g})")


def expect(cond, message):
    if not cond:
        raise Fail(message)


def raises(exc_type, fn, what):
    """``fn()`` (a call into the student's code) must raise ``exc_type`` (or a subclass)."""
    try:
        fn()
    except RemoteError as exc:
        if exc_type.__name__ in exc.types and not exc.read_only_write:
            return
        if "NotImplementedError" in exc.types:
            raise
        raise Fail(f"{what}: raised {exc.describe()}, expected {exc_type.__name__}")
    raise Fail(f"{what}: no {exc_type.__name__} raised")


def updated(what, buf, before, want, tol, dtype=None):
    """A buffer the function must update in place (``buf`` a :class:`Mut`)."""
    if buf.value.shape == np.shape(want) and np.array_equal(buf.value, before) and not np.allclose(before, want):
        raise Fail(f"{what}: the buffer was not updated in place (it still holds {before.tolist()!r}); "
                   f"rebinding the name (running_mean = ...) inside the function does not change the "
                   f"caller's array: write into it, running_mean[...] = ... or running_mean *= ...")
    close(what, buf.value, want, tol, dtype=dtype)


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


def _cache(c, x, f, weight, eps, frozen=False):
    """A ``BNCache`` of the student's class, filled from a reference forward ``f``."""
    dt = np.promote_types(x.dtype, np.float32)
    return c.F.BNCache(x=x, x_hat=f["x_hat"].astype(dt), mean=f["mean"], var=f["var"],
                       inv_std=f["inv_std"], weight=weight, eps=eps, count=f["count"], frozen=frozen)


# =========================================================================== bn_forward

def _check_forward(c, x, w, b, eps, tol, what=""):
    (y, cache), (same_weight,) = c.F.batch_norm_forward.with_facts([("same", "r.1.weight", "a1")], x, w, b, eps)
    f = R.bn_forward(x, w, b, eps)
    close(f"{what}y", y, f["y"], tol, dtype=x.dtype)
    close(f"{what}cache.x_hat", cache.x_hat, f["x_hat"], tol)
    close(f"{what}cache.mean", cache.mean, f["mean"], tol, floor=1.0, shape_free=True)
    close(f"{what}cache.var (biased: divide by m)", cache.var, f["var"], tol, shape_free=True)
    close(f"{what}cache.inv_std = 1/sqrt(var + eps)", cache.inv_std, f["inv_std"], tol, shape_free=True)
    expect(int(cache.count) == f["count"], f"{what}cache.count is {cache.count}, expected m = {f['count']}")
    expect(same_weight, f"{what}cache.weight is not the weight that was passed")
    expect(float(cache.eps) == eps, f"{what}cache.eps is {cache.eps}, expected {eps}")
    expect(not cache.frozen, f"{what}training-mode cache has frozen=True")
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
    _check_forward(c, x, None, None, 1e-5, 1e-10)
    _, (shared,) = c.F.batch_norm_forward.with_facts([("shares", "r.0", "r.1.x_hat")], x, None, None, 1e-5)
    expect(not shared, "y shares memory with cache.x_hat: writing into y would change the cache; "
                       "y must be a new array")


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
        layer.set("weight.data", w, inplace=True)
        layer.set("bias.data", b, inplace=True)
        x = data(shape, 21)
        close(f"{cls._path} train forward on {shape}", layer(x), R.bn_forward(x, w, b, 1e-4)["y"], 1e-10)


@case("bn_forward", "eval_mode_uses_running_stats")
def _(c):
    layer = c.nn.BatchNorm2d(3, eps=1e-3, dtype=np.float64)
    w, b = affine(3, 22)
    layer.set("weight.data", w, inplace=True)
    layer.set("bias.data", b, inplace=True)
    rm, rv = np.array([0.3, -0.2, 1.0]), np.array([2.0, 0.5, 1.5])
    layer.set("running_mean", rm, inplace=True)
    layer.set("running_var", rv, inplace=True)
    layer.eval()
    x = data((2, 3, 2, 2), 23)
    close("eval-mode y = gamma (x - running_mean) / sqrt(running_var + eps) + beta", layer(x),
          R.bn_forward(x, w, b, 1e-3, stats=(0, rm, rv))["y"], 1e-10)
    x1 = data((1, 3, 1, 1), 24)           # one value per channel is fine in eval mode
    close("eval mode with a single value per channel", layer(x1),
          R.bn_forward(x1, w, b, 1e-3, stats=(0, rm, rv))["y"], 1e-10)
    y = c.F.batch_norm(x, Mut(rm), Mut(rv), w, b, False, 0.1, 1e-3)
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
    dx, dw, db = fn(dy, cache)
    rdx, rdw, rdb = R.bn_backward(dy, f["x_hat"], f["inv_std"], w, f["count"], frozen)
    close(f"{what}dx", dx, rdx, tol, dtype=dtype if out_dtype else None)
    if gamma:
        close(f"{what}dgamma = sum(dy * x_hat)", dw, rdw, tol, dtype=dtype if out_dtype else None)
        close(f"{what}dbeta = sum(dy)", db, rdb, tol, dtype=dtype if out_dtype else None)
    else:
        expect(dw is None and db is None, f"{what}without weight, dgamma and dbeta must be None")


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
        reduce = Callback(o_dy.sum(axis=(0, 2)), (o_dy * o_xh).sum(axis=(0, 2)))
        dx, dw, db = c.F.batch_norm_backward(dy[part], cache, reduce=reduce)
        expect(reduce.calls == 1, f"reduce was called {reduce.calls} times, expected once")
        close(f"part {k}: dx with global sums from reduce", dx, rdx[part], 1e-9)
        close(f"part {k}: dgamma is this part's own sum", dw, (dy[part] * f["x_hat"][part]).sum(axis=(0, 2)), 1e-9)
        close(f"part {k}: dbeta is this part's own sum", db, dy[part].sum(axis=(0, 2)), 1e-9)


@case("bn_backward", "layer_backward_accumulates")
def _(c):
    layer = c.nn.BatchNorm2d(3, dtype=np.float64)
    w, b = affine(3, 43)
    layer.set("weight.data", w, inplace=True)
    layer.set("bias.data", b, inplace=True)
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
    rm, rv = Mut(np.zeros(1)), Mut(np.ones(1))
    # The article prints 6.765 for step 3; its own formula gives
    # (1 - 0.9) * 5.85 + 0.9 * 7.0 = 0.585 + 6.3 = 6.885, which is what is checked.
    for batch_mean, expected in ((5.0, 4.5), (6.0, 5.85), (7.0, 6.885)):
        before = rm.value.copy()
        c.F.update_running_stats(rm, rv, np.array([batch_mean]), np.array([1.0]), 10, 0.9)
        updated(f"running mean after the batch with mean {batch_mean} (momentum 0.9: {expected})", rm, before,
                [expected], 1e-12)


@case("running_stats", "unbiased_running_var_several_steps")
def _(c):
    r = rng(50)
    rm, rv = Mut(r.standard_normal(4)), Mut(r.uniform(0.5, 2, 4))
    em, ev = rm.value.copy(), rv.value.copy()
    for step, (alpha, m) in enumerate(((0.1, 4), (0.5, 2), (0.25, 7), (1.0, 3), (0.0, 5), (0.9, 12))):
        mean, var = r.standard_normal(4), r.uniform(0.1, 3, 4)
        before = rm.value.copy(), rv.value.copy()
        c.F.update_running_stats(rm, rv, mean, var, m, alpha)
        em, ev = R.ema(em, mean, alpha), R.ema(ev, var * m / (m - 1), alpha)
        updated(f"step {step} (momentum {alpha}, m={m}): running_mean", rm, before[0], em, 1e-12)
        updated(f"step {step} (momentum {alpha}, m={m}): running_var (unbiased batch var m/(m-1))", rv,
                before[1], ev, 1e-12)


@case("running_stats", "float32_buffers_stay_float32_in_place")
def _(c):
    rm, rv = Mut(np.zeros(3, np.float32)), Mut(np.ones(3, np.float32))
    mean, var = np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 2.0])
    c.F.update_running_stats(rm, rv, mean, var, 8, 0.3)
    updated("float32 running_mean", rm, np.zeros(3), R.ema(np.zeros(3), mean, 0.3), 1e-6, dtype=np.float32)
    updated("float32 running_var", rv, np.ones(3), R.ema(np.ones(3), var * 8 / 7, 0.3), 1e-6, dtype=np.float32)


def _layer_steps(c, layer, shapes, momentum, seed):
    C = shapes[0][1]
    em, ev = np.zeros(C), np.ones(C)
    for k, shape in enumerate(shapes):
        x = data(shape, seed + k)
        layer(x)
        m, mean, var = R.bn_stats(x)
        alpha = 1.0 / (k + 1) if momentum is None else momentum
        em, ev = R.ema(em, mean, alpha), R.ema(ev, var * m / (m - 1), alpha)
        close(f"{typename(layer)}(momentum={momentum}) step {k + 1} on {shape}: running_mean",
              layer.running_mean, em, 1e-10)
        close(f"{typename(layer)}(momentum={momentum}) step {k + 1} on {shape}: running_var",
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
    em, ev = np.array([0.5, 0.0, -0.5]), np.array([1.0, 2.0, 0.5])
    rm, rv = Mut(em), Mut(ev)
    c.F.batch_norm(x, rm, rv, None, None, True, 0.2, 1e-5)
    m, mean, var = R.bn_stats(x)
    updated("functional.batch_norm(training=True, momentum=0.2): running_mean", rm, em, R.ema(em, mean, 0.2), 1e-10)
    updated("functional.batch_norm(training=True, momentum=0.2): running_var", rv, ev,
            R.ema(ev, var * m / (m - 1), 0.2), 1e-10)
    before = rm.value.copy(), rv.value.copy()
    c.F.batch_norm(x, rm, rv, None, None, False, 0.2, 1e-5)
    expect(np.array_equal(rm.value, before[0]) and np.array_equal(rv.value, before[1]),
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
    dx, dw, db = c.SN.layer_norm_backward(dy, cache)
    f = R.ln_forward(x, k, w, b, eps)
    rdx, rdw, rdb = R.ln_backward(dy, f["x_hat"], f["inv_std"], k, w)
    what = f"LayerNorm{list(pshape)} on {shape}: "
    _compare_grads(what, (dx, dw, db), (rdx, rdw, rdb), affine_on, tol, dtype)


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
    ln = c.nn.LayerNorm((3, 2), dtype=np.float64)
    gn = c.nn.GroupNorm(2, 4, dtype=np.float64)
    for layer, shape, ref in ((ln, (4, 3, 2), "ln"), (gn, (2, 4, 3), "gn")):
        r = rng(86)
        pshape = (3, 2) if ref == "ln" else (4,)
        w, b = r.uniform(0.5, 2, pshape), r.uniform(-1, 1, pshape)
        layer.set("weight.data", w)
        layer.set("bias.data", b)
        x = data(shape, 87)
        dy = r.standard_normal(shape)
        layer(x)
        dx = layer.backward(dy)
        layer(x)
        layer.backward(dy)
        if ref == "ln":
            f = R.ln_forward(x, 2, w, b)
            rdx, rdw, rdb = R.ln_backward(dy, f["x_hat"], f["inv_std"], 2, w)
        else:
            f = R.gn_forward(x, 2, w, b)
            rdx, rdw, rdb = R.gn_backward(dy, f["x_hat"], f["inv_std"], 2, w)
        name = typename(layer)
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


# =========================================================================== randomized cases
# Drawn from the grading run's seed (``c.seed``, printed in the report): shapes, eps and data differ
# from one run to the next.

def _random_shape(r):
    return tuple(int(v) for v in r.integers(2, 5, size=int(r.integers(2, 5))))


@case("bn_forward", "random_inputs")
def _(c):
    r = rng(c.seed)
    for _ in range(3):
        shape = _random_shape(r)
        _check_forward(c, data(shape, int(r.integers(1 << 30))), *affine(shape[1], int(r.integers(1 << 30))),
                       float(r.uniform(1e-5, 0.5)), 1e-10, what=f"random {shape}: ")


for _task, _fn in (("bn_backward", "batch_norm_backward"), ("bn_backward_graph", "batch_norm_backward_graph")):
    def _make(fn_name, out_dtype):
        def run(c):
            r = rng(c.seed + 1)
            for _ in range(3):
                shape = _random_shape(r)
                _check_backward(c, getattr(c.F, fn_name), shape, int(r.integers(1 << 30)), 1e-9,
                                eps=float(r.uniform(1e-5, 0.5)), out_dtype=out_dtype, what=f"random {shape}: ")
        return run
    case(_task, "random_inputs")(_make(_fn, _task == "bn_backward"))


@case("running_stats", "random_inputs")
def _(c):
    r = rng(c.seed + 2)
    C = int(r.integers(1, 6))
    rm, rv = Mut(r.standard_normal(C)), Mut(r.uniform(0.5, 2, C))
    em, ev = rm.value.copy(), rv.value.copy()
    for step in range(4):
        alpha, m = float(r.uniform(0.05, 0.95)), int(r.integers(2, 40))
        mean, var = r.standard_normal(C), r.uniform(0.1, 3, C)
        before = rm.value.copy(), rv.value.copy()
        c.F.update_running_stats(rm, rv, mean, var, m, alpha)
        em, ev = R.ema(em, mean, alpha), R.ema(ev, var * m / (m - 1), alpha)
        updated(f"random step {step} (momentum {alpha!r}, m={m}): running_mean", rm, before[0], em, 1e-12)
        updated(f"random step {step} (momentum {alpha!r}, m={m}): running_var", rv, before[1], ev, 1e-12)


@case("merge_moments", "random_inputs")
def _(c):
    r = rng(c.seed + 3)
    for _ in range(3):
        sizes = tuple(int(v) for v in r.integers(1, 20, size=int(r.integers(1, 6))))
        _check_merge(c, _parts(sizes, int(r.integers(1, 5)), int(r.integers(1 << 30))), what=f"random {sizes}: ")


@case("ln_gn_backward", "random_inputs")
def _(c):
    r = rng(c.seed + 4)
    for _ in range(2):
        shape = _random_shape(r)
        _ln_case(c, shape, int(r.integers(1, len(shape))), int(r.integers(1 << 30)))
        per_row = int(np.prod(shape[2:], dtype=np.int64))      # more than one value per group
        groups = int(r.choice([g for g in range(1, shape[1] + 1) if shape[1] % g == 0 and shape[1] // g * per_row > 1]))
        _gn_case(c, shape, groups, int(r.integers(1 << 30)))


# =========================================================================== syncbn (mpiexec, batch mode)
# Each case writes a scenario (batch.py): every rank runs SyncBatchNorm on its slice of one global batch
# in its own process under mpiexec, and writes raw outputs; the result must equal single-process batch
# norm (the grader's float64 reference) on the whole batch.  Here ``c`` is a ``batch.Context``.

EPS = 1e-5


def _rank_parts(arr, nprocs, sizes):
    """``arr``'s rows cut into ``sizes`` (one entry per rank; the last rank takes any rest)."""
    sizes = (list(sizes) + [0] * nprocs)[:nprocs]
    sizes[-1] += arr.shape[0] - sum(sizes)
    starts = np.cumsum([0] + sizes)
    return [arr[starts[r]:starts[r + 1]] for r in range(nprocs)], [slice(starts[r], starts[r + 1])
                                                                 for r in range(nprocs)]


def _scenario(c, C, seed, dtype=np.float64, affine_=True, momentum=0.1):
    from .batch import Scenario
    w, b = affine(C, seed, dtype) if affine_ else (None, None)
    return Scenario(c.nprocs, C, dtype, affine_, momentum, w, b), w, b


def _no_error(ranks, what=""):
    for r, out in enumerate(ranks):
        if out["error"] is not None:
            i, err = out["error"]
            if "NotImplementedError" in err.types:
                raise Fail(err.describe())
            raise Fail(f"{what}rank {r} raised in step {i}: {err.describe()}")


def _judge_step(ranks, fwd, bwd, x, dy, w, b, slices, tol, dtype, what=""):
    """The forward (step ``fwd``) and backward (step ``bwd``) outputs of every rank, against the reference
    on the whole batch ``x`` (gradient ``dy``)."""
    f = R.bn_forward(x, w, b, EPS)
    rdx, _, _ = R.bn_backward(dy, f["x_hat"], f["inv_std"], w, f["count"])
    axes = tuple(a for a in range(x.ndim) if a != 1)
    for r, out in enumerate(ranks):
        part, where = slices[r], f"{what}rank {r}: "
        close(where + "y (this rank's rows of the whole batch's output)", out["steps"][fwd]["y"], f["y"][part],
              tol, dtype=dtype)
        close(where + "dx (this rank's rows)", out["steps"][bwd]["dx"], rdx[part], tol, dtype=dtype)
        if w is not None and x[part].shape[0]:
            d = np.asarray(dy[part], np.float64)
            close(where + "weight.grad (this rank's share: its rows of dy * x_hat)",
                  out["steps"][bwd]["weight_grad"], (d * f["x_hat"][part]).sum(axis=axes), tol)
            close(where + "bias.grad (this rank's share)", out["steps"][bwd]["bias_grad"], d.sum(axis=axes), tol)


def _sync_case(c, x, dy, sizes, seed, tol, dtype=np.float64, affine_=True, what=""):
    s, w, b = _scenario(c, x.shape[1], seed, dtype, affine_)
    xs, slices = _rank_parts(x, c.nprocs, sizes)
    fwd = s.forward(xs)
    bwd = s.backward(_rank_parts(dy, c.nprocs, sizes)[0])
    ranks = c.run(s)
    _no_error(ranks, what)
    _judge_step(ranks, fwd, bwd, x, dy, w, b, slices, tol, dtype, what)


@case("syncbn", "uneven_2d_batch")
def _(c):
    _sync_case(c, data((7, 4), 100), rng(101).standard_normal((7, 4)), [5, 2], 102, 1e-9)


@case("syncbn", "uneven_4d_batch")
def _(c):
    _sync_case(c, data((5, 3, 2, 2), 103), rng(104).standard_normal((5, 3, 2, 2)), [1, 4], 105, 1e-9)


@case("syncbn", "one_value_per_rank_global_m2")
def _(c):
    # one row per rank: the local count is 1, the global count 2; only the global one matters
    _sync_case(c, data((2, 3), 106), rng(107).standard_normal((2, 3)), [1, 1], 108, 1e-9)


@case("syncbn", "empty_rank_takes_part")
def _(c):
    _sync_case(c, data((6, 3, 2), 109), rng(110).standard_normal((6, 3, 2)), [0, 6], 111, 1e-9)


@case("syncbn", "random_uneven_batch")
def _(c):
    r = rng(c.seed)
    n, C = int(r.integers(3, 12)), int(r.integers(1, 6))
    shape = (n, C) + tuple(int(k) for k in r.integers(1, 4, int(r.integers(0, 3))))
    first = int(r.integers(0, n + 1))
    _sync_case(c, data(shape, c.seed + 1), rng(c.seed + 2).standard_normal(shape), [first, n - first],
               c.seed + 3, 1e-9, what=f"random batch {shape} split {first}/{n - first}: ")


@case("syncbn", "global_m1_is_ValueError_on_every_rank")
def _(c):
    s, _, _ = _scenario(c, 3, 112)
    step = s.forward(_rank_parts(data((1, 3), 113), c.nprocs, [1, 0])[0])
    for r, out in enumerate(c.run(s)):
        err = out["error"]
        if err is not None and "NotImplementedError" in err[1].types:
            raise Fail(err[1].describe())
        expect(err is not None and err[0] == step and "ValueError" in err[1].types,
               f"rank {r}: a global batch of one value per channel (ranks with 1 and 0 rows): "
               + (f"raised {err[1].describe()} in step {err[0]}, expected ValueError" if err is not None
                  else "no ValueError raised"))


@case("syncbn", "running_stats_global_over_steps")
def _(c):
    for momentum in (0.3, 0.75):
        s, _, _ = _scenario(c, 3, 114, momentum=momentum)
        steps, em, ev = [], np.zeros(3), np.ones(3)
        for k, (n, sizes) in enumerate(((6, [4, 2]), (3, [1, 2]), (8, [3, 5]))):
            x = data((n, 3, 2), 115 + k)
            m, mean, var = R.bn_stats(x)
            em, ev = R.ema(em, mean, momentum), R.ema(ev, var * m / (m - 1), momentum)
            steps.append((s.forward(_rank_parts(x, c.nprocs, sizes)[0]), em, ev))
        ranks = c.run(s)
        _no_error(ranks)
        for k, (i, em, ev) in enumerate(steps):
            for r, out in enumerate(ranks):
                what = f"momentum={momentum}, step {k + 1}, rank {r}: "
                close(what + "running_mean (global statistics)", out["steps"][i]["running_mean"], em, 1e-10)
                close(what + "running_var (global unbiased variance, global m)", out["steps"][i]["running_var"],
                      ev, 1e-10)
            first = ranks[0]["steps"][i]
            expect(all(np.array_equal(first["running_mean"], o["steps"][i]["running_mean"])
                       and np.array_equal(first["running_var"], o["steps"][i]["running_var"]) for o in ranks),
                   "the running statistics differ between ranks (they must be identical, bit for bit)")


@case("syncbn", "one_packed_allreduce_per_pass")
def _(c):
    # a layer's first forward may also check, once, that the ranks built it alike (minibn's does):
    # one step first, not counted; then the counts of every later step
    s, _, _ = _scenario(c, 5, 119)
    s.forward(_rank_parts(data((4, 5, 3), 119), c.nprocs, [2, 2])[0])
    s.backward(_rank_parts(rng(119).standard_normal((4, 5, 3)), c.nprocs, [2, 2])[0])
    counted = []
    for n in (6, 30):
        x, dy = data((n, 5, 3), 120 + n), rng(121).standard_normal((n, 5, 3))
        sizes = [n // 2, n - n // 2]
        counted.append((n, s.forward(_rank_parts(x, c.nprocs, sizes)[0]), s.backward(_rank_parts(dy, c.nprocs, sizes)[0])))
    ranks = c.run(s)
    _no_error(ranks)
    for r, out in enumerate(ranks):
        sent = []
        for n, f, b in counted:
            calls_f, calls_b = int(out["steps"][f]["calls"]), int(out["steps"][b]["calls"])
            expect(calls_f != -1, "SyncBatchNorm has no comm.ledger to count its collectives")
            expect(calls_f == 1, f"rank {r}: training forward made {calls_f} collective calls, expected one")
            expect(calls_b == 1, f"rank {r}: backward made {calls_b} collective calls, expected one")
            sent.append((int(out["steps"][f]["bytes"]), int(out["steps"][b]["bytes"])))
        expect(sent[0] == sent[1], f"rank {r}: bytes sent depend on the batch size ({sent[0]} for 6 rows, "
                                   f"{sent[1]} for 30): the payload must be O(C), per-channel sums only")


@case("syncbn", "large_mean_no_cancellation")
def _(c):
    _sync_case(c, data((8, 3), 122, loc=1e8), rng(123).standard_normal((8, 3)), [3, 5], 124, 1e-6,
               affine_=False, what="data with mean 1e8, std ~1: ")


@case("syncbn", "float32_and_no_affine")
def _(c):
    _sync_case(c, data((6, 4, 3), 125, dtype=np.float32), rng(126).standard_normal((6, 4, 3)).astype(np.float32),
               [2, 4], 127, 2e-5, dtype=np.float32, what="float32: ")
    _sync_case(c, data((5, 2), 128), rng(130).standard_normal((5, 2)), [3, 2], 129, 1e-9, affine_=False,
               what="affine=False: ")


@case("syncbn", "train_step_then_eval_mode")
def _(c):
    s, w, b = _scenario(c, 3, 131, momentum=0.5)
    x = data((5, 3), 132)
    s.forward(_rank_parts(x, c.nprocs, [2, 3])[0])
    m, mean, var = R.bn_stats(x)
    rm, rv = R.ema(np.zeros(3), mean, 0.5), R.ema(np.ones(3), var * m / (m - 1), 0.5)
    s.eval()
    x2 = data((3, 3), 133)
    i = s.forward([x2] * c.nprocs)
    ranks = c.run(s)
    _no_error(ranks)
    want = R.bn_forward(x2, w, b, EPS, stats=(0, rm, rv))["y"]
    for r, out in enumerate(ranks):
        close(f"rank {r}: eval-mode SyncBatchNorm output (running statistics of the global batch)",
              out["steps"][i]["y"], want, 1e-10)
        calls = int(out["steps"][i]["calls"])
        expect(calls <= 0, f"rank {r}: eval mode communicated ({calls} collective calls)")
