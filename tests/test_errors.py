"""Bad input gets a clear error that says what was expected and what was given."""
import re

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
    ({"num_features": 3, "eps": -1e-5}, "eps must be a finite number > 0, got -1e-05"),
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


def test_buffer_of_wrong_length_is_caught_when_assigned():
    bn = mb.BatchNorm1d(3).eval()
    with pytest.raises(ValueError, match=r"BatchNorm1d.running_var must have shape \(3,\), got shape \(2,\)"):
        bn.running_var = np.ones(2, np.float32)
    np.testing.assert_array_equal(bn.running_var, np.ones(3))      # unchanged


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


# --------------------------------------------------------------------------- eps: one rule everywhere

def _eps_layers():
    """Every layer with an eps, built with a given eps (name, factory, a training input)."""
    rng = np.random.default_rng(1)
    x2, x3, x4, x5 = (rng.normal(size=s).astype(np.float32)
                      for s in ((4, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 2)))
    return [
        ("BatchNorm1d", lambda eps: mb.BatchNorm1d(3, eps=eps), x2),
        ("BatchNorm2d", lambda eps: mb.BatchNorm2d(3, eps=eps), x4),
        ("BatchNorm3d", lambda eps: mb.BatchNorm3d(3, eps=eps), x5),
        ("SyncBatchNorm", lambda eps: mb.SyncBatchNorm(3, eps=eps), x3),
        ("LayerNorm", lambda eps: mb.LayerNorm(3, eps=eps), x2),
        ("GroupNorm", lambda eps: mb.GroupNorm(1, 3, eps=eps), x3),
        ("InstanceNorm1d", lambda eps: mb.InstanceNorm1d(3, eps=eps), x3),
        ("InstanceNorm2d", lambda eps: mb.InstanceNorm2d(3, eps=eps), x4),
        ("InstanceNorm3d", lambda eps: mb.InstanceNorm3d(3, eps=eps), x5),
    ]


EPS_LAYERS = _eps_layers()
BAD_EPS_VALUES = [0, 0.0, -0.0, -1e-5, -1, np.float32(0), float("nan"), float("inf"), -float("inf")]
BAD_EPS_TYPES = [True, np.bool_(True), "1e-5", None, [1e-5], 1e-5j]
GOOD_EPS = [1e-5, 1, 3.0, np.float32(1e-5), np.float64(1e-3), np.float16(0.01), np.int64(2)]


@pytest.mark.parametrize("name,make,x", EPS_LAYERS, ids=[n for n, _, _ in EPS_LAYERS])
def test_eps_rule_at_construction_and_assignment(name, make, x):
    for bad in BAD_EPS_VALUES:
        with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got "):
            make(bad)
    for bad in BAD_EPS_TYPES:
        with pytest.raises(TypeError, match=r"eps must be a real number"):
            make(bad)
    layer = make(1e-5)
    for bad in BAD_EPS_VALUES:
        with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got "):
            layer.eps = bad
    for bad in BAD_EPS_TYPES:
        with pytest.raises(TypeError, match=r"eps must be a real number"):
            layer.eps = bad
    assert layer.eps == 1e-5                         # a refused assignment changes nothing
    for good in GOOD_EPS:
        layer = make(good)
        assert type(layer.eps) is float and layer.eps == float(good)
        layer.eps = good
        assert type(layer.eps) is float and layer.eps == float(good)
    assert np.all(np.isfinite(layer(x)))


def test_eps_zero_no_longer_turns_a_constant_channel_into_nan():
    x = np.ones((4, 3), np.float32)                  # a constant channel: variance 0
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got 0"):
        mb.BatchNorm1d(3, eps=0)(x)
    bn = mb.BatchNorm1d(3)
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got -1"):
        bn.eps = -1
    np.testing.assert_array_equal(bn(x), np.zeros((4, 3)))   # 0 / sqrt(0 + 1e-5): finite


def _functional_calls(eps):
    from minibn import functional as F
    from minibn import sample_norms as SN
    rng = np.random.default_rng(2)
    x2, x3 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3, 5))
    mean, var = np.zeros(3), np.ones(3)
    return {
        "batch_norm": lambda: F.batch_norm(x2, mean.copy(), var.copy(), training=True, eps=eps),
        "batch_norm eval": lambda: F.batch_norm(x2, mean, var, training=False, eps=eps),
        "batch_norm_with_cache": lambda: F.batch_norm_with_cache(x2, None, None, training=True, eps=eps),
        "batch_norm_forward": lambda: F.batch_norm_forward(x2, eps=eps),
        "batch_norm_eval_forward": lambda: F.batch_norm_eval_forward(x2, mean, var, eps=eps),
        "layer_norm": lambda: SN.layer_norm(x2, 3, eps=eps),
        "layer_norm_forward": lambda: SN.layer_norm_forward(x2, 3, eps=eps),
        "group_norm": lambda: SN.group_norm(x3, 1, eps=eps),
        "group_norm_forward": lambda: SN.group_norm_forward(x3, 3, eps=eps),
        "instance_norm": lambda: SN.instance_norm(x3, eps=eps),
        "instance_norm eval": lambda: SN.instance_norm(x3, mean, var, use_input_stats=False, eps=eps),
        "instance_norm_forward": lambda: SN.instance_norm_forward(x3, eps=eps),
        "instance_norm_with_cache": lambda: SN.instance_norm_with_cache(x3, eps=eps),
    }


