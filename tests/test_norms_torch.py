"""LayerNorm, GroupNorm, InstanceNorm against PyTorch: outputs, dx, dweight, dbias, running stats.

The reference is PyTorch in float64 on the same values.  For float32 input minibn is
also compared with PyTorch's own float32 result, more loosely: minibn accumulates
the statistics in float64 and is the more accurate of the two (with two values per
group, PyTorch float32's dx is off by ~1e-3 of its largest value, minibn's by ~1e-6).
"""
from __future__ import annotations

import numpy as np
import pytest

import minibn as mb

torch = pytest.importorskip("torch")

T64, T32 = torch.float64, torch.float32


def _close(ours, ref, dtype, what, loose=False):
    """Max error relative to the largest reference value."""
    ref = np.asarray(ref, dtype=np.float64)
    if ref.size == 0:
        return
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    allowed = 1e-10 if dtype == np.float64 else (3e-3 if loose else 2e-5)
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - ref))) / scale
    assert err < allowed, f"{what}: max error {err:.3g} of the largest value, allowed {allowed}"


class Pair:
    """A minibn layer and PyTorch twins (float64 and float32) with the same gamma/beta."""

    def __init__(self, ours, make_theirs, rng, dtype):
        self.ours, self.dtype = ours, dtype
        self.theirs = {T64: make_theirs(T64)}
        if dtype == np.float32:
            self.theirs[T32] = make_theirs(T32)
        for name, p in ours.named_parameters():
            p.data[...] = rng.standard_normal(p.shape).astype(dtype)
            for t in self.theirs.values():
                getattr(t, name).data.copy_(torch.from_numpy(np.asarray(p.data, np.float64)))

    def compare(self, x, rng, train=True):
        ours, dtype = self.ours, self.dtype
        ours.train(train)
        ours.zero_grad()
        y = ours(x)
        assert y.dtype == dtype
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = ours.backward(dy)
        assert dx.dtype == dtype
        for tdt, t in self.theirs.items():
            t.train(train)
            t.zero_grad()
            xt = torch.tensor(x, dtype=tdt, requires_grad=True)
            yt = t(xt)
            yt.backward(torch.tensor(dy, dtype=tdt))
            loose = tdt == T32
            assert y.shape == tuple(yt.shape)
            _close(y, yt.detach().numpy(), dtype, f"y vs torch {tdt}", loose)
            _close(dx, xt.grad.numpy(), dtype, f"dx vs torch {tdt}", loose)
            for name, p in ours.named_parameters():
                _close(p.grad, getattr(t, name).grad.numpy(), dtype, f"d{name} vs torch {tdt}", loose)
        return y

    def feed(self, x):
        """A training forward in all layers (running statistics move)."""
        self.ours.train()
        self.ours(x)
        for tdt, t in self.theirs.items():
            t.train()
            t(torch.tensor(x, dtype=tdt))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ns,affine,bias", [
    ((7, 10), (10,), True, True), ((5, 3, 2, 4), (2, 4), True, True), ((2, 3, 6), (3, 6), False, True),
    ((4, 3, 5), (5,), True, False), ((2, 2, 3, 2, 2), (3, 2, 2), True, True), ((9,), (9,), True, True)])
def test_layer_norm_matches_torch(rng, dtype, shape, ns, affine, bias):
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    pair = Pair(mb.LayerNorm(ns, elementwise_affine=affine, bias=bias, dtype=dtype),
                lambda d: torch.nn.LayerNorm(ns, elementwise_affine=affine, bias=bias, dtype=d), rng, dtype)
    pair.compare(x, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,G,affine", [
    ((3, 12, 5), 4, True), ((2, 6, 3, 3, 2), 2, True), ((5, 4), 2, True), ((2, 8, 4, 4), 8, False),
    ((3, 6, 7), 1, True), ((1, 10, 3, 2), 5, False)])
