"""LayerNorm, GroupNorm, InstanceNorm: forward against the float64 two-pass reference
(``minibn.grading.reference``), backward against finite differences, running statistics,
state, errors."""
from __future__ import annotations

import numpy as np
import pytest

import minibn as mb
from minibn import functional as F
from minibn import sample_norms as SN
from minibn.grading import reference as R
from minibn.gradcheck import check_layer, numerical_gradient


# --------------------------------------------------------------------------- the reference

def ref_layer_norm(x, k, w=None, b=None, eps=1e-5):
    return R.ln_forward(x, k, w, b, eps)["y"]


def ref_group_norm(x, G, w=None, b=None, eps=1e-5):
    return R.gn_forward(x, G, w, b, eps)["y"]


def ref_instance_norm(x, w=None, b=None, eps=1e-5):
    """Instance norm is group norm with one group per channel."""
    return ref_group_norm(x, x.shape[1], w, b, eps)


def _randomize_affine(layer, rng):
    for p in layer.parameters():
        p.data[...] = rng.standard_normal(p.shape).astype(p.dtype)


# --------------------------------------------------------------------------- forward vs reference

@pytest.mark.parametrize("shape,ns", [((4, 6), (6,)), ((3, 5, 7), (7,)), ((3, 5, 7), (5, 7)),
                                       ((2, 3, 4, 5), (3, 4, 5)), ((5,), (5,))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_forward_matches_reference(rng, shape, ns, dtype):
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    ln = mb.LayerNorm(ns, dtype=dtype)
    _randomize_affine(ln, rng)
    y = ln(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = ref_layer_norm(x, len(ns), ln.weight.data, ln.bias.data)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,G", [((4, 6), 3), ((3, 8, 5), 2), ((2, 6, 3, 4), 3), ((2, 6, 3, 4), 1),
                                     ((2, 6, 3, 4), 6), ((2, 4, 2, 2, 3), 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_norm_forward_matches_reference(rng, shape, G, dtype):
    x = (rng.standard_normal(shape) * 2 - 1).astype(dtype)
    gn = mb.GroupNorm(G, shape[1], dtype=dtype)
    _randomize_affine(gn, rng)
    y = gn(x)
    assert y.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ref_group_norm(x, G, gn.weight.data, gn.bias.data), rtol=tol, atol=tol)


@pytest.mark.parametrize("cls,shape", [(mb.InstanceNorm1d, (3, 4, 6)), (mb.InstanceNorm2d, (2, 3, 4, 5)),
                                       (mb.InstanceNorm3d, (2, 2, 3, 2, 2))])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_forward_matches_reference(rng, cls, shape, affine):
    x = rng.standard_normal(shape) * 5 + 1
    inn = cls(shape[1], affine=affine, dtype=np.float64)
    if affine:
        _randomize_affine(inn, rng)
        y_ref = ref_instance_norm(x, inn.weight.data, inn.bias.data)
    else:
        y_ref = ref_instance_norm(x)
    np.testing.assert_allclose(inn(x), y_ref, rtol=1e-12, atol=1e-12)


def test_float32_with_large_offset_keeps_its_digits(rng):
    """|mean| >> std: statistics in float64 with a shifted second pass keep float32 accuracy."""
    x = (1e4 + rng.standard_normal((4, 8, 16))).astype(np.float32)
    for layer, ref in ((mb.LayerNorm((8, 16)), lambda v: ref_layer_norm(v, 2)),
                       (mb.GroupNorm(4, 8), lambda v: ref_group_norm(v, 4)),
                       (mb.InstanceNorm1d(8), ref_instance_norm)):
        y = layer(x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, ref(x), atol=2e-3)   # float32 spacing at 1e4 is 1e-3


def test_no_affine_parameters(rng):
    x = rng.standard_normal((3, 4, 5))
    ln = mb.LayerNorm((4, 5), elementwise_affine=False)
    gn = mb.GroupNorm(2, 4, affine=False)
    assert ln.weight is None and ln.bias is None and gn.weight is None and gn.bias is None
    assert list(ln.parameters()) == [] and list(gn.parameters()) == []
    np.testing.assert_allclose(ln(x), ref_layer_norm(x, 2), atol=1e-12)
    np.testing.assert_allclose(gn(x), ref_group_norm(x, 2), atol=1e-12)
    ln_nb = mb.LayerNorm(5, bias=False, dtype=np.float64)
    assert ln_nb.bias is None and ln_nb.weight.shape == (5,)
    ln_nb.weight.data[...] = rng.standard_normal(5)
    np.testing.assert_allclose(ln_nb(x), ref_layer_norm(x, 1, ln_nb.weight.data), atol=1e-12)
    dx = ln_nb.backward(np.ones_like(x))
    assert dx.shape == x.shape and ln_nb.weight.grad.shape == (5,)


def test_outputs_do_not_depend_on_the_rest_of_the_batch(rng):
    """The point of section 6.3: sample 0's output is the same in any batch (BN's is not)."""
    x = rng.standard_normal((8, 6, 3, 3))
    layers = [mb.LayerNorm((6, 3, 3)), mb.GroupNorm(3, 6), mb.InstanceNorm2d(6)]
    for layer in layers:
        alone = layer(x[:1])
        for n in (2, 5, 8):
            np.testing.assert_allclose(layer(x[:n])[:1], alone, rtol=0, atol=1e-14)
    bn = mb.BatchNorm2d(6, track_running_stats=False)
    assert np.max(np.abs(bn(x[:2])[:1] - bn(x)[:1])) > 1e-2


# --------------------------------------------------------------------------- backward: finite differences

def _gradcheck(layer, x, rng):
    _randomize_affine(layer, rng)
    errs = check_layer(layer, x)
    assert max(errs.values()) < 1e-7, errs
    return errs


@pytest.mark.parametrize("shape,ns,affine,bias", [((3, 5), (5,), True, True), ((2, 3, 4), (3, 4), True, True),
                                                  ((2, 3, 4), (4,), False, True), ((3, 4), (4,), True, False),
                                                  ((4,), (4,), True, True)])
def test_layer_norm_gradcheck(rng, shape, ns, affine, bias):
    errs = _gradcheck(mb.LayerNorm(ns, elementwise_affine=affine, bias=bias), rng.standard_normal(shape), rng)
    assert ("weight" in errs) == affine and ("bias" in errs) == (affine and bias)


@pytest.mark.parametrize("shape,G,affine", [((4, 6), 2, True), ((2, 4, 5), 2, True), ((2, 6, 2, 3), 3, True),
                                            ((2, 6, 2, 3), 1, False), ((3, 4, 3), 4, True)])
def test_group_norm_gradcheck(rng, shape, G, affine):
    _gradcheck(mb.GroupNorm(G, shape[1], affine=affine), rng.standard_normal(shape) * 2 + 1, rng)


@pytest.mark.parametrize("cls,shape", [(mb.InstanceNorm1d, (2, 3, 5)), (mb.InstanceNorm2d, (2, 3, 2, 3)),
                                       (mb.InstanceNorm1d, (3, 4)), (mb.InstanceNorm2d, (2, 3, 3))])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("track,mode", [(False, "train"), (True, "train"), (True, "eval")])
def test_instance_norm_gradcheck(rng, cls, shape, affine, track, mode):
    layer = cls(shape[0] if len(shape) == cls._spatial_dims + 1 else shape[1], affine=affine,
                track_running_stats=track)
    if track:      # non-trivial running statistics for the eval-mode check
        layer.running_mean[...] = rng.standard_normal(layer.num_features)
        layer.running_var[...] = rng.uniform(0.5, 2, layer.num_features)
    if mode == "eval":
        layer.eval()
    _gradcheck(layer, rng.standard_normal(shape), rng)


def test_functional_backward_against_finite_differences(rng):
    x = rng.standard_normal((3, 4, 5))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    dy = rng.standard_normal(x.shape)
    y, cache = SN.group_norm_forward(x, 2, w, b)
    dx, dw, db = SN.group_norm_backward(dy, cache)
    loss = lambda: float((SN.group_norm(x, 2, w, b) * dy).sum())  # noqa: E731
    for analytic, arr in ((dx, x), (dw, w), (db, b)):
        np.testing.assert_allclose(analytic, numerical_gradient(loss, arr), rtol=1e-6, atol=1e-8)
    lw, lb = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    y, cache = SN.layer_norm_forward(x, (4, 5), lw, lb)
    dx, dw, db = SN.layer_norm_backward(dy, cache)
    loss = lambda: float((SN.layer_norm(x, (4, 5), lw, lb) * dy).sum())  # noqa: E731
    for analytic, arr in ((dx, x), (dw, lw), (db, lb)):
        np.testing.assert_allclose(analytic, numerical_gradient(loss, arr), rtol=1e-6, atol=1e-8)


def test_gradients_accumulate_and_float32_backward(rng):
    x = rng.standard_normal((4, 6, 3)).astype(np.float32)
    gn = mb.GroupNorm(3, 6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gn(x)
    dx = gn.backward(dy)
    assert dx.dtype == np.float32 and gn.weight.grad.dtype == np.float32
    g1 = gn.weight.grad.copy()
    gn(x)
    gn.backward(dy)
    np.testing.assert_allclose(gn.weight.grad, 2 * g1, rtol=1e-6)
    # float32 backward agrees with the float64 one
    gn64 = mb.GroupNorm(3, 6, dtype=np.float64)
    gn64(x.astype(np.float64))
    dx64 = gn64.backward(dy.astype(np.float64))
    np.testing.assert_allclose(dx, dx64, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- running statistics

def test_instance_norm_running_stats_follow_the_per_sample_average(rng):
    inn = mb.InstanceNorm1d(3, momentum=0.2, track_running_stats=True, dtype=np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = rng.standard_normal((4, 3, 6)) * 2 + 1
        inn(x)
        L = x.shape[2]
        mu = x.mean(axis=2)                                       # (N, C)
        var_unbiased = ((x - mu[..., None]) ** 2).sum(axis=2) / (L - 1)
        rm = 0.8 * rm + 0.2 * mu.mean(axis=0)
        rv = 0.8 * rv + 0.2 * var_unbiased.mean(axis=0)
    np.testing.assert_allclose(inn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(inn.running_var, rv, rtol=1e-12)
    assert int(inn.num_batches_tracked) == 0          # PyTorch never counts instance-norm batches
    inn.eval()
    x = rng.standard_normal((2, 3, 5))
    expect = (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5)
    np.testing.assert_allclose(inn(x), expect, rtol=1e-12, atol=1e-12)
    before = inn.running_mean.copy()
    inn(x)
    np.testing.assert_array_equal(inn.running_mean, before)   # eval never updates


def test_instance_norm_without_tracking_uses_instance_stats_in_eval(rng):
    inn = mb.InstanceNorm2d(3)
    assert inn.running_mean is None and "running_mean" not in inn.state_dict()
    inn.eval()
    x = rng.standard_normal((2, 3, 3, 3))
    np.testing.assert_allclose(inn(x), ref_instance_norm(x), atol=1e-6)


def test_state_dict_keys_shapes_and_round_trip(rng):
    ln = mb.LayerNorm((3, 4))
    assert {k: v.shape for k, v in ln.state_dict().items()} == {"weight": (3, 4), "bias": (3, 4)}
    gn = mb.GroupNorm(2, 6)
    assert {k: v.shape for k, v in gn.state_dict().items()} == {"weight": (6,), "bias": (6,)}
    inn = mb.InstanceNorm2d(5, affine=True, track_running_stats=True)
    assert list(inn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    sd = {k: rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
          for k, v in inn.state_dict().items()}
    other = mb.InstanceNorm2d(5, affine=True, track_running_stats=True)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    with pytest.raises(ValueError, match="shape"):
        ln.load_state_dict({"weight": np.ones(12, np.float32), "bias": np.zeros((3, 4), np.float32)})


def test_empty_batch(rng):
    for layer, x in ((mb.LayerNorm(4), np.zeros((0, 4))), (mb.GroupNorm(2, 4), np.zeros((0, 4, 3))),
                     (mb.InstanceNorm1d(4, affine=True, track_running_stats=True), np.zeros((0, 4, 3)))):
        y = layer(x)
        assert y.shape == x.shape
        dx = layer.backward(np.zeros_like(x))
        assert dx.shape == x.shape
        for p in layer.parameters():
            assert np.all(p.grad == 0)
        if isinstance(layer, mb.InstanceNorm1d):
            np.testing.assert_array_equal(layer.running_var, np.ones(4))


def test_one_element_groups_are_refused(rng):
    """LayerNorm/GroupNorm with one value per group would output beta whatever the input
    (x - mean = 0) with a zero gradient: refused like batch norm's one value per channel.
    (PyTorch returns beta here, except for a GroupNorm batch of one, where it raises.)"""
    gn = mb.GroupNorm(2, 2, dtype=np.float64)
    with pytest.raises(ValueError, match=r"more than 1 value per group.*\(3, 2\) \(num_groups=2"):
        gn(rng.standard_normal((3, 2)))
    with pytest.raises(ValueError, match=r"more than 1 value in normalized_shape.*\(3, 1\)"):
        mb.LayerNorm(1)(rng.standard_normal((3, 1)))
    with pytest.raises(ValueError, match=r"more than 1 value per group"):
        SN.group_norm_forward(rng.standard_normal((0, 4, 1)), 4)      # even an empty batch


def test_group_norm_limits_equal_layer_and_instance_norm(rng):
    x = rng.standard_normal((3, 4, 5))
    np.testing.assert_allclose(mb.GroupNorm(1, 4)(x), mb.LayerNorm((4, 5))(x), atol=1e-12)
    np.testing.assert_allclose(mb.GroupNorm(4, 4)(x), mb.InstanceNorm1d(4)(x), atol=1e-12)


# --------------------------------------------------------------------------- errors

def test_errors_are_clear(rng):
    with pytest.raises(ValueError, match="divisible by num_groups"):
        mb.GroupNorm(3, 8)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        SN.group_norm(rng.standard_normal((2, 8)), 3)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 8, \*\)"):
        mb.GroupNorm(2, 8)(rng.standard_normal((2, 6, 3)))
    with pytest.raises(ValueError, match=r"\(N, 4, \*\)"):
        mb.GroupNorm(2, 4)(rng.standard_normal(4))
    with pytest.raises(ValueError, match=r"\[\*, 3, 4\]"):
        mb.LayerNorm((3, 4))(rng.standard_normal((2, 4, 3)))
    with pytest.raises(ValueError, match=r"\[\*, 3, 4\]"):
        mb.LayerNorm((3, 4))(rng.standard_normal(4))
    with pytest.raises(ValueError, match="non-empty"):
        mb.LayerNorm(())
    with pytest.raises(ValueError, match="2D .unbatched. or 3D"):
        mb.InstanceNorm1d(3)(rng.standard_normal((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="3D .unbatched. or 4D"):
        mb.InstanceNorm2d(3)(rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match="expected 3 channels"):
        mb.InstanceNorm1d(3)(rng.standard_normal((2, 4, 5)))
    for layer in (mb.LayerNorm(4), mb.GroupNorm(2, 4), mb.InstanceNorm1d(4)):
        with pytest.raises(TypeError, match="floating"):
            layer(np.ones((2, 4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        mb.InstanceNorm1d(3)(rng.standard_normal((4, 3, 1)))
    eval_no_track = mb.InstanceNorm2d(3).eval()
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        eval_no_track(rng.standard_normal((4, 3, 1, 1)))
    tracked = mb.InstanceNorm1d(3, track_running_stats=True).eval()
    assert tracked(rng.standard_normal((4, 3, 1))).shape == (4, 3, 1)   # running stats: allowed
    with pytest.raises(ValueError, match="momentum"):
        mb.InstanceNorm1d(3, momentum=None)
    with pytest.raises(ValueError, match="shape"):
        SN.layer_norm(rng.standard_normal((2, 4)), 4, np.ones(3))
    with pytest.raises(ValueError, match="shape"):
        SN.group_norm(rng.standard_normal((2, 4)), 2, np.ones(2))
    with pytest.raises(RuntimeError, match="before forward"):
        mb.LayerNorm(4).backward(np.ones((2, 4)))
    ln = mb.LayerNorm(4)
    ln(rng.standard_normal((2, 4)))
    with pytest.raises(ValueError, match="dy has shape"):
        ln.backward(np.ones((3, 4)))


# --------------------------------------------------------------------------- GPU (CuPy)

@pytest.mark.gpu
def test_cupy_matches_numpy(rng):
    cupy = pytest.importorskip("cupy")
    if not mb.backend.cupy_available():
        pytest.skip("no CUDA GPU")
    x = rng.standard_normal((3, 4, 5, 2))
    dy = rng.standard_normal(x.shape)
    for make in (lambda: mb.LayerNorm((4, 5, 2)), lambda: mb.GroupNorm(2, 4),
                 lambda: mb.InstanceNorm2d(4, affine=True, track_running_stats=True)):
        mb.set_backend("numpy")
        ref = make()
        mb.set_backend("cupy")
        try:
            gpu = make()
        finally:
            mb.set_backend("numpy")
        y_ref, y_gpu = ref(x), gpu(cupy.asarray(x))
        assert mb.backend.is_cupy_array(y_gpu)
        np.testing.assert_allclose(mb.asnumpy(y_gpu), y_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mb.asnumpy(gpu.backward(cupy.asarray(dy))), ref.backward(dy),
                                   rtol=1e-5, atol=1e-6)
        for (name, p), (_, q) in zip(ref.named_parameters(), gpu.named_parameters()):
            np.testing.assert_allclose(mb.asnumpy(q.grad), p.grad, rtol=1e-5, atol=1e-5, err_msg=name)
        for (name, b), (_, c) in zip(ref.named_buffers(), gpu.named_buffers()):
            np.testing.assert_allclose(mb.asnumpy(c), b, rtol=1e-6, err_msg=name)


def test_float16_in_float16_out(rng):
    x = (rng.standard_normal((4, 6, 5)) * 3 + 2).astype(np.float16)
    for layer, ref in ((mb.LayerNorm((6, 5), dtype=np.float16), lambda v: ref_layer_norm(v, 2)),
                       (mb.GroupNorm(3, 6, dtype=np.float16), lambda v: ref_group_norm(v, 3)),
                       (mb.InstanceNorm1d(6, affine=True, dtype=np.float16), ref_instance_norm)):
        y = layer(x)
        assert y.dtype == np.float16
        np.testing.assert_allclose(y.astype(np.float64), ref(x.astype(np.float64)), atol=1e-2)
        dx = layer.backward(np.ones_like(x))
        assert dx.dtype == np.float16 and np.all(np.abs(dx.astype(np.float64)) < 1e-2)  # d(sum y)/dx = 0