@pytest.mark.parametrize("call", list(_functional_calls(1e-5)))
def test_eps_rule_in_the_functional_api(call):
    for bad in BAD_EPS_VALUES:
        with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got "):
            _functional_calls(bad)[call]()
    with pytest.raises(TypeError, match=r"eps must be a real number"):
        _functional_calls(True)[call]()
    out = _functional_calls(np.float32(1e-5))[call]()
    y = out[0] if isinstance(out, tuple) else out
    assert np.all(np.isfinite(y))


# --------------------------------------------------------------------------- one value per statistic

def test_one_value_per_group_or_row_is_refused_like_one_value_per_channel():
    from minibn import functional as F
    from minibn import sample_norms as SN
    rng = np.random.default_rng(3)
    one_per_group = r"Expected more than 1 value per group, got input of shape \(4, 3\) \(num_groups=3"
    for layer in (mb.GroupNorm(3, 3), mb.GroupNorm(3, 3, affine=False)):
        for training in (True, False):                # GroupNorm has no running statistics
            with pytest.raises(ValueError, match=one_per_group):
                layer.train(training)(rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match=one_per_group):
        SN.group_norm(rng.normal(size=(4, 3)), 3)
    with pytest.raises(ValueError, match=r"more than 1 value per group, got input of shape \(2, 6, 1\)"):
        mb.GroupNorm(6, 6)(rng.normal(size=(2, 6, 1)))
    one_per_row = r"Expected more than 1 value in normalized_shape, got input of shape \(4, 1\)"
    with pytest.raises(ValueError, match=one_per_row):
        mb.LayerNorm(1)(rng.normal(size=(4, 1)))
    with pytest.raises(ValueError, match=r"more than 1 value in normalized_shape.*\(1, 1\)"):
        SN.layer_norm(rng.normal(size=(4, 1, 1)), (1, 1))
    # two values per group or row are fine
    assert mb.GroupNorm(3, 6)(rng.normal(size=(4, 6))).shape == (4, 6)
    assert mb.LayerNorm(2)(rng.normal(size=(4, 2))).shape == (4, 2)
    # every normalization words it the same way
    cases = [lambda: mb.BatchNorm1d(3)(f32(1, 3)), lambda: mb.SyncBatchNorm(3)(f32(1, 3)),
             lambda: mb.InstanceNorm1d(3)(f32(2, 3, 1)), lambda: mb.GroupNorm(3, 3)(f32(2, 3)),
             lambda: mb.LayerNorm(1)(f32(2, 1))]
    for case in cases:
        with pytest.raises(ValueError, match=r"^Expected more than 1 [a-z _]+, got input of shape \("):
            case()


# --------------------------------------------------------------------------- backward after an empty batch

@pytest.mark.parametrize("make", [lambda: mb.BatchNorm1d(3), lambda: mb.BatchNorm1d(3, affine=False),
                                  lambda: mb.SyncBatchNorm(3)])
def test_backward_after_an_empty_batch_checks_dy_like_any_backward(make):
    for n in (0, 4):                                   # the empty path and the usual one
        bn = make()
        bn(np.zeros((n, 3), np.float32) if n == 0 else f32(n, 3))
        with pytest.raises(TypeError, match=r"dy must be a real floating-point array.*int64"):
            bn.backward(np.zeros((n, 3), np.int64))
        with pytest.raises(TypeError, match=r"dy must be a real floating-point array.*list"):
            bn.backward([[0.0, 0.0, 0.0]] * n)
        with pytest.raises(ValueError, match=rf"dy has shape \({n}, 4\), expected .*\({n}, 3\)"):
            bn.backward(np.zeros((n, 4), np.float32))
        dx = bn.backward(np.zeros((n, 3), np.float32))
        assert dx.shape == (n, 3) and dx.dtype == np.float32


# --------------------------------------------------------------------------- wrong-size vectors

