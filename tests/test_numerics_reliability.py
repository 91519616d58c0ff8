"""Silent wrong answers in the numerics, on every engine and on both sides of the size
where the numpy engine stops handing inputs to the reference engine (16384 elements):

1. the backward does not depend on edits of the caller's ``x`` made after the forward;
2. ``dy`` of another float dtype than ``x`` gives the result of ``dy`` cast to ``x``'s dtype;
3. float32 data of magnitude 1e20 .. 3.4e38 (and float16 up to its max) is normalized
   correctly; a running statistic that does not fit its buffer raises before any change;
4. array subclasses: ``np.memmap`` works, masked arrays, ``np.matrix`` and other
   subclasses are a ``TypeError`` naming the type, at every size and entry point.

References are the float64 two-pass computations of ``minibn.grading.reference``.
"""
import numpy as np
import pytest

import minibn as mb
from minibn import functional as F
from minibn.grading import reference as R
from minibn import sample_norms as SN
from minibn.engines import engine_available, using_engine

ENGINES = ["reference", "numpy",
           pytest.param("numba", marks=pytest.mark.skipif(not engine_available("numba"),
                                                          reason="numba is not installed"))]
# (N, C) below and above the numpy engine's hand-off size, and a 4-D input (rows layout)
SHAPES = [(64, 8), (4096, 8), (8, 4, 32, 32)]
EPS = 1e-5


@pytest.fixture(params=ENGINES)
def engine(request):
    """The engine under test, also selected for the layers of the test."""
    with using_engine(request.param) as engine:
        yield engine


def _shape_id(shape):
    return "x".join(map(str, shape))


def reference_bn(x, dy, w, b, eps=EPS):
    """Training-mode batch norm and its backward in float64: ``(y, dx, dgamma, dbeta)``."""
    f = R.bn_forward(x, w, b, eps)
    dx, dgamma, dbeta = R.bn_backward(dy, f["x_hat"], f["inv_std"], w, f["count"])
    return f["y"], dx, dgamma, dbeta


