"""Bad input gets a clear error that says what was expected and what was given."""
import numpy as np
import pytest

import minibn as mb


def f32(*shape):
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("cls,bad_shape,words", [
    (mb.BatchNorm1d, (4,), r"2D \(N, C\) or 3D \(N, C, L\) input, got 1-D input of shape \(4,\)"),
    (mb.BatchNorm1d, (2, 3, 4, 5), r"2D \(N, C\) or 3D .*got 4-D input of shape \(2, 3, 4, 5\)"),
    (mb.BatchNorm2d, (2, 3, 4), r"4D \(N, C, H, W\) input, got 3-D input"),
    (mb.BatchNorm3d, (2, 3, 4, 4), r"5D \(N, C, D, H, W\) input, got 4-D input"),
])
def test_wrong_rank(cls, bad_shape, words):
    with pytest.raises(ValueError, match=words):
        cls(3)(f32(*bad_shape))


@pytest.mark.parametrize("cls,shape", [(mb.BatchNorm1d, (4, 5)), (mb.BatchNorm1d, (4, 5, 2)),
                                       (mb.BatchNorm2d, (2, 5, 2, 2)), (mb.BatchNorm3d, (2, 5, 1, 2, 2))])
def test_wrong_channel_count(cls, shape):
    with pytest.raises(ValueError, match=rf"expected 3 channels .*got input of shape {tuple(shape)}".replace(
            "(", r"\(").replace(")", r"\)")):
        cls(3)(f32(*shape))


def test_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3\) \(1 value"):
        mb.BatchNorm1d(3)(f32(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mb.BatchNorm1d(3, track_running_stats=False).eval()(f32(1, 3))   # batch stats in eval too
    assert mb.BatchNorm1d(3)(f32(1, 3, 2)).shape == (1, 3, 2)


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.bool_, np.complex64, np.uint16])
def test_non_floating_input(dtype):
    bn = mb.BatchNorm1d(3)
    x = np.ones((4, 3), dtype=dtype)
    with pytest.raises(TypeError, match=rf"BatchNorm1d input must be a real floating-point array.*"
                                        rf"{np.dtype(dtype).name}"):
        bn(x)
    bn.eval()
    with pytest.raises(TypeError, match="floating-point"):
        bn(x)


def test_python_list_input():
    with pytest.raises(TypeError, match="floating-point array.*list"):
        mb.BatchNorm1d(3)([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


# --------------------------------------------------------------------------- backward

def test_backward_before_forward():
    for bn in (mb.BatchNorm1d(3), mb.BatchNorm2d(3, affine=False)):
        with pytest.raises(RuntimeError, match="backward called before forward"):
            bn.backward(f32(4, 3))
    with pytest.raises(RuntimeError, match="before forward"):
        mb.BatchNorm1d(3).backward(np.zeros((0, 3), np.float32))     # even an empty dy


def test_dy_of_wrong_shape():
    bn = mb.BatchNorm1d(3)
    bn(f32(4, 3))
    with pytest.raises(ValueError, match=r"dy has shape \(1, 3\), expected .*\(4, 3\)"):
        bn.backward(f32(1, 3))                          # broadcastable: must still be refused
    with pytest.raises(ValueError, match=r"dy has shape \(4, 3, 1\)"):
        bn.backward(f32(4, 3, 1))
    with pytest.raises(TypeError, match="dy must be a real floating-point array"):
        bn.backward(np.ones((4, 3), dtype=np.int32))


# --------------------------------------------------------------------------- constructor and momentum

@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), True, "0.1", [0.1]])
def test_momentum_outside_0_1(bad):
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or None, got"):
        mb.BatchNorm1d(3, momentum=bad)
    bn = mb.BatchNorm1d(3)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
        bn.momentum = bad
    assert bn.momentum == 0.1                         # unchanged after a refused assignment


@pytest.mark.parametrize("ok", [0, 1, 0.0, 1.0, np.float32(0.25), np.int64(1), None])
def test_momentum_accepted(ok):
    bn = mb.BatchNorm1d(3, momentum=ok)
    assert bn.momentum == (None if ok is None else float(ok))


@pytest.mark.parametrize("kwargs,words", [
    ({"num_features": 0}, "num_features must be a positive integer, got 0"),
    ({"num_features": 2.5}, "num_features must be a positive integer, got 2.5"),
    ({"num_features": True}, "num_features must be a positive integer, got True"),
    ({"num_features": 3, "eps": -1e-5}, "eps must be a finite number >= 0, got -1e-05"),
    ({"num_features": 3, "eps": float("nan")}, "eps must be a finite number"),
])
def test_bad_constructor_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        mb.BatchNorm1d(**kwargs)


