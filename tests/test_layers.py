"""The small layers the lessons train with: Linear, ReLU, Sequential, CrossEntropyLoss, SGD.

Backward passes are checked against central finite differences (float64);
forward passes and SGD against formulas written here and, where installed,
against PyTorch.
"""
from __future__ import annotations

import numpy as np
import pytest

import minibn as mb
from minibn.gradcheck import check_layer, numerical_gradient, rel_error


def away_from_zero(rng, shape, margin=0.1):
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < margin, np.sign(x + 1e-12) * margin * 2, x)


def test_linear_forward_is_x_wt_plus_b(rng):
    lin = mb.Linear(4, 3, seed=0, dtype=np.float64)
    x = rng.standard_normal((5, 4))
    want = np.einsum("nk,ok->no", x, lin.weight.data) + lin.bias.data
    np.testing.assert_allclose(lin(x), want, rtol=1e-14)
    bound = 1 / np.sqrt(4)
    assert np.all(np.abs(lin.weight.data) <= bound) and lin.weight.shape == (3, 4)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(rng, bias):
    lin = mb.Linear(4, 3, bias=bias, seed=1)
    errors = check_layer(lin, rng.standard_normal((6, 4)))
    assert set(errors) == ({"input", "weight", "bias"} if bias else {"input", "weight"})
    assert max(errors.values()) < 1e-8, errors


def test_relu_forward_and_gradient(rng):
    x = away_from_zero(rng, (5, 7))
    relu = mb.ReLU()
    assert np.array_equal(relu(x), np.maximum(x, 0))
    assert check_layer(relu, x)["input"] < 1e-8


def test_sequential_gradients_through_batchnorm(rng):
    model = mb.Sequential(mb.Linear(3, 5, seed=2), mb.BatchNorm1d(5), mb.ReLU(), mb.Linear(5, 2, seed=3))
    errors = check_layer(model, rng.standard_normal((8, 3)))
    assert {"input", "0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"} == set(errors)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_value_and_gradient(rng, reduction):
    logits = rng.standard_normal((6, 4)) * 3
    targets = rng.integers(0, 4, 6)
    loss_fn = mb.CrossEntropyLoss(reduction)
    loss = loss_fn(logits, targets)
    # -log softmax, written out
    per_sample = -logits[np.arange(6), targets] + np.log(np.exp(logits).sum(axis=1))
    assert loss == pytest.approx(per_sample.mean() if reduction == "mean" else per_sample.sum(), rel=1e-13)
    grad = loss_fn.backward()
    numeric = numerical_gradient(lambda: loss_fn(logits, targets), logits)
    assert rel_error(grad, numeric) < 1e-8


def test_cross_entropy_is_stable_for_huge_logits():
    loss_fn = mb.CrossEntropyLoss()
    loss = loss_fn(np.array([[1000.0, 0.0], [0.0, 1000.0]]), np.array([0, 0]))
    assert np.isfinite(loss) and loss == pytest.approx(500.0)
    assert np.all(np.isfinite(loss_fn.backward()))


def test_cross_entropy_rejects_bad_targets():
    loss_fn = mb.CrossEntropyLoss()
    with pytest.raises(ValueError):
        loss_fn(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError):
        loss_fn(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError):
        mb.CrossEntropyLoss("none")


def test_sum_reduction_split_over_parts_adds_up(rng):
    """What data parallelism relies on: the sum over parts of 'sum' losses and gradients."""
    logits, targets = rng.standard_normal((9, 3)), rng.integers(0, 3, 9)
    whole = mb.CrossEntropyLoss("mean")
    total = whole(logits, targets)
    g_whole = whole.backward()
    parts = mb.CrossEntropyLoss("sum")
    acc, grads = 0.0, []
    for sl in (slice(0, 2), slice(2, 9)):
        acc += parts(logits[sl], targets[sl])
        grads.append(parts.backward())
    assert acc / 9 == pytest.approx(total, rel=1e-14)
    np.testing.assert_allclose(np.concatenate(grads) / 9, g_whole, rtol=1e-13)


def test_sgd_with_momentum_and_weight_decay_follows_the_update_rule(rng):
    p = mb.Parameter(rng.standard_normal(4))
    w = p.data.copy()
    opt = mb.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    v = np.zeros(4)
    for step in range(3):
        g = rng.standard_normal(4)
        p.grad = g.copy()
        opt.step()
        d = g + 0.01 * w                       # weight decay adds wd * w to the gradient
        v = d if step == 0 else 0.9 * v + d    # heavy ball: v <- mu v + d (v = d at first)
        w = w - 0.1 * v
        np.testing.assert_allclose(p.data, w, rtol=1e-14)
    opt.zero_grad()
    assert p.grad is None
    before = p.data.copy()
    opt.step()                                 # no gradient: no update
    assert np.array_equal(p.data, before)


def test_sgd_matches_torch(rng):
    torch = pytest.importorskip("torch")
    w0 = rng.standard_normal((3, 2))
    grads = [rng.standard_normal((3, 2)) for _ in range(4)]
    p = mb.Parameter(w0.copy())
    opt = mb.SGD([p], lr=0.05, momentum=0.8, weight_decay=0.1)
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.SGD([tp], lr=0.05, momentum=0.8, weight_decay=0.1)
    for g in grads:
        p.grad = g.copy()
        opt.step()
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-13)


def test_sgd_rejects_bad_settings():
    p = mb.Parameter(np.zeros(2))
    for kw in ({"lr": 0.0}, {"lr": 0.1, "momentum": 1.0}, {"lr": -1.0}):
        with pytest.raises(ValueError):
            mb.SGD([p], **kw)


def test_linear_float32_stays_float32(rng):
    lin = mb.Linear(3, 2, seed=0)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = lin(x)
    dx = lin.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == lin.weight.grad.dtype == np.float32
