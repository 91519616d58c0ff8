"""Precise BN: running statistics set to the exact statistics of the concatenated batches.

The references are float64 NumPy computations (``minibn.grading.reference``): the
mean and the unbiased variance of the concatenation, and for a model, a forward
pass written out layer by layer (each BN normalizing with its batch's statistics).
"""
from __future__ import annotations

import numpy as np
import pytest

import minibn as mb
from minibn.batchnorm import _BatchNorm
from minibn.grading import reference as R


def concat_stats(batches):
    """Mean and unbiased variance of the concatenation of ``batches`` along axis 0, and its count."""
    count, mean, var = R.bn_stats(np.concatenate([np.asarray(b, dtype=np.float64) for b in batches]))
    return mean, var * count / (count - 1), count


# --------------------------------------------------------------------------- one layer

@pytest.mark.parametrize("layer, shapes", [
    (lambda: mb.BatchNorm1d(3, dtype=np.float64), [(16, 3), (5, 3), (40, 3), (2, 3)]),
    (lambda: mb.BatchNorm1d(4, dtype=np.float64), [(6, 4, 7), (3, 4, 7), (9, 4, 7)]),
    (lambda: mb.BatchNorm2d(2, dtype=np.float64), [(4, 2, 3, 5), (1, 2, 3, 5), (7, 2, 3, 5)]),
])
def test_single_layer_equals_concatenation_statistics(layer, shapes, rng):
    bn = layer()
    batches = [rng.normal(5.0, 2.0, size=s) * rng.uniform(0.5, 3.0) + rng.normal() for s in shapes]
    for b in batches:                                # some EMA history to overwrite
        bn(b)
    result = mb.precise_bn(bn, batches)
    mean, var_u, total = concat_stats(batches)
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(bn.running_var, var_u, rtol=1e-13)
    (count, r_mean, r_var), = result.values()
    assert count == total
    np.testing.assert_allclose(r_var, var_u, rtol=1e-13)


def test_unequal_batches_are_weighted_per_element_not_per_batch(rng):
    """A 2-row batch and a 200-row batch: the average of batch means would be far off."""
    batches = [rng.normal(10.0, 1.0, size=(2, 2)), rng.normal(0.0, 1.0, size=(200, 2))]
    bn = mb.BatchNorm1d(2, dtype=np.float64)
    mb.precise_bn(bn, batches)
    mean, var_u, _ = concat_stats(batches)
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, var_u, rtol=1e-13)
    per_batch = np.mean([b.mean(axis=0) for b in batches], axis=0)
    assert np.all(np.abs(per_batch - mean) > 4)                         # the wrong answer is far away


def test_float32_layer_large_mean(rng):
    batches = [(1000.0 + rng.standard_normal((32, 3))).astype(np.float32) for _ in range(20)]
    bn = mb.BatchNorm1d(3)
    mb.precise_bn(bn, batches)
    mean, var_u, _ = concat_stats(batches)
    assert bn.running_mean.dtype == np.float32
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-7)
    np.testing.assert_allclose(bn.running_var, var_u, rtol=1e-5)


# --------------------------------------------------------------------------- a model

def reference_forward_stats(model_params, batches, eps=1e-5):
    """Linear -> BN -> ReLU -> Linear -> BN in float64 NumPy; the inputs each BN sees."""
    (W1, b1, g1, be1, W2, b2) = model_params
    seen1, seen2 = [], []
    for x in batches:
        h1 = x @ W1.T + b1
        seen1.append(h1)
        a1 = np.maximum(R.bn_forward(h1, g1, be1, eps)["y"], 0.0)       # batch statistics
        h2 = a1 @ W2.T + b2
        seen2.append(h2)
    return seen1, seen2


def make_model(rng):
    model = mb.Sequential(mb.Linear(5, 6, seed=11, dtype=np.float64), mb.BatchNorm1d(6, dtype=np.float64),
                          mb.ReLU(), mb.Linear(6, 4, seed=12, dtype=np.float64),
                          mb.BatchNorm1d(4, dtype=np.float64))
    model[1].weight.data[...] = rng.uniform(0.5, 2.0, 6)      # non-trivial gamma and beta
    model[1].bias.data[...] = rng.normal(0.0, 0.5, 6)
    return model


