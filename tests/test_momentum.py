"""Momentum schedules: their formulas, when they set the layers' momentum, checkpointing, errors.

References are written here from the formulas (the article's section 4 and the
docstrings' definitions), and the running statistics they drive are checked
against a float64 NumPy EMA, not against minibn's own update.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import minibn as mb
from minibn import momentum as M
from minibn.batchnorm import _BatchNorm


# --------------------------------------------------------------------------- independent formulas

def linear_ref(t, start, end, total):
    return end if t >= total else start - (t / total) * (start - end)


def exponential_ref(t, start, rate, floor=None):
    v = start * rate ** t
    return v if floor is None else max(v, floor)


def cosine_ref(t, start, end, total):
    if t >= total:
        return end
    return end + (start - end) * (1 + math.cos(math.pi * t / total)) / 2


def ema_ref(batches, momenta, mean0=0.0, var0=1.0):
    """float64 EMA with a per-batch momentum; the variance update uses the unbiased batch variance."""
    C = batches[0].shape[1]
    rm, rv = np.full(C, mean0, dtype=np.float64), np.full(C, var0, dtype=np.float64)
    for x, a in zip(batches, momenta):
        x = np.asarray(x, dtype=np.float64)
        m = x.shape[0]
        mu = x.sum(axis=0) / m
        var_u = ((x - mu) ** 2).sum(axis=0) / (m - 1)
        rm = (1 - a) * rm + a * mu
        rv = (1 - a) * rv + a * var_u
    return rm, rv


def batches_f64(rng, n=30, size=16, C=4):
    return [rng.normal(2.0, 3.0, size=(size, C)) for _ in range(n)]


# --------------------------------------------------------------------------- the formulas

def test_linear_decay_is_the_articles_schedule_for_all_50_steps():
    bn = mb.BatchNorm1d(5)
    sched = M.LinearDecay(bn, start=0.9, end=0.1, total_steps=40)
    for epoch in range(50):
        article = max(0.9 - (epoch / 50), 0.1)          # the article's line, verbatim
        assert sched.momentum == pytest.approx(article, abs=2e-16), epoch
        assert bn.momentum == sched.momentum
        sched.step()


@pytest.mark.parametrize("make, ref", [
    (lambda bn: M.Constant(bn, 0.25), lambda t: 0.25),
    (lambda bn: M.LinearDecay(bn, 0.9, 0.01, 100), lambda t: linear_ref(t, 0.9, 0.01, 100)),
    (lambda bn: M.LinearDecay(bn, 0.1, 0.6, 7), lambda t: linear_ref(t, 0.1, 0.6, 7)),
    (lambda bn: M.ExponentialDecay(bn, 0.9, 0.95), lambda t: exponential_ref(t, 0.9, 0.95)),
    (lambda bn: M.ExponentialDecay(bn, 0.8, 0.9, floor=0.05), lambda t: exponential_ref(t, 0.8, 0.9, 0.05)),
    (lambda bn: M.Cosine(bn, 0.9, 0.1, 40), lambda t: cosine_ref(t, 0.9, 0.1, 40)),
    (lambda bn: M.Cumulative(bn), lambda t: 1.0 / (t + 1)),
])
def test_schedule_values_follow_their_formulas(make, ref):
    bn = mb.BatchNorm1d(3)
    sched = make(bn)
    assert sched.values(120) == pytest.approx([ref(t) for t in range(120)], rel=1e-14, abs=1e-16)
    for t in range(120):
        assert sched.last_step == t
        assert sched.get_momentum() == pytest.approx(ref(t), rel=1e-14, abs=1e-16)
        assert bn.momentum == sched.get_momentum()
        sched.step()


def test_schedule_endpoints():
    bn = mb.BatchNorm1d(2)
    cos = M.Cosine(bn, 0.9, 0.1, 40)
    assert cos.momentum_at(0) == 0.9 and cos.momentum_at(40) == 0.1 and cos.momentum_at(1000) == 0.1
    assert cos.momentum_at(20) == pytest.approx(0.5, abs=1e-15)            # the midpoint of the cosine
    lin = M.LinearDecay(bn, 0.9, 0.1, 40)
    assert lin.momentum_at(40) == pytest.approx(0.1, abs=1e-16) and lin.momentum_at(10**6) == 0.1
    exp = M.ExponentialDecay(bn, 0.5, 0.5, floor=0.1)
    assert [exp.momentum_at(t) for t in range(5)] == [0.5, 0.25, 0.125, 0.1, 0.1]
    # without a floor the momentum may reach 0: the layer accepts that and stops updating
    exp0 = M.ExponentialDecay(bn, 0.5, 0.01)
    for _ in range(400):
        exp0.step()
    assert bn.momentum == 0.0


def test_values_does_not_touch_the_layers():
    bn = mb.BatchNorm1d(2)
    sched = M.LinearDecay(bn, 0.9, 0.1, 10)
    sched.values(50)
    assert sched.last_step == 0 and bn.momentum == 0.9


# --------------------------------------------------------------------------- when the momentum is set

def test_forward_t_uses_momentum_t(rng):
    """The running statistics equal an EMA whose batch t is weighted by momentum(t)."""
    batches = batches_f64(rng, n=50)
    for make, ref in ((lambda bn: M.LinearDecay(bn, 0.9, 0.1, 40), lambda t: max(0.9 - t / 50, 0.1)),
                      (lambda bn: M.ExponentialDecay(bn, 0.9, 0.9, floor=0.02),
                       lambda t: exponential_ref(t, 0.9, 0.9, 0.02)),
                      (lambda bn: M.Cosine(bn, 0.7, 0.05, 30), lambda t: cosine_ref(t, 0.7, 0.05, 30))):
        bn = mb.BatchNorm1d(4, momentum=0.5, dtype=np.float64)   # 0.5 is overwritten at construction
        sched = make(bn)
        for x in batches:
            bn(x)
            sched.step()
        rm, rv = ema_ref(batches, [ref(t) for t in range(len(batches))])
        np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12, atol=1e-12)


def test_off_by_one_would_be_detected(rng):
    """Guard for the test above: shifting the schedule by one batch changes the result."""
    batches = batches_f64(rng, n=10)
    bn = mb.BatchNorm1d(4, dtype=np.float64)
    sched = M.LinearDecay(bn, 0.9, 0.1, 5)
    for x in batches:
        bn(x)
        sched.step()
    shifted, _ = ema_ref(batches, [linear_ref(t + 1, 0.9, 0.1, 5) for t in range(10)])
    assert np.max(np.abs(bn.running_mean - shifted)) > 1e-3


def test_cumulative_is_the_exact_average_and_equals_momentum_none(rng):
    batches = batches_f64(rng, n=25)
    bn = mb.BatchNorm1d(4, dtype=np.float64)
    sched = M.Cumulative(bn)
    bn_none = mb.BatchNorm1d(4, momentum=None, dtype=np.float64)
    for x in batches:
        bn(x)
        sched.step()
        bn_none(x)
    means = np.array([x.mean(axis=0) for x in batches])
    vars_u = np.array([x.var(axis=0, ddof=1) for x in batches])
    np.testing.assert_allclose(bn.running_mean, means.mean(axis=0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(bn.running_var, vars_u.mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, bn_none.running_mean)      # bit for bit
    np.testing.assert_array_equal(bn.running_var, bn_none.running_var)


def test_cumulative_on_a_used_layer_starts_a_new_average(rng):
    """Documented difference from momentum=None: the schedule counts its own steps."""
    old, new = batches_f64(rng, n=5), batches_f64(rng, n=7)
    bn = mb.BatchNorm1d(4, dtype=np.float64)
    for x in old:
        bn(x)
    sched = M.Cumulative(bn)
    for x in new:
        bn(x)
        sched.step()
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(axis=0) for x in new], axis=0),
                               rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------- which layers

class _CustomBN(_BatchNorm):
    """A stand-in for SyncBatchNorm or any other subclass of the shared base class."""
    _ranks = (2,)
    _rank_words = "2D"


class _Block(mb.Module):
    def __init__(self):
        super().__init__()
        self.lin = mb.Linear(4, 4, seed=0)
        self.norm = _CustomBN(4)
        self.inner = mb.Sequential(mb.BatchNorm1d(4), mb.ReLU())

    def forward(self, x):
        return self.inner(self.norm(self.lin(x)))


def test_a_model_schedule_drives_every_bn_layer_including_subclasses():
    model = mb.Sequential(mb.Linear(4, 4, seed=1), mb.BatchNorm1d(4, momentum=0.3), mb.ReLU(), _Block(),
                          mb.BatchNorm2d(4, momentum=None))
    sched = M.ExponentialDecay(model, 0.8, 0.5)
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(layers) == 4 and [id(m) for m in sched.layers] == [id(m) for m in layers]
    assert all(m.momentum == 0.8 for m in layers)
    sched.step()
    assert all(m.momentum == 0.4 for m in layers)
    assert "momentum" not in model[0].__dict__          # the Linear layer is left alone


def test_a_layer_shared_twice_is_driven_once_and_lists_are_accepted():
    bn = mb.BatchNorm1d(3)
    model = mb.Sequential(bn, mb.ReLU(), bn)
    assert len(M.Constant(model, 0.2).layers) == 1
    other = mb.BatchNorm1d(3)
    sched = M.Constant([model, other], 0.3)
    assert len(sched.layers) == 2 and bn.momentum == 0.3 and other.momentum == 0.3


def test_no_bn_layer_is_a_value_error():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        M.Constant(mb.Sequential(mb.Linear(2, 2), mb.ReLU()), 0.1)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        M.Cumulative([])
    with pytest.raises(TypeError, match="minibn Module"):
        M.Constant(42, 0.1)
    with pytest.raises(TypeError, match="minibn Modules"):
        M.Constant([mb.BatchNorm1d(2), "bn"], 0.1)


# --------------------------------------------------------------------------- invalid settings

@pytest.mark.parametrize("bad", [-0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.1", None])
def test_momentum_outside_0_1_is_a_value_error(bad):
    bn = mb.BatchNorm1d(2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.Constant(bn, bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.LinearDecay(bn, bad, 0.1, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.Cosine(bn, 0.9, bad, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.ExponentialDecay(bn, bad, 0.9)
    assert bn.momentum == 0.1            # a failed construction leaves the layer alone


@pytest.mark.parametrize("edge", [0, 0.0, 1, 1.0])
def test_schedules_and_layers_take_the_same_momenta(edge):
    """One rule, PyTorch's: a momentum in [0, 1] is valid for a layer and for a schedule alike."""
    bn = mb.BatchNorm1d(2, momentum=edge)
    assert M.Constant(bn, edge).momentum == float(edge) == bn.momentum
    assert M.LinearDecay(bn, edge, edge, 10).momentum == float(edge)


