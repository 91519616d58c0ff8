"""minibn against torch.nn.BatchNorm1d/2d/3d, step by step (skipped without PyTorch)."""
import inspect

import numpy as np
import pytest

import minibn as mb

torch = pytest.importorskip("torch")

PAIRS = {
    "1d-2D": (mb.BatchNorm1d, torch.nn.BatchNorm1d, (8, 3)),
    "1d-3D": (mb.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
    "2d": (mb.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 3, 2)),
    "3d": (mb.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 3, 2)),
}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64, np.float16: torch.float16}
TOL = {np.float32: 1e-5, np.float64: 1e-12, np.float16: 5e-3}


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = b.detach().to(torch.float64).numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def make_pair(name, dtype, momentum=0.1, affine=True, track=True, seed=0, bias=True):
    ours_cls, theirs_cls, shape = PAIRS[name]
    C = shape[1]
    no_bias = {} if bias else {"bias": False}
    ours = ours_cls(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype,
                    **no_bias)
    theirs = theirs_cls(C, momentum=momentum, affine=affine, track_running_stats=track,
                        dtype=TORCH_DTYPE[dtype], **no_bias)
    if affine:
        rng = np.random.default_rng(seed)
        w, b = rng.normal(1.0, 0.5, C).astype(dtype), rng.normal(size=C).astype(dtype)
        ours.weight.data[...] = w
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(w))
        if bias:
            ours.bias.data[...] = b
            with torch.no_grad():
                theirs.bias.copy_(torch.from_numpy(b))
    return ours, theirs, shape


def step(ours, theirs, x, dy):
    """One forward + backward on both; returns the pairs to compare."""
    ours.zero_grad()
    theirs.zero_grad()
    y = ours(x)
    dx = ours.backward(dy)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = theirs(xt)
    yt.backward(torch.from_numpy(dy))
    out = {"y": (y, yt), "dx": (dx, xt.grad)}
    if ours.affine:
        out["dweight"] = (ours.weight.grad, theirs.weight.grad)
    if ours.affine and ours.bias is not None:
        out["dbias"] = (ours.bias.grad, theirs.bias.grad)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    return out


def compare_buffers(ours, theirs, tol):
    if not ours.track_running_stats:
        assert theirs.running_mean is None
        return
    assert rel(ours.running_mean, theirs.running_mean) < tol
    assert rel(ours.running_var, theirs.running_var) < tol
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def run_steps(name, dtype, momentum, affine=True, track=True, steps=4, seed=0, bias=True):
    ours, theirs, shape = make_pair(name, dtype, momentum, affine, track, seed, bias)
    rng = np.random.default_rng(seed + 1)
    tol = TOL[dtype]
    for loc, scale in [(1.0, 1.0), (5.0, 2.0), (-2.0, 0.5), (0.0, 3.0)][:steps]:
        x = rng.normal(loc, scale, shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        for key, (a, b) in step(ours, theirs, x, dy).items():
            # dx is a difference of O(1) terms: allow a few more roundings than the forward
            assert rel(a, b) < (10 * tol if key == "dx" else tol), key
        compare_buffers(ours, theirs, tol)
    ours.eval()
    theirs.eval()
    x = rng.normal(2.0, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    for key, (a, b) in step(ours, theirs, x, dy).items():
        assert rel(a, b) < (10 * tol if key == "dx" else tol), ("eval", key)
    compare_buffers(ours, theirs, tol)
    return ours, theirs


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, 0.9, None, 0.0, 1.0])
def test_steps_match_torch(name, dtype, momentum):
    run_steps(name, dtype, momentum)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_affine_and_tracking_options_match_torch(name, dtype, affine, track):
    run_steps(name, dtype, 0.1, affine=affine, track=track)


def test_float16_matches_torch():
    run_steps("2d", np.float16, 0.1)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_state_dict_keys_equal_torch(affine, track):
    for name, (ours_cls, theirs_cls, shape) in PAIRS.items():
        ours = ours_cls(shape[1], affine=affine, track_running_stats=track)
        theirs = theirs_cls(shape[1], affine=affine, track_running_stats=track)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for k, v in theirs.state_dict().items():
            assert tuple(ours.state_dict()[k].shape) == tuple(v.shape), k
    ours = mb.Sequential(mb.BatchNorm1d(2), mb.BatchNorm2d(3, affine=False))
    theirs = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.BatchNorm2d(3, affine=False))
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_state_dict_exchange_with_torch():
    rng = np.random.default_rng(3)
    ours, theirs, shape = make_pair("2d", np.float32)
    for _ in range(3):
        theirs(torch.from_numpy(rng.normal(3.0, 2.0, shape).astype(np.float32)))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    ours.eval()
    theirs.eval()
    x = rng.normal(size=shape).astype(np.float32)
    assert rel(ours(x), theirs(torch.from_numpy(x))) < 1e-6
    # and back: a minibn state dict loads into torch
    ours.train()
    ours(rng.normal(-1.0, 1.0, shape).astype(np.float32))
    theirs.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in ours.state_dict().items()})
    assert rel(ours.running_mean, theirs.running_mean) == 0.0
    assert int(theirs.num_batches_tracked) == int(ours.num_batches_tracked)