def test_model_with_two_bn_layers_in_sequence(rng):
    model = make_model(rng)
    batches = [rng.normal([1, -2, 3, 0, 5], [1, 2, 0.5, 3, 1], size=(n, 5)) for n in (16, 16, 9, 30, 16)]
    for b in batches:                     # EMA history, which precise BN must replace
        model(b)
    params = (model[0].weight.data, model[0].bias.data, model[1].weight.data, model[1].bias.data,
              model[3].weight.data, model[3].bias.data)
    seen1, seen2 = reference_forward_stats([np.array(p) for p in params], batches)
    result = mb.precise_bn(model, batches)
    for layer, seen in ((model[1], seen1), (model[4], seen2)):
        mean, var_u, _ = concat_stats(seen)
        np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_var, var_u, rtol=1e-12)
    assert set(result) == {"1", "4"} and result["4"][0] == sum(len(b) for b in batches)


def test_the_second_layer_sees_batch_normalized_input(rng):
    """Guard: population statistics of the second layer differ from those of a model whose
    first BN used the population statistics: precise BN must run the model in training mode."""
    model = make_model(rng)
    batches = [rng.normal(3.0, 2.0, size=(4, 5)) for _ in range(6)]    # small batches: big difference
    model.eval()
    mb.precise_bn(model, batches)
    model.eval()
    h2_eval = [model[3](model[2](model[1](model[0](b)))) for b in batches]
    eval_mean, _, _ = concat_stats(h2_eval)
    assert np.max(np.abs(eval_mean - model[4].running_mean)) > 1e-3


# --------------------------------------------------------------------------- restoring state

def snapshot(model):
    out = {"modes": [m.training for m in model.modules()],
           "momenta": [m.momentum for m in model.modules() if isinstance(m, _BatchNorm)],
           "attrs": [sorted(m.__dict__) for m in model.modules()]}
    for k, v in model.state_dict().items():
        out[k] = np.array(v, copy=True)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def test_modes_momentum_and_attributes_are_restored(rng):
    model = make_model(rng)
    model[4].momentum = None
    model.eval()
    model[1].train()                     # a mixed state must come back as it was
    before = snapshot(model)
    batches = [rng.normal(size=(8, 5)) for _ in range(4)]
    mb.precise_bn(model, batches)
    after = snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["momenta"] == before["momenta"]
    assert after["attrs"] == before["attrs"] or all(
        set(a) - set(b) <= {"_cache", "_empty_shape", "_x", "_mask"}
        for a, b in zip(after["attrs"], before["attrs"]))
    assert "_batch_statistics" not in model[1].__dict__
    assert int(model[1].num_batches_tracked) == int(before["1.num_batches_tracked"]) + 4


@pytest.mark.parametrize("where", ["forward", "no_batches", "one_value"])
def test_on_error_nothing_is_changed(where, rng):
    model = make_model(rng)
    for b in [rng.normal(size=(8, 5)) for _ in range(3)]:
        model(b)
    model.eval()
    before = snapshot(model)
    if where == "forward":
        good = [rng.normal(size=(8, 5)) for _ in range(3)]

        def batches():
            yield from good
            raise RuntimeError("the data loader broke")
        with pytest.raises(RuntimeError, match="data loader broke"):
            mb.precise_bn(model, batches())
    elif where == "no_batches":
        with pytest.raises(ValueError, match="no batches"):
            mb.precise_bn(model, [])
    else:
        bn = model[1]
        with pytest.raises(ValueError):
            mb.precise_bn(model, [rng.normal(size=(1, 5))])    # one value per channel: BN refuses
        assert bn.training is False
    after = snapshot(model)
    for k in before:
        if k == "attrs":
            continue
        if isinstance(before[k], np.ndarray):
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        else:
            assert after[k] == before[k], k
    assert "_batch_statistics" not in model[1].__dict__


def test_forward_argument_and_generators(rng):
    pairs = [(rng.normal(size=(10, 3)), rng.integers(0, 2, 10)) for _ in range(5)]
    bn = mb.BatchNorm1d(3, dtype=np.float64)
    mb.precise_bn(bn, (p for p in pairs), forward=lambda batch: bn(batch[0]))
    mean, var_u, _ = concat_stats([p[0] for p in pairs])
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, var_u, rtol=1e-13)