@pytest.mark.parametrize("bad", [0, -3, 2.5, 10.0, True, None, "40"])
def test_total_steps_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="total_steps"):
        M.LinearDecay(mb.BatchNorm1d(2), 0.9, 0.1, bad)
    with pytest.raises(ValueError, match="total_steps"):
        M.Cosine(mb.BatchNorm1d(2), 0.9, 0.1, bad)


@pytest.mark.parametrize("bad", [0, -0.5, 1.01, float("nan"), True])
def test_decay_rate_outside_0_1_is_a_value_error(bad):
    with pytest.raises(ValueError, match="decay_rate"):
        M.ExponentialDecay(mb.BatchNorm1d(2), 0.9, bad)


def test_floor_checks():
    with pytest.raises(ValueError, match="floor"):
        M.ExponentialDecay(mb.BatchNorm1d(2), 0.5, 0.9, floor=-0.1)
    with pytest.raises(ValueError, match="floor"):
        M.ExponentialDecay(mb.BatchNorm1d(2), 0.5, 0.9, floor=1.5)
    with pytest.raises(ValueError, match="must not exceed start"):
        M.ExponentialDecay(mb.BatchNorm1d(2), 0.5, 0.9, floor=0.6)
    M.ExponentialDecay(mb.BatchNorm1d(2), 0.5, 1.0, floor=0.5)          # the edge cases are valid


