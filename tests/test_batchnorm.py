"""BatchNorm1d/2d/3d layers against the article and an independent float64 NumPy reference."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minibn as mb

EPS = 1e-5
CASES = [(mb.BatchNorm1d, (8, 3)), (mb.BatchNorm1d, (5, 3, 4)),
         (mb.BatchNorm2d, (4, 3, 3, 2)), (mb.BatchNorm3d, (3, 3, 2, 2, 3))]
IDS = ["1d-2D", "1d-3D", "2d", "3d"]


def batches(rng, shape, k=4):
    """Batches whose statistics differ from step to step."""
    params = [(1.0, 1.0), (5.0, 2.0), (-2.0, 0.5), (0.0, 3.0), (10.0, 0.1)]
    return [rng.normal(loc, scale, shape) for loc, scale in params[:k]]


# --------------------------------------------------------------------------- the article

def test_article_section2_with_a_layer():
    bn = mb.BatchNorm1d(1, dtype=np.float64)
    bn.weight.data[...] = 2.0
    bn.bias.data[...] = 1.0
    x = np.array([[2.0], [4.0], [6.0], [8.0]])
    y = bn(x)
    s = np.sqrt(5.0 + EPS)
    np.testing.assert_allclose(y[:, 0], [2 * (v - 5) / s + 1 for v in (2, 4, 6, 8)], rtol=1e-14)
    np.testing.assert_allclose(np.round(y[:, 0], 2), [-1.68, 0.11, 1.89, 3.68])
    # the running statistics saw mu = 5, and the unbiased variance 20 / 3
    np.testing.assert_allclose(bn.running_mean, [0.1 * 5.0])
    np.testing.assert_allclose(bn.running_var, [0.9 * 1.0 + 0.1 * 20.0 / 3.0])


def test_article_section3_with_a_layer():
    """Batches whose means are 5, 6, 7; alpha = 0.9 weights the new batch (PyTorch's momentum)."""
    bn = mb.BatchNorm1d(1, momentum=0.9, dtype=np.float64)
    seen = []
    for mu in (5.0, 6.0, 7.0):
        bn(np.array([[mu - 1.0], [mu + 1.0]]))
        seen.append(float(bn.running_mean[0]))
    np.testing.assert_allclose(seen[:2], [4.5, 5.85], rtol=1e-15)
    np.testing.assert_allclose(seen[2], 0.1 * 5.85 + 0.9 * 7.0, rtol=1e-15)   # 6.885, not 6.765


# --------------------------------------------------------------------------- against the reference

@pytest.mark.parametrize("cls,shape", CASES, ids=IDS)
@pytest.mark.parametrize("momentum", [0.1, 0.9, None, 0.0, 1.0])
def test_training_steps_match_reference(cls, shape, momentum, rng, ref, relerr):
    C = shape[1]
    bn = cls(C, momentum=momentum, dtype=np.float64)
    g, b = rng.normal(1, 0.5, C), rng.normal(size=C)
    bn.weight.data[...] = g
    bn.bias.data[...] = b
    xs = batches(rng, shape)
    for t, x in enumerate(xs, start=1):
        bn.zero_grad()
        y = bn(x)
        assert relerr(y, ref.forward(x, g, b, EPS)[0]) < 1e-12
        dy = rng.normal(size=shape)
        dx = bn.backward(dy)
        dx_ref, dg_ref, db_ref = ref.backward(dy, x, g, EPS)
        assert relerr(dx, dx_ref) < 1e-10
        assert relerr(bn.weight.grad, dg_ref) < 1e-12 and relerr(bn.bias.grad, db_ref) < 1e-12
        rm, rv = ref.running(xs[:t], momentum)
        assert relerr(bn.running_mean, rm) < 1e-13 and relerr(bn.running_var, rv) < 1e-13
        assert int(bn.num_batches_tracked) == t
    bn.eval()
    x = rng.normal(2.0, 2.0, shape)
    rm, rv = ref.running(xs, momentum)
    y = bn(x)
    assert relerr(y, ref.forward(x, g, b, EPS, mean=rm, var=rv)[0]) < 1e-12
    dy = rng.normal(size=shape)
    bn.zero_grad()
    dx = bn.backward(dy)
    bsh = ref.bshape(len(shape))
    assert relerr(dx, dy * (g / np.sqrt(rv + EPS)).reshape(bsh)) < 1e-13
    # eval mode changes nothing
    assert int(bn.num_batches_tracked) == len(xs)
    assert relerr(bn.running_mean, rm) < 1e-13


def test_momentum_none_is_the_cumulative_average(rng, ref):
    bn = mb.BatchNorm1d(2, momentum=None, dtype=np.float64)
    xs = [rng.normal(loc, 1.0, (6, 2)) for loc in (0.0, 3.0, 9.0, -4.0)]
    for x in xs:
        bn(x)
    means = np.array([x.mean(axis=0) for x in xs])
    uvars = np.array([x.var(axis=0, ddof=1) for x in xs])
    # after k batches: the plain average of the k batch means (the initial 0/1 are forgotten)
    np.testing.assert_allclose(bn.running_mean, means.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, uvars.mean(axis=0), rtol=1e-13)


def test_momentum_can_change_between_steps(rng, ref):
    bn = mb.BatchNorm1d(2, dtype=np.float64)
    xs = [rng.normal(loc, 1.0, (6, 2)) for loc in (0.0, 3.0, 9.0)]
    rm = np.zeros(2)
    for a, x in zip((0.9, 0.5, 0.1), xs):
        bn.momentum = a
        bn(x)
        rm = (1 - a) * rm + a * x.mean(axis=0)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-13)


