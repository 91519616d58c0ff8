"""The pure math in minibn.functional against the article and an independent float64 reference."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minibn.functional as F
from minibn.gradcheck import check_function, numerical_gradient, rel_error
from lesson_utils import matches_printed

EPS = 1e-5


# --------------------------------------------------------------------------- the article, section 2

def article_example():
    x = np.array([2.0, 4.0, 6.0, 8.0]).reshape(4, 1)      # one feature, a batch of four
    return x, np.array([2.0]), np.array([1.0])


def test_article_section2_statistics_exact():
    x, g, b = article_example()
    _, cache = F.batch_norm_forward(x, g, b, EPS)
    # by hand: (2 + 4 + 6 + 8) / 4 and (9 + 1 + 1 + 9) / 4
    assert cache.mean[0] == 5.0
    assert cache.var[0] == 5.0
    assert cache.count == 4


def test_article_section2_x_hat_and_y_exact():
    x, g, b = article_example()
    y, cache = F.batch_norm_forward(x, g, b, EPS)
    s = math.sqrt(5.0 + 1e-5)
    x_hat = [(2 - 5) / s, (4 - 5) / s, (6 - 5) / s, (8 - 5) / s]
    y_exact = [2.0 * v + 1.0 for v in x_hat]
    np.testing.assert_allclose(cache.x_hat[:, 0], x_hat, rtol=1e-15, atol=0)
    np.testing.assert_allclose(y[:, 0], y_exact, rtol=1e-15, atol=1e-15)
    # eps moves the sixth decimal: -1.683279 with eps = 1e-5, -1.683282 (2 * -3/sqrt(5) + 1) without
    assert abs(y[0, 0] - (-1.6832789)) < 1e-7
    assert abs(y[0, 0] - (2 * -3 / math.sqrt(5.0) + 1)) > 2e-6


def test_article_section2_printed_rounding():
    x, g, b = article_example()
    y, cache = F.batch_norm_forward(x, g, b, EPS)
    printed_xhat = ["-1.34", "-0.45", "0.45", "1.34"]
    printed_y = ["-1.68", "0.1", "1.9", "3.68"]
    for v, p in zip(cache.x_hat[:, 0], printed_xhat):
        assert matches_printed(v, p), (v, p)
    # Every printed y is the exact y at the article's printed number of decimals ...
    for v, p in zip(y[:, 0], printed_y):
        assert matches_printed(v, p), (v, p)
    # ... and the article's arithmetic is gamma * round(x_hat, 2) + beta exactly.
    from_rounded = 2.0 * np.round(cache.x_hat[:, 0], 2) + 1.0
    np.testing.assert_allclose(from_rounded, [float(p) for p in printed_y], atol=1e-12)
    # The rounding is visible: exact y[1] = 0.1056 rounds to 0.11 at two decimals, not 0.10.
    assert round(float(y[1, 0]), 2) == 0.11 and round(float(y[2, 0]), 2) == 1.89


def test_printed_rounding_check_can_fail():
    assert not matches_printed(-1.683281, "-1.69")
    assert not matches_printed(0.1056, "0.10")


# --------------------------------------------------------------------------- the article, section 3

def test_article_section3_running_mean():
    rm, rv = np.zeros(1), np.ones(1)
    got = []
    for batch_mean in (5.0, 6.0, 7.0):
        F.update_running_stats(rm, rv, np.array([batch_mean]), np.array([1.0]), count=4, momentum=0.9)
        got.append(rm[0])
    # steps 1 and 2 as printed in the article
    assert got[0] == pytest.approx(4.5, rel=1e-15) and got[1] == pytest.approx(5.85, rel=1e-15)
    # step 3: the article prints (1 - 0.9) * 5.85 + 0.9 * 7.0 = 6.765, but that expression is
    # 0.585 + 6.3 = 6.885; minibn computes the expression, not the misprint.
    assert got[2] == pytest.approx((1 - 0.9) * 5.85 + 0.9 * 7.0, rel=1e-15)
    assert got[2] == pytest.approx(6.885, rel=1e-15)
    assert abs(got[2] - 6.765) == pytest.approx(0.12, rel=1e-12)
    # hand formula for the variance with unbiased batch variance 1 * 4/3 each time
    v = 1.0
    for _ in range(3):
        v = 0.1 * v + 0.9 * (4.0 / 3.0)
    assert rv[0] == pytest.approx(v, rel=1e-14)


# --------------------------------------------------------------------------- against the reference

SHAPES = [(7, 3), (5, 4, 6), (3, 2, 4, 5), (2, 3, 3, 2, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_backward_match_reference(shape, affine, rng, ref, relerr):
    C = shape[1]
    x = rng.normal(3.0, 2.0, shape)
    g = rng.normal(1.0, 0.5, C) if affine else None
    b = rng.normal(0.0, 1.0, C) if affine else None
    dy = rng.normal(size=shape)
    y, cache = F.batch_norm_forward(x, g, b, EPS)
    y_ref, xh_ref = ref.forward(x, g, b, EPS)
    assert relerr(y, y_ref) < 1e-13 and relerr(cache.x_hat, xh_ref) < 1e-13
    dx_ref, dg_ref, db_ref = ref.backward(dy, x, g, EPS)
    for backward in (F.batch_norm_backward, F.batch_norm_backward_graph):
        dx, dg, db = backward(dy, cache)
        assert relerr(dx, dx_ref) < 1e-10
        if affine:
            assert relerr(dg, dg_ref) < 1e-12 and relerr(db, db_ref) < 1e-12
        else:
            assert dg is None and db is None


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_forward_backward_match_reference(shape, rng, ref, relerr):
    C = shape[1]
    x = rng.normal(size=shape)
    mean, var = rng.normal(size=C), rng.uniform(0.5, 2.0, C)
    g, b = rng.normal(size=C), rng.normal(size=C)
    y, cache = F.batch_norm_eval_forward(x, mean, var, g, b, EPS)
    y_ref, xh_ref = ref.forward(x, g, b, EPS, mean=mean, var=var)
    assert relerr(y, y_ref) < 1e-13
    dy = rng.normal(size=shape)
    dx, dg, db = F.batch_norm_backward(dy, cache)
    ax = ref.axes(len(shape))
    assert relerr(dx, dy * (g / np.sqrt(var + EPS)).reshape(ref.bshape(len(shape)))) < 1e-13
    assert relerr(dg, (dy * xh_ref).sum(axis=ax)) < 1e-12
    assert relerr(db, dy.sum(axis=ax)) < 1e-12
    with pytest.raises(ValueError, match="training-mode"):
        F.batch_norm_backward_graph(dy, cache)


# --------------------------------------------------------------------------- gradient checks

@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("which", ["closed_form", "graph"])
@pytest.mark.parametrize("affine", [True, False])
def test_both_backward_derivations_finite_differences(shape, which, affine, rng):
    C = shape[1]
    x = rng.normal(1.0, 2.0, shape)
    g = rng.normal(1.0, 0.5, C) if affine else None
    b = rng.normal(size=C) if affine else None
    dy = rng.normal(size=shape)
    backward = F.batch_norm_backward if which == "closed_form" else F.batch_norm_backward_graph

    def forward(inp):
        return F.batch_norm_forward(inp, g, b, EPS)[0]

    def grad_x(d):
        return backward(d, F.batch_norm_forward(x, g, b, EPS)[1])[0]

    assert check_function(forward, grad_x, x, dy) < 1e-7
    if affine:
        _, dg, db = backward(dy, F.batch_norm_forward(x, g, b, EPS)[1])
        loss = lambda: float((F.batch_norm_forward(x, g, b, EPS)[0] * dy).sum())  # noqa: E731
        assert rel_error(dg, numerical_gradient(loss, g)) < 1e-7
        assert rel_error(db, numerical_gradient(loss, b)) < 1e-7


def test_eval_backward_finite_differences(rng):
    x = rng.normal(size=(6, 3, 4))
    mean, var, g, b = rng.normal(size=3), rng.uniform(0.5, 2, 3), rng.normal(size=3), rng.normal(size=3)
    dy = rng.normal(size=x.shape)
    forward = lambda inp: F.batch_norm_eval_forward(inp, mean, var, g, b, EPS)[0]  # noqa: E731
    backward = lambda d: F.batch_norm_backward(d, F.batch_norm_eval_forward(x, mean, var, g, b, EPS)[1])[0]  # noqa: E731
    assert check_function(forward, backward, x, dy) < 1e-7


def test_gradient_check_detects_a_wrong_backward(rng):
    """The same check, fed a backward that forgets the gradient through the mean, fails."""
    x = rng.normal(size=(8, 3))
    dy = rng.normal(size=x.shape)
    forward = lambda inp: F.batch_norm_forward(inp, None, None, EPS)[0]  # noqa: E731

    def wrong(d):
        cache = F.batch_norm_forward(x, None, None, EPS)[1]
        xh = cache.x_hat
        return cache.inv_std.reshape(1, -1) * (d - xh * (d * xh).mean(axis=0))   # no "- mean(dy)"

    assert check_function(forward, wrong, x, dy) > 1e-2


def test_both_derivations_agree_closely(rng):
    x = rng.normal(10.0, 3.0, (16, 5, 3))
    g, b = rng.normal(size=5), rng.normal(size=5)
    _, cache = F.batch_norm_forward(x, g, b, EPS)
    dy = rng.normal(size=x.shape)
    a, c = F.batch_norm_backward(dy, cache), F.batch_norm_backward_graph(dy, cache)
    for u, v in zip(a, c):
        assert rel_error(u, v) < 1e-12


# --------------------------------------------------------------------------- running statistics, functional API

@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.0, 1.0])
def test_functional_batch_norm_running_stats(momentum, rng, ref, relerr):
    C = 3
    rm, rv = np.zeros(C), np.ones(C)
    batches = [rng.normal(loc, scale, (8, C, 2)) for loc, scale in ((1, 1), (5, 2), (-2, 0.5), (0, 3))]
    for xb in batches:
        y = F.batch_norm(xb, rm, rv, None, None, training=True, momentum=momentum, eps=EPS)
        assert relerr(y, ref.forward(xb, eps=EPS)[0]) < 1e-13
    rm_ref, rv_ref = ref.running(batches, momentum)
    assert relerr(rm, rm_ref) < 1e-13 and relerr(rv, rv_ref) < 1e-13
    x_eval = rng.normal(size=(4, C, 2))
    y_eval = F.batch_norm(x_eval, rm, rv, training=False, eps=EPS)
    assert relerr(y_eval, ref.forward(x_eval, eps=EPS, mean=rm_ref, var=rv_ref)[0]) < 1e-13


def test_functional_batch_norm_argument_errors(rng):
    x = rng.normal(size=(4, 3))
    with pytest.raises(ValueError, match="momentum"):
        F.batch_norm(x, np.zeros(3), np.ones(3), training=True, momentum=None)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\].*1\.5"):
        F.batch_norm(x, np.zeros(3), np.ones(3), training=True, momentum=1.5)
    with pytest.raises(ValueError, match=r"\(N, C, \*\).*\(4,\)"):
        F.batch_norm_forward(np.ones(4))
    # a (3,) gamma against a one-channel input must not broadcast into three channels
    with pytest.raises(ValueError, match=r"weight must have shape \(1,\).*\(3,\)"):
        F.batch_norm_forward(rng.normal(size=(5, 1)), np.ones(3), None)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\).*\(2,\)"):
        F.batch_norm_eval_forward(x, np.zeros(2), np.ones(3))
    _, cache = F.batch_norm_forward(x)
    with pytest.raises(ValueError, match=r"dy has shape \(1, 3\).*\(4, 3\)"):
        F.batch_norm_backward(np.ones((1, 3)), cache)       # would broadcast silently
    with pytest.raises(ValueError, match=r"dy has shape"):
        F.batch_norm_backward_graph(np.ones((4, 1)), cache)
    with pytest.raises(TypeError, match="int64"):
        F.batch_norm_backward(np.ones((4, 3), dtype=np.int64), cache)


def test_batch_with_one_value_per_channel_is_an_error():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm_forward(np.ones((1, 3)))
    y, cache = F.batch_norm_forward(np.arange(6.0).reshape(1, 2, 3))     # m = N * L = 3: fine
    assert cache.count == 3


# --------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtype_in_dtype_out(dtype, rng, ref, relerr):
    x = rng.normal(2.0, 3.0, (16, 4, 3)).astype(dtype)
    g = rng.normal(1, 0.3, 4).astype(dtype)
    b = rng.normal(size=4).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y, cache = F.batch_norm_forward(x, g, b, EPS)
    dx, dg, db = F.batch_norm_backward(dy, cache)
    assert y.dtype == dtype and dx.dtype == dtype and dg.dtype == dtype and db.dtype == dtype
    tol = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-12}[dtype]
    assert relerr(y, ref.forward(x, g, b, EPS)[0]) < tol
    dx_ref, dg_ref, db_ref = ref.backward(dy, x, g, EPS)
    assert relerr(dx, dx_ref) < 5 * tol
    assert relerr(dg, dg_ref) < tol and relerr(db, db_ref) < tol


@pytest.mark.parametrize("bad", [np.int32, np.int64, np.bool_, np.complex128, np.uint8])
def test_non_floating_input_is_a_type_error(bad):
    x = np.ones((4, 3), dtype=bad)
    with pytest.raises(TypeError, match=rf"floating-point.*{np.dtype(bad).name}"):
        F.batch_norm_forward(x)
    with pytest.raises(TypeError, match="floating-point"):
        F.batch_norm_eval_forward(x, np.zeros(3), np.ones(3))


# --------------------------------------------------------------------------- properties

@st.composite
def bn_inputs(draw):
    ndim = draw(st.integers(2, 5))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 4))
    spatial = [draw(st.integers(1, 3)) for _ in range(ndim - 2)]
    shape = (n, c, *spatial)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    loc = draw(st.sampled_from([0.0, 1.0, -50.0, 1e3]))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    x = np.random.default_rng(seed).normal(loc, scale, shape).astype(dtype)
    return x


@given(bn_inputs())
def test_property_forward_matches_reference(x):
    from conftest import Reference, rel_err
    y, cache = F.batch_norm_forward(x, None, None, EPS)
    assert y.dtype == x.dtype and y.shape == x.shape
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    _, mu, var = Reference.stats(x)
    assert rel_err(cache.mean, mu) < tol or np.max(np.abs(cache.mean - mu)) < tol * np.sqrt(var.max())
    assert rel_err(cache.var, var) < tol
    assert rel_err(y, Reference.forward(x, eps=EPS)[0]) < 10 * tol


@given(bn_inputs())
def test_property_backward_sums(x):
    """In training mode dx sums to 0 per channel, and with eps -> 0 it is orthogonal to x."""
    x = x.astype(np.float64)
    dy = np.random.default_rng(int(abs(x).sum() * 1000) % 2 ** 31).normal(size=x.shape)
    # eps must be > 0; 1e-300 vanishes next to any variance here, as eps = 0 did
    _, cache = F.batch_norm_forward(x, None, None, eps=1e-300)
    dx = F.batch_norm_backward(dy, cache)[0]
    ax = (0,) + tuple(range(2, x.ndim))
    istd = cache.inv_std
    assert np.all(np.abs(dx.sum(axis=ax)) <= 1e-10 * istd * np.abs(dy).sum(axis=ax))
    xc = np.abs(x - x.mean(axis=ax, keepdims=True))
    assert np.all(np.abs((dx * (x - x.mean(axis=ax, keepdims=True))).sum(axis=ax))
                  <= 1e-10 * istd * (np.abs(dy) * xc).sum(axis=ax))