def _data(shape, dtype=np.float32, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[1]
    w = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
    b = (0.1 * rng.standard_normal(C)).astype(dtype)
    return x, dy, w, b


# =========================================================================== 1. aliasing

@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("frozen", [False, True], ids=["train", "eval"])
def test_backward_ignores_edits_of_x_after_the_forward(engine, shape, frozen):
    x, dy, w, b = _data(shape, loc=3.0)
    C = shape[1]
    mean, var = np.full(C, 2.5), np.full(C, 1.5)

    def forward(inp):
        if frozen:
            return engine.forward_eval(inp, mean, var, w, b, EPS)
        return engine.forward_train(inp, w, b, EPS)

    _, clean = forward(x.copy())
    expected = engine.backward(dy, clean)
    _, cache = forward(x)
    x[...] = 7.0                                    # the caller reuses its buffer
    got = engine.backward(dy, cache)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_layer_backward_ignores_edits_of_x(engine, shape):
    x, dy, _, _ = _data(shape, seed=3)
    layer = mb.BatchNorm1d if len(shape) == 2 else mb.BatchNorm2d
    clean, edited = layer(shape[1]), layer(shape[1])
    clean(x.copy())
    expected = clean.backward(dy)
    edited(x)
    x *= -2.0
    np.testing.assert_array_equal(edited.backward(dy), expected)
    np.testing.assert_array_equal(edited.weight.grad, clean.weight.grad)


def test_graph_backward_reads_the_forward_x():
    """batch_norm_backward_graph derives from cache.x: it is the forward's, not the caller's."""
    x, dy, w, b = _data((16, 3), dtype=np.float64, seed=5)
    _, cache = F.batch_norm_forward(x, w, b, EPS)
    expected = F.batch_norm_backward_graph(dy, cache)
    x += 100.0
    got = F.batch_norm_backward_graph(dy, cache)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_allclose(got[0], reference_bn(x - 100.0, dy, w, b)[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: mb.LayerNorm((4, 8, 8)), lambda: mb.GroupNorm(2, 4),
                                  lambda: mb.InstanceNorm2d(4, affine=True)],
                         ids=["LayerNorm", "GroupNorm", "InstanceNorm2d"])
def test_sample_norm_layers_ignore_edits_of_x(make):
    x, dy, _, _ = _data((6, 4, 8, 8), seed=6)
    clean, edited = make(), make()
    clean(x.copy())
    expected = clean.backward(dy)
    edited(x)
    x[...] = 0.0
    np.testing.assert_array_equal(edited.backward(dy), expected)


def test_linear_backward_ignores_edits_of_x():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    dy = rng.standard_normal((5, 2)).astype(np.float32)
    clean, edited = mb.Linear(3, 2, seed=1), mb.Linear(3, 2, seed=1)
    clean(x.copy())
    clean.backward(dy)
    edited(x)
    x[...] = 0.0
    edited.backward(dy)
    np.testing.assert_array_equal(edited.weight.grad, clean.weight.grad)


# =========================================================================== 2. dy of another dtype

@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("frozen", [False, True], ids=["train", "eval"])
def test_dy_of_another_dtype_is_cast_to_the_input_dtype(engine, shape, frozen):
    """float32 x at 1e6 +- 0.1: float64 dy gives exactly the float32-dy result (dgamma was off
    by 3e-2 through a path without the mean-rounding correction)."""
    x, dy, w, b = _data(shape, loc=1e6, scale=0.1, seed=11)
    if frozen:
        C = shape[1]
        _, cache = engine.forward_eval(x, np.full(C, 1e6), np.full(C, 0.01), w, b, EPS)
    else:
        _, cache = engine.forward_train(x, w, b, EPS)
    expected = engine.backward(dy, cache)
    got = engine.backward(dy.astype(np.float64), cache)
    assert got[0].dtype == np.float32
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    if not frozen:     # and that result is right
        _, dx_ref, dw_ref, _ = reference_bn(x, dy, w, b)
        assert np.max(np.abs(got[1] - dw_ref)) <= 1e-4 * np.abs(dw_ref).max() + 1e-3


@pytest.mark.parametrize("shape", [(64, 8), (4096, 8)], ids=_shape_id)
def test_layer_backward_casts_dy(engine, shape):
    x, dy, _, _ = _data(shape, loc=1e6, scale=0.1, seed=12)
    a, c = mb.BatchNorm1d(shape[1]), mb.BatchNorm1d(shape[1])
    a(x)
    c(x)
    dx64 = a.backward(dy.astype(np.float64))
    dx32 = c.backward(dy)
    assert dx64.dtype == np.float32
    np.testing.assert_array_equal(dx64, dx32)
    np.testing.assert_array_equal(a.weight.grad, c.weight.grad)


def test_row_norm_backward_casts_dy():
    x, dy, _, _ = _data((6, 4, 8, 8), loc=1e6, scale=0.1, seed=13)
    y, cache = SN.group_norm_forward(x, 2)
    got = SN.group_norm_backward(dy.astype(np.float64), cache)
    expected = SN.group_norm_backward(dy, cache)
    assert got[0].dtype == np.float32
    np.testing.assert_array_equal(got[0], expected[0])


def test_dy_that_does_not_fit_the_input_dtype_is_an_error(engine):
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float16)
    _, cache = engine.forward_train(x)
    dy = np.full(x.shape, 1e6)
    with pytest.raises(OverflowError, match=r"dy .*float16"):
        engine.backward(dy, cache)