@pytest.mark.parametrize("cls,shape", CASES, ids=IDS)
def test_affine_false(cls, shape, rng, ref, relerr):
    bn = cls(shape[1], affine=False, dtype=np.float64)
    assert bn.weight is None and bn.bias is None
    assert list(bn.parameters()) == []
    x = rng.normal(3.0, 2.0, shape)
    assert relerr(bn(x), ref.forward(x, eps=EPS)[0]) < 1e-12
    dy = rng.normal(size=shape)
    assert relerr(bn.backward(dy), ref.backward(dy, x, None, EPS)[0]) < 1e-10


@pytest.mark.parametrize("cls,shape", CASES, ids=IDS)
def test_untracked_eval_uses_batch_statistics(cls, shape, rng, ref, relerr):
    bn = cls(shape[1], track_running_stats=False, dtype=np.float64)
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert list(bn.state_dict()) == ["weight", "bias"]
    x = rng.normal(3.0, 2.0, shape)
    bn(x)
    bn.eval()
    x2 = rng.normal(-1.0, 0.5, shape)
    assert relerr(bn(x2), ref.forward(x2, np.ones(shape[1]), np.zeros(shape[1]), EPS)[0]) < 1e-12
    dy = rng.normal(size=shape)
    assert relerr(bn.backward(dy), ref.backward(dy, x2, None, EPS)[0]) < 1e-10


def test_gradients_accumulate_until_zero_grad(rng, ref):
    bn = mb.BatchNorm1d(3, dtype=np.float64)
    x, dy1, dy2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    bn(x)
    bn.backward(dy1)
    bn.backward(dy2)
    _, g1, b1 = ref.backward(dy1, x)
    _, g2, b2 = ref.backward(dy2, x)
    np.testing.assert_allclose(bn.weight.grad, g1 + g2, rtol=1e-12)
    np.testing.assert_allclose(bn.bias.grad, b1 + b2, rtol=1e-12)
    bn.zero_grad()
    assert bn.weight.grad is None and bn.bias.grad is None