def test_one_value_per_channel_is_an_error_in_both():
    x = np.ones((1, 3), dtype=np.float32)
    with pytest.raises(ValueError):
        torch.nn.BatchNorm1d(3)(torch.from_numpy(x))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mb.BatchNorm1d(3)(x)
    # (1, C, L > 1) is fine in both
    x = np.random.default_rng(0).normal(size=(1, 3, 4)).astype(np.float32)
    assert rel(mb.BatchNorm1d(3)(x), torch.nn.BatchNorm1d(3)(torch.from_numpy(x))) < 1e-5


def test_empty_batch_documented_difference():
    ours, theirs, shape = make_pair("1d-2D", np.float32)
    empty = np.zeros((0, 3), dtype=np.float32)
    assert ours(empty).shape == (0, 3) and theirs(torch.from_numpy(empty)).shape == (0, 3)
    compare_running = rel(ours.running_mean, theirs.running_mean) == 0.0 and \
        rel(ours.running_var, theirs.running_var) == 0.0
    assert compare_running                              # both leave the statistics alone ...
    assert int(theirs.num_batches_tracked) == 1         # ... PyTorch counts the empty batch,
    assert int(ours.num_batches_tracked) == 0           # minibn does not (see _BatchNorm's docstring)
    assert "num_batches_tracked" in type(ours).__mro__[1].__doc__


# --------------------------------------------------------------------------- bias=False (keyword only)

@pytest.mark.parametrize("ours_cls,theirs_cls", [
    (mb.BatchNorm1d, torch.nn.BatchNorm1d), (mb.BatchNorm2d, torch.nn.BatchNorm2d),
    (mb.BatchNorm3d, torch.nn.BatchNorm3d), (mb.SyncBatchNorm, torch.nn.SyncBatchNorm)])
def test_bias_is_keyword_only_like_torch(ours_cls, theirs_cls):
    ours = inspect.signature(ours_cls).parameters["bias"]
    theirs = inspect.signature(theirs_cls).parameters["bias"]
    assert (ours.kind, ours.default) == (theirs.kind, theirs.default) == (inspect.Parameter.KEYWORD_ONLY, True)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False])
def test_bias_false_matches_torch(name, dtype, affine):
    """bias=False: weight stays a parameter (with affine=True), bias is None and not in the state
    dict; outputs, dx, dweight and running statistics equal PyTorch's, in training and eval."""
    ours, theirs = run_steps(name, dtype, 0.1, affine=affine, bias=False)
    assert ours.bias is None and theirs.bias is None
    assert (ours.weight is None) == (theirs.weight is None) == (not affine)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)


def test_sync_batchnorm_bias_false_and_conversion_keep_it():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 3, 4)).astype(np.float32)
    theirs = torch.nn.BatchNorm1d(3, bias=False)
    sync = mb.SyncBatchNorm(3, bias=False)
    assert sync.bias is None and list(sync.state_dict()) == list(theirs.state_dict())
    assert rel(sync(x), theirs(torch.from_numpy(x))) < 1e-5
    model = mb.Sequential(mb.BatchNorm1d(3, bias=False), mb.BatchNorm1d(3), mb.BatchNorm1d(3, affine=False))
    weight = model[0].weight
    converted = mb.convert_sync_batchnorm(model)
    assert isinstance(converted[0], mb.SyncBatchNorm) and converted[0].bias is None
    assert converted[0].weight is weight                     # the same Parameter, shared
    assert converted[1].bias is not None and converted[2].weight is None
    assert [list(m.state_dict()) for m in converted] == [
        list(m.state_dict()) for m in (theirs, torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3, affine=False))]
    dy = rng.normal(size=x.shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    theirs.zero_grad()
    theirs(xt).backward(torch.from_numpy(dy))
    converted[0](x)
    dx = converted[0].backward(dy)
    assert rel(dx, xt.grad) < 1e-4 and rel(converted[0].weight.grad, theirs.weight.grad) < 1e-5


# --------------------------------------------------------------------------- eps

def test_eps_zero_is_an_error_in_both():
    x = np.ones((4, 3), dtype=np.float32)               # a constant channel
    with pytest.raises(ValueError, match="eps must be positive"):
        torch.nn.BatchNorm1d(3, eps=0)(torch.from_numpy(x))
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got 0"):
        mb.BatchNorm1d(3, eps=0)(x)
    # a NumPy float32 eps is accepted by both, with the same result
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    eps = np.float32(0.5)
    assert rel(mb.BatchNorm1d(3, eps=eps)(x), torch.nn.BatchNorm1d(3, eps=eps)(torch.from_numpy(x))) < 1e-6
