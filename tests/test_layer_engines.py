"""The layer side of the engines: a per-layer choice, validated on assignment; the backward on
the engine of the forward; the choice kept by convert_sync_batchnorm."""
import numpy as np
import pytest

import minibn as mb
from minibn.engines import Engine, get_engine, using_engine


class _Recording(Engine):
    """The reference engine, recording which of its methods ran."""

    name = "recording"

    def __init__(self):
        self.calls = []
        self._reference = get_engine("reference")

    def statistics(self, x):
        self.calls.append("statistics")
        return self._reference.statistics(x)

    def forward_train(self, x, weight=None, bias=None, eps=1e-5, stats=None):
        self.calls.append("forward_train")
        return self._reference.forward_train(x, weight, bias, eps, stats)

    def forward_eval(self, x, mean, var, weight=None, bias=None, eps=1e-5):
        self.calls.append("forward_eval")
        return self._reference.forward_eval(x, mean, var, weight, bias, eps)

    def backward(self, dy, cache, reduce=None):
        self.calls.append("backward")
        return self._reference.backward(dy, cache, reduce)


def test_engine_is_none_by_default_and_validated_on_assignment():
    bn = mb.BatchNorm1d(3)
    assert bn.engine is None
    bn.engine = "reference"
    assert bn.engine is get_engine("reference")
    with pytest.raises(ValueError, match="expected one of"):
        bn.engine = "no-such-engine"
    assert bn.engine is get_engine("reference")          # unchanged after a refused assignment
    with pytest.raises(ValueError, match="expected one of"):
        mb.BatchNorm1d(3, engine="no-such-engine")
    assert "engine='reference'" in repr(bn) and "engine" not in repr(mb.BatchNorm1d(3))


def test_the_layer_engine_wins_over_a_using_engine_block_and_runs_the_backward(rng):
    engine = _Recording()
    bn = mb.BatchNorm2d(3, engine=engine, dtype=np.float64)
    x = rng.normal(size=(4, 3, 2, 2))
    with using_engine("numpy"):
        y = bn(x)
        bn.backward(np.ones_like(y))
        bn.eval()
        bn(x)
    assert engine.calls == ["statistics", "forward_train", "backward", "forward_eval"]
    plain = mb.BatchNorm2d(3, dtype=np.float64, engine="reference")
    np.testing.assert_array_equal(y, plain(x))


def test_the_backward_runs_on_the_engine_of_the_forward(rng):
    engine = _Recording()
    bn = mb.BatchNorm1d(3, dtype=np.float64)
    x = rng.normal(size=(8, 3))
    with using_engine(engine):
        y = bn(x)
    bn.backward(np.ones_like(y))                          # outside the block: still that engine
    assert engine.calls == ["statistics", "forward_train", "backward"]


def test_a_failed_forward_leaves_nothing_to_backpropagate(rng):
    bn = mb.BatchNorm1d(3, dtype=np.float64)
    bn(rng.normal(size=(8, 3)))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(rng.normal(size=(1, 3)))
    with pytest.raises(RuntimeError, match="before forward"):
        bn.backward(np.ones((1, 3)))


def test_convert_sync_batchnorm_keeps_the_engine():
    pytest.importorskip("mpi4py")
    model = mb.Sequential(mb.BatchNorm1d(3, engine="reference"), mb.BatchNorm1d(3))
    sync = mb.convert_sync_batchnorm(model)
    assert sync[0].engine is get_engine("reference") and sync[1].engine is None