def test_reset_running_stats(rng):
    bn = mb.BatchNorm2d(2)
    bn(rng.normal(4.0, 2.0, (3, 2, 2, 2)).astype(np.float32))
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, [0, 0])
    np.testing.assert_array_equal(bn.running_var, [1, 1])
    assert int(bn.num_batches_tracked) == 0


# --------------------------------------------------------------------------- shapes and dtypes

def test_one_sample_with_length_is_fine_in_training(rng, ref, relerr):
    x = rng.normal(size=(1, 3, 5))             # m = N * L = 5
    bn = mb.BatchNorm1d(3, dtype=np.float64)
    assert relerr(bn(x), ref.forward(x, eps=EPS)[0]) < 1e-12
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(rng.normal(size=(1, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mb.BatchNorm2d(3)(rng.normal(size=(1, 3, 1, 1)).astype(np.float32))
    bn.eval()
    assert bn(rng.normal(size=(1, 3))).shape == (1, 3)      # eval: running statistics, m irrelevant


@pytest.mark.parametrize("cls,shape", CASES, ids=IDS)
def test_empty_batch_leaves_state_untouched(cls, shape, rng):
    bn = cls(shape[1])
    bn(rng.normal(2.0, 1.0, shape).astype(np.float32))
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    empty = np.zeros((0,) + shape[1:], dtype=np.float32)
    y = bn(empty)
    assert y.shape == empty.shape and y.dtype == np.float32
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])          # num_batches_tracked stays 1
    dx = bn.backward(np.zeros_like(empty))
    assert dx.shape == empty.shape
    np.testing.assert_array_equal(bn.weight.grad, np.zeros(shape[1]))
    np.testing.assert_array_equal(bn.bias.grad, np.zeros(shape[1]))
    with pytest.raises(ValueError, match="dy has shape"):
        bn.backward(np.zeros((1,) + shape[1:], dtype=np.float32))
    bn.eval()
    assert bn(empty).shape == empty.shape


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_dtype_in_dtype_out(dtype, training, rng, ref, relerr):
    bn = mb.BatchNorm2d(3, dtype=dtype)
    bn(rng.normal(1.0, 2.0, (4, 3, 2, 2)).astype(dtype))    # some running statistics
    bn.train(training)
    x = rng.normal(1.0, 2.0, (4, 3, 2, 2)).astype(dtype)
    y = bn(x)
    dx = bn.backward(rng.normal(size=x.shape).astype(dtype))
    assert y.dtype == dtype and dx.dtype == dtype
    assert bn.weight.grad.dtype == dtype and bn.running_mean.dtype == dtype
    if training:
        tol = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-12}[dtype]
        assert relerr(y, ref.forward(x, eps=EPS)[0]) < tol


def test_float32_parameters_with_float64_input(rng, ref, relerr):
    """Mixed: float64 data through a float32 layer gives float64 output (the input's dtype)."""
    bn = mb.BatchNorm1d(3)
    x = rng.normal(size=(6, 3))
    y = bn(x)
    assert y.dtype == np.float64 and relerr(y, ref.forward(x, eps=EPS)[0]) < 1e-12


def test_large_mean_small_spread_float32(rng, ref):
    """Statistics of float32 data with |mean| >> std are accurate (see test_moments for the proof)."""
    x = (1e4 + rng.normal(size=(256, 4))).astype(np.float32)
    bn = mb.BatchNorm1d(4, momentum=1.0)
    y = bn(x)
    _, mu, var = ref.stats(x)
    np.testing.assert_allclose(bn.running_mean, mu.astype(np.float32), rtol=1e-7)
    np.testing.assert_allclose(bn.running_var, var * 256 / 255, rtol=1e-5)
    np.testing.assert_allclose(y.astype(np.float64).var(axis=0), var / (var + EPS), rtol=1e-3)


# --------------------------------------------------------------------------- state dict