def test_numpy_scalars_are_accepted():
    bn = mb.BatchNorm1d(2)
    sched = M.LinearDecay(bn, np.float32(0.5), np.float64(0.25), np.int64(5))
    assert isinstance(sched.total_steps, int) and bn.momentum == 0.5


# --------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("make", [
    lambda m: M.LinearDecay(m, 0.9, 0.05, 17),
    lambda m: M.ExponentialDecay(m, 0.9, 0.93, floor=0.03),
    lambda m: M.Cosine(m, 0.95, 0.02, 23),
    lambda m: M.Cumulative(m),
    lambda m: M.Constant(m, 0.2),
])
def test_a_resumed_run_continues_the_schedule_exactly(make, rng, tmp_path):
    batches = [rng.normal(1.0, 2.0, size=(8, 3)).astype(np.float32) for _ in range(40)]

    def model():
        return mb.Sequential(mb.Linear(3, 3, seed=5), mb.BatchNorm1d(3), mb.ReLU(),
                             mb.Linear(3, 3, seed=6), mb.BatchNorm1d(3))

    straight = model()
    sched = make(straight)
    momenta = []
    for x in batches:
        momenta.append(straight[1].momentum)
        straight(x)
        sched.step()

    first = model()
    s1 = make(first)
    for x in batches[:13]:
        first(x)
        s1.step()
    mb.save(tmp_path / "model.npz", first.state_dict())
    (tmp_path / "sched.json").write_text(json.dumps(s1.state_dict()))

    resumed = model()
    resumed.load_state_dict(mb.load(tmp_path / "model.npz"))
    s2 = make(resumed)
    s2.load_state_dict(json.loads((tmp_path / "sched.json").read_text()))
    assert s2.last_step == 13
    resumed_momenta = []
    for x in batches[13:]:
        resumed_momenta.append(resumed[4].momentum)
        resumed(x)
        s2.step()
    assert resumed_momenta == momenta[13:]
    for key, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)