def test_group_norm_matches_torch(rng, dtype, shape, G, affine):
    x = (rng.standard_normal(shape) * 2 - 3).astype(dtype)
    pair = Pair(mb.GroupNorm(G, shape[1], affine=affine, dtype=dtype),
                lambda d: torch.nn.GroupNorm(G, shape[1], affine=affine, dtype=d), rng, dtype)
    pair.compare(x, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ours_cls,theirs_cls,shape", [
    (mb.InstanceNorm1d, torch.nn.InstanceNorm1d, (4, 5, 7)),
    (mb.InstanceNorm2d, torch.nn.InstanceNorm2d, (3, 2, 5, 4)),
    (mb.InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 6)),          # unbatched (C, L)
    (mb.InstanceNorm2d, torch.nn.InstanceNorm2d, (2, 4, 3)),       # unbatched (C, H, W)
    (mb.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 3, 2, 3, 2))])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_matches_torch(rng, dtype, ours_cls, theirs_cls, shape, affine):
    C = shape[0] if len(shape) == ours_cls._spatial_dims + 1 else shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    pair = Pair(ours_cls(C, affine=affine, dtype=dtype),
                lambda d: theirs_cls(C, affine=affine, dtype=d), rng, dtype)
    pair.compare(x, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_running_stats_match_torch(rng, dtype, affine):
    C = 3
    pair = Pair(mb.InstanceNorm2d(C, momentum=0.3, affine=affine, track_running_stats=True, dtype=dtype),
                lambda d: torch.nn.InstanceNorm2d(C, momentum=0.3, affine=affine, track_running_stats=True,
                                                  dtype=d), rng, dtype)
    for shape in ((4, C, 3, 5), (2, C, 2, 2), (5, C, 4, 1)):
        pair.feed((rng.standard_normal(shape) * 1.5 + 2).astype(dtype))
        for name in ("running_mean", "running_var"):
            for tdt, t in pair.theirs.items():
                _close(getattr(pair.ours, name), getattr(t, name).numpy(), dtype, name, tdt == T32)
    t64 = pair.theirs[T64]
    assert int(pair.ours.num_batches_tracked) == int(t64.num_batches_tracked)
    assert list(pair.ours.state_dict()) == list(t64.state_dict())
    # eval mode normalizes with the running statistics: output and gradients match too
    pair.compare((rng.standard_normal((2, C, 3, 3)) + 1).astype(dtype), rng, train=False)
    pair.compare((rng.standard_normal((C, 2, 2)) + 1).astype(dtype), rng, train=False)   # unbatched


def test_spatial_size_one_errors_like_torch(rng):
    x = rng.standard_normal((4, 3, 1))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        torch.nn.InstanceNorm1d(3)(torch.from_numpy(x))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        mb.InstanceNorm1d(3)(x)
    # with tracked running statistics, eval mode is fine in both
    y_t = torch.nn.InstanceNorm1d(3, track_running_stats=True, dtype=T64).eval()(torch.from_numpy(x))
    y_o = mb.InstanceNorm1d(3, track_running_stats=True, dtype=np.float64).eval()(x)
    _close(y_o, y_t.numpy(), np.float64, "y")


def test_state_dict_keys_match_torch():
    pairs = [(mb.LayerNorm((2, 3)), torch.nn.LayerNorm((2, 3))),
             (mb.LayerNorm(4, bias=False), torch.nn.LayerNorm(4, bias=False)),
             (mb.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4)),
             (mb.InstanceNorm1d(3), torch.nn.InstanceNorm1d(3)),
             (mb.InstanceNorm2d(3, affine=True, track_running_stats=True),
              torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True))]
    for ours, theirs in pairs:
        a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert a == b
        ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})


def test_one_value_per_group_or_row(rng):
    """Statistics over one value make the output the bias whatever the input.  Where PyTorch
    raises (a GroupNorm batch of one), minibn raises the same ValueError; where PyTorch returns
    that constant output (more samples; LayerNorm over one element), minibn raises too."""
    x1 = rng.standard_normal((1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value"):
        torch.nn.GroupNorm(3, 3, dtype=T64)(torch.from_numpy(x1))
    with pytest.raises(ValueError, match="Expected more than 1 value per group"):
        mb.GroupNorm(3, 3)(x1)
    x4 = rng.standard_normal((4, 3))
    with torch.no_grad():
        assert float(torch.nn.GroupNorm(3, 3, dtype=T64)(torch.from_numpy(x4)).abs().max()) < 1e-2
    with pytest.raises(ValueError, match="Expected more than 1 value per group"):
        mb.GroupNorm(3, 3)(x4)
    x = rng.standard_normal((4, 1))
    with torch.no_grad():
        assert float(torch.nn.LayerNorm(1, dtype=T64)(torch.from_numpy(x)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="Expected more than 1 value in normalized_shape"):
        mb.LayerNorm(1)(x)
