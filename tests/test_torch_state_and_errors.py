"""State dicts exchanged with PyTorch, and wrong-size arguments refused where PyTorch refuses them.

PyTorch is the oracle (skipped without it): a PyTorch state dict converted to NumPy
loads into the matching minibn layer and the reverse, after which both layers give
the same outputs; every wrong-size weight, bias, running statistic or state-dict
entry that PyTorch refuses, minibn refuses too, with a message that names the
argument and both shapes.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import minibn as mb

torch = pytest.importorskip("torch")
TF = torch.nn.functional


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = b.detach().to(torch.float64).numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


# --------------------------------------------------------------------------- state dicts

LAYERS = {
    "BatchNorm1d": (lambda m, **k: m.BatchNorm1d(4, **k), (6, 4)),
    "BatchNorm2d": (lambda m, **k: m.BatchNorm2d(4, **k), (3, 4, 3, 2)),
    "LayerNorm": (lambda m, affine=True, **k: m.LayerNorm((4, 3), elementwise_affine=affine, **k), (5, 4, 3)),
    "GroupNorm": (lambda m, **k: m.GroupNorm(2, 4, **k), (3, 4, 5)),
    "InstanceNorm1d": (lambda m, **k: m.InstanceNorm1d(4, track_running_stats=True, **k), (3, 4, 5)),
}
VARIANTS = {"affine": dict(affine=True), "bias=False": dict(affine=True, bias=False),
            "affine=False": dict(affine=False)}
CASES = [(layer, variant) for layer in LAYERS for variant in VARIANTS]


def _pair(layer, variant):
    make, shape = LAYERS[layer]
    return make(mb, **VARIANTS[variant]), make(torch.nn, **VARIANTS[variant]), shape


def _train_steps(layer, rng, shape, steps=3):
    """A few training forwards, so that running statistics move away from 0 and 1."""
    for i in range(steps):
        x = rng.normal(1.0 + i, 2.0, shape).astype(np.float32)
        layer(torch.from_numpy(x) if isinstance(layer, torch.nn.Module) else x)


def _same_outputs(ours, theirs, rng, shape):
    for training in (False, True):
        ours.train(training)
        theirs.train(training)
        x = rng.normal(0.5, 1.5, shape).astype(np.float32)
        with torch.no_grad():
            y_theirs = theirs(torch.from_numpy(x))
        assert rel(ours(x), y_theirs) < 1e-5, f"training={training}"
    for key, value in theirs.state_dict().items():      # running statistics moved alike
        assert rel(ours.state_dict()[key], value) < 1e-5, key


@pytest.mark.parametrize("layer,variant", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_torch_state_dict_loads_into_minibn(layer, variant):
    rng = np.random.default_rng(0)
    ours, theirs, shape = _pair(layer, variant)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    _train_steps(theirs, rng, shape)
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    assert list(ours.state_dict()) == list(state)
    ours.load_state_dict(state)
    for key, value in state.items():
        np.testing.assert_array_equal(ours.state_dict()[key], value)
    _same_outputs(ours, theirs, rng, shape)


@pytest.mark.parametrize("layer,variant", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_minibn_state_dict_loads_into_torch(layer, variant):
    rng = np.random.default_rng(1)
    ours, theirs, shape = _pair(layer, variant)
    for p in ours.parameters():
        p.data[...] = rng.normal(size=p.shape)
    _train_steps(ours, rng, shape)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    _same_outputs(ours, theirs, rng, shape)


def test_array_likes_load_and_a_value_that_is_not_one_is_named():
    bn = mb.BatchNorm1d(3)
    state = {"weight": [1.0, 2.0, 3.0], "bias": (0.5, 0.5, 0.5), "running_mean": torch.zeros(3),
             "running_var": torch.full((3,), 2.0), "num_batches_tracked": 7}
    bn.load_state_dict(state)
    np.testing.assert_array_equal(bn.weight.data, [1.0, 2.0, 3.0])
    assert int(bn.num_batches_tracked) == 7 and bn.running_var.dtype == np.float32
    with pytest.raises(TypeError, match=r"'weight' is a Parameter that does not convert to an array"):
        bn.load_state_dict(dict(state, weight=torch.nn.Parameter(torch.ones(3))))
    with pytest.raises(TypeError, match=r"'bias' has dtype object"):
        bn.load_state_dict(dict(state, bias=np.array([1.0, "x", None], dtype=object)))


# --------------------------------------------------------------------------- wrong sizes

def _both_refuse(theirs, ours, words):
    """PyTorch raises, and minibn raises a ValueError or TypeError matching ``words``."""
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        theirs()
    with pytest.raises((ValueError, TypeError), match=words):
        ours()


def _shapes(what, expected, given):
    """``what`` ... ``expected`` ... ``given``, in that order, as a regular expression."""
    return rf"{re.escape(what)}.*{re.escape(str(expected))}.*{re.escape(str(given))}"


def _functional(name, *args, **kwargs):
    """The same call on both libraries: ``(torch's, minibn's)``."""
    def theirs():
        conv = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args]
        kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        return getattr(TF, name)(*conv, **kw)

    def ours():
        module = mb.functional if name == "batch_norm" else mb.sample_norms    # LayerNorm/GroupNorm/InstanceNorm
        return getattr(module, name)(*[a.copy() if isinstance(a, np.ndarray) else a for a in args], **kwargs)
    return theirs, ours


def _functional_cases():
    rng = np.random.default_rng(2)
    x, x3 = rng.normal(size=(4, 3)), rng.normal(size=(4, 4, 2))
    m3, v3, m4, v4 = np.zeros(3), np.ones(3), np.zeros(4), np.ones(4)
    two, two2 = np.ones(2), np.zeros(2)
    cases = []
    for training in (True, False):
        cases += [
            (_functional("batch_norm", x, two2, v3, training=training), _shapes("running_mean", (3,), (2,))),
            (_functional("batch_norm", x, m3, two, training=training), _shapes("running_var", (3,), (2,))),
            (_functional("batch_norm", x, m3, v3, two, training=training), _shapes("weight", (3,), (2,))),
            (_functional("batch_norm", x, m3, v3, None, two, training=training), _shapes("bias", (3,), (2,))),
            (_functional("batch_norm", x, np.zeros((3, 1)), v3, training=training),
             _shapes("running_mean", (3,), (3, 1))),
        ]
    for use_input_stats in (True, False):
        cases += [
            (_functional("instance_norm", x3, two2, v4, use_input_stats=use_input_stats),
             _shapes("running_mean", (4,), (2,))),
            (_functional("instance_norm", x3, m4, two, use_input_stats=use_input_stats),
             _shapes("running_var", (4,), (2,))),
        ]
    cases += [
        (_functional("instance_norm", x3, weight=two), _shapes("weight", (4,), (2,))),
        (_functional("instance_norm", x3, bias=two), _shapes("bias", (4,), (2,))),
        (_functional("layer_norm", x, (3,), two), _shapes("weight", (3,), (2,))),
        (_functional("layer_norm", x, (3,), None, two), _shapes("bias", (3,), (2,))),
        (_functional("group_norm", x3, 2, two), _shapes("weight", (4,), (2,))),
        (_functional("group_norm", x3, 2, None, two), _shapes("bias", (4,), (2,))),
    ]
    return cases


FUNCTIONAL_CASES = _functional_cases()


@pytest.mark.parametrize("calls,words", FUNCTIONAL_CASES, ids=[str(i) for i in range(len(FUNCTIONAL_CASES))])
def test_functional_wrong_sizes_refused_where_torch_refuses(calls, words):
    _both_refuse(*calls, words)


MODULES = {   # name: (factory on a library, training input shape, the per-entry shape)
    "BatchNorm1d": (lambda m: m.BatchNorm1d(3), (4, 3), (3,)),
    "LayerNorm": (lambda m: m.LayerNorm(3), (4, 3), (3,)),
    "GroupNorm": (lambda m: m.GroupNorm(1, 3), (4, 3, 2), (3,)),
    "InstanceNorm1d": (lambda m: m.InstanceNorm1d(3, affine=True, track_running_stats=True), (4, 3, 2), (3,)),
}
ENTRIES = [(name, key) for name, (make, _, _) in MODULES.items() for key in make(torch.nn).state_dict()
           if key != "num_batches_tracked"]


@pytest.mark.parametrize("name,key", ENTRIES, ids=[f"{n}.{k}" for n, k in ENTRIES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_size_parameter_or_buffer_refused_where_torch_refuses(name, key, training):
    make, shape, entry = MODULES[name]
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    wrong = np.ones(2, np.float32)

    def theirs():
        layer = make(torch.nn).train(training)
        value = torch.from_numpy(wrong)
        setattr(layer, key, torch.nn.Parameter(value) if key in ("weight", "bias") else value)
        return layer(torch.from_numpy(x))

    def ours():                          # minibn refuses at the assignment already
        layer = make(mb).train(training)
        setattr(layer, key, mb.Parameter(wrong) if key in ("weight", "bias") else wrong)

    _both_refuse(theirs, ours, _shapes(f"{name}.{key}", entry, (2,)))


@pytest.mark.parametrize("name,key", ENTRIES, ids=[f"{n}.{k}" for n, k in ENTRIES])
def test_wrong_size_state_dict_entry_refused_where_torch_refuses(name, key):
    make, _, entry = MODULES[name]
    theirs_layer, ours_layer = make(torch.nn), make(mb)
    state = {k: v.numpy().copy() for k, v in theirs_layer.state_dict().items()}
    state[key] = np.ones(5, np.float32)
    _both_refuse(lambda: theirs_layer.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}),
                 lambda: ours_layer.load_state_dict(state), _shapes(f"'{key}'", (5,), entry))