def test_state_dict_keys_are_pytorchs_names():
    # PyTorch's documented naming for BatchNorm: parameters weight, bias; buffers running_mean,
    # running_var, num_batches_tracked; children prefixed by their attribute name (Sequential: index).
    assert list(mb.BatchNorm1d(3).state_dict()) == \
        ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert list(mb.BatchNorm2d(3, affine=False).state_dict()) == \
        ["running_mean", "running_var", "num_batches_tracked"]
    assert list(mb.BatchNorm3d(3, affine=False, track_running_stats=False).state_dict()) == []
    model = mb.Sequential(mb.BatchNorm1d(2), mb.BatchNorm1d(2, affine=False))
    assert list(model.state_dict()) == [
        "0.weight", "0.bias", "0.running_mean", "0.running_var", "0.num_batches_tracked",
        "1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_state_dict_copies_and_load_is_in_place(rng):
    bn = mb.BatchNorm1d(3)
    bn(rng.normal(size=(4, 3)).astype(np.float32))
    sd = bn.state_dict()
    sd["running_mean"][...] = 99.0                 # a copy: the layer does not change
    assert not np.any(bn.running_mean == 99.0)
    ids = {k: id(v) for k, v in [("weight", bn.weight.data), ("running_mean", bn.running_mean),
                                 ("num_batches_tracked", bn.num_batches_tracked)]}
    new = {"weight": np.full(3, 2.0, np.float32), "bias": np.zeros(3, np.float32),
           "running_mean": np.arange(3.0),          # float64 into float32: converted, same array
           "running_var": np.ones(3, np.float32), "num_batches_tracked": np.array(7)}
    assert bn.load_state_dict(new) == ([], [])
    assert id(bn.weight.data) == ids["weight"] and id(bn.running_mean) == ids["running_mean"]
    assert id(bn.num_batches_tracked) == ids["num_batches_tracked"]
    np.testing.assert_array_equal(bn.running_mean, [0, 1, 2])
    assert bn.running_mean.dtype == np.float32 and int(bn.num_batches_tracked) == 7


def test_load_state_dict_non_strict(rng):
    bn = mb.BatchNorm1d(2)
    missing, unexpected = bn.load_state_dict({"weight": np.array([3.0, 4.0]), "extra": np.ones(1)},
                                             strict=False)
    assert set(missing) == {"bias", "running_mean", "running_var", "num_batches_tracked"}
    assert unexpected == ["extra"]
    np.testing.assert_array_equal(bn.weight.data, [3, 4])


def test_train_eval_flags_propagate():
    model = mb.Sequential(mb.BatchNorm1d(2), mb.Sequential(mb.BatchNorm1d(2)))
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------- properties

@given(n=st.integers(2, 8), c=st.integers(1, 4), length=st.integers(1, 4),
       scale=st.sampled_from([1e-1, 1.0, 1e2]), shift=st.sampled_from([0.0, -7.0, 1e3]),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2 ** 31))
def test_property_normalized_output_and_invariance(n, c, length, scale, shift, dtype, seed):
    """Per channel the output has mean 0 and variance var / (var + eps); BN(a x + b) = BN(x) (eps -> 0)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, length))
    x = x * scale + shift
    x = x.astype(dtype)
    bn = mb.BatchNorm1d(c, eps=1e-300, dtype=dtype)    # eps must be > 0; this one acts as 0
    y = bn(x).astype(np.float64)
    xd = x.astype(np.float64)
    var = xd.var(axis=(0, 2))
    ok = var > (1e-6 * scale) ** 2                     # skip channels that are constant after rounding
    tol = 1e-4 if dtype == np.float32 else 1e-9
    assert np.all(np.abs(y.mean(axis=(0, 2)))[ok] < tol)
    assert np.all(np.abs(y.var(axis=(0, 2)) - 1.0)[ok] < 10 * tol)
    bn2 = mb.BatchNorm1d(c, eps=1e-300, dtype=np.float64)
    y2 = bn2(3.0 * xd - 11.0)
    assert np.all(np.abs(y2 - y)[:, ok] < 10 * tol)