def test_subclass_hook_is_recorded_and_restored(rng):
    """A layer whose ``_batch_statistics`` is overridden (as SyncBatchNorm does) is recorded
    through the override, and an instance-level override survives the call."""
    calls = []

    class Counting(mb.BatchNorm1d):
        def _batch_statistics(self, x):
            calls.append(x.shape[0])
            return super()._batch_statistics(x)

    bn = Counting(2, dtype=np.float64)
    batches = [rng.normal(size=(n, 2)) for n in (3, 4)]
    mb.precise_bn(bn, batches)
    assert calls == [3, 4]
    np.testing.assert_allclose(bn.running_mean, concat_stats(batches)[0], rtol=1e-13)

    plain = mb.BatchNorm1d(2, dtype=np.float64)
    marker = plain._batch_statistics
    object.__setattr__(plain, "_batch_statistics", marker)
    mb.precise_bn(plain, batches)
    assert plain.__dict__["_batch_statistics"] is marker


def test_models_without_running_statistics_are_rejected():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        mb.precise_bn(mb.Sequential(mb.Linear(2, 2)), [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="track_running_stats"):
        mb.precise_bn(mb.BatchNorm1d(2, track_running_stats=False), [np.ones((3, 2))])
    with pytest.raises(TypeError, match="minibn Module"):
        mb.precise_bn([mb.BatchNorm1d(2)], [np.ones((3, 2))])
    with pytest.raises(TypeError, match="forward"):
        mb.precise_bn(mb.BatchNorm1d(2), [np.ones((3, 2))], forward="model")


def test_precise_statistics_are_what_eval_mode_uses(rng):
    bn = mb.BatchNorm1d(3, dtype=np.float64)
    batches = [rng.normal(2.0, 3.0, size=(12, 3)) for _ in range(6)]
    mb.precise_bn(bn, batches)
    bn.eval()
    x = rng.normal(size=(4, 3))
    mean, var_u, _ = concat_stats(batches)
    np.testing.assert_allclose(bn(x), (x - mean) / np.sqrt(var_u + bn.eps), rtol=1e-12)


def test_sync_batchnorm_single_process(rng):
    """SyncBatchNorm records its (global) moments through the same hook; with one process
    the result is the statistics of the concatenation."""
    pytest.importorskip("mpi4py")
    from minibn.distributed import SyncBatchNorm
    model = mb.Sequential(mb.Linear(3, 4, seed=2, dtype=np.float64), SyncBatchNorm(4, dtype=np.float64))
    batches = [rng.normal(1.0, 2.0, size=(n, 3)) for n in (5, 9, 16)]
    mb.precise_bn(model, batches)
    h = [b @ model[0].weight.data.T + model[0].bias.data for b in batches]
    mean, var_u, _ = concat_stats(h)
    np.testing.assert_allclose(model[1].running_mean, mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(model[1].running_var, var_u, rtol=1e-12)
    assert "_batch_statistics" not in model[1].__dict__


@pytest.mark.gpu
def test_precise_bn_on_the_gpu(rng):
    cupy = pytest.importorskip("cupy")
    if not mb.backend.cupy_available():
        pytest.skip("CuPy is installed but sees no CUDA device")
    previous = mb.get_backend().__name__
    mb.set_backend("cupy")
    try:
        model = mb.Sequential(mb.Linear(3, 4, seed=2, dtype=np.float64), mb.BatchNorm1d(4, dtype=np.float64))
    finally:
        mb.set_backend(previous)
    host = [rng.normal(1.0, 2.0, size=(n, 3)) for n in (5, 9, 16)]
    mb.precise_bn(model, [cupy.asarray(b) for b in host])
    W, b = cupy.asnumpy(model[0].weight.data), cupy.asnumpy(model[0].bias.data)
    mean, var_u, _ = concat_stats([x @ W.T + b for x in host])
    np.testing.assert_allclose(cupy.asnumpy(model[1].running_mean), mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cupy.asnumpy(model[1].running_var), var_u, rtol=1e-12)
