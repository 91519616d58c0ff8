"""Finite-difference checks of every batch-norm layer, and of the checker itself."""
import numpy as np
import pytest

import minibn as mb
from minibn import functional as F
from minibn.gradcheck import check_function, check_layer, numerical_gradient, rel_error

TOL = 1e-7

LAYERS = [
    (mb.BatchNorm1d, (6, 3)),
    (mb.BatchNorm1d, (4, 3, 5)),
    (mb.BatchNorm2d, (3, 2, 3, 4)),
    (mb.BatchNorm3d, (2, 2, 2, 3, 3)),
]


def make_layer(cls, C, affine, track, rng, momentum=0.1):
    bn = cls(C, affine=affine, track_running_stats=track, momentum=momentum, dtype=np.float64)
    if affine:        # non-trivial gamma/beta, so a bug that ignores them shows
        bn.weight.data[...] = rng.normal(1.0, 0.5, C)
        bn.bias.data[...] = rng.normal(0.0, 1.0, C)
    if track:         # non-trivial running statistics for eval mode
        bn.running_mean[...] = rng.normal(size=C)
        bn.running_var[...] = rng.uniform(0.5, 2.0, C)
    return bn


@pytest.mark.parametrize("cls,shape", LAYERS, ids=["1d-2D", "1d-3D", "2d", "3d"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-untracked"])
def test_layer_gradients(cls, shape, affine, mode, rng):
    track = mode != "eval-untracked"
    bn = make_layer(cls, shape[1], affine, track, rng)
    bn.train(mode == "train")
    x = rng.normal(2.0, 1.5, shape)
    errors = check_layer(bn, x)
    expected = {"input"} | ({"weight", "bias"} if affine else set())
    assert set(errors) == expected
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("momentum", [None, 0.0, 1.0])
def test_layer_gradients_other_momenta(momentum, rng):
    bn = make_layer(mb.BatchNorm1d, 3, True, True, rng, momentum=momentum)
    errors = check_layer(bn, rng.normal(size=(5, 3, 2)))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("which", [F.batch_norm_backward, F.batch_norm_backward_graph],
                         ids=["closed_form", "graph"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 3, 4), (2, 2, 2, 3, 3)])
def test_functional_backward_derivations(which, shape, rng):
    C = shape[1]
    g, b = rng.normal(1, 0.5, C), rng.normal(size=C)
    x = rng.normal(-1.0, 3.0, shape)
    dy = rng.normal(size=shape)
    err = check_function(lambda inp: F.batch_norm_forward(inp, g, b)[0],
                         lambda d: which(d, F.batch_norm_forward(x, g, b)[1])[0], x, dy)
    assert err < TOL


def test_check_layer_restores_state(rng):
    bn = make_layer(mb.BatchNorm2d, 2, True, True, rng)
    bn.weight.grad = np.full(2, 7.0)
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    w_obj, rm_obj = bn.weight.data, bn.running_mean
    check_layer(bn, rng.normal(size=(2, 2, 3, 3)))
    after = bn.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    assert bn.weight.data is w_obj and bn.running_mean is rm_obj
    assert bn.weight.data.dtype == np.float64
    np.testing.assert_array_equal(bn.weight.grad, [7.0, 7.0])


def test_check_layer_float32_layer_is_promoted(rng):
    bn = mb.BatchNorm1d(3)                   # float32 parameters
    errors = check_layer(bn, rng.normal(size=(5, 3)))
    assert max(errors.values()) < TOL
    assert bn.weight.data.dtype == np.float32


def test_check_layer_needs_float64(rng):
    with pytest.raises(TypeError, match="float64.*float32"):
        check_layer(mb.BatchNorm1d(3), rng.normal(size=(5, 3)).astype(np.float32))


class _WrongBackward(mb.BatchNorm1d):
    """A deliberately broken layer: dx as if the statistics were constants."""

    def backward(self, dy):
        dx = super().backward(dy)
        c = self._cache
        return dy * (c.weight * c.inv_std).reshape(1, -1)


class _WrongWeightGrad(mb.BatchNorm1d):
    def backward(self, dy):
        dx = super().backward(dy)
        self.weight.grad = self.weight.grad * 1.01
        return dx


@pytest.mark.parametrize("cls,key", [(_WrongBackward, "input"), (_WrongWeightGrad, "weight")])
def test_check_layer_catches_bugs(cls, key, rng):
    bn = cls(3, dtype=np.float64)
    bn.weight.data[...] = [0.5, 1.5, -2.0]
    errors = check_layer(bn, rng.normal(size=(6, 3)))
    assert errors[key] > 1e-3


def test_numerical_gradient_of_known_function(rng):
    x = rng.normal(size=(3, 4))
    g = numerical_gradient(lambda: float((x ** 3).sum()), x)
    assert rel_error(g, 3 * x ** 2) < 1e-8


def test_rel_error_semantics():
    a = np.array([1.0, -2.0, 0.0])
    assert rel_error(a, a) == 0.0
    assert rel_error(a, -a) == pytest.approx(2.0)
    assert rel_error(np.zeros(3), np.full(3, 1e-17)) < 1e-8     # below the floor: not an error
    assert rel_error(np.zeros(0), np.zeros(0)) == 0.0
    with pytest.raises(ValueError, match=r"\(3,\) vs \(2,\)"):
        rel_error(a, a[:2])


def test_numerical_gradient_refuses_a_copy():
    x = np.arange(12.0).reshape(3, 4)[:, :2]        # not contiguous: reshape(-1) would copy
    with pytest.raises(ValueError, match="contiguous"):
        numerical_gradient(lambda: float(x.sum()), x)
