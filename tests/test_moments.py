"""Per-channel moments: accuracy when |mean| >> std, merging parts (the article's section 6)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minibn.moments import channel_moments, merge_moments, reduce_axes, unbiased


def two_pass64(x, axes):
    """The float64 two-pass reference on exactly the given values."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes)
    return mu.reshape(var.shape), var


def naive_float32(x, axes):
    """E[x^2] - E[x]^2 in float32: the textbook one-pass formula that cancels."""
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=axes, dtype=np.float32)
    return mean, (x * x).mean(axis=axes, dtype=np.float32) - mean * mean


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b)))


def test_reduce_axes():
    assert reduce_axes(2) == (0,)
    assert reduce_axes(4) == (0, 2, 3)
    assert reduce_axes(3, channel_axis=2) == (0, 1)


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5), (2, 3, 4, 4), (2, 2, 3, 2, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_matches_two_pass(shape, keepdims, rng):
    x = rng.normal(2.0, 3.0, shape)
    axes = reduce_axes(len(shape))
    count, mean, var = channel_moments(x, axes, keepdims=keepdims)
    mu, v = two_pass64(x, axes)
    assert count == x.size // shape[1]
    expect_shape = tuple(1 if a in axes else s for a, s in enumerate(shape)) if keepdims else (shape[1],)
    assert mean.shape == expect_shape and var.shape == expect_shape
    assert mean.dtype == np.float64 and var.dtype == np.float64
    np.testing.assert_allclose(mean.reshape(-1), mu, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(var.reshape(-1), v, rtol=1e-13)


def test_negative_axes(rng):
    x = rng.normal(size=(4, 3, 5))
    a = channel_moments(x, (0, -1))
    b = channel_moments(x, (0, 2))
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])


def test_empty_is_count_zero(rng):
    count, mean, var = channel_moments(np.zeros((0, 3)), (0,))
    assert count == 0 and mean.shape == (3,) and not mean.any() and not var.any()


# --------------------------------------------------------------------------- |mean| >> std

LARGE_MEAN_CASES = [(1e4, 1.0), (1e6, 1e2), (-3e5, 0.5), (1e3, 1e-2)]


@pytest.mark.parametrize("loc,scale", LARGE_MEAN_CASES)
def test_float32_large_mean_is_accurate(loc, scale, rng):
    x = (loc + scale * rng.normal(size=(4096, 3))).astype(np.float32)
    count, mean, var = channel_moments(x, (0,))
    mu, v = two_pass64(x, (0,))
    # The mean is accumulated in float64: float64-level agreement.
    assert rel(mean, mu) < 1e-14
    # The deviations are float32 (x - float32(mean) is exact here), their squares are rounded
    # once to float32: a few float32 ulps, ~1e-7, whatever the ratio |mean| / std.
    assert rel(var, v) < 1e-6


@pytest.mark.parametrize("loc,scale", LARGE_MEAN_CASES)
def test_naive_float32_formula_fails_the_same_check(loc, scale, rng):
    """Proof that the check above can fail: E[x^2] - E[x]^2 in float32 loses every digit."""
    x = (loc + scale * rng.normal(size=(4096, 3))).astype(np.float32)
    _, v = two_pass64(x, (0,))
    _, v_naive = naive_float32(x, (0,))
    assert rel(v_naive, v) > 1e-2


@pytest.mark.parametrize("loc,scale", LARGE_MEAN_CASES)
def test_float32_large_mean_through_the_layer_normalizes(loc, scale, rng):
    """The output of float32 data with |mean| >> std has mean 0 and std 1 to float32 accuracy.

    This needs more than accurate statistics: subtracting the float64 mean rounded to float32
    would centre the output off by up to half a float32 ulp of the mean, divided by the std
    (3e-2 for mean -3e5, std 0.5); the normalization removes that rounding per channel.
    """
    import minibn as mb
    x = (loc + scale * rng.normal(size=(512, 2))).astype(np.float32)
    y = mb.BatchNorm1d(2, eps=1e-300)(x).astype(np.float64)   # eps must be > 0; this one acts as 0
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=1e-6)


def test_float16_moments(rng):
    x = (100.0 + rng.normal(size=(256, 2))).astype(np.float16)
    _, mean, var = channel_moments(x, (0,))
    mu, v = two_pass64(x, (0,))
    assert rel(mean, mu) < 1e-12 and rel(var, v) < 1e-6


@given(loc=st.sampled_from([0.0, 1.0, -1e3, 1e5, 3e6]),
       scale=st.sampled_from([1e-3, 1.0, 1e2]),
       n=st.integers(2, 200), seed=st.integers(0, 2 ** 31),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_property_variance_accuracy(loc, scale, n, seed, dtype):
    x = (loc + scale * np.random.default_rng(seed).normal(size=(n, 2))).astype(dtype)
    _, mean, var = channel_moments(x, (0,))
    mu, v = two_pass64(x, (0,))
    ok = v > 0
    tol = 2e-6 if dtype == np.float32 else 1e-12
    assert np.all(np.abs(var - v)[ok] <= tol * v[ok])
    assert np.all(var[~ok] == 0)
    assert np.all(np.abs(mean - mu) <= 1e-15 * np.abs(mu) + 1e-12 * np.sqrt(v))


# --------------------------------------------------------------------------- merging parts

def test_merge_equals_moments_of_the_concatenation(rng):
    parts = [rng.normal(loc, s, (n, 4)) for loc, s, n in ((0, 1, 32), (5, 2, 7), (-3, 0.5, 20))]
    counts = [len(p) for p in parts]
    means = np.array([p.mean(axis=0) for p in parts])
    varis = np.array([p.var(axis=0) for p in parts])
    total, mean, var = merge_moments(counts, means, varis)
    whole = np.concatenate(parts)
    assert total == len(whole)
    np.testing.assert_allclose(mean, whole.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(var, whole.var(axis=0), rtol=1e-13)


def test_merge_article_section6_example(rng):
    """Three GPUs with 32 samples each: global statistics of all 96."""
    data = rng.normal(1.0, 2.0, (96, 2))
    split = np.split(data, 3)
    n, mu, var = merge_moments([32, 32, 32], [p.mean(0) for p in split], [p.var(0) for p in split])
    assert n == 96
    np.testing.assert_allclose(mu, data.mean(0), rtol=1e-13)
    np.testing.assert_allclose(var, data.var(0), rtol=1e-13)
    # the naive average of the local variances misses the spread of the means
    naive = np.mean([p.var(0) for p in split], axis=0)
    assert np.all(naive < var)


def test_merge_ignores_empty_parts(rng):
    a = rng.normal(size=(5, 2))
    n, mu, var = merge_moments([5, 0], [a.mean(0), [123.0, 7.0]], [a.var(0), [9.0, 9.0]])
    assert n == 5
    np.testing.assert_allclose(mu, a.mean(0), rtol=1e-14)
    np.testing.assert_allclose(var, a.var(0), rtol=1e-14)


def test_merge_errors():
    with pytest.raises(ValueError, match="1-d"):
        merge_moments([[1, 2]], np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"\(P, \.\.\.\).*P = len\(counts\) = 2"):
        merge_moments([1, 2], np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        merge_moments([1, -1], np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="all parts are empty"):
        merge_moments([0, 0], np.zeros((2, 2)), np.zeros((2, 2)))


def test_unbiased():
    np.testing.assert_allclose(unbiased(np.array([5.0]), 4), [20.0 / 3.0])
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        unbiased(np.array([1.0]), 1)