def test_bad_dtype_argument():
    with pytest.raises(TypeError, match="dtype must be a floating dtype, got int32"):
        mb.BatchNorm1d(3, dtype=np.int32)


# --------------------------------------------------------------------------- parameters

def test_parameter_assignment_mistakes():
    bn = mb.BatchNorm1d(3)
    with pytest.raises(TypeError, match="cannot assign ndarray to parameter 'weight'.*minibn.Parameter"):
        bn.weight = np.ones(3, np.float32)
    assert isinstance(bn.weight, mb.Parameter)
    with pytest.raises(TypeError, match="Parameter needs a NumPy or CuPy array, got list"):
        mb.Parameter([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="Parameter needs a floating-point array, got dtype int64"):
        mb.Parameter(np.arange(3))


def test_parameter_data_of_wrong_length_is_caught_at_forward():
    # one channel, three gammas: broadcasting would silently give three output channels
    bn = mb.BatchNorm1d(1)
    bn.weight.data = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(1,\).*got shape \(3,\)"):
        bn(f32(4, 1))
    bn = mb.BatchNorm1d(3)
    bn.bias.data = np.zeros((3, 1), np.float32)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\).*got shape \(3, 1\)"):
        bn(f32(4, 3))
    bn = mb.BatchNorm1d(3).eval()
    bn.running_var = np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"var must have shape \(3,\).*got shape \(2,\)"):
        bn(f32(4, 3))


def test_parameter_set_to_none_on_an_affine_layer():
    bn = mb.BatchNorm1d(3)
    bn.weight = None                   # the registry allows it (as PyTorch's does) ...
    with pytest.raises(ValueError, match="affine=True but its weight is None.*affine=False"):
        bn(f32(4, 3))                  # ... but a half-affine layer is refused, not guessed at


# --------------------------------------------------------------------------- state dicts

def good_state(bn):
    return {k: v.copy() for k, v in bn.state_dict().items()}


def test_state_dict_missing_key():
    bn = mb.BatchNorm1d(3)
    sd = good_state(bn)
    del sd["running_var"]
    with pytest.raises(KeyError, match=r"missing keys \['running_var'\], unexpected keys \[\]"):
        bn.load_state_dict(sd)


def test_state_dict_unexpected_key():
    bn = mb.BatchNorm1d(3, affine=False)
    sd = good_state(bn)
    sd["weight"] = np.ones(3, np.float32)
    with pytest.raises(KeyError, match=r"missing keys \[\], unexpected keys \['weight'\]"):
        bn.load_state_dict(sd)


def test_state_dict_wrong_shape_changes_nothing():
    bn = mb.BatchNorm1d(3)
    sd = good_state(bn)
    sd["weight"] = np.full(3, 5.0, np.float32)            # valid, but must not be applied ...
    sd["running_mean"] = np.zeros(4, np.float32)          # ... because this one is not
    with pytest.raises(ValueError, match=r"'running_mean' has shape \(4,\), expected \(3,\)"):
        bn.load_state_dict(sd)
    np.testing.assert_array_equal(bn.weight.data, np.ones(3))


@pytest.mark.parametrize("key,value,words", [
    ("running_mean", np.zeros(3, np.int64), r"'running_mean' has dtype int64, expected a floating"),
    ("weight", np.ones(3, np.bool_), r"'weight' has dtype bool, expected a floating"),
    ("bias", np.zeros(3, np.complex64), r"'bias' has dtype complex64"),
    ("num_batches_tracked", np.array(3.0), r"'num_batches_tracked' has dtype float64, expected an integer"),
])
def test_state_dict_wrong_dtype_kind(key, value, words):
    bn = mb.BatchNorm1d(3)
    sd = good_state(bn)
    sd[key] = value
    with pytest.raises(TypeError, match=words):
        bn.load_state_dict(sd)


def test_load_a_file_that_would_need_pickle(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, weight=np.array([1.0, "x"], dtype=object))
    with pytest.raises(ValueError, match="only be read with pickle.*never unpickles"):
        mb.load(path)


# --------------------------------------------------------------------------- backend

def test_mixing_array_modules_is_refused():
    class FakeCupyArray:
        pass
    FakeCupyArray.__module__ = "cupy._core.core"
    with pytest.raises(TypeError, match="both NumPy and CuPy arrays"):
        mb.get_array_module(np.ones(2), FakeCupyArray())


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of \('numpy', 'cupy'\), got 'torch'"):
        mb.set_backend("torch")