def test_load_state_dict_restores_the_settings_too():
    bn = mb.BatchNorm1d(2)
    a = M.LinearDecay(bn, 0.9, 0.1, 40)
    for _ in range(7):
        a.step()
    b = M.LinearDecay(mb.BatchNorm1d(2), 0.5, 0.5, 3)
    b.load_state_dict(a.state_dict())
    assert (b.start, b.end, b.total_steps, b.last_step) == (0.9, 0.1, 40, 7)
    assert b.layers[0].momentum == a.momentum == linear_ref(7, 0.9, 0.1, 40)
    assert b.state_dict() == a.state_dict()


@pytest.mark.parametrize("state, match", [
    ({"schedule": "Cosine", "last_step": 3, "start": 0.9, "end": 0.1, "total_steps": 40}, "Cosine"),
    ({"schedule": "LinearDecay", "start": 0.9, "end": 0.1, "total_steps": 40}, "missing keys"),
    ({"schedule": "LinearDecay", "last_step": 3, "start": 0.9, "end": 0.1, "total_steps": 40, "x": 1},
     "unknown keys"),
    ({"schedule": "LinearDecay", "last_step": -1, "start": 0.9, "end": 0.1, "total_steps": 40}, "last_step"),
    ({"schedule": "LinearDecay", "last_step": 2.5, "start": 0.9, "end": 0.1, "total_steps": 40}, "last_step"),
    ({"schedule": "LinearDecay", "last_step": 3, "start": 1.9, "end": 0.1, "total_steps": 40}, "start"),
])
def test_a_bad_state_is_rejected_and_changes_nothing(state, match):
    bn = mb.BatchNorm1d(2)
    sched = M.LinearDecay(bn, 0.8, 0.2, 10)
    sched.step()
    before = (sched.state_dict(), bn.momentum)
    with pytest.raises(ValueError, match=match):
        sched.load_state_dict(state)
    assert (sched.state_dict(), bn.momentum) == before


def test_repr_and_exports():
    sched = mb.momentum.LinearDecay(mb.BatchNorm1d(2), start=0.9, end=0.1, total_steps=40)
    text = repr(sched)
    assert "LinearDecay" in text and "last_step=0" in text and "0.9" in text
    assert "momentum" in mb.__all__ and "precise_bn" in mb.__all__


def test_sync_batchnorm_layers_are_driven():
    pytest.importorskip("mpi4py")
    model = mb.convert_sync_batchnorm(mb.Sequential(mb.Linear(3, 3, seed=0), mb.BatchNorm1d(3)))
    sched = M.Cosine(model, 0.9, 0.1, 10)
    assert type(sched.layers[0]).__name__ == "SyncBatchNorm" and sched.layers[0].momentum == 0.9