def test_pytorch_casts_the_incoming_gradient_to_the_output_dtype():
    """The rule above is PyTorch's: autograd casts dy to the output's dtype."""
    torch = pytest.importorskip("torch")
    x, dy, _, _ = _data((64, 8), loc=1e6, scale=0.1, seed=14)
    grads = []
    for g in (dy.astype(np.float64), dy):
        xt = torch.tensor(x, requires_grad=True)
        bn = torch.nn.BatchNorm1d(8)
        bn(xt).backward(torch.tensor(g))
        grads.append((xt.grad.numpy(), bn.weight.grad.numpy()))
    assert grads[0][0].dtype == np.float32
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    np.testing.assert_array_equal(grads[0][1], grads[1][1])


# =========================================================================== 3. range of the dtype

def _extreme_data(shape, magnitude, seed, dtype=np.float32):
    """Data of the given magnitude; at the dtype's max, spread over its whole range."""
    rng = np.random.default_rng(seed)
    top = float(np.finfo(dtype).max)
    if magnitude >= top:
        x = rng.uniform(-1.0, 1.0, shape) * top
    else:
        x = magnitude * (0.5 + rng.standard_normal(shape))
    x = x.astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(shape[1])).astype(dtype)
    b = (0.1 * rng.standard_normal(shape[1])).astype(dtype)
    return x, dy, w, b


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e37, 3.4028235e38], ids=["1e20", "1e30", "1e37", "max"])
def test_float32_beyond_the_range_of_squares(engine, shape, magnitude):
    x, dy, w, b = _extreme_data(shape, magnitude, seed=21)
    assert np.isfinite(x).all()
    y, cache = engine.forward_train(x, w, b, EPS)
    dx, dw, db = engine.backward(dy, cache)
    y_ref, dx_ref, dw_ref, db_ref = reference_bn(x, dy, w, b)
    assert y.dtype == np.float32 and dx.dtype == np.float32
    assert np.max(np.abs(y - y_ref)) <= 1e-5 * np.abs(y_ref).max()
    assert np.max(np.abs(dx - dx_ref)) <= 1e-4 * np.abs(dx_ref).max()
    assert np.max(np.abs(dw - dw_ref)) <= 1e-4 * np.abs(dw_ref).max()
    assert np.max(np.abs(db - db_ref)) <= 1e-4 * np.abs(db_ref).max()
    # the statistics themselves, exact in float64
    count, mean, var = engine.statistics(x)
    np.testing.assert_allclose(var, R.bn_stats(x)[2], rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_float16_over_its_whole_range(engine, shape):
    x, dy, w, b = _extreme_data(shape, 65504.0, seed=22, dtype=np.float16)
    y, cache = engine.forward_train(x, w, b, EPS)
    dx, _, _ = engine.backward(dy, cache)
    y_ref, dx_ref, _, _ = reference_bn(x, dy, w, b)
    assert y.dtype == np.float16
    assert np.max(np.abs(y - y_ref)) <= 2e-3 * np.abs(y_ref).max()
    assert np.max(np.abs(dx - dx_ref)) <= 2e-3 * np.abs(dx_ref).max()


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_eval_mode_with_huge_running_statistics(engine, shape):
    """Given statistics whose scale is subnormal in float32: normalized in float64."""
    x, dy, w, b = _extreme_data(shape, 3.4028235e38, seed=23)
    C = shape[1]
    mean, var = np.zeros(C), np.full(C, 4e76)
    y, cache = engine.forward_eval(x, mean, var, w, b, EPS)
    y_ref = R.bn_forward(x, w, b, EPS, stats=(0, mean, var))["y"]
    assert np.max(np.abs(y - y_ref)) <= 1e-5 * np.abs(y_ref).max()


@pytest.mark.parametrize("shape", [(64, 8), (4096, 8)], ids=_shape_id)
def test_layer_refuses_a_running_var_beyond_its_dtype_before_any_change(engine, shape):
    x, _, _, _ = _extreme_data(shape, 1e20, seed=24)
    layer = mb.BatchNorm1d(shape[1])
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(OverflowError, match=r"running_var.*float32.*float64"):
        layer(x)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    wide = mb.BatchNorm1d(shape[1], dtype=np.float64)      # float64 buffers take it
    y = wide(x)
    x64 = x.astype(np.float64)
    unbiased = x64.var(axis=0, ddof=1)
    np.testing.assert_allclose(wide.running_var, 0.9 + 0.1 * unbiased, rtol=1e-6)
    y_ref = reference_bn(x, x, np.ones(shape[1]), np.zeros(shape[1]))[0]
    assert np.max(np.abs(y - y_ref)) <= 1e-5 * np.abs(y_ref).max()


def test_functional_running_stats_overflow_changes_nothing():
    x, _, _, _ = _extreme_data((64, 4), 1e20, seed=25)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(OverflowError, match="running_var"):
        F.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


# =========================================================================== 4. array subclasses

class _Tagged(np.ndarray):
    """A subclass minibn knows nothing about."""


def _entry_points(engine, x, dy):
    """Every way an array reaches the numerics: engine methods, functions, layers, dy in backward."""
    C = x.shape[1]
    _, cache = engine.forward_train(np.asarray(x), None, None, EPS)
    layer = mb.BatchNorm1d(C)
    return {
        "engine.forward_train": lambda: engine.forward_train(x),
        "engine.forward_eval": lambda: engine.forward_eval(x, np.zeros(C), np.ones(C)),
        "engine.statistics": lambda: engine.statistics(x),
        "functional.batch_norm": lambda: F.batch_norm(x, None, None, training=True),
        "functional.layer_norm": lambda: SN.layer_norm(x, (C,)),
        "moments.channel_moments": lambda: mb.moments.channel_moments(x, (0,)),
        "BatchNorm1d": lambda: layer(x),
        "LayerNorm": lambda: mb.LayerNorm(C)(x),
        "backward dy": lambda: engine.backward(dy, cache),
        "weight": lambda: engine.forward_train(np.asarray(x), x[0], None),
    }


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")      # np.matrix
@pytest.mark.parametrize("shape", [(64, 8), (4096, 8)], ids=_shape_id)
@pytest.mark.parametrize("kind", ["masked", "matrix", "other"])
def test_array_subclasses_are_refused_at_every_entry_point(engine, shape, kind):
    rng = np.random.default_rng(31)
    plain = rng.standard_normal(shape)
    if kind == "masked":
        x, words = np.ma.masked_array(plain, mask=rng.random(shape) < 0.3), r"MaskedArray.*filled.*compressed"
    elif kind == "matrix":
        x, words = np.asmatrix(plain), r"matrix.*np\.asarray"
    else:
        x, words = plain.view(_Tagged), r"_Tagged.*np\.asarray"
    for name, call in _entry_points(engine, x, x).items():
        with pytest.raises(TypeError, match=words):
            call()
            pytest.fail(f"{name} accepted a {type(x).__name__}")


@pytest.mark.parametrize("shape", [(64, 8), (4096, 8)], ids=_shape_id)
def test_memmap_input_works_like_an_ndarray(engine, shape, tmp_path):
    x, dy, w, b = _data(shape, seed=32)
    xm = np.memmap(tmp_path / "x.dat", dtype=x.dtype, mode="w+", shape=shape)
    xm[...] = x
    dym = np.memmap(tmp_path / "dy.dat", dtype=dy.dtype, mode="w+", shape=shape)
    dym[...] = dy
    y, cache = engine.forward_train(xm, w, b, EPS)
    dx, dw, db = engine.backward(dym, cache)
    y2, cache2 = engine.forward_train(x, w, b, EPS)
    expected = (y2,) + engine.backward(dy, cache2)
    for g, e in zip((y, dx, dw, db), expected):
        assert type(g) is np.ndarray
        np.testing.assert_array_equal(g, e)
    layer = mb.BatchNorm1d(shape[1])
    np.testing.assert_array_equal(layer(xm), mb.BatchNorm1d(shape[1])(x))