def test_functional_wrong_size_vectors_name_the_argument_and_both_shapes():
    from minibn import functional as F
    from minibn import sample_norms as SN
    rng = np.random.default_rng(4)
    x, x3 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3, 2))
    mean, var = np.zeros(3), np.ones(3)
    for training in (True, False):
        with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\).*got shape \(2,\)"):
            F.batch_norm(x, np.zeros(2), var, training=training)
        with pytest.raises(ValueError, match=r"running_var must have shape \(3,\).*got shape \(2,\)"):
            F.batch_norm(x, mean, np.ones(2), training=training)
        with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\).*got shape \(3, 1\)"):
            F.batch_norm(x, np.zeros((3, 1)), var, training=training)
        with pytest.raises(ValueError, match=r"weight must have shape \(3,\).*got shape \(2,\)"):
            F.batch_norm(x, mean, var, np.ones(2), training=training)
        with pytest.raises(ValueError, match=r"bias must have shape \(3,\).*got shape \(4,\)"):
            F.batch_norm(x, mean, var, None, np.ones(4), training=training)
    for use_input_stats in (True, False):
        with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\).*got shape \(2,\)"):
            SN.instance_norm(x3, np.zeros(2), var, use_input_stats=use_input_stats)
        with pytest.raises(ValueError, match=r"running_var must have shape \(3,\).*got shape \(2,\)"):
            SN.instance_norm(x3, mean, np.ones(2), use_input_stats=use_input_stats)
    with pytest.raises(ValueError, match=r"InstanceNorm: weight must have shape \(3,\), got \(2,\)"):
        SN.instance_norm(x3, weight=np.ones(2))
    with pytest.raises(ValueError, match=r"LayerNorm: bias must have shape \(3,\), got \(2,\)"):
        SN.layer_norm(x, 3, None, np.ones(2))
    with pytest.raises(ValueError, match=r"GroupNorm: weight must have shape \(3,\), got \(2,\)"):
        SN.group_norm(x3, 1, np.ones(2))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\).*got shape \(2,\)"):
        F.update_running_stats(np.zeros(2), np.ones(3), mean, var, 4, 0.1)


LAYERS_WITH_STATE = [
    ("BatchNorm1d", lambda: mb.BatchNorm1d(3), (3,)),
    ("SyncBatchNorm", lambda: mb.SyncBatchNorm(3), (3,)),
    ("InstanceNorm1d", lambda: mb.InstanceNorm1d(3, affine=True, track_running_stats=True), (3,)),
    ("LayerNorm", lambda: mb.LayerNorm((3, 2)), (3, 2)),
    ("GroupNorm", lambda: mb.GroupNorm(1, 3), (3,)),
]


@pytest.mark.parametrize("name,make,shape", LAYERS_WITH_STATE, ids=[n for n, _, _ in LAYERS_WITH_STATE])
def test_wrong_size_parameter_or_buffer_is_refused_when_assigned(name, make, shape):
    layer = make()
    wrong = (shape[0] + 1,) + shape[1:]
    names = ["weight", "bias"] + (["running_mean", "running_var"] if "running_mean" in layer._buffers else [])
    for key in names:
        before = getattr(layer, key)
        value = mb.Parameter(np.ones(wrong, np.float32)) if key in ("weight", "bias") \
            else np.ones(wrong, np.float32)
        with pytest.raises(ValueError, match=rf"{name}.{key} must have shape {re.escape(str(shape))}, "
                                             rf"got shape {re.escape(str(wrong))}"):
            setattr(layer, key, value)
        assert getattr(layer, key) is before             # unchanged
    if "running_mean" in layer._buffers:
        with pytest.raises(TypeError, match=rf"{name}.running_mean must be an array of shape \(3,\), got list"):
            layer.running_mean = [0.0, 0.0, 0.0]
        with pytest.raises(TypeError, match=rf"{name}.running_var must be a floating array, got dtype int64"):
            layer.running_var = np.ones(3, np.int64)
        with pytest.raises(TypeError, match=rf"{name}.num_batches_tracked must be an integer array"):
            layer.num_batches_tracked = np.array(1.0)
        layer.running_var = np.full(3, 2.0, np.float32)      # the right shape is accepted
    layer.weight = mb.Parameter(np.full(shape, 2.0, np.float32))
    assert layer.weight.shape == shape


@pytest.mark.parametrize("name,make,shape", LAYERS_WITH_STATE, ids=[n for n, _, _ in LAYERS_WITH_STATE])
def test_wrong_size_state_dict_entry_names_the_key_and_both_shapes(name, make, shape):
    layer = make()
    for key, value in good_state(layer).items():
        sd = good_state(layer)
        wrong = (2,) if key == "num_batches_tracked" else (shape[0] + 1,) + shape[1:]
        sd[key] = np.zeros(wrong, value.dtype)
        with pytest.raises(ValueError, match=rf"'{key}' has shape {re.escape(str(wrong))}, "
                                             rf"expected {re.escape(str(value.shape))}"):
            layer.load_state_dict(sd)
